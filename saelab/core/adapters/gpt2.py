"""GPT-2 (and GPT-2-layout models such as GPT-BigCode): blocks at model.transformer.h."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from saelab.core.adapters.base import BlockModules, ModelAdapter


class GPT2Adapter(ModelAdapter):
    """Pre-LayerNorm blocks ln_1 -> attn -> ln_2 -> mlp; learned positions are added to the stream too."""

    name = "gpt2"
    family = "gpt2"
    description = "GPT-2 (blocks at model.transformer.h)"
    attn_output_names = ("c_proj",)  # Conv1D: weight [in, out]
    mlp_output_names = ("c_proj",)

    def matches(self, model: nn.Module) -> bool:
        return hasattr(model, "transformer") and hasattr(model.transformer, "h")

    def layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.transformer.h

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.transformer.ln_f

    def block(self, layer: nn.Module) -> BlockModules:
        return BlockModules(layer, layer.attn, layer.ln_2, layer.mlp, layer.mlp)

    def position_embeddings(self, model: nn.Module) -> list[nn.Module]:
        return [model.transformer.wpe]
