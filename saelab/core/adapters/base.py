"""What saelab must know about a model family, declared once: `ModelAdapter` and `BlockModules`.

An adapter answers three questions for one family of Hugging Face causal LMs: which modules carry
each hook point (`block`), which modules write into the residual stream (`residual_writers`, what
weight orthogonalization edits and runtime ablation mirrors at hook points), and what elementwise
gain the final norm applies (`final_norm_gain`, for logit effects of decoder directions).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from saelab.errors import OrthogonalizationError


@dataclass(frozen=True)
class BlockModules:
    """The modules of one block that carry its hook points."""

    block: nn.Module  # input: resid_pre, output: resid_post
    attn: nn.Module  # first output: attn_out (what is added to the residual)
    ln2: nn.Module | None  # input: mlp_in (None where the MLP reads the residual directly)
    mlp: nn.Module  # input: ln2.hook_normalized
    mlp_out: nn.Module  # first output: mlp_out
    parallel: bool = False  # attention and MLP both read resid_pre, so there is no resid_mid
    normed_outputs: bool = False  # attn_out / mlp_out leave a norm (sandwich and post-norm blocks)


def output_projection(parent: nn.Module, names: Sequence[str], where: str) -> nn.Module:
    """The first child of `parent` named in `names`: the linear map whose output leaves a sublayer."""
    for name in names:
        module = getattr(parent, name, None)
        if isinstance(module, nn.Module):
            return module
    raise OrthogonalizationError(
        f"{where} ({type(parent).__name__}) has none of the output projections saelab knows "
        f"({', '.join(names)}); this architecture cannot be orthogonalized (mixture-of-experts MLPs and "
        "fused layouts are not supported)."
    )


class ModelAdapter(ABC):
    """One model family: where its blocks are, their hook-point modules, residual writers, final norm."""

    name: str  # the registry key, e.g. "gemma"
    family: str  # the block layout, recorded as HookedLM.family (repr, orthogonalization sidecar)
    description: str  # for the unsupported-model message: the family and where its blocks are
    attn_output_names: tuple[str, ...]  # children of BlockModules.attn that may write attn_out
    mlp_output_names: tuple[str, ...]  # children of BlockModules.mlp_out that may write mlp_out

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether `model` (an AutoModelForCausalLM) belongs to this family."""

    @abstractmethod
    def layers(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks, in forward order."""

    @abstractmethod
    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm applied to the last residual stream before the unembedding."""

    @abstractmethod
    def block(self, layer: nn.Module) -> BlockModules:
        """The modules of one block that carry its hook points."""

    def position_embeddings(self, model: nn.Module) -> list[nn.Module]:
        """Learned position embeddings added to the residual stream beside the token embedding."""
        return []

    def final_norm_gain(self, norm: nn.Module, d_model: int) -> Tensor:
        """The final norm's elementwise gain [d_model] (float32, CPU); ones if it has none."""
        weight = getattr(norm, "weight", None)
        if weight is None:
            return torch.ones(d_model)
        return weight.detach().float().cpu()

    def residual_writers(self, model: nn.Module, blocks: Sequence[BlockModules]) -> list[nn.Module]:
        """Every linear module whose output is added to the residual stream, in forward order.

        Blocks that normalise a sublayer's output before adding it have no such writers: refused.
        """
        writers = [model.get_input_embeddings(), *self.position_embeddings(model)]
        for i, block in enumerate(blocks):
            if block.normed_outputs:
                raise OrthogonalizationError(
                    f"block {i} ({type(block.block).__name__}) normalises each sublayer's output before adding "
                    "it to the residual stream (sandwich norms), so no weight edit reproduces directional "
                    "ablation. Use runtime ablation instead: steer(lm, ablation(lm, direction))."
                )
            writers.append(
                output_projection(block.attn, self.attn_output_names, f"the attention of block {i}")
            )
            writers.append(output_projection(block.mlp_out, self.mlp_output_names, f"the MLP of block {i}"))
        return writers
