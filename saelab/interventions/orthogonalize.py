"""Weight orthogonalization: bake directional ablation of one direction into a model's weights.

Arditi et al. (2024, "Refusal in language models is mediated by a single direction"): if every
matrix that *writes* into the residual stream has its output projected off the unit direction r,
``W <- W - r r^T W``, then no residual-stream state at any layer or position has a component along
r, which is exactly what runtime directional ablation at the embedding output and every attention
and MLP output does (`saelab.interventions.hooks.ablation(lm, r)` with ``layers=None``). The edit
is exact (up to float rounding) because each writer's input is unchanged by induction over layers.

Writers edited, per family (each family's adapter in `saelab.core.adapters` declares them, see
`HookedLM.residual_writers`):
- Llama-like (Llama, Mistral, Qwen, SmolLM, ...): ``embed_tokens``, each ``self_attn.o_proj`` and
  ``mlp.down_proj`` (and their biases where present);
- GPT-2: ``wte`` and ``wpe`` (token and position embeddings), each ``attn.c_proj`` and ``mlp.c_proj``
  (``Conv1D``: weight ``[in, out]``, so the projection acts on the other side than for ``nn.Linear``);
- GPT-NeoX: ``embed_in``, each ``attention.dense`` and ``mlp.dense_4h_to_h``.

Tied embeddings: many small models (SmolLM2, GPT-2) share one matrix between the token embedding and
the unembedding (``lm_head``). Orthogonalizing the embedding must not change the unembedding (the
runtime ablation leaves it alone), so ``lm_head`` first gets its own copy of the original matrix and
``config.tie_word_embeddings`` is set to False; the written folder then stores both matrices (the
file grows by one vocab x d_model matrix). Models whose blocks normalise a sublayer's output before
adding it (sandwich norms: Gemma 2/3, OLMo 2) cannot be orthogonalized this way and are refused.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import saelab
from saelab.core.fileio import atomic_folder
from saelab.core.models import HookedLM
from saelab.errors import DimensionMismatchError, OrthogonalizationError
from saelab.interventions.hooks import unit

SIDECAR = "saelab_orthogonalization.json"


@dataclass
class _Writer:
    """One module whose output is added to the residual stream, and the side its d_model axis is on."""

    name: str
    module: nn.Module
    layout: str  # "rows": d_model is the weight's last axis (Embedding, Conv1D); "cols": nn.Linear


def _layout(module: nn.Module, name: str, d_model: int) -> str:
    """Where the output (d_model) axis is: the type decides, not the shape (o_proj is square)."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.ndim != 2:
        raise OrthogonalizationError(
            f"{name} ({type(module).__name__}) has no 2-D weight, so saelab cannot orthogonalize it. "
            "Only plain nn.Linear, Conv1D and nn.Embedding writers are supported."
        )
    if not weight.is_floating_point():
        raise OrthogonalizationError(
            f"{name} holds quantized weights (dtype {weight.dtype}); projecting a direction out of them "
            "needs float weights. Load the model unquantized (e.g. load_model(path, dtype=torch.float32)) "
            "and orthogonalize that."
        )
    if isinstance(module, nn.Embedding) or type(module).__name__ == "Conv1D":
        layout, width = "rows", weight.shape[1]
    elif isinstance(module, nn.Linear):
        layout, width = "cols", weight.shape[0]
    else:
        raise OrthogonalizationError(
            f"{name} is a {type(module).__name__}, not nn.Linear, Conv1D or nn.Embedding; saelab does not "
            "know which axis of its weight writes into the residual stream."
        )
    if width != d_model:
        raise OrthogonalizationError(
            f"{name} writes width {width}, not the residual width {d_model}; it is not a residual-stream "
            "writer of a supported layout (mixture-of-experts MLPs are not supported)."
        )
    return layout


def _writers(lm: HookedLM) -> list[_Writer]:
    """Every module whose output is added to the residual stream, in forward order, with its layout."""
    names = {id(m): n for n, m in lm.model.named_modules()}
    modules = lm.residual_writers()
    return [_Writer(names[id(m)], m, _layout(m, names[id(m)], lm.d_model)) for m in modules]


def residual_writers(lm: HookedLM) -> list[str]:
    """Qualified names of the modules whose weights (and biases) orthogonalization edits."""
    return [w.name for w in _writers(lm)]


def _checked_direction(lm: HookedLM, direction) -> Tensor:
    """The unit direction (float32); a wrong width, zero or non-finite direction is a clear error."""
    r = unit(torch.as_tensor(direction))
    if r.shape[0] != lm.d_model:
        raise DimensionMismatchError(
            f"the direction has width {r.shape[0]} but {lm.name} has d_model {lm.d_model}; use a direction "
            "found in this model's residual stream."
        )
    return r


def _untie_embeddings(model: nn.Module) -> bool:
    """Give the unembedding its own copy of a shared matrix, and stop transformers re-tying it on load.

    Returns whether the two were tied.
    """
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == inp.weight.data_ptr()
    if tied:
        out.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=inp.weight.requires_grad)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return tied


@torch.no_grad()
def _project_out(writer: _Writer, r: Tensor) -> None:
    """W <- W - r r^T W on the output axis, and b <- b - (r . b) r; computed in float32."""
    weight = writer.module.weight
    r = r.to(weight.device)
    w = weight.float()
    if writer.layout == "rows":
        w = w - (w @ r)[:, None] * r[None, :]
    else:
        w = w - r[:, None] * (r @ w)[None, :]
    weight.copy_(w.to(weight.dtype))
    bias = getattr(writer.module, "bias", None)
    if isinstance(bias, Tensor):
        b = bias.float()
        bias.copy_((b - (b @ r) * r).to(bias.dtype))


def orthogonalize_weights(lm: HookedLM, direction) -> None:
    """Edit `lm`'s weights IN PLACE so that it behaves like runtime `ablation(lm, direction)`.

    Pass a copy (`orthogonalized_copy` makes one) if the original model is still needed. Tied
    embeddings are untied first, so the unembedding keeps its original weights.
    """
    r = _checked_direction(lm, direction)
    writers = _writers(lm)  # every check runs before the first edit: a refused model stays intact
    _untie_embeddings(lm.model)
    for writer in writers:
        _project_out(writer, r)


def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy without quantization settings (a GGUF load leaves them in the config, dequantized).

    The copy carries no forward hooks: called inside `steer(...)` or `lm.patch(...)`, a deep copy
    would otherwise keep copies of the active interventions.
    """
    if getattr(model.config, "quantization_config", None) is None:
        plain = copy.deepcopy(model)
        for module in plain.modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                hooks.clear()
            module._forward_hooks_with_kwargs.clear()
            module._forward_pre_hooks_with_kwargs.clear()
        return plain
    bad = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if bad:
        raise OrthogonalizationError(
            f"the model is quantized ({bad[0]} has dtype {model.get_parameter(bad[0]).dtype}); saelab "
            "orthogonalizes float weights only. Load it unquantized (load_model(path, dtype=torch.float32))."
        )
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    del config.quantization_config
    param = next(model.parameters())
    plain = AutoModelForCausalLM.from_config(config).to(param.dtype)
    plain.load_state_dict(model.state_dict())
    return plain.to(param.device).eval().requires_grad_(False)


def orthogonalized_copy(lm: HookedLM, direction) -> HookedLM:
    """A new HookedLM whose weights are orthogonalized against `direction`; `lm` is left unchanged."""
    r = _checked_direction(lm, direction)
    _writers(lm)  # refuse unsupported models before paying for the copy
    new = HookedLM(_plain_copy(lm.model), lm.tokenizer, name=f"{lm.name} (orthogonalized)", hf_id=None)
    orthogonalize_weights(new, r)
    return new


def _check_provenance(provenance) -> None:
    try:
        json.dumps(provenance)
    except (TypeError, ValueError) as exc:
        raise OrthogonalizationError(
            f"provenance must be JSON-serialisable (strings, numbers, lists, dicts): {exc}. Convert tensors "
            "with .tolist() and paths with str()."
        ) from None


def _sidecar(lm: HookedLM, direction, r: Tensor, tied: bool, writers: list[str], provenance) -> dict:
    return {
        "format": "saelab-orthogonalization",
        "saelab_version": saelab.__version__,
        "source_model": lm.name,
        "source_hf_id": lm.hf_id,
        "family": lm.family,
        "d_model": lm.d_model,
        "direction_norm": float(torch.as_tensor(direction).detach().float().norm()),
        "direction": r.tolist(),
        "provenance": provenance,
        "edited_parameters": writers,
        "untied_embeddings": tied,
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "runtime_equivalent": "saelab.interventions.hooks.ablation(lm, direction, layers=None)",
    }


def write_orthogonalized(
    lm: HookedLM, direction, out_dir, provenance: dict | None = None, overwrite: bool = False
) -> Path:
    """Write a loadable HF model folder (safetensors + tokenizer) orthogonalized against `direction`.

    Beside the weights, `saelab_orthogonalization.json` records the unit direction, the norm of the
    direction as given, `provenance` (how the direction was found: any JSON object) and the edited
    parameters. `lm` itself is not changed. The folder appears atomically: a failure leaves nothing.
    """
    out_dir = Path(out_dir)
    if lm.tokenizer is None:
        raise OrthogonalizationError(
            "this HookedLM has no tokenizer, so the folder would not be loadable; build it with one "
            "(HookedLM(model, tokenizer)) or use load_model."
        )
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())) and not overwrite:
        raise OrthogonalizationError(
            f"{out_dir} already exists and is not empty; choose a new folder or pass overwrite=True."
        )
    r = _checked_direction(lm, direction)
    _check_provenance(provenance)  # before paying for the copy
    out = lm.model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == lm.model.get_input_embeddings().weight.data_ptr()
    new = orthogonalized_copy(lm, r)
    info = _sidecar(lm, direction, r, tied, residual_writers(new), provenance or {})
    with atomic_folder(out_dir) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is a normal folder
        new.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        (tmp / SIDECAR).write_text(json.dumps(info, indent=1) + "\n")
    return out_dir
