"""Directions from two contrastive prompt sets: difference in means, and paired PCA.

Two sets of prompts that differ in one behaviour (code requests vs prose requests, harmful vs
harmless instructions) are run through the model; the residual stream is read at chosen token
positions of every layer, and the direction is mean(positive) - mean(negative) (unnormalised: its
norm is the size of the shift between the two sets, which is the natural scale for adding it).
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Sequence

import torch
from torch import Tensor

from saelab.core.models import HookedLM
from saelab.core.prompts import Position, format_prompts, iter_prompt_activations
from saelab.errors import ActivationError, DataError, DimensionMismatchError
from saelab.interventions.directions.collection import resid_pre_hooks
from saelab.interventions.directions.positions import post_instruction_positions, resolve_positions
from saelab.interventions.directions.storage import DirectionSet


def _split_pairs(
    items: Sequence, answers: Sequence[str] | None, what: str
) -> tuple[list[str], list[str] | None]:
    """Plain prompts, or (prompt, answer) pairs, into prompts and answers."""
    items = list(items)
    if not items:
        raise DataError(f"the {what} set is empty; give it at least one prompt.")
    pairs = [isinstance(x, (tuple, list)) for x in items]
    if any(pairs):
        if not all(pairs) or any(len(x) != 2 for x in items) or answers is not None:
            raise DataError(
                f"the {what} set mixes prompts and (prompt, answer) pairs (or also got answers=); use one form."
            )
        return [str(p) for p, _ in items], [str(a) for _, a in items]
    return [str(x) for x in items], None if answers is None else list(answers)


def _fingerprint(positive, pos_answers, negative, neg_answers) -> str:
    blob = json.dumps([positive, pos_answers, negative, neg_answers], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _provenance(
    lm: HookedLM, method, set_names, positive, pos_answers, negative, neg_answers, chat, n_post, **extra
) -> dict:
    from saelab import __version__

    template = getattr(lm.tokenizer, "chat_template", None) if chat else None
    return {
        "model": lm.name,
        "hf_id": lm.hf_id,
        "method": method,
        "sets": {
            "positive": {
                "name": set_names[0],
                "size": len(positive),
                "with_answers": pos_answers is not None,
            },
            "negative": {
                "name": set_names[1],
                "size": len(negative),
                "with_answers": neg_answers is not None,
            },
            "sha256": _fingerprint(positive, pos_answers, negative, neg_answers),
        },
        "chat": bool(template),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
        "example_text": format_prompts(lm.tokenizer, positive[:1], chat)[0]
        + (pos_answers[0] if pos_answers else ""),
        "post_instruction_tokens": n_post,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "saelab_version": __version__,
        **extra,
    }


def _contrast_inputs(lm: HookedLM, positive, negative, hooks, positions, chat, answers):
    """Both sets as prompts and answers, the checked hook points and the resolved position labels."""
    pos_answers, neg_answers = (None, None) if answers is None else answers
    positive, pos_answers = _split_pairs(positive, pos_answers, "positive")
    negative, neg_answers = _split_pairs(negative, neg_answers, "negative")
    if (pos_answers is None) != (neg_answers is None):
        raise DataError("only one of the two sets has answers; give answers to both sets or to neither.")
    hooks = list(hooks) if hooks is not None else resid_pre_hooks(lm)
    for h in hooks:
        lm.layer_of(h)  # unknown hook names fail here with the valid ones listed
    if positions is None:
        positions = ("answer",) if pos_answers is not None else (-1,)
    positions = resolve_positions(lm.tokenizer, positions, chat)
    return positive, pos_answers, negative, neg_answers, hooks, positions


@torch.no_grad()
def mean_difference(
    lm: HookedLM,
    positive: Sequence,
    negative: Sequence,
    hooks: Sequence[str] | None = None,
    positions: Sequence[Position] | None = None,
    chat: bool = True,
    name: str = "direction",
    answers: tuple[Sequence[str], Sequence[str]] | None = None,
    set_names: tuple[str, str] = ("positive", "negative"),
    batch_size: int = 16,
) -> DirectionSet:
    """mean(positive) - mean(negative) of the residual stream at every hook and position (unnormalised).

    `positive`/`negative` are prompts, or (prompt, answer) pairs (or prompts with `answers=(for the
    positive, for the negative)`); with answers the default position is "answer" (CAA), without it
    -1 (the last prompt token). `hooks=None` reads blocks.{i}.hook_resid_pre of every layer.
    """
    positive, pos_answers, negative, neg_answers, hooks, positions = _contrast_inputs(
        lm, positive, negative, hooks, positions, chat, answers
    )
    means = []
    for prompts, ans in ((positive, pos_answers), (negative, neg_answers)):
        total = None
        for acts in iter_prompt_activations(lm, prompts, hooks, positions, chat, batch_size, ans):
            part = acts.double().sum(0)
            total = part if total is None else total + part
        means.append(total / len(prompts))
    vectors = (means[0] - means[1]).float()
    n_post = post_instruction_positions(lm.tokenizer, chat)
    prov = _provenance(
        lm,
        "mean_difference",
        set_names,
        positive,
        pos_answers,
        negative,
        neg_answers,
        chat,
        n_post,
        name=name,
    )
    return DirectionSet(vectors, hooks, positions, prov)


def pca_directions(activations_pos: Tensor, activations_neg: Tensor) -> Tensor:
    """Unit first principal component of paired differences pos[i] - neg[i], per trailing index.

    Inputs [n, ..., d] (the same n: item i of one set is paired with item i of the other); returns
    [..., d]. The PCA is uncentered (an SVD of the differences), which equals RepE's PCA over pairs
    in random order: a centered PCA would throw away the mean shift, which is the signal. Sign
    convention: the positive set projects higher on average, i.e. mean(pos - neg) . v > 0; where that
    mean projection is exactly 0, the coordinate of largest magnitude (the first such) is positive.
    Computed in float64 on the CPU, so the same inputs always give the same direction.
    """
    pos, neg = torch.as_tensor(activations_pos), torch.as_tensor(activations_neg)
    if pos.shape != neg.shape or pos.ndim < 2:
        raise DimensionMismatchError(
            f"paired PCA needs two tensors of the same shape [n, ..., d], got {tuple(pos.shape)} and "
            f"{tuple(neg.shape)}; pair every positive item with one negative item."
        )
    diffs = (pos.double().cpu() - neg.double().cpu()).movedim(0, -2)  # [..., n, d]
    if not torch.isfinite(diffs).all():
        raise ActivationError("the activations contain NaN or inf; recompute them from a float32 model.")
    if bool((diffs.abs().amax(dim=(-2, -1)) == 0).any()):
        raise ActivationError(
            "the positive and negative activations are identical at some hook/position, so the difference "
            "has no direction; use prompt sets that differ, or a later layer/position."
        )
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    v = vh[..., 0, :]
    mean_proj = (diffs.mean(-2) * v).sum(-1)
    largest = v.gather(-1, v.abs().argmax(-1, keepdim=True)).squeeze(-1)
    sign = torch.where(mean_proj != 0, mean_proj.sign(), largest.sign())
    return (v * sign[..., None]).float()


@torch.no_grad()
def pca_direction(
    lm: HookedLM,
    positive: Sequence,
    negative: Sequence,
    hooks: Sequence[str] | None = None,
    positions: Sequence[Position] | None = None,
    chat: bool = True,
    name: str = "direction",
    answers: tuple[Sequence[str], Sequence[str]] | None = None,
    set_names: tuple[str, str] = ("positive", "negative"),
    batch_size: int = 16,
) -> DirectionSet:
    """Unit first principal components of paired differences (see `pca_directions`), as a DirectionSet.

    Item i of `positive` is paired with item i of `negative` (e.g. the same question with the
    matching and the non-matching answer), so both sets must have the same size.
    """
    positive, pos_answers, negative, neg_answers, hooks, positions = _contrast_inputs(
        lm, positive, negative, hooks, positions, chat, answers
    )
    if len(positive) != len(negative):
        raise DataError(
            f"PCA pairs item i of each set, but the sets have {len(positive)} and {len(negative)} items; "
            "give both the same number, or use mean_difference."
        )
    acts_pos = torch.cat(
        list(iter_prompt_activations(lm, positive, hooks, positions, chat, batch_size, pos_answers))
    )
    acts_neg = torch.cat(
        list(iter_prompt_activations(lm, negative, hooks, positions, chat, batch_size, neg_answers))
    )
    n_post = post_instruction_positions(lm.tokenizer, chat)
    prov = _provenance(
        lm,
        "pca",
        set_names,
        positive,
        pos_answers,
        negative,
        neg_answers,
        chat,
        n_post,
        name=name,
        unit_norm=True,
    )
    return DirectionSet(pca_directions(acts_pos, acts_neg), hooks, positions, prov)
