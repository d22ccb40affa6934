"""One view of the transcoders that replace a model's MLPs: a per-layer set or one cross-layer transcoder.

The replacement model and the attribution graph ask the same questions of both: which features fire
at a layer, how a layer's features read its MLP input (`encoder`), how they write to a layer's MLP
output (`decoder(source, target)`), and which layers they write to (`targets`). A per-layer
transcoder writes only to its own layer; a cross-layer transcoder's layer-l features write to layers
l..L-1. Weights come back with the training scales folded in, in raw activation units.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from saelab.dictionaries.base import Dictionary
from saelab.dictionaries.sets import DictionarySet, split_hook
from saelab.dictionaries.transcoders import is_cross_layer
from saelab.errors import DictionarySetError

INPUT_SUFFIX = "ln2.hook_normalized"
OUTPUT_SUFFIX = "hook_mlp_out"


@dataclass
class Transcoders:
    """A per-layer `DictionarySet` of transcoders, or one cross-layer transcoder, behind one interface."""

    source: DictionarySet | Dictionary
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.source, Transcoders):
            self.source = self.source.source
        if not isinstance(self.source, DictionarySet) and not is_cross_layer(self.source):
            raise DictionarySetError(
                "attribution graphs need a transcoder at every layer: a per-layer transcoder set or a "
                f"cross-layer transcoder, not one {self.source.cfg.architecture} dictionary."
            )

    # ---- what it is ----------------------------------------------------------------------------
    @property
    def cross_layer(self) -> bool:
        return not isinstance(self.source, DictionarySet)

    @property
    def n_layers(self) -> int:
        return self.source.n_layers if self.cross_layer else len(self.source)

    @property
    def layers(self) -> list[int]:
        return list(self.source.cfg.layers) if self.cross_layer else self.source.layers

    @property
    def hook_suffix(self) -> str:
        if self.cross_layer:
            return split_hook(self.source.cfg.hook_name.replace("{i}", "0"))[1]
        return self.source.hook_suffix

    @property
    def output_suffix(self) -> str | None:
        if self.cross_layer:
            out = self.source.cfg.output_hook_name
            return split_hook(out.replace("{i}", "0"))[1] if out else None
        return self.source.output_suffix

    @property
    def model_name(self) -> str | None:
        if self.cross_layer:
            return self.source.cfg.metadata.get("model_name")
        return self.source.model_name

    def check(self, n_layers: int) -> None:
        """Refuse transcoders that are not MLP-input -> MLP-output at every layer 0..n_layers-1 of the model."""
        if self.hook_suffix != INPUT_SUFFIX or self.output_suffix != OUTPUT_SUFFIX:
            raise DictionarySetError(
                f"attribution graphs need transcoders from blocks.{{i}}.{INPUT_SUFFIX} to blocks.{{i}}.{OUTPUT_SUFFIX}, "
                f"but these read blocks.{{i}}.{self.hook_suffix} and write blocks.{{i}}.{self.output_suffix or self.hook_suffix}. "
                "Train transcoders between those hooks."
            )
        if max(self.layers) >= n_layers:
            raise DictionarySetError(
                f"the transcoders have layers up to {max(self.layers)} but the model has {n_layers} "
                f"(0 to {n_layers - 1}): they were trained on another model."
            )
        if self.layers != list(range(n_layers)):
            raise DictionarySetError(
                f"the transcoders cover layers {self.layers} but the model has {n_layers}: every MLP must be "
                "replaced for the replacement model to be linear. Add transcoders for the missing layers."
            )

    def to(self, device) -> Transcoders:
        self.source.to(device)
        self._cache.clear()
        return self

    # ---- reading and writing -------------------------------------------------------------------
    def targets(self, source: int) -> range:
        """The layers whose MLP outputs the features of layer `source` write to."""
        return range(source, self.n_layers) if self.cross_layer else range(source, source + 1)

    def encode(self, layer: int, mlp_input: Tensor) -> Tensor:
        """[..., F]: the features of `layer` for its raw MLP input."""
        if self.cross_layer:
            return self.source.layer_latents(layer, mlp_input)
        member = self.source[layer]
        return member.encode(mlp_input.to(member.W_enc.dtype))

    def preacts(self, layer: int, mlp_input: Tensor) -> Tensor:
        """[..., F]: pre-activations of the features of `layer` (what an edge into a feature changes)."""
        if self.cross_layer:
            return self.source.layer_preacts(layer, mlp_input)
        member = self.source[layer]
        return member.preacts(mlp_input.to(member.W_enc.dtype))

    def encoder(self, layer: int) -> Tensor:
        """[d, F]: how the features of `layer` read its MLP input (input scale folded in)."""
        if ("enc", layer) not in self._cache:
            if self.cross_layer:
                weight = self.source.W_enc[layer] * self.source.input_scale[layer]
            else:
                member = self.source[layer]
                weight = member.W_enc * member.input_scale
            self._cache["enc", layer] = weight.detach()
        return self._cache["enc", layer]

    def decoder(self, source: int, target: int) -> Tensor:
        """[F, d]: how the features of layer `source` write to the MLP output of layer `target`."""
        if target not in self.targets(source):
            raise ValueError(
                f"layer {source}'s features write to layers {list(self.targets(source))}, not {target}"
            )
        if ("dec", source, target) not in self._cache:
            if self.cross_layer:
                weight = self.source.decoder(source, target)
            else:
                member = self.source[source]
                weight = member.W_dec / member.output_scale
            self._cache["dec", source, target] = weight.detach()
        return self._cache["dec", source, target]

    def b_dec(self, layer: int) -> Tensor:
        """[d]: the constant every transcoder output at `layer` includes."""
        if self.cross_layer:
            return (self.source.b_dec[layer] / self.source.output_scale[layer]).detach()
        member = self.source[layer]
        return (member.b_dec / member.output_scale).detach()

    def feature_store_index(self, layer: int, feature: int) -> int:
        """The latent's index in its dictionary's feature store (a CLT numbers latents layer-major)."""
        return layer * self.source.width + feature if self.cross_layer else feature


def as_transcoders(source: DictionarySet | Dictionary | Transcoders) -> Transcoders:
    return source if isinstance(source, Transcoders) else Transcoders(source)
