"""GPT-NeoX (Pythia, GPT-NeoX-20B): blocks at model.gpt_neox.layers, sequential or parallel residual."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from saelab.core.adapters.base import BlockModules, ModelAdapter


class GPTNeoXAdapter(ModelAdapter):
    """With use_parallel_residual, attention and MLP both read resid_pre and their sum is added."""

    name = "gpt_neox"
    family = "gpt_neox"
    description = "GPT-NeoX (blocks at model.gpt_neox.layers)"
    attn_output_names = ("dense",)
    mlp_output_names = ("dense_4h_to_h",)

    def matches(self, model: nn.Module) -> bool:
        return hasattr(model, "gpt_neox")

    def layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.gpt_neox.layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.gpt_neox.final_layer_norm

    def block(self, layer: nn.Module) -> BlockModules:
        parallel = bool(layer.use_parallel_residual)
        return BlockModules(
            layer, layer.attention, layer.post_attention_layernorm, layer.mlp, layer.mlp, parallel=parallel
        )
