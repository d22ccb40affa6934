"""One config for every dictionary: the fields a family does not use are ignored by it.

Settings that only one family has are not fields here: the family declares them with defaults
(`Family.options`) and a config carries their values in `options`, filled in when it is made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from saelab.dictionaries.registry import family


@dataclass
class DictionaryConfig:
    """Shape and sparsity settings of one dictionary (SAE, or transcoder when output_hook_name is set)."""

    architecture: str = "topk"
    d_in: int = 576
    d_sae: int = 4608
    hook_name: str = "blocks.15.hook_resid_post"
    # Transcoders read `hook_name` and predict `output_hook_name` (e.g. ln2.hook_normalized -> hook_mlp_out).
    output_hook_name: str | None = None
    d_out: int | None = None
    # topk / batchtopk: latents kept per token (batchtopk: on average over the batch).
    k: int = 32
    # relu / gated: coefficient of the decoder-norm-weighted L1 penalty (on normalized inputs).
    l1_coefficient: float = 5.0
    # relu / gated: the L1 penalty ramps up linearly over this fraction of training.
    l1_warmup_fraction: float = 0.05
    # jumprelu: the mean L0 to steer towards, the penalty weight, and the straight-through kernel width.
    target_l0: float = 32.0
    l0_coefficient: float = 1.0
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.5
    # AuxK for dead latents (topk, batchtopk): k_aux defaults to d_in // 2.
    aux_k: int | None = None
    aux_coefficient: float = 1 / 32
    aux_max_rows: int = 1024  # AuxK runs on at most this many rows of each batch
    # batchtopk: EMA rate of the inference threshold.
    threshold_momentum: float = 0.99
    # topk: dtype of the encoder matmul in training steps. "bfloat16" is ~1.4x faster where the
    # hardware has bf16 matmul units (AMX CPUs, GPUs); forward values are then bf16-rounded (~0.4%).
    # "auto": the trainer picks bfloat16 exactly where saelab.core.devices picks it for the model.
    encoder_dtype: str = "auto"
    apply_b_dec_to_input: bool = True
    # "expected_average_only_in": scale inputs by sqrt(d) / E||x|| while training; folded in at save.
    normalize_activations: str = "expected_average_only_in"
    b_dec_init: str = "geometric_median"  # or "mean" or "zeros"
    dtype: str = "float32"
    # This dictionary's learning rate in a sweep (None: the run's lr). Gated SAEs, for one, need a
    # higher rate than TopK on small synthetic data: their gate biases move about lr per Adam step.
    lr: float | None = None
    seed: int = 0
    metadata: dict = field(default_factory=dict)
    # The family's own settings (see Family.options); empty for the built-in families.
    options: dict = field(default_factory=dict)
    # Cross-layer families (Family.cross_layer): the layers they read at once; hook_name and
    # output_hook_name then hold {i}, which stands for each layer (blocks.{i}.ln2.hook_normalized).
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        fam = family(self.architecture)
        unknown = sorted(set(self.options) - set(fam.options))
        if unknown:
            raise ValueError(
                f"the {self.architecture} family has no option(s) {', '.join(unknown)}; "
                f"its options are: {', '.join(fam.options) or 'none'}"
            )
        self.options = {name: self.options.get(name, default) for name, default in fam.options.items()}
        if fam.prepare is not None:
            fam.prepare(self)
        if self.encoder_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"encoder_dtype must be auto, float32 or bfloat16, got {self.encoder_dtype!r}")
        if self.output_hook_name and self.d_out is None and self.d_in > 0:
            self.d_out = self.d_in
        if self.is_transcoder:
            # A transcoder's input and output live in different spaces: no b_dec subtraction.
            self.apply_b_dec_to_input = False
        if fam.knob == "k" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in 1..d_sae ({self.d_sae}), got {self.k}")
        # A crosscoder's latents are shared by all the hook points it reads (its class says so with
        # latents_per_layer = False); a CLT has its own latents at each layer.
        self._check_layers(fam.cross_layer, fam.knob == "k", getattr(fam.cls, "latents_per_layer", True))

    def _check_layers(self, cross_layer: bool, uses_k: bool, latents_per_layer: bool = True) -> None:
        if not cross_layer:
            if self.layers is not None:
                raise ValueError(
                    f"the {self.architecture} family reads one hook point; `layers` is for cross-layer "
                    "families (clt, clt_batchtopk). Train one dictionary per layer instead."
                )
            return
        hooks = [self.hook_name] + ([self.output_hook_name] if self.output_hook_name else [])
        if not self.layers or any("{i}" not in hook for hook in hooks):
            raise ValueError(
                f"a {self.architecture} dictionary reads several layers at once: give `layers` (e.g. "
                "0..29) and hooks with {i} where the layer goes (blocks.{i}.ln2.hook_normalized)."
            )
        self.layers = sorted(int(layer) for layer in self.layers)
        if len(set(self.layers)) != len(self.layers) or self.layers[0] < 0:
            raise ValueError(f"`layers` must list each layer (0 or more) once; got {self.layers}.")
        if not latents_per_layer:
            return
        if self.d_sae % len(self.layers):
            raise ValueError(
                f"d_sae ({self.d_sae}) is the total over {len(self.layers)} layers, so it must be a "
                f"multiple of {len(self.layers)} (the same number of latents at every layer)."
            )
        if uses_k and self.k > self.d_sae // len(self.layers):
            raise ValueError(
                f"k ({self.k}) is per layer: it must be at most the {self.d_sae // len(self.layers)} latents of a layer."
            )

    @property
    def is_transcoder(self) -> bool:
        return self.output_hook_name is not None and self.output_hook_name != self.hook_name

    @property
    def input_hooks(self) -> list[str]:
        """The hook points the dictionary reads (one per layer for a cross-layer family)."""
        if self.layers is None:
            return [self.hook_name]
        return [self.hook_name.replace("{i}", str(layer)) for layer in self.layers]

    @property
    def output_hooks(self) -> list[str]:
        """The hook points it predicts: output_hook_name at each layer, else its inputs."""
        if not self.output_hook_name:
            return self.input_hooks
        if self.layers is None:
            return [self.output_hook_name]
        return [self.output_hook_name.replace("{i}", str(layer)) for layer in self.layers]

    @property
    def out_dim(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def resolved_aux_k(self) -> int:
        return self.aux_k if self.aux_k is not None else max(1, self.d_in // 2)

    @classmethod
    def default(cls, name: str):
        """The default value of a field (what a config gets when it does not set it)."""
        spec = next(f for f in dataclasses.fields(cls) if f.name == name)
        return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default

    def to_dict(self) -> dict:
        """All fields; `options` only when the family has some (so older files stay the same)."""
        out = dataclasses.asdict(self)
        if not out["options"]:
            del out["options"]
        if out["layers"] is None:
            del out["layers"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> DictionaryConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})
