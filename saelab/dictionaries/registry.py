"""The dictionary families: one `Family` declaration per file of `saelab.dictionaries.families`.

A family's file declares everything other modules need to know about it (its class, its sparsity
knob, its run-folder tag, its label and plot colour, its SAELens names, its decoder-norm rule and
any settings of its own). The trainer, the file formats, the CLI and the toy bench read it from
here, so adding a family is adding one file: `discover()` imports every module of the package.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from saelab.errors import UnknownFamilyError

if TYPE_CHECKING:
    from saelab.dictionaries.base import Dictionary
    from saelab.dictionaries.config import DictionaryConfig

FAMILIES_PACKAGE = "saelab.dictionaries.families"


@dataclass(frozen=True)
class Family:
    """How one dictionary family is built, named, saved and shown."""

    name: str  # the DictionaryConfig.architecture that selects it
    cls: type[Dictionary]
    label: str  # for tables and plot legends, e.g. "ReLU + L1"
    # The setting that trades sparsity for reconstruction: a DictionaryConfig field (k,
    # l1_coefficient, target_l0) or one of `options`. Sweeps (CLI, toy bench) vary it.
    knob: str
    # The run-folder tag of a config, e.g. "k16" in topk-k16-w512 (keep a family's tag stable:
    # it names the folders of existing runs).
    tag: Callable[[DictionaryConfig], str]
    saelens: str  # SAELens's architecture name for the saved folder
    saelens_transcoder: str | None = None  # ... for a transcoder of this family (None: same as saelens)
    # Whether SAELens folders of that architecture load as this family (BatchTopK saves as a JumpReLU,
    # but a SAELens JumpReLU loads as a JumpReLU).
    loads_saelens: bool = True
    saelens_extra: Callable[[DictionaryConfig], dict] | None = None  # more keys of the SAELens cfg.json
    saelens_required: tuple[str, ...] = ()  # keys a SAELens cfg.json of this family must have
    # Decoder rows kept at unit norm (sparsity independent of norms), or learned norms (L1 families).
    unit_norm_decoder: bool = True
    colour: str | None = None  # matplotlib colour in the toy bench's plots (None: "C<position>")
    # Settings only this family has, with their defaults: they live in DictionaryConfig.options,
    # filled with these defaults when the config is made (so a saved config records them).
    options: Mapping[str, Any] = field(default_factory=dict)
    order: int = 100  # position in FAMILIES (the built-in five use 10 to 50)
    # Reads the same hook of several layers at once (DictionaryConfig.layers), like a cross-layer
    # transcoder: single-hook tools (the toy bench, `saelab evaluate`, the feature store) skip it.
    cross_layer: bool = False
    # Checks a config's family settings and completes them (e.g. resolves defaults that depend on
    # d_sae), so a bad setting fails when the config is made, not steps into training. Raises
    # DictionaryConfigError.
    prepare: Callable[[DictionaryConfig], None] | None = None

    @property
    def knob_default(self) -> Any:
        """The knob's value when a config does not set it."""
        if self.knob in self.options:
            return self.options[self.knob]
        from saelab.dictionaries.config import DictionaryConfig

        return DictionaryConfig.default(self.knob)

    def knob_value(self, cfg: DictionaryConfig) -> Any:
        return cfg.options[self.knob] if self.knob in self.options else getattr(cfg, self.knob)

    def with_knob(self, value: Any, settings: dict | None = None) -> dict:
        """DictionaryConfig keyword arguments: `settings` with the knob set to `value` (of the knob's type)."""
        out = dict(settings or {})
        value = type(self.knob_default)(value)
        if self.knob in self.options:
            out["options"] = {**out.get("options", {}), self.knob: value}
        else:
            out[self.knob] = value
        return out

    def saelens_name(self, transcoder: bool) -> str:
        return (self.saelens_transcoder or self.saelens) if transcoder else self.saelens


_families: dict[str, Family] = {}
# name -> Family in display order (relu, gated, topk, batchtopk, jumprelu, then added families).
FAMILIES: Mapping[str, Family] = MappingProxyType(_families)


def _reorder() -> None:
    ordered = sorted(_families.values(), key=lambda fam: (fam.order, fam.name))
    _families.clear()
    _families.update((fam.name, fam) for fam in ordered)


def register(fam: Family) -> Family:
    """Make a family known (a family file calls this once, at import)."""
    from saelab.dictionaries.config import DictionaryConfig

    known = {f.name for f in dataclasses.fields(DictionaryConfig)}
    if fam.knob not in known and fam.knob not in fam.options:
        raise ValueError(
            f"family {fam.name!r}: its knob {fam.knob!r} is neither a config field nor an option"
        )
    clash = sorted(set(fam.options) & known)
    if clash:
        raise ValueError(f"family {fam.name!r}: options {clash} are already DictionaryConfig fields")
    if fam.name in _families and _families[fam.name].cls is not fam.cls:
        raise ValueError(f"two families are called {fam.name!r}: {_families[fam.name].cls} and {fam.cls}")
    _families[fam.name] = fam
    _reorder()
    return fam


def unregister(name: str) -> None:
    """Forget a family (for tests that register one of their own)."""
    _families.pop(name, None)


def family(name: str) -> Family:
    """The family called `name`; the error names the known ones."""
    try:
        return _families[name]
    except KeyError:
        raise UnknownFamilyError(
            f"unknown dictionary family (architecture) {name!r}; choose one of {', '.join(_families)}. "
            f"A family is declared by a file in saelab/dictionaries/families/."
        ) from None


def saelens_families() -> dict[str, Family]:
    """SAELens architecture name -> the family that loads folders of it ("standard" -> relu, ...)."""
    loaders: dict[str, Family] = {}
    for fam in _families.values():
        if fam.loads_saelens:
            loaders.update(dict.fromkeys((fam.saelens, fam.saelens_name(transcoder=True)), fam))
    return loaders


def build_dictionary(cfg: DictionaryConfig) -> Dictionary:
    """A freshly initialised dictionary of the configured family."""
    return family(cfg.architecture).cls(cfg)


def discover() -> None:
    """Import every module of the families package: each registers its family."""
    package = importlib.import_module(FAMILIES_PACKAGE)
    for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not module.name.startswith("_"):
            importlib.import_module(f"{FAMILIES_PACKAGE}.{module.name}")
