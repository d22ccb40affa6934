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


class DictionarySetError(SaelabError):
    """A dictionary set with a missing layer, or a member at the wrong hook, layer or width."""


class DictionaryConfigError(SaelabError, ValueError):
    """A dictionary setting that cannot work (e.g. Matryoshka prefix widths that do not nest up to d_sae)."""


class DataError(SaelabError):
    """A dataset that is empty, too short, unreadable or of an unknown format."""


class ActivationError(SaelabError):
    """Activations that cannot be trained on (NaN or inf values, wrong shape)."""


class RunFolderError(SaelabError):
    """A run folder in the wrong state: no checkpoint to resume, or a finished run in the way."""


class DeviceError(SaelabError):
    """A device or dtype that cannot be used here (unknown name, CUDA asked for but absent, ...)."""


class FeatureStoreError(SaelabError):
    """A feature store file that is foreign, corrupt, of another schema version, or incomplete."""


class InterventionError(SaelabError):
    """An intervention that cannot be applied: bad scope, wrong width, zero or non-finite direction."""


class DirectionFileError(SaelabError):
    """A direction-set folder that is missing, corrupt, truncated, foreign or unsafe to load."""


class DirectionLookupError(SaelabError, KeyError):
    """A hook or position that a direction set does not hold."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class DecompositionError(SaelabError, ValueError):
    """A vector or setting that cannot be decomposed (zero vector, n_features out of range, ...)."""


class ProbeError(SaelabError, ValueError):
    """Data a probe cannot be trained on: one class, too few samples, mismatched lengths, bad settings."""


class CAAError(SaelabError):
    """A/B items or settings that cannot be evaluated (unknown letter, letters that are not one token)."""


class SelectionError(SaelabError):
    """Settings or prompt sets that direction selection cannot work with."""


class OrthogonalizationError(SaelabError, ValueError):
    """A model or direction that cannot be orthogonalized, or a folder that cannot be written."""


class ToyConfigError(SaelabError, ValueError):
    """A toy-model config that cannot run: say which field is wrong and what it should be."""


class TaskError(SaelabError, ValueError):
    """A circuit task that cannot be used: bad file, missing field, answer not one token, unequal pair."""


class TextTooLongError(SaelabError):
    """User text beyond the live limits: the server answers 413 with this message."""


class UnknownFamilyError(SaelabError, ValueError):
    """A dictionary family (architecture) name that no family file registers."""


class ClientSpecError(SaelabError, ValueError):
    """An LM client spec or option that names no client (`--explainer` / `--judge`): list the forms."""


class ClientError(SaelabError):
    """An LM client that cannot answer: unreachable endpoint, refused key, timeouts, empty or junk replies.

    Messages name the endpoint and the fix; they never contain the API key.
    """


class GraphError(SaelabError):
    """A model, dictionary set or prompt that an attribution graph cannot be built on (nonlinear leftovers)."""


class DiffingError(SaelabError):
    """Model diffing asked of something that is not a crosscoder, or with data it cannot read."""
