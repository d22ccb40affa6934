"""Dictionary sets: one dictionary per layer (SAEs at one hook of every layer, or a transcoder at every
MLP), loaded as one object, because attribution graphs and circuits read them all at once.

Two folder layouts, both read by `load_dictionary_set` (it tells them apart by their index file):

* **saelab** (`save_dictionary_set`): `set.json` plus one SAELens-layout folder per layer
  (`layer_{i}/cfg.json`, `sae_weights.safetensors`), so each member also loads on its own, in saelab or
  SAELens.
* **circuit-tracer's `transcoder_set`** (`save_transcoder_set`): `config.yaml` (`model_kind:
  transcoder_set`, `model_name`, `feature_input_hook`, `feature_output_hook`, `scan`, `transcoders`: the
  layer files in layer order) and `layer_{i}.safetensors` holding `W_enc` and `W_dec` (both
  [d_transcoder, d_model]), `b_enc`, `b_dec` and `activation_function.threshold`. circuit-tracer names
  hooks inside a block; `mlp.hook_in` is saelab's `ln2.hook_normalized` (the MLP's input, after the
  norm) and `mlp.hook_out` its `hook_mlp_out`; other in-block names are written as they are. Training
  scales are folded into the weights. Only JumpReLU-shaped members fit: JumpReLU and BatchTopK (its inference
  threshold), and ReLU (threshold 0); a TopK or gated member is refused with the fix.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from saelab.core.fileio import atomic_folder, atomic_save_tensors, atomic_write_json, atomic_write_text
from saelab.dictionaries.base import Dictionary
from saelab.dictionaries.config import DictionaryConfig
from saelab.dictionaries.io import _read_safetensors, load_dictionary, save_dictionary
from saelab.dictionaries.registry import build_dictionary
from saelab.errors import DictionaryFileError, DictionarySetError

SET_INDEX = "set.json"
TRANSCODER_SET_INDEX = "config.yaml"
SET_FORMAT = 1
LAYER_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# circuit-tracer's in-block hook names -> saelab's (TransformerLens) ones.
_TRACER_HOOKS = {"mlp.hook_in": "ln2.hook_normalized", "mlp.hook_out": "hook_mlp_out"}
_SAELAB_HOOKS = {v: k for k, v in _TRACER_HOOKS.items()}
_THRESHOLD = "activation_function.threshold"


def split_hook(hook: str) -> tuple[int, str]:
    """`blocks.3.ln2.hook_normalized` -> (3, `ln2.hook_normalized`)."""
    match = LAYER_HOOK.match(hook)
    if not match:
        raise DictionarySetError(
            f"hook {hook!r} names no layer; a dictionary set holds one dictionary per layer, at hooks "
            "of the form blocks.{i}.<name> (for example blocks.{i}.ln2.hook_normalized)."
        )
    return int(match.group(1)), match.group(2)


@dataclass
class DictionarySet:
    """Dictionaries by layer, all at the same in-block hook (and, for transcoders, output hook)."""

    members: dict[int, Dictionary]
    model_name: str | None = None

    def __post_init__(self) -> None:
        if not self.members:
            raise DictionarySetError("a dictionary set needs at least one dictionary; none was given.")
        self.members = dict(sorted(self.members.items()))
        first = next(iter(self.members.values())).cfg
        _, self.hook_suffix = split_hook(first.hook_name)
        self.output_suffix = split_hook(first.output_hook_name)[1] if first.is_transcoder else None
        for layer, member in self.members.items():
            self._check_member(layer, member.cfg, first)
        missing = sorted(set(range(max(self.members) + 1)) - set(self.members))
        if missing:
            raise DictionarySetError(
                f"the dictionary set has no dictionary for layer(s) {missing}: every layer from 0 to "
                f"{max(self.members)} needs one (attribution reads each layer in turn). Train or add the "
                "missing layers, or drop the layers above the gap."
            )

    def _check_member(self, layer: int, cfg: DictionaryConfig, first: DictionaryConfig) -> None:
        at, suffix = split_hook(cfg.hook_name)
        if at != layer or suffix != self.hook_suffix:
            raise DictionarySetError(
                f"the dictionary for layer {layer} reads {cfg.hook_name!r}, but this set reads "
                f"blocks.{layer}.{self.hook_suffix}. Put each dictionary at the layer it was trained on, "
                "and use dictionaries trained at the same hook of every layer."
            )
        if cfg.is_transcoder != first.is_transcoder:
            raise DictionarySetError(
                f"layer {layer} holds {'a transcoder' if cfg.is_transcoder else 'an SAE'} but layer "
                f"{split_hook(first.hook_name)[0]} does not; a set is all SAEs or all transcoders."
            )
        if cfg.is_transcoder:
            out_at, out_suffix = split_hook(cfg.output_hook_name)
            if out_at != layer or out_suffix != self.output_suffix:
                raise DictionarySetError(
                    f"the transcoder for layer {layer} writes {cfg.output_hook_name!r}, but this set's "
                    f"transcoders write blocks.{layer}.{self.output_suffix}. Use transcoders trained "
                    "between the same hooks of every layer."
                )
        if cfg.d_in != first.d_in:
            raise DictionarySetError(
                f"layer {layer}'s dictionary reads width {cfg.d_in} but layer "
                f"{split_hook(first.hook_name)[0]}'s reads {first.d_in}: they come from different models."
            )

    # ---- access ------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.members)

    @property
    def is_transcoder_set(self) -> bool:
        return self.output_suffix is not None

    @property
    def d_model(self) -> int:
        return next(iter(self.members.values())).cfg.d_in

    def hook(self, layer: int) -> str:
        return f"blocks.{layer}.{self.hook_suffix}"

    def output_hook(self, layer: int) -> str:
        return f"blocks.{layer}.{self.output_suffix or self.hook_suffix}"

    def __getitem__(self, layer: int) -> Dictionary:
        if layer not in self.members:
            raise DictionarySetError(f"the dictionary set has no layer {layer}; it has layers {self.layers}.")
        return self.members[layer]

    def __iter__(self) -> Iterator[tuple[int, Dictionary]]:
        return iter(self.members.items())

    def __len__(self) -> int:
        return len(self.members)

    def to(self, device: str | torch.device) -> DictionarySet:
        for member in self.members.values():
            member.to(device)
        return self

    def check_model(self, n_layers: int) -> None:
        """Refuse a set with layers the model does not have, or one that stops short of its last layer."""
        if max(self.members) >= n_layers:
            raise DictionarySetError(
                f"the dictionary set has layers up to {max(self.members)} but the model has {n_layers} "
                f"(0 to {n_layers - 1}): it was trained on another model."
            )


def dictionary_set(dictionaries: Mapping[int, Dictionary] | list[Dictionary], model_name: str | None = None):
    """A DictionarySet from dictionaries keyed by layer, or from a list (each keyed by its hook's layer)."""
    if isinstance(dictionaries, Mapping):
        return DictionarySet(dict(dictionaries), model_name)
    members: dict[int, Dictionary] = {}
    for member in dictionaries:
        layer, _ = split_hook(member.cfg.hook_name)
        if layer in members:
            raise DictionarySetError(f"two dictionaries read layer {layer}; a set holds one per layer.")
        members[layer] = member
    return DictionarySet(members, model_name)


# ---- saelab layout -----------------------------------------------------------------------------
def _set_index(dset: DictionarySet, folders: dict[int, str]) -> dict:
    return {
        "format": SET_FORMAT,
        "kind": "transcoder_set" if dset.is_transcoder_set else "sae_set",
        "model_name": dset.model_name,
        "hook": f"blocks.{{i}}.{dset.hook_suffix}",
        "output_hook": f"blocks.{{i}}.{dset.output_suffix}" if dset.output_suffix else None,
        "layers": {str(layer): folders[layer] for layer in dset.layers},
    }


def save_dictionary_set(dset: DictionarySet, folder: str | Path) -> Path:
    """`set.json` + one SAELens-layout folder per layer, written atomically as one folder."""
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        for layer, member in dset:
            save_dictionary(member, tmp / f"layer_{layer}")
        atomic_write_json(
            tmp / SET_INDEX, _set_index(dset, {layer: f"layer_{layer}" for layer in dset.layers})
        )
    return folder


def write_set_index(folder: str | Path, saved: dict[int, Path], dset: DictionarySet) -> Path:
    """A set folder holding only `set.json`, pointing at dictionaries saved elsewhere (a run's saes/)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    relative = {layer: os.path.relpath(saved[layer], folder) for layer in dset.layers}
    atomic_write_json(folder / SET_INDEX, _set_index(dset, relative))
    return folder


# ---- circuit-tracer's transcoder_set layout ----------------------------------------------------
def tracer_hook(suffix: str) -> str:
    """saelab's in-block hook name -> circuit-tracer's (`ln2.hook_normalized` -> `mlp.hook_in`)."""
    return _SAELAB_HOOKS.get(suffix, suffix)


def saelab_hook(name: str) -> str:
    """circuit-tracer's in-block hook name -> saelab's (`mlp.hook_out` -> `hook_mlp_out`)."""
    return _TRACER_HOOKS.get(name, name)


def _jumprelu_tensors(member: Dictionary, layer: int) -> dict[str, torch.Tensor]:
    """One layer file's tensors: the member as a JumpReLU on raw activations, in circuit-tracer's names."""
    arch = member.cfg.architecture
    folded = copy.deepcopy(member).cpu().float()
    folded.fold_scales()
    if arch in ("jumprelu", "batchtopk"):
        threshold = folded.threshold.detach().expand(member.cfg.d_sae).clone()
    elif arch == "relu":
        threshold = torch.zeros(member.cfg.d_sae)
    else:
        raise DictionarySetError(
            f"layer {layer} is a {arch} dictionary, which has no per-latent threshold; circuit-tracer reads "
            "JumpReLU (or ReLU) transcoders. Train the set with --architecture jumprelu, batchtopk or relu "
            "(BatchTopK saves its inference threshold), or keep it in saelab's layout (save_dictionary_set)."
        )
    return {  # a transcoder never subtracts b_dec from its input, as circuit-tracer's encoder does not
        "W_enc": folded.W_enc.detach().t().contiguous(),
        "W_dec": folded.W_dec.detach().contiguous(),
        "b_enc": folded.b_enc.detach().clone(),
        "b_dec": folded.b_dec.detach().clone(),
        _THRESHOLD: threshold.contiguous(),
    }


def save_transcoder_set(
    dset: DictionarySet, folder: str | Path, model_name: str | None = None, scan: str | None = None
) -> Path:
    """circuit-tracer's `transcoder_set` folder (config.yaml + layer_{i}.safetensors), atomically."""
    if not dset.is_transcoder_set:
        raise DictionarySetError(
            "circuit-tracer's transcoder_set layout holds transcoders, and this set holds SAEs (each reads "
            "and writes the same hook). Save it with save_dictionary_set instead."
        )
    folder = Path(folder)
    model_name = model_name or dset.model_name or "unknown-model"
    files = [f"layer_{layer}.safetensors" for layer in dset.layers]
    tensors = {layer: _jumprelu_tensors(member, layer) for layer, member in dset}
    config = {
        "model_kind": "transcoder_set",
        "model_name": model_name,
        "feature_input_hook": tracer_hook(dset.hook_suffix),
        "feature_output_hook": tracer_hook(dset.output_suffix),
        "scan": scan or f"{model_name.split('/')[-1]}/saelab-transcoders",
        "transcoders": files,
    }
    with atomic_folder(folder) as tmp:
        for layer_tensors, name in zip(tensors.values(), files, strict=True):
            atomic_save_tensors(layer_tensors, tmp / name)
        atomic_write_text(tmp / TRANSCODER_SET_INDEX, yaml.safe_dump(config, sort_keys=False))
    return folder


def _read_tracer_config(folder: Path) -> dict:
    try:
        config = yaml.safe_load((folder / TRANSCODER_SET_INDEX).read_text())
    except yaml.YAMLError as err:
        raise DictionaryFileError(f"{folder / TRANSCODER_SET_INDEX} is not valid YAML ({err}).") from err
    if not isinstance(config, dict) or config.get("model_kind") != "transcoder_set":
        raise DictionaryFileError(
            f"{folder / TRANSCODER_SET_INDEX} is not a circuit-tracer transcoder_set config (model_kind is "
            f"{config.get('model_kind') if isinstance(config, dict) else None!r}); a dictionary set is a "
            "per-layer transcoder set (model_kind: transcoder_set). Load a cross_layer_transcoder with "
            "saelab.dictionaries.transcoders.load_transcoders."
        )
    missing = [k for k in ("feature_input_hook", "feature_output_hook", "transcoders") if k not in config]
    if missing:
        raise DictionaryFileError(f"{folder / TRANSCODER_SET_INDEX} lacks {missing}.")
    return config


def _tracer_layer_file(folder: Path, entry) -> tuple[int, Path]:
    path_text = entry["filepath"] if isinstance(entry, dict) else str(entry)
    if path_text.startswith("hf://"):
        raise DictionaryFileError(
            f"{folder / TRANSCODER_SET_INDEX} points at {path_text}, on the Hugging Face hub; saelab reads a "
            "local folder. Download the layer files next to config.yaml and list them by file name."
        )
    path = Path(path_text)
    path = path if path.is_absolute() else folder / path
    match = re.search(r"layer_(\d+)\.safetensors$", path.name)
    layer = entry.get("layer") if isinstance(entry, dict) else None
    if layer is None and match is None:
        raise DictionaryFileError(
            f"cannot tell the layer of {path.name}; name layer files layer_{{i}}.safetensors."
        )
    return int(layer if layer is not None else match.group(1)), path


def _load_tracer_layer(path: Path, layer: int, input_suffix: str, output_suffix: str) -> Dictionary:
    if not path.is_file():
        raise DictionarySetError(
            f"the transcoder set lists {path.name} for layer {layer}, but there is no such file in "
            f"{path.parent}. Copy the missing layer file there, or remove it from config.yaml."
        )
    raw = _read_safetensors(path)
    threshold = raw.get(_THRESHOLD, raw.get("threshold"))
    needed = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if k not in raw]
    if needed:
        raise DictionaryFileError(f"{path} lacks the tensors {needed} of a circuit-tracer transcoder layer.")
    d_sae, d_in = raw["W_enc"].shape
    if tuple(raw["W_dec"].shape[:1]) != (d_sae,):
        raise DictionaryFileError(
            f"{path}: W_enc is [{d_sae}, {d_in}] but W_dec is {list(raw['W_dec'].shape)}; both must be "
            "[d_transcoder, d_model]."
        )
    cfg = DictionaryConfig(
        architecture="jumprelu" if threshold is not None else "relu",
        d_in=d_in,
        d_sae=d_sae,
        d_out=raw["W_dec"].shape[1],
        hook_name=f"blocks.{layer}.{input_suffix}",
        output_hook_name=f"blocks.{layer}.{output_suffix}",
        apply_b_dec_to_input=False,
    )
    member = build_dictionary(cfg)
    tensors = {
        "W_enc": raw["W_enc"].t().contiguous().float(),
        "W_dec": raw["W_dec"].float(),
        "b_enc": raw["b_enc"].float(),
        "b_dec": raw["b_dec"].float(),
    }
    if threshold is not None:
        tensors["threshold"] = threshold.float()
    member.load_saelens_tensors(tensors)
    return member


def load_dictionary_set(path: str | Path, device: str | torch.device = "cpu") -> DictionarySet:
    """A set from saelab's layout (set.json) or circuit-tracer's transcoder_set (config.yaml)."""
    folder = Path(path)
    if (folder / SET_INDEX).is_file():
        index = _read_set_index(folder)
        members = {}
        for layer, sub in index["layers"].items():
            if not (folder / sub).is_dir():
                raise DictionarySetError(
                    f"the dictionary set in {folder} lists layer {layer} in {sub}/, which is missing. Restore "
                    "that folder, or train the missing layer."
                )
            members[int(layer)] = load_dictionary(folder / sub, device)
        return DictionarySet(members, index.get("model_name"))
    if (folder / TRANSCODER_SET_INDEX).is_file():
        config = _read_tracer_config(folder)
        suffix_in = saelab_hook(config["feature_input_hook"])
        suffix_out = saelab_hook(config["feature_output_hook"])
        members = {}
        for entry in config["transcoders"]:
            layer, file = _tracer_layer_file(folder, entry)
            members[layer] = _load_tracer_layer(file, layer, suffix_in, suffix_out).to(device)
        return DictionarySet(members, config.get("model_name"))
    raise DictionarySetError(
        f"{folder} is not a dictionary set: it holds neither {SET_INDEX} (saelab) nor {TRANSCODER_SET_INDEX} "
        "(circuit-tracer's transcoder_set). Point at the set's folder, or save one with save_dictionary_set."
    )


def _read_set_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / SET_INDEX).read_text())
    except json.JSONDecodeError as err:
        raise DictionaryFileError(f"{folder / SET_INDEX} is not valid JSON ({err}).") from err
    if index.get("format") != SET_FORMAT or not isinstance(index.get("layers"), dict):
        raise DictionaryFileError(
            f"{folder / SET_INDEX} is not a saelab dictionary-set index (format {index.get('format')!r})."
        )
    return index
