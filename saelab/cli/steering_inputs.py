"""What the `steer` and `direction` groups both read: prompt lists, saved vectors, the --model and --chat options."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from saelab.errors import SaelabError

if TYPE_CHECKING:
    from torch import Tensor

MODEL_OPTION = typer.Option(
    None, help="Model; default: the embedded SmolLM2-135M-Instruct (or the SAE's model)."
)
CHAT_OPTION = typer.Option(True, "--chat/--no-chat", help="Wrap prompts in the chat template as a user turn.")


def prompt_list(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts given on the command line and/or in a file (FILE or FILE:KEY for a JSON object)."""
    from saelab.core.prompts import load_prompts

    out = list(prompts or [])
    if prompts_file:
        path, _, key = (
            prompts_file.partition(":") if not Path(prompts_file).exists() else (prompts_file, "", "")
        )
        out += load_prompts(path, key or None)
    if not out:
        raise SaelabError("no prompts: pass them as arguments or with --prompts FILE.")
    return out


def load_vector(path: Path, hook: str | None, position: int) -> tuple[str, Tensor]:
    """(hook, vector) from a saved DirectionSet folder, or a .safetensors file holding one vector."""
    from saelab.interventions.directions import DirectionSet

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise SaelabError(
                f"{path} holds {len(tensors)} tensors; save exactly one vector, or use a direction folder."
            )
        (vector,) = tensors.values()
        if hook is None:
            raise SaelabError(f"{path} does not say where the vector lives; pass --hook.")
        return hook, vector.float().reshape(-1)
    directions = DirectionSet.load(path)
    hook = hook or directions.provenance.get("best_hook") or directions.hooks[len(directions.hooks) // 2]
    return hook, directions.get(hook, position)
