"""Sparse forward/backward pieces: a TopK SAE only needs gradients for the k chosen latents.

A dense TopK step costs five [batch x d_in x d_sae] matmuls (encoder forward, decoder forward,
and three in the backward pass). With the latents chosen, only the encoder forward stays dense:
the decoder is an embedding_bag over k rows per token, and the encoder's backward pass is a
sparse [d_sae x batch] @ [batch x d_in] product.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def _sparse_weight_grad(indices: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, n_latents: int):
    """sum_b x_b outer grad_b over the chosen latents, as a [n_latents, d] tensor."""
    batch, k = indices.shape
    rows = torch.arange(batch, device=x.device).repeat_interleave(k)
    coo = torch.sparse_coo_tensor(
        torch.stack([indices.reshape(-1), rows]), grad.reshape(-1), (n_latents, batch), check_invariants=False
    )
    return torch.sparse.mm(coo, x)


class _SelectedPreacts(torch.autograd.Function):
    """Encoder pre-activations at given latents; backward touches only those latents."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, indices, values):
        ctx.save_for_backward(x, W_enc, indices)
        return values

    @staticmethod
    def backward(ctx, grad):
        x, W_enc, indices = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc.t().contiguous(), per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_W = _sparse_weight_grad(indices, grad, x, W_enc.shape[1]).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device)
            grad_b.index_add_(0, indices.reshape(-1), grad.reshape(-1))
        return grad_x, grad_W, grad_b, None, None


def selected_preacts(x, W_enc, b_enc, indices, values):
    """Make `values` (= (x @ W_enc + b_enc).gather(-1, indices), computed without grad) differentiable."""
    return _SelectedPreacts.apply(x, W_enc, b_enc, indices, values)


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j values[b, j] * W_dec[indices[b, j]]: the decoder for k active latents per row."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")


def topk_select(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and indices of the k largest entries per row (sorted is faster on CPU)."""
    values, indices = pre.topk(k, dim=-1, sorted=True)
    return values, indices
