"""What every command group shares: the consoles, the option texts, model loading and error printing.

Heavy modules (torch, transformers) are imported inside the functions, so `saelab --help` stays fast.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console

from saelab.errors import SaelabError

if TYPE_CHECKING:
    from saelab.core.data import DataConfig
    from saelab.core.models import HookedLM

console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)

DEFAULT_HOOK = "blocks.15.hook_resid_post"
DTYPE_HELP = (
    "Model dtype: auto (bfloat16 where the CPU or GPU has bf16 matrix units, else float32), "
    "bfloat16, float32 or float16."
)
DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda or mps."
DEVICE_OPTION = typer.Option("auto", help=DEVICE_HELP)
DTYPE_OPTION = typer.Option("auto", help=DTYPE_HELP)


# ---- errors -------------------------------------------------------------------------------------


def exit_on_user_error(err: SaelabError) -> NoReturn:
    """A user error is one paragraph on stderr (no traceback) and its exit status (2)."""
    err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
    sys.exit(err.exit_code)


def exit_on_interrupt() -> NoReturn:
    """Ctrl-C keeps what was written: every long command resumes from its checkpoints."""
    err_console.print("interrupted: checkpoints written so far are kept; rerun with --resume.")
    sys.exit(130)


@contextlib.contextmanager
def removed_on_error(folder: Path, keep_if: Callable[[Path], bool] | None = None) -> Iterator[None]:
    """Delete `folder` when the command that creates it fails with a user error, unless it existed before.

    A failed command then leaves nothing half-written behind. `keep_if(folder)` keeps folders worth
    resuming (a training checkpoint). An interruption (Ctrl-C) keeps everything: rerunning resumes it.
    """
    existed = folder.exists()
    try:
        yield
    except SaelabError:
        if not existed and folder.is_dir() and not (keep_if and keep_if(folder)):
            shutil.rmtree(folder, ignore_errors=True)
        raise


# ---- options ------------------------------------------------------------------------------------


def model_dtype(name: str):
    """Check a --dtype option: a torch dtype, or "auto"."""
    from saelab.core.devices import parse_dtype

    return parse_dtype(name)


def model_dtype_name(name: str) -> str:
    """Check a --dtype option: its canonical name (as stored in a run's config), or "auto"."""
    from saelab.core.devices import dtype_name

    parsed = model_dtype(name)
    return parsed if parsed == "auto" else dtype_name(parsed)


def resolved_device(name: str) -> str:
    """Check a --device option and resolve "auto" to the device it picks here."""
    from saelab.core.devices import resolve_device

    return str(resolve_device(name))


CHAT_HELP = (
    'Read --data as chat: a .jsonl of conversations, one {"messages": [{"role": ..., "content": ...}]} a line, '
    "rendered with the model's chat template (ChatML if it has none) and packed into contexts."
)
ROLES_HELP = (
    "With --chat: keep only tokens of these roles, a comma list of system, user, assistant (e.g. assistant); "
    "default: every role. A turn's header tokens belong to its role."
)


def parse_roles(roles: str | None) -> list[str] | None:
    """`--roles user,assistant` -> ["user", "assistant"] (None: every role); unknown roles are refused later."""
    if roles is None:
        return None
    return [role.strip() for role in roles.split(",") if role.strip()]


def data_config(
    data,
    split,
    text_field,
    context_size,
    exclude_bos,
    exclude_special,
    dataset_config=None,
    chat=False,
    roles=None,
) -> DataConfig:
    """The data options of a command as a DataConfig (BOS always prepended); `roles` as --roles gives it."""
    from saelab.core.data import DataConfig

    return DataConfig(
        source=data,
        split=split,
        text_field=text_field,
        dataset_config=dataset_config,
        context_size=context_size,
        prepend_bos=True,
        exclude_bos=exclude_bos,
        exclude_special=exclude_special,
        chat=chat,
        roles=parse_roles(roles) if isinstance(roles, str) else roles,
    )


# ---- models -------------------------------------------------------------------------------------


def resolve_model(name: str | None) -> str | None:
    """The embedded model's hub id means the embedded model (no hub access needed)."""
    from saelab.core.models import EMBEDDED_HF_ID

    if name in (None, "", EMBEDDED_HF_ID, "SmolLM2-135M-Instruct", "saelab:embedded"):
        return None
    return name


def model_file_error(name: str | None, err: Exception) -> SaelabError:
    """A corrupt model weights file as a user error that says what to do."""
    from saelab.core.models import EMBEDDED_HF_ID
    from saelab.errors import ModelNotFoundError

    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelNotFoundError(
        f"could not read the weights of model {name or EMBEDDED_HF_ID!r}: a .safetensors file is corrupt, "
        f"truncated or not safetensors ({reason}). Download or save the model again "
        "(model.save_pretrained(folder)), or pass another --model."
    )


def load_lm(model: str | None, device: str, dtype: str) -> HookedLM:
    """The model named by --model (None or the embedded hub id: the embedded model) in --device/--dtype."""
    from safetensors import SafetensorError

    from saelab.core.models import load_model

    name = resolve_model(model)
    parsed = model_dtype(dtype)
    try:
        return load_model(name, device=device, dtype=parsed)
    except SafetensorError as err:
        raise model_file_error(name, err) from None
