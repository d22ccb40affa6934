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
    return sparse_weight_grad_flat(rows, indices.reshape(-1), grad.reshape(-1), x, n_latents)


def sparse_weight_grad_flat(rows, cols, grad, x, n_latents: int) -> torch.Tensor:
    """sum_e grad[e] * x[rows[e]] into row cols[e] of a [n_latents, d] tensor: a sparse @ dense product.

    Zero entries (latents a BatchTopK row did not keep, padding) are dropped first: building the
    sparse matrix sorts its entries, and most of a padded row's entries are zeros.
    """
    nonzero = grad != 0
    if not bool(nonzero.all()):
        rows, grad, cols = rows[nonzero], grad[nonzero], cols[nonzero]
    coo = torch.sparse_coo_tensor(
        torch.stack([cols, rows]), grad, (n_latents, x.shape[0]), check_invariants=False
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


def batch_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """BatchTopK's selection: the batch's k*B largest positive pre-activations, exactly.

    Returns per-row (values, indices) with the entries not kept zeroed, and the smallest kept value
    (None if nothing is positive). Candidates are each row's top 4k. Their (k*B)-th largest value is a
    lower bound of the true cutoff, so only rows whose candidates all clear it can hold more: those
    rows alone are widened to every value above that bound (other rows are padded with zero entries).
    """
    batch, d_sae = pre.shape
    budget = k * batch
    values, indices = pre.topk(min(d_sae, 4 * k), dim=-1, sorted=False)
    values = F.relu(values)
    cutoff = _cutoff(values, budget)
    saturated = ((values >= cutoff) & (values > 0)).all(-1)
    if values.shape[1] < d_sae and bool(saturated.any()):
        rows = saturated.nonzero().squeeze(1)
        need = int((pre[rows] >= cutoff).sum(-1).max())
        width = max(values.shape[1], need)
        wide_values, wide_indices = pre[rows].topk(width, dim=-1, sorted=False)
        pad = width - values.shape[1]
        values = F.pad(values, (0, pad))
        indices = torch.cat([indices, indices[:, :1].expand(-1, pad)], dim=1)
        values[rows], indices[rows] = F.relu(wide_values), wide_indices
        cutoff = _cutoff(values, budget)
    keep = (values >= cutoff) & (values > 0)
    smallest = values[keep].min() if bool(keep.any()) else None
    return values * keep, indices, smallest


def _cutoff(values: torch.Tensor, budget: int) -> torch.Tensor:
    flat = values.reshape(-1)
    if budget >= flat.numel():
        return values.new_tensor(0.0)
    return flat.topk(budget, sorted=False).values.min()


def _row_offsets(rows: torch.Tensor, batch: int) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=batch)
    return torch.cumsum(counts, 0) - counts


class _FlatSelectedPreacts(torch.autograd.Function):
    """Pre-activations x[rows] @ W_enc[:, cols] + b_enc[cols] at (row, latent) entries, rows sorted.

    Like _SelectedPreacts for any number of entries per row; backward touches only those entries.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, rows, cols, values):
        ctx.save_for_backward(x, W_enc, rows, cols)
        return values

    @staticmethod
    def backward(ctx, grad):
        x, W_enc, rows, cols = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            offsets = _row_offsets(rows, x.shape[0])
            grad_x = F.embedding_bag(
                cols, W_enc.t().contiguous(), offsets, per_sample_weights=grad, mode="sum"
            )
        if ctx.needs_input_grad[1]:
            grad_W = sparse_weight_grad_flat(rows, cols, grad, x, W_enc.shape[1]).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device).index_add_(
                0, cols, grad
            )
        return grad_x, grad_W, grad_b, None, None, None


def selected_preacts_flat(x, W_enc, b_enc, rows, cols, values):
    """Make `values` (= pre-activations at (rows, cols), computed without grad) differentiable."""
    return _FlatSelectedPreacts.apply(x, W_enc, b_enc, rows, cols, values)


class _FlatDecoderWeightGrad(torch.autograd.Function):
    """Identity on the reconstruction whose backward gives W_dec's gradient as a sparse product."""

    @staticmethod
    def forward(ctx, recon, W_dec, rows, cols, values):
        ctx.save_for_backward(rows, cols, values)
        ctx.n_latents = W_dec.shape[0]
        return recon.view_as(recon)

    @staticmethod
    def backward(ctx, grad):
        rows, cols, values = ctx.saved_tensors
        grad_W = sparse_weight_grad_flat(rows, cols, values, grad.contiguous(), ctx.n_latents)
        return grad, grad_W, None, None, None


def sparse_decode_flat(rows, cols, values, W_dec: torch.Tensor, batch: int) -> torch.Tensor:
    """[batch, d]: sum over entries e of values[e] * W_dec[cols[e]] into row rows[e] (rows sorted).

    The decoder for any number of active latents per row (a BatchTopK or JumpReLU batch), as an
    embedding_bag; W_dec's gradient is a sparse product, as in `sparse_decode`.
    """
    offsets = _row_offsets(rows, batch)
    recon = F.embedding_bag(cols, W_dec.detach(), offsets, per_sample_weights=values, mode="sum")
    if W_dec.requires_grad and torch.is_grad_enabled():
        recon = _FlatDecoderWeightGrad.apply(recon, W_dec, rows, cols, values.detach())
    return recon
