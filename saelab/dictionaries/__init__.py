"""Sparse dictionaries: SAEs and transcoders of every family, and their files.

Each family is one file of `families/`, registered in `registry`; FAMILIES (name -> Family, in
display order) and ARCHITECTURES (their names) are live views of the registry.
"""

from saelab.dictionaries.base import Dictionary, StepContext, TrainOutput
from saelab.dictionaries.config import DictionaryConfig
from saelab.dictionaries.registry import FAMILIES, Family, build_dictionary, discover, family

discover()
ARCHITECTURES = FAMILIES.keys()

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "Dictionary",
    "DictionaryConfig",
    "Family",
    "StepContext",
    "TrainOutput",
    "build_dictionary",
    "family",
]
