"""SAELens's and SAEBench's core-eval metrics, computed exactly as those tools compute them.

Why: a number called "explained variance" must mean the same thing whichever tool printed it. saelab's
own metrics (`evaluation`) use SAELens's formulas on saelab's positions; these are the anchors' own
definitions, position rules and aggregation included, so that saelab's eval.json can be put beside a
SAELens `run_evals` or SAEBench core result on the same tokens (tests/analysis/test_saelens_parity.py
checks them against the installed sae-lens). Sources: sae_lens/evals.py (6.54,
`get_sparsity_and_variance_metrics`, `ExplainedVarianceCalculator`, `get_recons_loss`) and SAEBench
`sae_bench/evals/core/main.py`.

- Positions: SAELens drops tokens whose id is the tokenizer's bos/eos/pad/sep/decoder_start id
  (`get_special_token_ids`), wherever they are; SAEBench drops pad/eos/bos ids. Neither drops
  position 0 as such, and neither drops other special tokens.
- SAELens explained variance: 1 - Σ_t ||x_t - x̂_t||² / (Σ_t ||x_t||² - N ||mean(x)||²), pooled over
  all kept tokens; `explained_variance_legacy`: the mean over tokens of 1 - ||x_t - x̂_t||² /
  ||x_t - mean_batch(x)||² (its pre-6.45.1 formula, still reported).
- SAEBench explained variance: 1 - mean_b(mean_t ||x - x̂||²) / (mean_b(mean_t ||x||²) -
  mean_{b,d}(mean_t x_d²)²), batches weighted equally. The subtracted term is the squared mean of
  x², not ||mean(x)||², so it is not the variance about the mean; it is reported as SAEBench prints it.
- CE / KL: SAELens and SAEBench zero-ablate the hook at every position (BOS included). SAELens splices
  the SAE at its kept positions; SAEBench (default `exclude_special_tokens_from_reconstruction=False`)
  at every position. Losses are averaged over predictions made at kept positions (KL also at the last).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SAELENS_SPECIAL_ATTRS = (
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
)
SAEBENCH_SPECIAL_ATTRS = ("pad_token_id", "eos_token_id", "bos_token_id")


def special_keep(input_ids: torch.Tensor, tokenizer, attrs: tuple[str, ...]) -> torch.Tensor:
    """True where the token id is none of the tokenizer's `attrs` ids (the anchors' ignore_tokens)."""
    ids = sorted({i for i in (getattr(tokenizer, a, None) for a in attrs) if i is not None})
    if not ids:
        return torch.ones_like(input_ids, dtype=torch.bool)
    return ~torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))


class AnchorSums:
    """Running sums over batches of whole contexts, as SAELens's and SAEBench's loops see them."""

    def __init__(self):
        self.n = 0
        self.sq_err = self.mse_sum = 0.0
        self.sum_x: torch.Tensor | None = None
        self.sum_sq_x = 0.0
        self.legacy = self.cos = self.l2_ratio = self.l0 = self.l1 = 0.0
        self.bias: list[float] = []
        self.bench_n = 0
        self.bench_mse = 0.0
        self.bench_sq: list[float] = []
        self.bench_sq_dim: list[torch.Tensor] = []
        self.bench_err: list[float] = []

    def add_saelens(self, x: torch.Tensor, x_hat: torch.Tensor, latents: torch.Tensor) -> None:
        """One batch's kept tokens [n, d], with SAELens's float32 per-batch reductions."""
        if x.shape[0] == 0:
            return
        err = (x - x_hat).pow(2).sum(-1)
        batch_sum = x.sum(0).to(torch.float64)
        self.sum_x = batch_sum if self.sum_x is None else self.sum_x + batch_sum
        self.sum_sq_x += x.pow(2).sum().item()
        self.sq_err += (x - x_hat).pow(2).sum().item()
        self.n += x.shape[0]
        self.legacy += float((1 - err / (x - x.mean(0)).pow(2).sum(-1)).double().sum())
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        cos = (x / norm_in[:, None] * (x_hat / norm_out[:, None])).sum(-1)
        self.cos += float(cos.double().sum())
        self.l2_ratio += float((norm_out / torch.where(norm_in.abs() < 1e-4, 1, norm_in)).double().sum())
        self.bias.append(float(x_hat.norm(dim=-1).pow(2).mean() / (x * x_hat).sum(-1).mean()))
        self.l0 += float((latents != 0).sum(-1).double().sum())
        self.l1 += float(latents.abs().sum(-1).double().sum())
        self.mse_sum += float(err.double().sum())

    def add_saebench(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """One batch's kept tokens [n, d] under SAEBench's mask."""
        if x.shape[0] == 0:
            return
        err = (x - x_hat).pow(2).sum(-1)
        self.bench_mse += float((err / x.shape[0]).double().sum())
        self.bench_n += x.shape[0]
        self.bench_sq.append(float(x.pow(2).sum(-1).mean(0)))
        self.bench_sq_dim.append(x.pow(2).mean(0))
        self.bench_err.append(float(err.mean(0)))

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.n:
            mean_x = self.sum_x / self.n
            total_var = self.sum_sq_x / self.n - float(mean_x.pow(2).sum())
            mse = self.sq_err / self.n
            out.update(
                saelens_tokens=self.n,
                saelens_explained_variance=1.0 - mse / total_var
                if total_var >= 1e-10
                else float(mse < 1e-10),
                saelens_explained_variance_legacy=self.legacy / self.n,
                saelens_mse=self.mse_sum / self.n,
                saelens_cossim=self.cos / self.n,
                saelens_l2_ratio=self.l2_ratio / self.n,
                saelens_relative_reconstruction_bias=sum(self.bias) / len(self.bias),
                saelens_l0=self.l0 / self.n,
                saelens_l1=self.l1 / self.n,
            )
        if self.bench_n:
            sq = sum(self.bench_sq) / len(self.bench_sq)
            sq_dim = float(torch.cat(self.bench_sq_dim).mean())
            out.update(
                saebench_explained_variance=1.0
                - (sum(self.bench_err) / len(self.bench_err)) / (sq - sq_dim**2),
                saebench_mse=self.bench_mse / self.bench_n,
            )
        return out


def token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position [B, T-1]."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none"
    ).view(input_ids.shape[0], -1)


def kl_per_position(clean_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(clean || other) per position [B, T]."""
    p_log = clean_logits.float().log_softmax(-1)
    q_log = other_logits.float().log_softmax(-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1)


class AnchorLosses:
    """Pooled CE / KL sums for one anchor's position rule: clean, with the SAE, zero-ablated."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.sums = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_sae": 0.0, "kl_zero": 0.0}
        self.ce_count = self.kl_count = 0.0

    def add(self, input_ids, keep, clean_logits, sae_logits, zero_logits) -> None:
        ce_mask, kl_mask = keep[:, :-1].float(), keep.float()
        for name, logits in (("clean", clean_logits), ("sae", sae_logits), ("zero", zero_logits)):
            self.sums[f"ce_{name}"] += float((token_losses(logits, input_ids) * ce_mask).sum())
        self.sums["kl_sae"] += float((kl_per_position(clean_logits, sae_logits) * kl_mask).sum())
        self.sums["kl_zero"] += float((kl_per_position(clean_logits, zero_logits) * kl_mask).sum())
        self.ce_count += float(ce_mask.sum())
        self.kl_count += float(kl_mask.sum())

    def metrics(self) -> dict[str, float]:
        if not self.ce_count:
            return {}
        ce = {k: v / self.ce_count for k, v in self.sums.items() if k.startswith("ce")}
        kl = {k: v / self.kl_count for k, v in self.sums.items() if k.startswith("kl")}
        p = self.prefix
        return {
            f"{p}_ce_loss_without_sae": ce["ce_clean"],
            f"{p}_ce_loss_with_sae": ce["ce_sae"],
            f"{p}_ce_loss_with_ablation": ce["ce_zero"],
            f"{p}_ce_loss_score": (ce["ce_zero"] - ce["ce_sae"]) / (ce["ce_zero"] - ce["ce_clean"]),
            f"{p}_kl_div_with_sae": kl["kl_sae"],
            f"{p}_kl_div_with_ablation": kl["kl_zero"],
            f"{p}_kl_div_score": (kl["kl_zero"] - kl["kl_sae"]) / kl["kl_zero"],
        }
