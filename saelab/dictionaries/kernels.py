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
    """sum_b x_b outer grad_b over the chosen latents, as a [n_latents, d] tensor.

    Zero entries (latents a BatchTopK row did not keep, padding) are dropped first: building the
    sparse matrix sorts its entries, and most of a padded row's entries are zeros.
    """
    batch, k = indices.shape
    rows = torch.arange(batch, device=x.device).repeat_interleave(k)
    flat_grad, flat_idx = grad.reshape(-1), indices.reshape(-1)
    nonzero = flat_grad != 0
    if not bool(nonzero.all()):
        rows, flat_grad, flat_idx = rows[nonzero], flat_grad[nonzero], flat_idx[nonzero]
    coo = torch.sparse_coo_tensor(
        torch.stack([flat_idx, rows]), flat_grad, (n_latents, batch), check_invariants=False
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


class _EncoderValues(torch.autograd.Function):
    """Like _SelectedPreacts for pre = (x - b_dec) @ W_enc + b_enc, with b_dec's gradient in closed form.

    d loss / d b_dec = -W_enc @ (per-latent sum of the gradients): one matrix-vector product instead
    of a [batch, d_in] gradient that autograd would only sum over the batch.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, indices, values):
        ctx.save_for_backward(x, b_dec, W_enc, indices)
        return values

    @staticmethod
    def backward(ctx, grad):
        x, b_dec, W_enc, indices = ctx.saved_tensors
        grad = grad.contiguous()
        per_latent = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device)
        per_latent.index_add_(0, indices.reshape(-1), grad.reshape(-1))
        grad_x = grad_b_dec = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc.t().contiguous(), per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_b_dec = -(W_enc @ per_latent)
        if ctx.needs_input_grad[2]:
            grad_W = _sparse_weight_grad(indices, grad, x - b_dec, W_enc.shape[1]).t()
        grad_b_enc = per_latent if ctx.needs_input_grad[3] else None
        return grad_x, grad_b_dec, grad_W, grad_b_enc, None, None


def encoder_values(x, b_dec, W_enc, b_enc, indices, values):
    """Differentiable pre-activations at `indices` for pre = (x - b_dec) @ W_enc + b_enc.

    `values` were computed without grad; pass b_dec=None when it is not subtracted (transcoders).
    """
    if b_dec is None:
        return _SelectedPreacts.apply(x, W_enc, b_enc, indices, values)
    return _EncoderValues.apply(x, b_dec, W_enc, b_enc, indices, values)


def selected_preacts(x, W_enc, b_enc, indices, values):
    """Make `values` (= (x @ W_enc + b_enc).gather(-1, indices), computed without grad) differentiable."""
    return _SelectedPreacts.apply(x, W_enc, b_enc, indices, values)


class _DecoderWeightGrad(torch.autograd.Function):
    """Identity on the reconstruction whose backward gives W_dec's gradient as a sparse product."""

    @staticmethod
    def forward(ctx, recon, W_dec, indices, values):
        ctx.save_for_backward(indices, values)
        ctx.n_latents = W_dec.shape[0]
        return recon.view_as(recon)

    @staticmethod
    def backward(ctx, grad):
        indices, values = ctx.saved_tensors
        return grad, _sparse_weight_grad(indices, values, grad.contiguous(), ctx.n_latents), None, None


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_j values[b, j] * W_dec[indices[b, j]]: the decoder for k active latents per row.

    embedding_bag gives the forward pass and the gradient for `values`; W_dec's gradient is a sparse
    [d_sae x batch] @ [batch x d] product (faster than embedding_bag's dense backward).
    """
    recon = F.embedding_bag(indices, W_dec.detach(), per_sample_weights=values, mode="sum")
    if W_dec.requires_grad and torch.is_grad_enabled():
        recon = _DecoderWeightGrad.apply(recon, W_dec, indices, values.detach())
    return recon


def topk_select(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and indices of the k largest entries per row (sorted is faster on CPU)."""
    values, indices = pre.topk(k, dim=-1, sorted=True)
    return values, indices
