"""Errors a user can fix. The CLI prints them as one paragraph and exits with status 2."""


class SaelabError(Exception):
    """Base class: the message names the problem and the fix; no traceback is shown."""

    exit_code = 2


class ModelNotFoundError(SaelabError):
    """A model name or path that cannot be loaded."""


class UnknownHookError(SaelabError):
    """A hook point name that the model does not have."""


class DimensionMismatchError(SaelabError):
    """A dictionary whose width does not match the activations it is given."""


class DictionaryFileError(SaelabError):
    """A dictionary file that is missing, corrupt, truncated, foreign or unsafe to load."""


class DataError(SaelabError):
    """A dataset that is empty, too short, unreadable or of an unknown format."""


class ActivationError(SaelabError):
    """Activations that cannot be trained on (NaN or inf values, wrong shape)."""


class RunFolderError(SaelabError):
    """A run folder in the wrong state: no checkpoint to resume, or a finished run in the way."""
