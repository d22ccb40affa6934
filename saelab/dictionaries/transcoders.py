"""Transcoders for attribution graphs: a per-layer set, or one cross-layer transcoder (CLT), in saelab's
layout or circuit-tracer's.

circuit-tracer's `cross_layer_transcoder` folder (written by `save_clt`, read by `load_clt`):
`config.yaml` (`model_kind: cross_layer_transcoder`, `model_name`, `feature_input_hook`,
`feature_output_hook`, `scan`), and per layer i of L: `W_enc_{i}.safetensors` holding `W_enc_{i}`
[d_transcoder, d_model], `b_enc_{i}` [d_transcoder], `b_dec_{i}` [d_model] and `threshold_{i}`
[d_transcoder], and `W_dec_{i}.safetensors` holding `W_dec_{i}` [d_transcoder, L - i, d_model] (layer
i's features' decoders to layers i..L-1). Scales are folded in; hooks are named as in `sets`.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
import yaml

from saelab.core.fileio import atomic_folder, atomic_save_tensors, atomic_write_text
from saelab.dictionaries.base import Dictionary
from saelab.dictionaries.config import DictionaryConfig
from saelab.dictionaries.families.clt import CrossLayerTranscoder
from saelab.dictionaries.io import _read_safetensors, load_dictionary
from saelab.dictionaries.registry import build_dictionary
from saelab.dictionaries.sets import (
    SET_INDEX,
    TRANSCODER_SET_INDEX,
    DictionarySet,
    load_dictionary_set,
    saelab_hook,
    split_hook,
    tracer_hook,
)
from saelab.errors import DictionaryFileError, DictionarySetError

CLT_KIND = "cross_layer_transcoder"


def is_cross_layer(dictionary) -> bool:
    """Whether `dictionary` is a cross-layer transcoder (not a set, a single-hook dictionary or a crosscoder)."""
    return isinstance(dictionary, CrossLayerTranscoder)


def _suffix(template: str | None) -> str:
    """`blocks.{i}.ln2.hook_normalized` -> `ln2.hook_normalized`."""
    return split_hook((template or "").replace("{i}", "0"))[1]


def save_clt(
    dictionary: Dictionary, folder: str | Path, model_name: str | None = None, scan: str | None = None
) -> Path:
    """circuit-tracer's cross_layer_transcoder folder for a saelab CLT, written atomically."""
    if not is_cross_layer(dictionary):
        raise DictionarySetError(
            f"save_clt writes a cross-layer transcoder, and this is a {dictionary.cfg.architecture} dictionary. "
            "Save a per-layer transcoder set with save_transcoder_set."
        )
    cfg = dictionary.cfg
    if cfg.layers != list(range(len(cfg.layers))):
        raise DictionarySetError(
            f"circuit-tracer numbers a CLT's layers from 0, but this one reads layers {cfg.layers}. Train it "
            "on layers 0..n-1 to export it, or keep it in saelab's layout (save_dictionary)."
        )
    folded = copy.deepcopy(dictionary).cpu().float()
    folded.fold_scales()
    model_name = model_name or cfg.metadata.get("model_name") or "unknown-model"
    config = {
        "model_kind": CLT_KIND,
        "model_name": model_name,
        "feature_input_hook": tracer_hook(_suffix(cfg.hook_name)),
        "feature_output_hook": tracer_hook(_suffix(cfg.output_hook_name)),
        "scan": scan or f"{model_name.split('/')[-1]}/saelab-clt",
    }
    threshold = folded.threshold.detach()
    with atomic_folder(Path(folder)) as tmp:
        for layer in range(folded.n_layers):
            encoder = {
                f"W_enc_{layer}": folded.W_enc[layer].detach().t().contiguous(),
                f"b_enc_{layer}": folded.b_enc[layer].detach().clone(),
                f"b_dec_{layer}": folded.b_dec[layer].detach().clone(),
                f"threshold_{layer}": threshold[layer].clone(),
            }
            atomic_save_tensors(encoder, tmp / f"W_enc_{layer}.safetensors")
            atomic_save_tensors(
                {f"W_dec_{layer}": folded.W_dec[layer].detach().contiguous()},
                tmp / f"W_dec_{layer}.safetensors",
            )
        atomic_write_text(tmp / TRANSCODER_SET_INDEX, yaml.safe_dump(config, sort_keys=False))
    return Path(folder)


def _tracer_config(folder: Path) -> dict:
    try:
        config = yaml.safe_load((folder / TRANSCODER_SET_INDEX).read_text())
    except yaml.YAMLError as err:
        raise DictionaryFileError(f"{folder / TRANSCODER_SET_INDEX} is not valid YAML ({err}).") from err
    return config if isinstance(config, dict) else {}


def load_clt(folder: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """A circuit-tracer cross_layer_transcoder folder as a saelab CLT (family `clt`, JumpReLU thresholds)."""
    folder = Path(folder)
    config = _tracer_config(folder)
    if config.get("model_kind") != CLT_KIND:
        raise DictionaryFileError(
            f"{folder / TRANSCODER_SET_INDEX} has model_kind {config.get('model_kind')!r}, not {CLT_KIND!r}."
        )
    layers = sorted(
        int(m.group(1))
        for p in folder.glob("W_enc_*.safetensors")
        if (m := re.fullmatch(r"W_enc_(\d+)\.safetensors", p.name))
    )
    if not layers:
        raise DictionarySetError(
            f"{folder} holds no W_enc_{{i}}.safetensors files, so it holds no cross-layer transcoder."
        )
    n_layers = len(layers)
    missing = [
        i for i in range(n_layers) if i not in layers or not (folder / f"W_dec_{i}.safetensors").is_file()
    ]
    if missing or layers != list(range(n_layers)):
        gaps = sorted(set(range(max(layers) + 1)) - set(layers)) or missing
        raise DictionarySetError(
            f"the cross-layer transcoder in {folder} lacks the files of layer(s) {gaps} (W_enc_{{i}} and W_dec_{{i}}.safetensors "
            "for every layer from 0). Copy the missing files there."
        )
    encoders = [_read_safetensors(folder / f"W_enc_{i}.safetensors") for i in range(n_layers)]
    decoders = [_read_safetensors(folder / f"W_dec_{i}.safetensors")[f"W_dec_{i}"] for i in range(n_layers)]
    width, d_model = encoders[0]["W_enc_0"].shape
    for i, decoder in enumerate(decoders):
        if tuple(decoder.shape) != (width, n_layers - i, decoder.shape[-1]):
            raise DictionaryFileError(
                f"{folder / f'W_dec_{i}.safetensors'}: W_dec_{i} has shape {list(decoder.shape)}, expected "
                f"[{width}, {n_layers - i}, d_model] (layer {i}'s features write to layers {i}..{n_layers - 1})."
            )
    suffix_in = saelab_hook(config.get("feature_input_hook", "mlp.hook_in"))
    suffix_out = saelab_hook(config.get("feature_output_hook", "mlp.hook_out"))
    cfg = DictionaryConfig(
        architecture="clt",
        d_in=d_model,
        d_sae=width * n_layers,
        d_out=decoders[0].shape[-1],
        hook_name=f"blocks.{{i}}.{suffix_in}",
        output_hook_name=f"blocks.{{i}}.{suffix_out}",
        layers=list(range(n_layers)),
        normalize_activations="none",
        metadata={"model_name": config.get("model_name"), "source": "circuit-tracer"},
    )
    clt = build_dictionary(cfg)
    stacked = {
        "W_enc": torch.stack([e[f"W_enc_{i}"].t() for i, e in enumerate(encoders)]).float(),
        "b_enc": torch.stack([e[f"b_enc_{i}"] for i, e in enumerate(encoders)]).float(),
        "b_dec": torch.stack([e[f"b_dec_{i}"] for i, e in enumerate(encoders)]).float(),
        "threshold": torch.stack(
            [e.get(f"threshold_{i}", torch.zeros(width)) for i, e in enumerate(encoders)]
        ).float(),
    }
    stacked.update({f"W_dec_{i}": decoder.float() for i, decoder in enumerate(decoders)})
    clt.load_saelens_tensors(stacked)
    return clt.to(device)


def load_transcoders(path: str | Path, device: str | torch.device = "cpu") -> DictionarySet | Dictionary:
    """What `saelab graph --transcoders` reads: a per-layer transcoder set (saelab's set.json or
    circuit-tracer's transcoder_set) or one cross-layer transcoder (a saelab folder or circuit-tracer's
    cross_layer_transcoder)."""
    folder = Path(path)
    if (folder / SET_INDEX).is_file():
        return load_dictionary_set(folder, device)
    if (folder / TRANSCODER_SET_INDEX).is_file():
        if _tracer_config(folder).get("model_kind") == CLT_KIND:
            return load_clt(folder, device)
        return load_dictionary_set(folder, device)
    if not folder.is_dir() or not (folder / "cfg.json").is_file():
        raise DictionarySetError(
            f"{folder} is not a dictionary set or a cross-layer transcoder: it holds neither {SET_INDEX} (a saelab "
            f"set), {TRANSCODER_SET_INDEX} (circuit-tracer's transcoder_set or cross_layer_transcoder) nor cfg.json "
            "(a saelab CLT folder). Point --transcoders at one of those."
        )
    dictionary = load_dictionary(folder, device)
    if not is_cross_layer(dictionary):
        raise DictionarySetError(
            f"{folder} holds one {dictionary.cfg.architecture} dictionary at {dictionary.cfg.hook_name}; attribution "
            "graphs need a transcoder at every layer: a transcoder set (saelab train --layers 0-29 ...) or a "
            "cross-layer transcoder (--architecture clt_batchtopk)."
        )
    return dictionary
