"""Tiny random models, a word-level tokenizer and a small local corpus for fast tests (no downloads)."""

from __future__ import annotations

import contextlib
import io
import json
import random
import sys
import traceback
from pathlib import Path

import torch

from saelab.cli import main

WORDS = [f"w{i}" for i in range(200)]
SPECIAL = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3}
VOCAB = len(SPECIAL) + len(WORDS)


def make_tokenizer():
    """A word-level fast tokenizer with pad/bos/eos/unk, loadable with AutoTokenizer once saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIAL)
    vocab.update({w: i + len(SPECIAL) for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def make_model(
    kind: str = "llama", n_layers: int = 2, hidden: int = 32, seed: int = 0, **overrides
) -> torch.nn.Module:
    """The one tiny random causal LM factory: every model family saelab has an adapter for.

    kind: llama, gpt2, gpt_neox (parallel residual; use_parallel_residual=False for the sequential
    layout), gemma (norm gains stored as an offset from 1), gemma2 (sandwich norms), olmo2 (post-norms).
    `overrides` go to the family's config (e.g. attention_bias=True, tie_word_embeddings=True).
    """
    import transformers as tr

    torch.manual_seed(seed)
    tokens = {"bos_token_id": SPECIAL["<bos>"], "eos_token_id": SPECIAL["<eos>"]}
    llama_like = {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
    }
    configs = {
        "llama": lambda: tr.LlamaConfig(
            **llama_like, num_key_value_heads=2, pad_token_id=SPECIAL["<pad>"], **tokens
        ),
        "gpt2": lambda: tr.GPT2Config(
            vocab_size=VOCAB, n_embd=hidden, n_layer=n_layers, n_head=4, n_positions=64
        ),
        "gpt_neox": lambda: tr.GPTNeoXConfig(**llama_like, **tokens),
        "gemma": lambda: tr.GemmaConfig(**llama_like, num_key_value_heads=2, head_dim=hidden // 4),
        "gemma2": lambda: tr.Gemma2Config(**llama_like, num_key_value_heads=2, head_dim=hidden // 4),
        "olmo2": lambda: tr.Olmo2Config(**llama_like),
    }
    if kind not in configs:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose from {', '.join(configs)}")
    cfg = configs[kind]()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return tr.AutoModelForCausalLM.from_config(cfg).eval()


def save_model(folder: Path, kind: str = "llama", n_layers: int = 2, hidden: int = 32) -> Path:
    """save_pretrained a tiny model and its tokenizer into `folder` (a valid `load_model` path)."""
    folder = Path(folder)
    make_model(kind, n_layers, hidden).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def make_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(min_words, max_words))) for _ in range(n)]


def write_corpus(path: Path, n_docs: int = 200, seed: int = 0) -> Path:
    """A local .txt (documents separated by blank lines) or .jsonl corpus, by the path's suffix."""
    path = Path(path)
    docs = make_docs(n_docs, seed)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    else:
        path.write_text("\n\n".join(docs) + "\n")
    return path


def random_topk_sae(d_in: int, d_sae: int, hook: str, k: int = 8):
    """A TopK dictionary with seeded random encoder weights (no training): varied, reproducible activity."""
    from saelab.dictionaries import DictionaryConfig, build_dictionary

    cfg = DictionaryConfig(
        architecture="topk", d_in=d_in, d_sae=d_sae, k=k, hook_name=hook, normalize_activations="none"
    )
    sae = build_dictionary(cfg).eval()
    with torch.no_grad():
        sae.W_enc.normal_(generator=torch.Generator().manual_seed(1))
        sae.b_enc.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(2))
    return sae


# --- the CLI, run in this process --------------------------------------------------------------


def random_dictionary(
    layer: int,
    d_in: int,
    d_sae: int,
    hook_in: str = "ln2.hook_normalized",
    hook_out: str | None = "hook_mlp_out",
    architecture: str = "jumprelu",
    max_threshold: float = 0.2,
):
    """A dictionary at blocks.{layer}.<hook_in> (a transcoder to <hook_out> unless None) with random
    weights (std 0.5, seeded by the layer) and, for JumpReLU, thresholds below `max_threshold`, so that
    several latents fire at each position of a tiny model."""
    from saelab.dictionaries import DictionaryConfig, build_dictionary

    cfg = DictionaryConfig(
        architecture=architecture, d_in=d_in, d_sae=d_sae, k=4, seed=layer,
        hook_name=f"blocks.{layer}.{hook_in}", output_hook_name=f"blocks.{layer}.{hook_out}" if hook_out else None,
    )  # fmt: skip
    member = build_dictionary(cfg)
    generator = torch.Generator().manual_seed(100 + layer)
    with torch.no_grad():
        for tensor in member.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
        if architecture == "jumprelu":
            member.log_threshold.copy_(torch.rand(d_sae, generator=generator).mul(max_threshold).log())
    return member


def random_clt(n_layers: int, d_in: int, width: int, max_threshold: float = 0.2, architecture: str = "clt"):
    """A cross-layer transcoder over layers 0..n_layers-1 (ln2.hook_normalized -> hook_mlp_out) with random
    weights (std 0.5, seeded) and thresholds below `max_threshold`, so that several features fire."""
    from saelab.dictionaries import DictionaryConfig, build_dictionary

    cfg = DictionaryConfig(
        architecture=architecture, d_in=d_in, d_sae=width * n_layers, k=4, layers=list(range(n_layers)),
        hook_name="blocks.{i}.ln2.hook_normalized", output_hook_name="blocks.{i}.hook_mlp_out",
    )  # fmt: skip
    clt = build_dictionary(cfg)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for tensor in clt.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
        clt.set_threshold(torch.rand(n_layers, width, generator=generator) * max_threshold)
    return clt.eval()


def run(*args) -> tuple[int | str, str, str]:
    """(exit status, stdout, stderr) of `saelab args...`; an escaping exception is status 'crash'."""
    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["saelab", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code: int | str = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except BaseException:
                code = "crash"
                err.write(traceback.format_exc())
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def refused(*args) -> str:
    """Run a command that must fail cleanly; return its one-paragraph message."""
    code, _, err = run(*args)
    assert code == 2, err
    assert "Traceback" not in err and 'File "' not in err, err
    return " ".join(err.split())  # rich wraps long lines


def leftovers(folder) -> list[str]:
    """Temp files/folders and half-written things anywhere below `folder`."""
    found = []
    for path in folder.rglob("*"):
        name = path.name
        if name.endswith((".tmp", ".old")) or ".tmp" in name:
            found.append(str(path))
        if name == "sae_weights.safetensors" and not (path.parent / "cfg.json").exists():
            found.append(str(path))
    return found
