"""Tokens/s of one TopK training step (forward, backward, Adam) vs a plain dense PyTorch TopK step.

d_in 576, d_sae 4608, k 32, batch 4096, on random activations standing in for a cache (the step's
cost does not depend on the values). Both run in this process, on the same inputs.
Usage: python benchmarks/bench_train_step.py [--threads N] [--steps N]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from saelab.core.devices import describe_machine
from saelab.dictionaries import DictionaryConfig, StepContext, build_dictionary

D_IN, D_SAE, K, BATCH = 576, 4608, 32, 4096


class DenseTopK(torch.nn.Module):
    """The reference: the textbook TopK SAE step, every matmul dense."""

    def __init__(self):
        super().__init__()
        self.W_enc = torch.nn.Parameter(torch.randn(D_IN, D_SAE) / D_IN**0.5)
        self.b_enc = torch.nn.Parameter(torch.zeros(D_SAE))
        self.W_dec = torch.nn.Parameter(self.W_enc.detach().t().clone())
        self.b_dec = torch.nn.Parameter(torch.zeros(D_IN))

    def loss(self, x):
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        values, indices = pre.topk(K, dim=-1)
        latents = torch.zeros_like(pre).scatter(-1, indices, F.relu(values))
        recon = latents @ self.W_dec + self.b_dec
        return (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def timed(step, steps: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(BATCH, D_IN) * 3

    reference = DenseTopK()
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-4)

    def reference_step():
        ref_opt.zero_grad(set_to_none=True)
        reference.loss(x).backward()
        ref_opt.step()

    def saelab_step(dead_mask: torch.Tensor | None, encoder_dtype: str = "float32"):
        """One trainer step (as saelab.training does it) on a fresh TopK SAE."""
        cfg = DictionaryConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=K, encoder_dtype=encoder_dtype)
        sae = build_dictionary(cfg)
        sae.init_from_data(x, x)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
        ctx = StepContext(dead_mask=dead_mask, progress=0.5)

        def step():
            out = sae.training_loss(x, x, ctx)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            sae.remove_parallel_decoder_grad()
            opt.step()
            sae.after_optimizer_step()

        return step

    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[: D_SAE // 2] = True  # half the latents dead: the AuxK path runs too

    t_ref = timed(reference_step, args.steps)
    t_ours = timed(saelab_step(None), args.steps)
    t_aux = timed(saelab_step(dead), args.steps)
    t_bf16 = timed(saelab_step(None, "bfloat16"), args.steps)
    print(describe_machine("float32 weights; encoder matmul as listed"))
    print(f"TopK step, d_in {D_IN}, d_sae {D_SAE}, k {K}, batch {BATCH}, {args.threads} thread(s)")
    rows = [
        ("dense PyTorch reference (float32)", t_ref),
        ("saelab TopK (float32)", t_ours),
        ("saelab TopK, encoder_dtype bfloat16", t_bf16),
        ("saelab TopK + AuxK, half the latents dead", t_aux),
    ]
    for name, seconds in rows:
        print(
            f"  {name:<52} {BATCH / seconds:8,.0f} tok/s  {seconds * 1000:6.0f} ms/step  "
            f"{t_ref / seconds:5.2f}x the reference"
        )


if __name__ == "__main__":
    main()
