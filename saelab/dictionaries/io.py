"""Dictionary files: save in SAELens's layout, load SAELens, sparsify and dictionary_learning folders.

A saved folder is exactly what SAELens 6.54 writes (`cfg.json`, `sae_weights.safetensors`, optional
`sparsity.safetensors`), with the training scales folded in so it runs on raw activations. saelab's
own config (the true family, e.g. batchtopk saved as jumprelu) rides along under the `"saelab"` cfg
key, which SAELens's loader drops. Loading never unpickles: safetensors, or torch.load(weights_only=True).
"""

from __future__ import annotations

import copy
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from saelab.core.fileio import atomic_folder, atomic_save_tensors, atomic_write_json
from saelab.dictionaries.base import Dictionary
from saelab.dictionaries.config import DictionaryConfig
from saelab.dictionaries.registry import build_dictionary, family, saelens_families
from saelab.errors import DictionaryFileError, DimensionMismatchError, SaelabError

CFG, WEIGHTS, SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
SPARSIFY_WEIGHTS, DL_WEIGHTS, DL_CFG = "sae.safetensors", "ae.pt", "config.json"
# The SAELens file-format version we write; SAELens reads configs older than 6.0 differently.
SAELENS_FORMAT_VERSION = "6.54.12"
VALID_FOLDER = (
    "a SAELens folder (cfg.json + sae_weights.safetensors), a sparsify folder (cfg.json + "
    "sae.safetensors) or a dictionary_learning folder (ae.pt + config.json)"
)
_METADATA_DEFAULTS = {
    "model_name": None,
    "model_class_name": "HookedTransformer",  # hook names follow TransformerLens
    "hook_head_index": None,
    "context_size": None,
    "prepend_bos": True,
    "seqpos_slice": [None],
    "dataset_path": None,
    "model_from_pretrained_kwargs": {},
    "exclude_special_tokens": False,
    "neuronpedia_id": None,
}
RESAVE = "Copy the folder's files again together from their source, or re-save the dictionary."


def _fail(path: Path | str, problem: str, fix: str = RESAVE) -> DictionaryFileError:
    """One paragraph: the file, what is wrong with it, what to do."""
    return DictionaryFileError(f"{path}: {problem} {fix}")


def _is_transcoder(cfg: DictionaryConfig) -> bool:
    return cfg.is_transcoder or cfg.out_dim != cfg.d_in


# ---- saving ------------------------------------------------------------------------------------
def saelens_architecture(cfg: DictionaryConfig) -> str:
    """SAELens's name for this family (its Family.saelens, or saelens_transcoder for a transcoder)."""
    return family(cfg.architecture).saelens_name(transcoder=_is_transcoder(cfg))


def saelens_config(dictionary: Dictionary, training_config: dict | None = None) -> dict:
    """The cfg.json of a (folded) dictionary, key for key as SAELens 6.54 writes it, plus our extras."""
    cfg = dictionary.cfg
    metadata = dict(_METADATA_DEFAULTS)
    metadata.update(cfg.metadata)
    metadata.update(hook_name=cfg.hook_name, sae_lens_version=SAELENS_FORMAT_VERSION)
    metadata.setdefault("sae_lens_training_version", None)
    if _is_transcoder(cfg):
        metadata.update(hook_name_out=cfg.output_hook_name, hook_head_index_out=None)
    out = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": str(dictionary.W_enc.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    extra = family(cfg.architecture).saelens_extra
    if extra is not None:
        keys = extra(cfg)
        # A family's metadata keys (e.g. SAELens's training_architecture) join the common ones.
        metadata.update(keys.pop("metadata", {}))
        out.update(keys)
    if _is_transcoder(cfg):
        out["d_out"] = cfg.out_dim
    out["architecture"] = saelens_architecture(cfg)
    out["saelab"] = {"format": 1, "config": cfg.to_dict(), "training_config": training_config}
    return out


def save_dictionary(
    dictionary: Dictionary,
    folder: str | Path,
    sparsity: torch.Tensor | None = None,
    training_config: dict | None = None,
) -> Path:
    """Write a SAELens-loadable folder, atomically; `sparsity` is log10 feature density [d_sae]."""
    folder = Path(folder)
    if folder.is_dir():
        others = sorted(p.name for p in folder.iterdir() if p.name not in (CFG, WEIGHTS, SPARSITY))
        if others:
            raise _fail(
                folder,
                f"exists and holds other files ({', '.join(others[:5])}); saving replaces the whole folder.",
                "Save the dictionary into its own subfolder, e.g. runs/<name>/dictionary.",
            )
    if sparsity is not None and tuple(sparsity.shape) != (dictionary.cfg.d_sae,):
        raise DimensionMismatchError(
            f"the sparsity tensor has shape {tuple(sparsity.shape)} but the dictionary has "
            f"d_sae={dictionary.cfg.d_sae} latents. Pass one log10 feature density per latent."
        )
    folded = copy.deepcopy(dictionary).cpu()
    folded.fold_scales()
    with atomic_folder(folder) as tmp:
        atomic_save_tensors(folded.saelens_tensors(), tmp / WEIGHTS)
        if sparsity is not None:
            atomic_save_tensors({"sparsity": sparsity.detach().float()}, tmp / SPARSITY)
        atomic_write_json(tmp / CFG, saelens_config(folded, training_config))
    return folder


# ---- reading files safely ----------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _fail(path, f"is not valid JSON ({err}).") from None
    if not isinstance(data, dict):
        raise _fail(path, "does not hold a JSON object.")
    return data


def _require(cfg: dict, keys: tuple[str, ...], path: Path) -> None:
    missing = [key for key in keys if cfg.get(key) is None]
    if missing:
        raise _fail(path, f"lacks the required key(s) {', '.join(missing)}.")


def _sniff_pickle(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error types; never show them raw
        if _sniff_pickle(path):
            raise _fail(
                path,
                "is a pickle/torch file, not safetensors; saelab never unpickles weights.",
                "Convert it where you trust the file: sd = torch.load(path, weights_only=True); "
                "safetensors.torch.save_file(sd, 'sae_weights.safetensors').",
            ) from None
        raise _fail(path, f"is corrupt or truncated and cannot be read as safetensors ({err}).") from None


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the header only (for metadata without loading weights)."""
    try:
        with safe_open(path, framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception:
        return {key: tuple(value.shape) for key, value in _read_safetensors(path).items()}


def _read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise _fail(
            path,
            f"holds Python objects other than tensors ({found[1] if found else 'unknown objects'}), so "
            "torch.load(weights_only=True) refused it; saelab never unpickles arbitrary objects.",
            "Where you trust the file, re-save a plain state dict: torch.save(ae.state_dict(), 'ae.pt').",
        ) from None
    except Exception:
        raise _fail(path, "is corrupt or truncated and cannot be read as a torch state dict.") from None
    if not isinstance(state, dict):
        raise _fail(path, f"holds a {type(state).__name__}, not a state dict.", "Save ae.state_dict().")
    return state


# ---- finding the format ------------------------------------------------------------------------
def _format_of(folder: Path) -> str | None:
    if (folder / CFG).is_file() and (folder / WEIGHTS).is_file():
        return "saelens"
    if (folder / CFG).is_file() and (folder / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    if (folder / DL_WEIGHTS).is_file():
        return "dictionary_learning"
    return None


def _resolve(path: str | Path) -> tuple[Path, str]:
    """The folder holding one dictionary and its format; a run folder with one hook subfolder is fine."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise _fail(path, "does not exist.", f"Check the path; a dictionary is {VALID_FOLDER}.")
    fmt = _format_of(path)
    if fmt:
        return path, fmt
    subs = sorted(p for p in path.iterdir() if p.is_dir() and _format_of(p))
    if len(subs) == 1:
        return subs[0], _format_of(subs[0])
    if subs:
        names = ", ".join(p.name for p in subs)
        raise _fail(path, f"holds several dictionaries ({names}).", f"Pick one, e.g. {subs[0]}.")
    found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
    raise _fail(
        path, f"holds no dictionary files (found: {found}).", f"A dictionary folder is {VALID_FOLDER}."
    )


# ---- SAELens -----------------------------------------------------------------------------------
def _saelens_config(folder: Path) -> tuple[DictionaryConfig, dict]:
    raw = _read_json(folder / CFG)
    extras = raw.get("saelab")
    if isinstance(extras, dict) and isinstance(extras.get("config"), dict):
        try:
            return DictionaryConfig.from_dict(extras["config"]), raw
        except (TypeError, ValueError, SaelabError) as err:
            raise _fail(folder / CFG, f"has an invalid saelab config ({err}).") from None
    _require(raw, ("d_in", "d_sae"), folder / CFG)
    arch = raw.get("architecture", "standard")
    loaders = saelens_families()
    if arch not in loaders:
        hint = " (saelab cannot represent the skip connection W_skip)" if "skip" in arch else ""
        raise _fail(
            folder / CFG,
            f"has SAELens architecture {arch!r}, which saelab cannot load{hint}.",
            f"saelab loads {', '.join(sorted(loaders))}.",
        )
    if raw.get("normalize_activations", "none") not in ("none", "expected_average_only_in", None):
        raise _fail(
            folder / CFG,
            f"uses run-time normalization {raw['normalize_activations']!r}, which saelab cannot represent.",
            "Use a dictionary saved with normalize_activations 'none'.",
        )
    meta = raw["metadata"] if isinstance(raw.get("metadata"), dict) else {}
    hook = meta.get("hook_name") or raw.get("hook_name") or "unknown"
    hook_out = meta.get("hook_name_out") or raw.get("hook_name_out")
    _require(raw, loaders[arch].saelens_required, folder / CFG)
    cfg = DictionaryConfig(
        architecture=loaders[arch].name,
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        d_out=int(raw["d_out"]) if raw.get("d_out") is not None else None,
        hook_name=hook,
        output_hook_name=hook_out if hook_out != hook else None,
        k=int(raw.get("k") or min(32, int(raw["d_sae"]))),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)) and "transcoder" not in arch,
        normalize_activations="none",
        metadata={**meta, "source": "saelens"},
    )
    return cfg, raw


def _saelens_tensors(folder: Path, raw: dict) -> dict[str, torch.Tensor]:
    tensors = _read_safetensors(folder / WEIGHTS)
    scale = tensors.pop("scaling_factor", None)
    if scale is not None and not torch.allclose(scale, torch.ones_like(scale)):
        raise _fail(folder / WEIGHTS, "has a finetuning scaling_factor.", "Fold it in with SAELens first.")
    if raw.get("rescale_acts_by_decoder_norm") and "saelab" not in raw and {"W_dec", "b_enc"} <= set(tensors):
        # SAELens scales pre-activations by ||W_dec,i|| and divides them out again when decoding:
        # folding the norms into the encoder gives the same latents and outputs.
        norms = tensors["W_dec"].norm(dim=-1).clamp_min(1e-8)
        tensors["W_enc"] = tensors["W_enc"] * norms
        tensors["b_enc"] = tensors["b_enc"] * norms
        tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
    return tensors


# ---- sparsify ----------------------------------------------------------------------------------
_SPARSIFY_HOOKS = {"": "hook_resid_post", ".mlp": "hook_mlp_out", ".self_attn": "hook_attn_out"}
_SPARSIFY_TENSORS = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "W_dec", "b_dec": "b_dec"}


def _sparsify_config(folder: Path) -> DictionaryConfig:
    raw = _read_json(folder / CFG)
    path = folder / SPARSIFY_WEIGHTS
    shapes = _safetensors_shapes(path)
    if "W_skip" in shapes or raw.get("skip_connection"):
        raise _fail(path, "has a skip connection (W_skip), which saelab cannot represent.", "Train without.")
    if raw.get("activation", "topk") != "topk":
        raise _fail(
            folder / CFG,
            f"uses activation {raw['activation']!r}; saelab loads sparsify's topk coders only.",
            "Train the sparse coder with activation='topk'.",
        )
    missing = [key for key in _SPARSIFY_TENSORS.values() if key not in shapes]
    if missing:
        raise _fail(path, f"lacks tensor(s) {', '.join(missing)}.")
    n_latents, d_in = shapes["encoder.weight"]
    d_in_cfg = raw.get("d_in")
    want = raw.get("num_latents") or (d_in_cfg or d_in) * int(raw.get("expansion_factor", 0) or 0)
    if (d_in_cfg is not None and d_in_cfg != d_in) or (want and want != n_latents):
        raise _fail(
            path,
            f"holds encoder.weight of shape {(n_latents, d_in)} but cfg.json says d_in={d_in_cfg}, "
            f"num_latents={want}.",
        )
    _require(raw, ("k",), folder / CFG)
    match = re.fullmatch(r"(?:model\.)?layers\.(\d+)(|\.mlp|\.self_attn)", folder.name)
    transcode = bool(raw.get("transcode"))
    hook = f"blocks.{match[1]}.{_SPARSIFY_HOOKS[match[2]]}" if match and not transcode else folder.name
    return DictionaryConfig(
        architecture="topk",
        d_in=d_in,
        d_sae=n_latents,
        hook_name=hook,
        k=int(raw["k"]),
        apply_b_dec_to_input=not transcode,  # sparsify subtracts b_dec unless transcoding
        normalize_activations="none",
        metadata={"source": "sparsify", "sparsify_hookpoint": folder.name, "transcode": transcode},
    )


def _sparsify_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = _read_safetensors(folder / SPARSIFY_WEIGHTS)
    out = {ours: tensors[theirs] for ours, theirs in _SPARSIFY_TENSORS.items()}
    out["W_enc"] = out["W_enc"].T  # nn.Linear stores [d_sae, d_in]
    return out


# ---- dictionary_learning -----------------------------------------------------------------------
# dict_class -> (family, SAELens name -> its state-dict key, whether b_dec is subtracted from the input)
_LINEAR = {"W_enc": "encoder.weight", "b_enc": "encoder.bias", "W_dec": "decoder.weight"}
_GATED = {"W_enc": "encoder.weight", "W_dec": "decoder.weight", "b_dec": "decoder_bias"}
_GATED |= {"b_gate": "gate_bias", "r_mag": "r_mag", "b_mag": "mag_bias"}
_DL_CLASSES = {
    "AutoEncoder": ("relu", {**_LINEAR, "b_dec": "bias"}, True),
    "AutoEncoderNew": ("relu", {**_LINEAR, "b_dec": "decoder.bias"}, False),
    "GatedAutoEncoder": ("gated", _GATED, True),
    "AutoEncoderTopK": ("topk", {**_LINEAR, "b_dec": "b_dec"}, True),
    "BatchTopKSAE": ("batchtopk", {**_LINEAR, "b_dec": "b_dec", "threshold": "threshold"}, True),
    "JumpReluAutoEncoder": (
        "jumprelu",
        {name: name for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")},
        False,
    ),
}
_DL_SUBMODULE = re.compile(r"(resid_post|mlp_out|attn_out)_layer_(\d+)")


def _dl_class(folder: Path, trainer: dict, state: dict | None) -> str:
    name = trainer.get("dict_class")
    if name is None and state is not None:  # no config.json: tell the classes apart by their tensors
        if "k" in state:
            raise _fail(folder, "holds a TopK or BatchTopK ae.pt without config.json.", "Add it.")
        clues = {"W_enc": "JumpReluAutoEncoder", "gate_bias": "GatedAutoEncoder", "bias": "AutoEncoder"}
        name = next((cls for key, cls in clues.items() if key in state), None)
        name = name or ("AutoEncoderNew" if "decoder.bias" in state else None)
        if name is None:
            raise _fail(folder, "holds an ae.pt of unknown layout and no config.json.", "Add it.")
    if name not in _DL_CLASSES:
        raise _fail(
            folder / DL_CFG,
            f"names dict_class {name!r}, which saelab cannot load.",
            f"saelab loads dictionary_learning's {', '.join(_DL_CLASSES)}.",
        )
    return name


def _dl_config(folder: Path, state: dict | None = None) -> tuple[DictionaryConfig, str]:
    raw = _read_json(folder / DL_CFG) if (folder / DL_CFG).is_file() else {}
    trainer = raw.get("trainer", raw) if isinstance(raw.get("trainer", raw), dict) else {}
    if not trainer.get("dict_class") and state is None:
        state = _read_torch_state(folder / DL_WEIGHTS)
    name = _dl_class(folder, trainer, state)
    architecture, mapping, b_dec_in = _DL_CLASSES[name]
    d_in, d_sae, k = trainer.get("activation_dim"), trainer.get("dict_size"), trainer.get("k")
    if d_in is None or d_sae is None or (family(architecture).knob == "k" and k is None):
        state = state if state is not None else _read_torch_state(folder / DL_WEIGHTS)
        w = state.get(mapping["W_enc"])
        if w is None:
            raise _fail(folder / DL_WEIGHTS, f"lacks {mapping['W_enc']}.")
        d_sae, d_in = (w.shape[1], w.shape[0]) if name == "JumpReluAutoEncoder" else tuple(w.shape)
        k = int(state["k"]) if "k" in state else k
    sub = str(trainer.get("submodule_name") or "")
    match = _DL_SUBMODULE.fullmatch(sub)
    layer = trainer.get("layer")
    hook = f"blocks.{match[2]}.hook_{match[1]}" if match else (sub or f"layer {layer}")
    cfg = DictionaryConfig(
        architecture=architecture,
        d_in=int(d_in),
        d_sae=int(d_sae),
        hook_name=hook,
        k=int(k) if k is not None else min(32, int(d_sae)),
        apply_b_dec_to_input=b_dec_in,
        normalize_activations="none",
        metadata={
            "source": "dictionary_learning",
            "dict_class": name,
            "model_name": trainer.get("lm_name"),
            "layer": layer,
            "submodule_name": trainer.get("submodule_name"),
            "context_size": (raw.get("buffer") or {}).get("ctx_len"),
        },
    )
    return cfg, name


def _dl_tensors(folder: Path, name: str, state: dict) -> dict[str, torch.Tensor]:
    architecture, mapping, _ = _DL_CLASSES[name]
    missing = [key for key in mapping.values() if key not in state]
    if missing:
        raise _fail(folder / DL_WEIGHTS, f"lacks {', '.join(missing)} for a {name}.")
    out = {ours: state[theirs] for ours, theirs in mapping.items()}
    if name != "JumpReluAutoEncoder":  # nn.Linear stores [out, in]
        out["W_enc"], out["W_dec"] = out["W_enc"].T, out["W_dec"].T
    if architecture == "batchtopk" and out["threshold"].numel() == 1:
        # One threshold on ReLU'd activations; -1 means "never set", i.e. a plain ReLU.
        out["threshold"] = out["threshold"].float().clamp_min(0).expand(out["b_enc"].shape[0]).clone()
    return out


# ---- loading -----------------------------------------------------------------------------------
def _assemble(cfg: DictionaryConfig, tensors: dict[str, torch.Tensor], source: Path) -> Dictionary:
    """Build the family, check every tensor's name and shape against the config, then copy them in."""
    try:
        dictionary = build_dictionary(cfg)
    except (TypeError, ValueError, SaelabError) as err:
        raise _fail(source, f"describes an invalid dictionary ({err}).") from None
    expected = {name: tuple(t.shape) for name, t in dictionary.saelens_tensors().items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise _fail(
            source,
            f"does not match a {cfg.architecture} dictionary (missing tensors: {missing or 'none'}; "
            f"unexpected: {extra or 'none'}); the config and weights do not belong together.",
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise _fail(
                source,
                f"has tensor {name} of shape {tuple(tensors[name].shape)}, but the config (d_in={cfg.d_in}, "
                f"d_sae={cfg.d_sae}, d_out={cfg.out_dim}) needs {shape}.",
            )
    dictionary.load_saelens_tensors({name: t.float() for name, t in tensors.items()})
    return dictionary


def _read_config(folder: Path, fmt: str, state: dict | None = None) -> tuple[DictionaryConfig, dict, str]:
    """(saelab config, raw SAELens cfg, dictionary_learning class) of a folder, without its weights."""
    try:
        if fmt == "saelens":
            return (*_saelens_config(folder), "")
        if fmt == "sparsify":
            return _sparsify_config(folder), {}, ""
        cfg, name = _dl_config(folder, state)
        return cfg, {}, name
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        source = folder / (DL_CFG if fmt == "dictionary_learning" else CFG)
        raise _fail(source, f"holds values saelab cannot interpret ({err!r}).") from None


def load_dictionary(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Load any supported folder (or a file inside one) as a saelab dictionary on raw activations."""
    folder, fmt = _resolve(path)
    state = _read_torch_state(folder / DL_WEIGHTS) if fmt == "dictionary_learning" else None
    cfg, raw, name = _read_config(folder, fmt, state)
    if fmt == "saelens":
        tensors, source = _saelens_tensors(folder, raw), folder / WEIGHTS
    elif fmt == "sparsify":
        tensors, source = _sparsify_tensors(folder), folder / SPARSIFY_WEIGHTS
    else:
        tensors, source = _dl_tensors(folder, name, state), folder / DL_WEIGHTS
    return _assemble(cfg, tensors, source).to(device)


def dictionary_metadata(path: str | Path) -> dict:
    """The folder's format and saelab config (family, sizes, hooks, k, model metadata), without weights."""
    folder, fmt = _resolve(path)
    cfg, raw, _ = _read_config(folder, fmt)
    return {
        "format": fmt,
        "folder": str(folder),
        "saelens_architecture": raw.get("architecture") or saelens_architecture(cfg),
        "has_sparsity": (folder / SPARSITY).is_file(),
        "training_config": (raw.get("saelab") or {}).get("training_config"),
        **cfg.to_dict(),
    }


__all__ = ["dictionary_metadata", "load_dictionary", "save_dictionary", "saelens_config"]
