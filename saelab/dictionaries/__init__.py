"""Sparse dictionaries: SAEs and transcoders of every family, and their files."""

from saelab.dictionaries.base import Dictionary, StepContext, TrainOutput
from saelab.dictionaries.config import ARCHITECTURES, DictionaryConfig
from saelab.dictionaries.sae import FAMILIES, build_dictionary

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "Dictionary",
    "DictionaryConfig",
    "StepContext",
    "TrainOutput",
    "build_dictionary",
]
