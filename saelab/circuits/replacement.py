"""The local replacement model of one prompt: the model made linear around its own forward pass.

For a fixed prompt, every attention pattern and every norm scale is frozen at its value on the real
forward (queries and keys are replayed from that pass, norm denominators become constants) and each
layer's MLP output is replaced by the transcoder's output plus an error node (the real MLP output
minus the transcoder's), a constant. What is left maps token embeddings, feature activations and
errors to every later MLP input and to the logits linearly (up to constant biases), so a feature's
direct effect on another is well defined and gradients measure it exactly. With every node at its
value, the replacement model reproduces the model's logits.

Works on the plain Hugging Face modules: norms are recognised by class (`nn.LayerNorm`, `*RMSNorm`),
queries and keys by projection name (`q_proj`/`k_proj`, GPT-2's fused `c_attn`, GPT-NeoX's
`query_key_value`). Anything else is refused, and the result is checked to be affine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from saelab.circuits.transcoders import INPUT_SUFFIX, OUTPUT_SUFFIX, Transcoders, as_transcoders
from saelab.core.models import HookedLM
from saelab.dictionaries.base import Dictionary
from saelab.dictionaries.sets import DictionarySet
from saelab.errors import GraphError, TextTooLongError

_EPS_NAMES = ("variance_epsilon", "eps", "epsilon")


# ---- norms with a frozen denominator ------------------------------------------------------------
@dataclass
class _Norm:
    """One norm module as a linear map once its denominator is fixed: gain ⊙ (centred x) · scale + bias."""

    module: nn.Module
    centred: bool
    eps: float
    gain: Tensor | None
    bias: Tensor | None
    scales: list[Tensor] = field(default_factory=list)  # one per call on the real forward
    calls: int = 0  # calls so far in a frozen pass: which recorded scale comes next

    def scale_of(self, x: Tensor) -> Tensor:
        x = self._centre(x)
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def _centre(self, x: Tensor) -> Tensor:
        return x - x.mean(-1, keepdim=True) if self.centred else x

    def apply(self, x: Tensor, scale: Tensor) -> Tensor:
        out = self._centre(x) * scale
        if self.gain is not None:
            out = out * self.gain
        return out if self.bias is None else out + self.bias


def _norm_of(module: nn.Module) -> _Norm | None:
    """A frozen-scale description of `module` if it is a norm; None if it is not one."""
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm):
        return _Norm(module, True, module.eps, module.weight, module.bias)
    if name.endswith("RMSNorm"):
        eps = next((getattr(module, n) for n in _EPS_NAMES if hasattr(module, n)), None)
        if eps is None:
            raise GraphError(
                f"the norm {name} has no epsilon attribute saelab knows ({', '.join(_EPS_NAMES)})."
            )
        return _Norm(module, False, float(eps), None, None)
    if name.endswith(("Norm", "LayerNorm")):
        raise GraphError(
            f"the model uses a norm saelab cannot freeze ({name}); attribution graphs support nn.LayerNorm and "
            "RMSNorm models (Llama-like, Gemma, GPT-2, GPT-NeoX)."
        )
    return None


@torch.no_grad()
def _rms_gain(norm: _Norm, like: Tensor) -> Tensor:
    """An RMS norm's elementwise gain, read from the module itself (Gemma stores it as 1 + weight).

    Calls `forward` directly so that no hook fires: an input of ones has RMS 1.
    """
    ones = torch.ones(like.shape[-1], dtype=like.dtype, device=like.device)
    return norm.module.forward(ones) * (1.0 + norm.eps) ** 0.5


# ---- queries and keys, replayed -----------------------------------------------------------------
@dataclass
class _QK:
    """A module whose output holds queries and keys; `mask` marks those output channels."""

    module: nn.Module
    mask: Tensor | None  # None: the whole output is queries or keys
    outputs: list[Tensor] = field(default_factory=list)
    calls: int = 0


def _qk_sites(lm: HookedLM) -> list[_QK]:
    sites = []
    config = lm.model.config
    for i, block in enumerate(lm.blocks):
        found = [
            _QK(m, None) for n, m in block.block.named_modules() if n.split(".")[-1] in ("q_proj", "k_proj")
        ]
        for name, module in block.block.named_modules():
            leaf = name.split(".")[-1]
            if leaf == "c_attn":  # GPT-2: [q | k | v], each d_model wide
                mask = torch.zeros(3 * lm.d_model, dtype=torch.bool)
                mask[: 2 * lm.d_model] = True
                found.append(_QK(module, mask))
            elif leaf == "query_key_value":  # GPT-NeoX: per head [q | k | v]
                heads = config.num_attention_heads
                head = 3 * lm.d_model // heads
                mask = torch.zeros(heads, head, dtype=torch.bool)
                mask[:, : 2 * head // 3] = True
                found.append(_QK(module, mask.flatten()))
        if not found:
            raise GraphError(
                f"block {i} ({type(block.block).__name__}) has no query/key projection saelab knows (q_proj and "
                "k_proj, c_attn, query_key_value), so its attention patterns cannot be frozen."
            )
        sites += found
    return sites


# ---- the replacement model ----------------------------------------------------------------------
def check_transcoders(lm: HookedLM, transcoders: DictionarySet | Dictionary | Transcoders) -> Transcoders:
    """The transcoders as one view, refused unless they map every layer's MLP input to its MLP output."""
    view = as_transcoders(transcoders)
    view.check(lm.n_layers)
    return view


def _check_prompt(lm: HookedLM, ids: Tensor) -> None:
    if ids.ndim != 1 or ids.numel() == 0:
        raise GraphError(
            f"an attribution graph reads one non-empty prompt of token ids; got shape {tuple(ids.shape)}."
        )
    limit = getattr(lm.model.config, "max_position_embeddings", None) or getattr(
        lm.model.config, "n_positions", None
    )
    if limit is not None and ids.numel() > limit:
        raise TextTooLongError(
            f"the prompt has {ids.numel()} tokens but {lm.name} reads at most {limit}; shorten the prompt."
        )
    if getattr(lm.model.config, "final_logit_softcapping", None):
        raise GraphError(
            f"{lm.name} soft-caps its logits (tanh), so logits are not linear in the residual stream and "
            "attribution to them is not exact. Turn final_logit_softcapping off in the config to attribute."
        )


class ReplacementModel:
    """One prompt's local replacement model: frozen attention and norms, MLPs replaced by transcoders + errors.

    After construction it holds the real forward's values: `embeddings` [seq, d], `mlp_inputs` and
    `mlp_outputs` per layer [seq, d], `activations` per layer [seq, d_sae] (dense), `errors` per layer
    [seq, d] and `logits` [seq, vocab]. `run` evaluates the frozen model on other values of the nodes.
    """

    def __init__(
        self,
        lm: HookedLM,
        transcoders: DictionarySet | Dictionary | Transcoders,
        prompt_ids,
        zero_bos: bool | None = None,
    ):
        self.transcoders = check_transcoders(lm, transcoders)
        self.lm = lm
        self.input_ids = torch.as_tensor(prompt_ids, device=lm.device).long()
        if self.input_ids.ndim == 2 and self.input_ids.shape[0] == 1:
            self.input_ids = self.input_ids[0]  # a batch of one prompt
        _check_prompt(lm, self.input_ids)
        if zero_bos is None:
            bos = getattr(lm.tokenizer, "bos_token_id", None) if lm.tokenizer is not None else None
            zero_bos = bos is not None and int(self.input_ids[0]) == bos
        self.zero_bos = zero_bos
        self.dtype = next(lm.model.parameters()).dtype
        self.norms = [n for n in map(_norm_of, lm.model.modules()) if n is not None]
        self.qk = _qk_sites(lm)
        self._weights: dict[tuple[str, int], Tensor] = {}
        self._real_forward()
        self._split_mlp_outputs()
        self._check_affine()

    @property
    def n_layers(self) -> int:
        return self.lm.n_layers

    @property
    def n_pos(self) -> int:
        return int(self.input_ids.numel())

    # -- the real forward -------------------------------------------------------------------------
    @torch.no_grad()
    def _real_forward(self) -> None:
        """Run the model once, recording norm scales, queries/keys, embeddings and the MLPs' inputs and outputs."""
        for norm in self.norms:
            norm.scales.clear()
        for site in self.qk:
            site.outputs.clear()
        handles, store = [], {"emb": None}

        def record_norm(norm):
            def hook(_m, args, kwargs, output):
                x = _input(args, kwargs)
                if not norm.centred and norm.gain is None:
                    norm.gain = _rms_gain(norm, x)
                scale = norm.scale_of(x)
                tol = _tolerance(output.dtype, 1e-4)
                if not torch.allclose(
                    norm.apply(x, scale), output, rtol=tol, atol=tol * float(output.abs().max())
                ):
                    raise GraphError(
                        f"saelab's frozen copy of {type(norm.module).__name__} does not reproduce it, so this "
                        "norm cannot be frozen; attribution graphs support nn.LayerNorm and RMSNorm models."
                    )
                norm.scales.append(scale)

            return hook

        def record_qk(site):
            return lambda _m, _a, output: site.outputs.append(output.detach())

        def record_emb(_m, _a, output):
            store["emb"] = output.detach()

        try:
            for norm in self.norms:
                handles.append(norm.module.register_forward_hook(record_norm(norm), with_kwargs=True))
            for site in self.qk:
                handles.append(site.module.register_forward_hook(record_qk(site)))
            handles.append(self.lm.model.get_input_embeddings().register_forward_hook(record_emb))
            ins, outs = {}, {}
            patches = {}
            for layer in range(self.n_layers):
                patches[f"blocks.{layer}.{INPUT_SUFFIX}"] = _saver(ins, layer)
                patches[f"blocks.{layer}.{OUTPUT_SUFFIX}"] = _saver(outs, layer)
            with self.lm.patch(patches):
                logits = self.lm.forward(self.input_ids)
        finally:
            for handle in handles:
                handle.remove()
        self.embeddings = store["emb"][0]
        self.mlp_inputs = [ins[layer][0] for layer in range(self.n_layers)]
        self.mlp_outputs = [outs[layer][0] for layer in range(self.n_layers)]
        self.logits = logits[0].detach()

    @torch.no_grad()
    def _split_mlp_outputs(self) -> None:
        """Each MLP output = transcoder output + error; at a zeroed BOS it is one constant (no nodes).

        The features of every layer are read off the real forward first: a cross-layer transcoder's
        output at a layer includes what the features of every earlier layer write to it.
        """
        self.activations, self.errors, self._biases = [], [], []
        for layer in range(self.n_layers):
            acts = self.transcoders.encode(layer, self.mlp_inputs[layer]).to(self.dtype)
            if self.zero_bos:
                acts[0] = 0
            self.activations.append(acts)
        for layer in range(self.n_layers):
            recon = self.output(layer, self.activations)
            error = self.mlp_outputs[layer] - recon
            if self.zero_bos:
                error[0] = 0
            self.errors.append(error)
            self._biases.append(self.mlp_outputs[layer] - recon - error)  # nonzero only at a zeroed BOS

    def targets(self, layer: int) -> range:
        """The layers whose MLP outputs the features of `layer` write to (only itself, unless cross-layer)."""
        return self.transcoders.targets(layer)

    def decoder(self, layer: int, target: int | None = None) -> Tensor:
        """Decoder rows [d_sae, d_model]: how the features of `layer` write the MLP output of `target`
        (default: their own layer), output scale folded in."""
        target = layer if target is None else target
        if ("dec", layer, target) not in self._weights:
            weight = self.transcoders.decoder(layer, target)
            self._weights["dec", layer, target] = weight.to(self.dtype)
        return self._weights["dec", layer, target]

    def encoder(self, layer: int) -> Tensor:
        """Encoder columns [d_model, d_sae] as they read the MLP input (input scale folded in)."""
        if ("enc", layer) not in self._weights:
            self._weights["enc", layer] = self.transcoders.encoder(layer).to(self.dtype)
        return self._weights["enc", layer]

    def activations_of(self, features: Tensor) -> Tensor:
        """The activations of (layer, position, feature) rows [n, 3]."""
        values = [self.activations[layer][pos, idx] for layer, pos, idx in features.tolist()]
        return torch.stack(values) if values else torch.zeros(0, dtype=self.dtype)

    def output(self, layer: int, activations: list[Tensor]) -> Tensor:
        """The transcoders' output at `layer` [seq, d] from every layer's feature activations."""
        out = self.transcoders.b_dec(layer).to(self.dtype)
        for source in range(layer + 1):
            if layer in self.targets(source):
                out = out + activations[source] @ self.decoder(source, layer)
        return out

    def preactivations(self, layer: int, mlp_input: Tensor) -> Tensor:
        """A layer's feature pre-activations for an MLP input of the frozen model."""
        return self.transcoders.preacts(layer, mlp_input).detach().to(self.dtype)

    # -- the frozen model -------------------------------------------------------------------------
    @contextlib.contextmanager
    def frozen(
        self,
        embeddings: Tensor,
        mlp_outputs: list[Tensor],
        mlp_inputs: dict[int, Tensor],
        final: dict[str, Tensor] | None = None,
    ) -> Iterator[None]:
        """While active, a forward pass of a batch of this prompt is the frozen model.

        `embeddings` [batch, seq, d] and `mlp_outputs[layer]` [batch, seq, d] replace the token
        embeddings and MLP outputs; each layer's MLP input is stored in `mlp_inputs`. The real MLPs
        do not run (their outputs would be replaced). With `final`, the final norm's output is stored
        there as "out" and the pass stops (raising `StopFrozen`) before the unembedding.
        """
        handles = []
        try:
            for norm in self.norms:
                handles.append(norm.module.register_forward_hook(_replay_norm(norm), with_kwargs=True))
            for site in self.qk:
                handles.append(site.module.register_forward_hook(_replay_qk(site)))
            handles.append(self.lm.model.get_input_embeddings().register_forward_hook(lambda *_: embeddings))
            if final is not None:  # after the norms' replay hooks, so it sees the frozen output
                handles.append(self.lm.final_norm.register_forward_hook(_stop_at(final)))
            patches: dict[str, Callable] = {}
            for layer in range(self.n_layers):
                patches[f"blocks.{layer}.{INPUT_SUFFIX}"] = _saver(mlp_inputs, layer)
                patches[f"blocks.{layer}.{OUTPUT_SUFFIX}"] = _constant(mlp_outputs[layer])
            mlps = [block.mlp for block in self.lm.blocks]
            with self.lm.patch(patches), _skipped(mlps), _eager_attention(self.lm.model.config, self.dtype):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def forward_frozen(
        self, embeddings: Tensor, mlp_outputs: list[Tensor], logits: bool = True
    ) -> tuple[list[Tensor], Tensor]:
        """(MLP inputs per layer, logits) of the frozen model, batched: all inputs are [batch, seq, d].

        With `logits=False` the pass stops at the final norm and returns its output [batch, seq, d]
        instead: the unembedding is linear, so `logit_directions` carries a logit's gradient there.
        """
        batch = embeddings.shape[0]
        ins: dict[int, Tensor] = {}
        final: dict[str, Tensor] | None = None if logits else {}
        for site in self.qk + self.norms:
            site.calls = 0
        with self.frozen(embeddings, mlp_outputs, ins, final):
            try:
                out = self.lm.forward(self.input_ids.expand(batch, -1))
            except StopFrozen:
                out = final["out"]
        return [ins[layer] for layer in range(self.n_layers)], out

    def logit_directions(self, tokens: Tensor) -> Tensor:
        """[n, d]: the gradient of each token's demeaned logit at the last position (the logit minus the
        mean logit) with respect to the final norm's output, so that a backward pass can start there.

        Read off the model's own head by one backward pass through it, so that whatever it does
        after the final norm (a bias, a logit scale) is included.
        """
        store: dict[str, Tensor] = {}

        def leaf(_m, _a, output):
            store["h"] = output.detach().requires_grad_()
            return store["h"]

        handle = self.lm.final_norm.register_forward_hook(leaf)
        try:
            with torch.enable_grad():
                logits = self.lm.forward(self.input_ids)
                if tokens.numel() == 0:
                    return torch.zeros(0, self.lm.d_model, dtype=self.dtype, device=logits.device)
                seeds = torch.zeros(len(tokens), *logits.shape, dtype=logits.dtype, device=logits.device)
                seeds[:, 0, -1] = -1.0 / logits.shape[-1]
                seeds[torch.arange(len(tokens)), 0, -1, tokens] += 1.0
                grads = torch.autograd.grad(logits, store["h"], seeds, is_grads_batched=True)[0]
        finally:
            handle.remove()
        return grads[:, 0, -1].detach()

    @torch.no_grad()
    def run(
        self,
        activations: list[Tensor] | None = None,
        errors: list[Tensor] | None = None,
        embeddings: Tensor | None = None,
    ) -> tuple[list[Tensor], Tensor]:
        """(MLP inputs per layer [seq, d], logits [seq, vocab]) with nodes set to the given values.

        Each argument defaults to the real forward's values; activations are held fixed (a feature is
        not re-encoded from its input), so changing one node shows only its direct and linear effects.
        """
        activations = self.activations if activations is None else activations
        errors = self.errors if errors is None else errors
        embeddings = self.embeddings if embeddings is None else embeddings
        outs = [
            (self.output(layer, activations) + errors[layer] + self._biases[layer])[None]
            for layer in range(self.n_layers)
        ]
        ins, logits = self.forward_frozen(embeddings[None], outs)
        return [x[0] for x in ins], logits[0]

    def _check_affine(self) -> None:
        """Refuse a model whose frozen copy is not affine in its nodes (some nonlinearity left unfrozen)."""
        scaled = [self.run([a * k for a in self.activations], [e * k for e in self.errors], self.embeddings * k)[1]
                  for k in (0.0, 1.0, 2.0)]  # fmt: skip
        first, second = scaled[1] - scaled[0], scaled[2] - scaled[1]
        tol = _tolerance(self.dtype, 1e-3) * float(first.abs().max()) + 1e-6
        if not torch.allclose(first, second, rtol=0, atol=tol):
            raise GraphError(
                f"the frozen copy of {self.lm.name} is not linear in its embeddings, features and errors, so its "
                "attribution graph would not be exact; this model family has a nonlinearity saelab does not freeze."
            )


def _tolerance(dtype: torch.dtype, floor: float) -> float:
    """A relative tolerance for recomputing a value in `dtype`: `floor`, or looser for half precision."""
    return max(floor, 32 * torch.finfo(dtype).eps)


def _input(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    return kwargs.get("hidden_states", next(v for v in kwargs.values() if isinstance(v, Tensor)))


def _saver(store: dict, layer: int) -> Callable[[Tensor], None]:
    def save(value: Tensor) -> None:
        store[layer] = value

    return save


def _constant(value: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda _old: value


class StopFrozen(Exception):
    """Ends a frozen pass at the final norm: what follows (the unembedding) is not needed."""


def _stop_at(store: dict[str, Tensor]):
    def hook(_m, _a, output):
        store["out"] = output
        raise StopFrozen

    return hook


@contextlib.contextmanager
def _eager_attention(config, dtype: torch.dtype) -> Iterator[None]:
    """While active, attention is transformers' eager implementation (softmax, then a matmul).

    With queries and keys replayed the pattern is a constant, so the backward pass through eager
    attention is one matmul by it; fused kernels (SDPA) would recompute the pattern and the query
    and key gradients in every backward pass. Not for float64 models: eager takes the softmax in
    float32, so the pattern would no longer be the real forward's to float64 precision.
    """
    before = getattr(config, "_attn_implementation", None)
    if before is None or dtype == torch.float64:
        yield
        return
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


@contextlib.contextmanager
def _skipped(modules: list[nn.Module]) -> Iterator[None]:
    """While active, each module's forward returns its input unchanged instead of computing.

    For the MLPs of a frozen pass: `hook_mlp_out` replaces their output by a constant, so computing it
    (most of a block's work) would be wasted. Hooks still fire, so `ln2.hook_normalized` still sees
    the MLP's input, and the output has the shape the replacement is checked against.
    """

    def identity(*args, **kwargs):
        return _input(args, kwargs)

    saved = [m.__dict__.get("forward") for m in modules]
    try:
        for module in modules:
            module.forward = identity
        yield
    finally:
        for module, forward in zip(modules, saved, strict=True):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _replay_norm(norm: _Norm):
    """The norm with the denominator of its matching call on the real forward (a constant)."""

    def hook(_m, args, kwargs, _output):
        scale = norm.scales[norm.calls % len(norm.scales)]
        norm.calls += 1
        return norm.apply(_input(args, kwargs), scale)

    return hook


def _replay_qk(site: _QK):
    """Queries and keys as on the real forward, so every attention pattern is the real one (a constant)."""

    def hook(_m, _args, output):
        real = site.outputs[site.calls % len(site.outputs)].expand_as(output)
        site.calls += 1
        if site.mask is None:
            return real
        return torch.where(site.mask.to(output.device), real, output)

    return hook
