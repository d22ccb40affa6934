"""Gemma 1/2/3: Llama-like blocks whose RMSNorm gain is stored as an offset from 1."""

from __future__ import annotations

from torch import Tensor, nn

from saelab.core.adapters.llama import LlamaAdapter

# Model types whose norms compute x_normed * (1 + weight). Gemma 3n and 4 multiply by weight itself.
GEMMA_MODEL_TYPES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})


class GemmaAdapter(LlamaAdapter):
    """Block layout as Llama-like (Gemma 2/3 have sandwich norms); the final norm scales by 1 + weight."""

    name = "gemma"
    description = (
        f"Gemma 1/2/3 (blocks at model.model.layers, model_type {'/'.join(sorted(GEMMA_MODEL_TYPES))})"
    )

    def matches(self, model: nn.Module) -> bool:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return model_type in GEMMA_MODEL_TYPES and super().matches(model)

    def final_norm_gain(self, norm: nn.Module, d_model: int) -> Tensor:
        gain = super().final_norm_gain(norm, d_model)
        return gain if getattr(norm, "weight", None) is None else 1 + gain
