"""Model adapters: one per family, and the registry that picks the adapter of a Hugging Face model.

Adding a model family means adding one adapter module here and listing it in `ADAPTERS`
(CONTRIBUTING.md, "Adding a model family"). More specific adapters come first: the first that
matches a model wins.
"""

from __future__ import annotations

from torch import nn

from saelab.core.adapters.base import BlockModules, ModelAdapter, output_projection
from saelab.core.adapters.gemma import GemmaAdapter
from saelab.core.adapters.gpt2 import GPT2Adapter
from saelab.core.adapters.gpt_neox import GPTNeoXAdapter
from saelab.core.adapters.llama import LlamaAdapter
from saelab.errors import ModelNotFoundError

ADAPTERS: tuple[ModelAdapter, ...] = (GPTNeoXAdapter(), GPT2Adapter(), GemmaAdapter(), LlamaAdapter())


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of `model`'s family; an unsupported model class is a ModelNotFoundError naming the families."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    supported = "; ".join(adapter.description for adapter in ADAPTERS)
    raise ModelNotFoundError(
        f"unsupported model class {type(model).__name__}: saelab has no adapter for it. It supports {supported}. "
        "Use a model of one of these families, or add an adapter (saelab/core/adapters)."
    )


__all__ = [
    "ADAPTERS",
    "BlockModules",
    "GPT2Adapter",
    "GPTNeoXAdapter",
    "GemmaAdapter",
    "LlamaAdapter",
    "ModelAdapter",
    "adapter_for",
    "output_projection",
]
