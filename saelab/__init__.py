"""saelab: dictionary learning for mechanistic interpretability of language models."""

__version__ = "0.1.0"
