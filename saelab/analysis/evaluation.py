"""Evaluation: how well a dictionary reconstructs, how sparse it is, and what splicing it costs the LM.

Definitions follow SAELens / SAEBench so numbers compare:
- explained_variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (pooled over eval tokens);
- ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean), with the hook's output replaced by the
  reconstruction (CE_sae) or by zeros (CE_zero); kl_score = (KL_zero - KL_sae) / KL_zero;
- dead = latents that never fire on the eval tokens; dense = latents firing on > 10% of them.
Excluded positions (the position-0 attention sink / BOS and special tokens) are left untouched when
splicing and left out of every metric; the language-model losses are averaged over the predictions
made at kept positions.

Beside these, `saelens_*` and `saebench_*` keys are those tools' own definitions (their positions and
aggregation; see `anchors`), for a plain SAE. `explained_variance_trimmed` leaves out the 0.1% of
tokens with the largest norm: the pooled EV is otherwise decided by a handful of massive activations
(secondary attention sinks, norm ~1,000-9,000 against a median of ~170), one of which can hold 40% of
the total variance of 8,000 tokens; `variance_top_token_share` says how much the largest one holds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saelab.analysis.anchors import (
    SAEBENCH_SPECIAL_ATTRS,
    SAELENS_SPECIAL_ATTRS,
    AnchorLosses,
    AnchorSums,
    kl_per_position,
    special_keep,
    token_losses,
)
from saelab.core.data import DataConfig
from saelab.core.fileio import atomic_write_json
from saelab.core.models import HookedLM
from saelab.dictionaries import Dictionary
from saelab.dictionaries.transcoders import is_cross_layer
from saelab.errors import DataError, DimensionMismatchError

DENSE_THRESHOLD = 0.1
TRIM_FRACTION = 0.001  # share of tokens, by largest norm, that `explained_variance_trimmed` leaves out


@dataclass
class EvalConfig:
    n_tokens: int = 65536  # tokens for reconstruction metrics and feature density
    ce_contexts: int = 128  # contexts run three times through the whole model for CE / KL
    batch_contexts: int = 16
    split: str = "eval"
    anchor_ce: bool = False  # also CE / KL as SAELens and SAEBench define them (two more forwards per batch)


class _Sums:
    """Running float64 sums, so metrics over any number of tokens need one pass and little memory."""

    def __init__(self, d_sae: int, d_out: int, trim: int = 1):
        self.trim = trim  # the largest-norm tokens kept aside, whole, for the trimmed EV
        self.top_sq = torch.zeros(0, dtype=torch.float64)
        self.top_x = torch.zeros(0, d_out, dtype=torch.float64)
        self.top_err = torch.zeros(0, dtype=torch.float64)
        self.n = 0
        self.sq_err = 0.0
        self.sum_x = torch.zeros(d_out, dtype=torch.float64)
        self.sum_sq_x = 0.0
        self.l0 = 0.0
        self.l1 = 0.0
        self.cos = 0.0
        self.l2_ratio = 0.0
        self.fires = torch.zeros(d_sae, dtype=torch.long)

    def add(self, target: torch.Tensor, recon: torch.Tensor, latents: torch.Tensor) -> None:
        target, recon = target.double(), recon.double()
        self.n += target.shape[0]
        err = (recon - target).pow(2).sum(-1)
        self.sq_err += float(err.sum())
        self.sum_x += target.sum(0).cpu()
        sq = target.pow(2).sum(-1)
        self.sum_sq_x += float(sq.sum())
        sq = torch.cat([self.top_sq, sq.cpu()])
        top = sq.topk(min(self.trim, sq.shape[0])).indices
        self.top_sq = sq[top]
        self.top_x = torch.cat([self.top_x, target.cpu()])[top]
        self.top_err = torch.cat([self.top_err, err.cpu()])[top]
        active = latents > 0
        self.l0 += float(active.sum())
        self.l1 += float(latents.abs().sum())
        self.cos += float(F.cosine_similarity(recon, target, dim=-1).sum())
        self.l2_ratio += float((recon.norm(dim=-1) / target.norm(dim=-1).clamp_min(1e-12)).sum())
        self.fires += active.sum(0).cpu()

    def metrics(self) -> dict[str, float]:
        n = max(1, self.n)
        total_var = self.sum_sq_x - float(self.sum_x.pow(2).sum()) / n
        density = self.fires.double() / n
        m = self.top_sq.shape[0]
        rest_n = max(1, n - m)
        rest_sum = self.sum_x - self.top_x.sum(0)
        rest_var = self.sum_sq_x - float(self.top_sq.sum()) - float(rest_sum.pow(2).sum()) / rest_n
        rest_err = self.sq_err - float(self.top_err.sum())
        top_share = (
            float((self.top_x - self.sum_x / n).pow(2).sum(-1).max()) / max(total_var, 1e-12) if m else 0.0
        )
        return {
            "tokens": self.n,
            "l0": self.l0 / n,
            "l1": self.l1 / n,
            "mse": self.sq_err / (n * self.sum_x.numel()),
            "mse_per_token": self.sq_err / n,
            "explained_variance": 1 - self.sq_err / max(total_var, 1e-12),
            "fvu": self.sq_err / max(total_var, 1e-12),
            "explained_variance_trimmed": 1 - rest_err / max(rest_var, 1e-12),
            "trimmed_tokens": m,
            "variance_top_token_share": top_share,
            "cosine_similarity": self.cos / n,
            "l2_ratio": self.l2_ratio / n,
            "dead_fraction": float((density == 0).double().mean()),
            "dead_latents": int((density == 0).sum()),
            "dense_fraction": float((density > DENSE_THRESHOLD).double().mean()),
        }, density


def _batches(lm: HookedLM, data: DataConfig, n_contexts: int, batch_contexts: int, split: str):
    """(input_ids, keep) batches of `split` of the data (keep: `DataConfig.masked_batches`)."""
    return replace(data, split=split).masked_batches(lm.tokenizer, batch_contexts, max_contexts=n_contexts)


def _check_width(lm: HookedLM, dictionary: Dictionary) -> None:
    dcfg = dictionary.cfg
    in_hook = dcfg.input_hooks[-1]  # a cross-layer dictionary's last layer: a shallower model lacks it
    width = lm.hook_dim(in_hook)
    if width != dcfg.d_in:
        raise DimensionMismatchError(
            f"the dictionary expects d_in={dcfg.d_in} but {in_hook!r} of "
            f"{lm.name} has width {width}. Evaluate it on the model and hook point it was trained on."
        )
    out_hook = dcfg.output_hooks[-1]
    width = lm.hook_dim(out_hook)
    if width != dcfg.out_dim:
        raise DimensionMismatchError(
            f"the dictionary writes d_out={dcfg.out_dim} but its output hook {out_hook!r} of {lm.name} has "
            f"width {width}. Evaluate it on the model and hook points it was trained on."
        )


def _score(zero: float, with_sae: float, clean: float) -> float:
    """(zero - with_sae) / (zero - clean); NaN when ablating the hook does not change the loss at all."""
    denominator = zero - clean
    return (zero - with_sae) / denominator if abs(denominator) > 1e-12 else math.nan


def has_anchors(dictionary: Dictionary) -> bool:
    """SAELens's and SAEBench's core evals score a plain SAE: one hook, read and reconstructed."""
    dcfg = dictionary.cfg
    return not dcfg.layers and (dcfg.output_hook_name or dcfg.hook_name) == dcfg.hook_name


@torch.no_grad()
def reconstruction_metrics(
    lm: HookedLM, dictionary: Dictionary, data: DataConfig, cfg: EvalConfig, progress=True
):
    """L0, MSE, explained variance, cosine, density: captured with early exit, no logits needed.

    For a plain SAE the same pass also gives the `saelens_*` / `saebench_*` metrics (`anchors`), over
    whole batches of contexts as those tools read them."""
    dcfg = dictionary.cfg
    hooks = list(dict.fromkeys(dcfg.input_hooks + dcfg.output_hooks))
    sums = _Sums(
        dcfg.d_sae,
        dcfg.out_dim * len(dcfg.output_hooks),
        trim=max(1, math.ceil(TRIM_FRACTION * cfg.n_tokens)),
    )
    anchors = AnchorSums() if has_anchors(dictionary) else None
    n_contexts = math.ceil(cfg.n_tokens / max(1, data.context_size - 1)) + cfg.batch_contexts
    bar = tqdm(
        total=cfg.n_tokens,
        desc="eval: reconstruction",
        unit="tok",
        unit_scale=True,
        disable=not progress,
        leave=False,
    )
    for input_ids, keep in _batches(lm, data, n_contexts, cfg.batch_contexts, cfg.split):
        acts = lm.capture(input_ids.to(lm.device), hooks)
        keep = keep.to(lm.device)
        if anchors is None:
            x, y = dictionary.training_inputs({hook: acts[hook][keep].float() for hook in hooks})
            take = min(x.shape[0], cfg.n_tokens - sums.n)
            x, y = x[:take], y[:take]
            latents = dictionary.encode(x)
            recon = dictionary.decode(latents)
        else:
            # One encode of every position that any of the three rules keeps, then each rule's share.
            ids = input_ids.to(lm.device)
            keep_lens = special_keep(ids, lm.tokenizer, SAELENS_SPECIAL_ATTRS)
            keep_bench = special_keep(ids, lm.tokenizer, SAEBENCH_SPECIAL_ATTRS)
            union = keep | keep_lens | keep_bench
            x_all = acts[dcfg.hook_name][union].float()
            latents_all = dictionary.encode(x_all)
            recon_all = dictionary.decode(latents_all)
            sel = keep_lens[union]
            anchors.add_saelens(x_all[sel], recon_all[sel], latents_all[sel])
            sel = keep_bench[union]
            anchors.add_saebench(x_all[sel], recon_all[sel])
            sel = keep[union]
            take = min(int(sel.sum()), cfg.n_tokens - sums.n)
            y = x_all[sel][:take]
            latents, recon = latents_all[sel][:take], recon_all[sel][:take]
        # A cross-layer dictionary's [tokens, layers, d] outputs count as one vector per token.
        sums.add(y.flatten(1), recon.flatten(1), latents)
        bar.update(take)
        if sums.n >= cfg.n_tokens:
            break
    bar.close()
    if sums.n == 0:
        raise DataError("the evaluation data gave no usable tokens; point --data at a non-empty source.")
    metrics, density = sums.metrics()
    if anchors is not None:
        metrics.update(anchors.metrics())
    return metrics, density


@torch.no_grad()
def downstream_metrics(
    lm: HookedLM, dictionary: Dictionary, data: DataConfig, cfg: EvalConfig, progress=True
):
    """CE and KL of the LM with the dictionary spliced in, against clean and zero-ablated runs."""
    dcfg = dictionary.cfg
    in_hook, out_hook = dcfg.hook_name, dcfg.output_hook_name or dcfg.hook_name
    cross_layer = is_cross_layer(dictionary)
    totals = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
    count = 0
    anchors = (
        [AnchorLosses("saelens"), AnchorLosses("saebench")]
        if cfg.anchor_ce and has_anchors(dictionary)
        else []
    )
    bar = tqdm(total=cfg.ce_contexts, desc="eval: CE/KL", unit="ctx", disable=not progress, leave=False)
    for input_ids, keep in _batches(lm, data, cfg.ce_contexts, cfg.batch_contexts, cfg.split):
        input_ids, keep = input_ids.to(lm.device), keep.to(lm.device)
        seen: dict[str, torch.Tensor] = {}

        def record(value, name=in_hook):
            seen[name] = value
            return None

        def zero(value):
            out = value.clone()
            out[keep] = 0
            return out

        if cross_layer:
            clean_logits = lm.forward(input_ids)
            with lm.patch(cross_layer_splice(dictionary, keep)):
                sae_logits = lm.forward(input_ids)
            with lm.patch(dict.fromkeys(dcfg.output_hooks, zero)):
                zero_logits = lm.forward(input_ids)
        else:
            with lm.patch({in_hook: record}):
                clean_logits = lm.forward(input_ids)
            x = seen[in_hook]

            def splice(value, where=keep):
                recon = dictionary(x[where].float()).to(value.dtype)
                out = value.clone()
                out[where] = recon
                return out

            with lm.patch({out_hook: splice}):
                sae_logits = lm.forward(input_ids)
            with lm.patch({out_hook: zero}):
                zero_logits = lm.forward(input_ids)
            if anchors:
                _anchor_losses(lm, input_ids, keep, out_hook, splice, clean_logits, sae_logits, anchors)
        mask = keep[:, :-1].float()  # a prediction counts when it is made at a kept position
        n = float(mask.sum())
        totals["ce_clean"] += float((token_losses(clean_logits, input_ids) * mask).sum())
        totals["ce_sae"] += float((token_losses(sae_logits, input_ids) * mask).sum())
        totals["ce_zero"] += float((token_losses(zero_logits, input_ids) * mask).sum())
        totals["kl_sae"] += float((kl_per_position(clean_logits, sae_logits)[:, :-1] * mask).sum())
        totals["kl_zero"] += float((kl_per_position(clean_logits, zero_logits)[:, :-1] * mask).sum())
        count += n
        bar.update(input_ids.shape[0])
    bar.close()
    if count == 0:
        raise DataError("the evaluation data gave no usable tokens; point --data at a non-empty source.")
    out = {key: value / count for key, value in totals.items()}
    # No clamping of the denominator: zero-ablation can even lower the loss (a negative denominator),
    # and max(denominator, eps) would turn that into a score of about -1e9.
    out["ce_loss_score"] = _score(out["ce_zero"], out["ce_sae"], out["ce_clean"])
    out["kl_score"] = _score(out["kl_zero"], out["kl_sae"], 0.0)
    out["ce_tokens"] = int(count)
    for anchor in anchors:
        out.update(anchor.metrics())
    return out


def _anchor_losses(lm, input_ids, keep, hook, splice, clean_logits, sae_logits, anchors) -> None:
    """SAELens: splice where no structural special token is, zero every position; SAEBench (by
    default): splice and zero every position. The clean run and saelab's own splice are reused."""
    keep_lens = special_keep(input_ids, lm.tokenizer, SAELENS_SPECIAL_ATTRS)
    keep_bench = special_keep(input_ids, lm.tokenizer, SAEBENCH_SPECIAL_ATTRS)
    with lm.patch({hook: torch.zeros_like}):
        zero_logits = lm.forward(input_ids)
    if not torch.equal(keep_lens, keep):
        with lm.patch({hook: lambda value: splice(value, keep_lens)}):
            sae_logits = lm.forward(input_ids)
    anchors[0].add(input_ids, keep_lens, clean_logits, sae_logits, zero_logits)
    everywhere = torch.ones_like(keep)
    with lm.patch({hook: lambda value: splice(value, everywhere)}):
        bench_logits = lm.forward(input_ids)
    anchors[1].add(input_ids, keep_bench, clean_logits, bench_logits, zero_logits)


def cross_layer_splice(dictionary: Dictionary, keep: torch.Tensor) -> dict:
    """Patches that run the model with a cross-layer dictionary in place of every layer's output hook.

    Each layer's features are encoded from that layer's input in the spliced run itself (so errors
    compound as they do in the replacement model), and each output is what the features of that layer
    and every earlier one write to it.
    """
    dcfg = dictionary.cfg
    writes: dict[int, torch.Tensor] = {}

    def encode_at(index):
        def record(value):
            writes[index] = dictionary.layer_writes(
                index, dictionary.layer_latents(index, value[keep].float())
            )

        return record

    def decode_at(index):
        def splice(value):
            recon = dictionary.layer_output(index, writes)
            out = value.clone()
            out[keep] = recon.to(value.dtype)
            return out

        return splice

    patches = {}
    for index, (in_hook, out_hook) in enumerate(zip(dcfg.input_hooks, dcfg.output_hooks, strict=True)):
        patches[in_hook] = encode_at(index)
        patches[out_hook] = decode_at(index)
    return patches


def density_histogram(density: torch.Tensor, path: Path, title: str) -> None:
    """log10 feature density of the live latents, with the dead count in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    live = density[density > 0]
    fig, ax = plt.subplots(figsize=(7, 4))
    if live.numel():
        ax.hist(live.log10().numpy(), bins=60, color="#3b6ea5")
    ax.set_xlabel("log10 feature density (fraction of tokens where the latent fires)")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}\n{int((density == 0).sum())} of {density.numel()} latents dead on the eval tokens")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(
    lm: HookedLM,
    dictionary: Dictionary,
    data: DataConfig,
    cfg: EvalConfig | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Every metric above; written as eval.json (+ density.png) into out_dir when given."""
    cfg = cfg or EvalConfig()
    _check_width(lm, dictionary)
    dictionary = dictionary.to(lm.device).eval()
    metrics, density = reconstruction_metrics(lm, dictionary, data, cfg, progress)
    # A multi-hook dictionary is spliced in only if it is a transcoder from each layer to its own and
    # later layers (a CLT); a crosscoder's members feed back into each other's inputs in no defined order.
    spliceable = not dictionary.cfg.layers or is_cross_layer(dictionary)
    if cfg.ce_contexts > 0 and spliceable:
        metrics.update(downstream_metrics(lm, dictionary, data, cfg, progress))
    metrics.update(
        {
            "architecture": dictionary.cfg.architecture,
            "d_sae": dictionary.cfg.d_sae,
            "hook_name": dictionary.cfg.hook_name,
            "output_hook_name": dictionary.cfg.output_hook_name,
            "model": lm.name,
            "data": data.to_dict() | {"split": cfg.split},
            "excluded": "position 0 (BOS / attention sink) and special tokens"
            if data.exclude_bos and data.exclude_special
            else "see data",
        }
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        atomic_write_json(out_dir / "eval.json", metrics)
        density_histogram(
            density,
            out_dir / "density.png",
            f"{dictionary.cfg.architecture} d_sae={dictionary.cfg.d_sae} at {dictionary.cfg.hook_name}",
        )
    return metrics


def load_eval(path: str | Path) -> dict:
    return json.loads((Path(path) / "eval.json").read_text())
