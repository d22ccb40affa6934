"""Llama-like decoders (Llama, Mistral, Qwen, SmolLM, Phi-3, OLMo 2, ...): blocks at model.model.layers."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from saelab.core.adapters.base import BlockModules, ModelAdapter
from saelab.errors import ModelNotFoundError


class LlamaAdapter(ModelAdapter):
    """Pre-norm blocks with self_attn, mlp and post_attention_layernorm; sandwich and post-norm variants.

    The variant is read from each block's modules: with a post_feedforward_layernorm (Gemma 2/3,
    OLMo 2) the post-norms' outputs are what enters the residual stream.
    """

    name = "llama"
    family = "llama"
    description = "Llama-like (blocks at model.model.layers)"
    attn_output_names = ("o_proj", "out_proj", "dense", "c_proj")
    mlp_output_names = ("down_proj", "dense_4h_to_h", "c_proj", "fc2", "w2")

    def matches(self, model: nn.Module) -> bool:
        return hasattr(getattr(model, "model", None), "layers")

    def layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return model.model.layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def block(self, layer: nn.Module) -> BlockModules:
        if hasattr(layer, "post_feedforward_layernorm"):
            ln2 = getattr(layer, "pre_feedforward_layernorm", None)  # None: OLMo 2's MLP reads the residual
            post_mlp = layer.post_feedforward_layernorm
            return BlockModules(
                layer, layer.post_attention_layernorm, ln2, layer.mlp, post_mlp, normed_outputs=True
            )
        if hasattr(layer, "post_attention_layernorm"):
            return BlockModules(layer, layer.self_attn, layer.post_attention_layernorm, layer.mlp, layer.mlp)
        raise ModelNotFoundError(
            f"unsupported block layout {type(layer).__name__}: saelab hooks Llama-like blocks with self_attn, "
            "mlp and post_attention_layernorm, GPT-2 and GPT-NeoX. Use a model of one of these families."
        )
