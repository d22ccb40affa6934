"""A planted dictionary: latents that are known token-indicator features, for checking explanations.

Every scorer of `saelab.explain` is only as good as its judge, and on a real SAE nobody knows the right
label. Here we do: each latent of the planted dictionary fires on the tokens of one concept (digits,
animal words, closing brackets, capitalised words, the word ``self``, ...) and its true label says so.
Scoring the true labels against shuffled ones (another latent's true label) measures the judge, and
explaining the latents measures the explainer, against a known answer.

How the latents are made. The dictionary reads ``blocks.0.hook_resid_pre``, where the residual of a
model without learned positions (Llama, Gemma, ...) is a function of the token alone: its embedding.
For each concept a linear separator of the vocabulary's embeddings (members against the rest) is fit
by class-balanced weighted least squares, boosted on the tokens it gets wrong (a token's weight also
grows with the square root of how often it occurs in the corpus, so a frequent non-member firing costs
more). The separator becomes a JumpReLU latent:
``W_enc`` the normal, the threshold at the margin, so the latent is exactly 0 off the concept's
accepted tokens. Where the members are not linearly separable from the rest, a few tokens are on the
wrong side: `PlantedDictionary.report` counts them over the vocabulary and over corpus occurrences
(precision and recall of the latent against the concept), so every figure comes with how exact the
planted features are. The decoder row is the unit mean embedding of the accepted tokens.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from saelab.core.models import HookedLM, special_token_ids
from saelab.dictionaries import DictionaryConfig, build_dictionary
from saelab.dictionaries.base import Dictionary
from saelab.errors import DataError

HOOK = "blocks.0.hook_resid_pre"

ANIMALS = frozenset(
    "cat cats dog dogs horse horses cow cows pig pigs sheep goat goats mouse mice rat rats bird birds "
    "fish fox foxes wolf wolves bear bears lion lions tiger tigers rabbit rabbits duck ducks chicken "
    "chickens snake snakes monkey monkeys elephant elephants deer frog frogs owl owls bee bees ant ants "
    "spider spiders whale whales shark sharks eagle eagles camel camels zebra giraffe penguin parrot "
    "turtle donkey puppy kitten spam".split()
)
PYTHON_KEYWORDS = frozenset("def return import class lambda yield elif raise except".split())
NEGATIONS = frozenset("not no never nor cannot none nothing neither".split())


def _word(text: str) -> str:
    return text.strip()


def _is_digits(text: str) -> bool:
    w = _word(text)
    return bool(w) and all(c.isdigit() for c in w)


def _is_capitalised(text: str) -> bool:
    w = _word(text)
    return len(w) >= 2 and w.isalpha() and w[0].isupper() and w[1:].islower()


def _closes_bracket(text: str) -> bool:
    w = _word(text)
    return bool(w) and any(c in ")]}" for c in w) and not any(c.isalnum() for c in w)


@dataclass(frozen=True)
class Concept:
    """One planted feature: a name, its true label, and which token texts belong to it."""

    name: str
    label: str
    member: Callable[[str], bool]


CONCEPTS: tuple[Concept, ...] = (
    Concept("digits", "digits and numbers written with digits", _is_digits),
    Concept("animals", "names of animals such as cat, dog or horse", lambda t: _word(t).lower() in ANIMALS),
    Concept("closing_brackets", "closing brackets and parentheses", _closes_bracket),
    Concept("capitalised", "capitalised words that start with an upper-case letter", _is_capitalised),
    Concept("self", "the word self, as in Python methods", lambda t: _word(t) == "self"),
    Concept(
        "python_keywords",
        "Python keywords such as def, return, import and class",
        lambda t: _word(t) in PYTHON_KEYWORDS,
    ),
    Concept("negations", "negation words such as not, no and never", lambda t: _word(t).lower() in NEGATIONS),
    Concept("commas", "commas", lambda t: _word(t) == ","),
)


def token_texts(tokenizer, vocab_size: int) -> list[str]:
    """Each token id's text as it reads after other text (spaces kept, byte-level marks decoded)."""
    texts = []
    for i in range(vocab_size):
        text = tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        texts.append(unicodedata.normalize("NFC", text))
    return texts


@torch.no_grad()
def token_residuals(lm: HookedLM, hook: str = HOOK, batch: int = 4096) -> torch.Tensor:
    """The residual at `hook` for every token id [vocab, d_model] (float32), checked to depend on the
    token alone: the same ids at other positions must give the same rows."""
    n = lm.model.get_input_embeddings().weight.shape[0]
    rows = []
    for start in range(0, n, batch):
        ids = torch.arange(start, min(n, start + batch))
        rows.append(lm.capture(ids[:, None], hook)[hook][:, 0].float().cpu())
    table = torch.cat(rows)
    probe = torch.arange(min(n, 16))
    later = lm.capture(probe[None], hook)[hook][0].float().cpu()  # positions 0..15, not 0
    if not torch.allclose(later, table[probe], atol=1e-4, rtol=1e-4):
        raise DataError(
            f"the residual at {hook} of {lm.name} depends on the position (learned position embeddings), "
            "so no latent there can be a pure token indicator; plant the dictionary in a model without "
            "learned positions (Llama, Gemma, Mistral, ...)."
        )
    return table


def _fit_separator(
    x: torch.Tensor, positive: torch.Tensor, weight: torch.Tensor, rounds: int
) -> tuple[torch.Tensor, float]:
    """(w, c): w.x + c > 0 on as many members and as few others as can be, weighted by `weight`.

    A class-balanced weighted least-squares fit of +1 / -1 (in float64, with a bias), its threshold
    placed where the weighted F1 over the vocabulary is best; then the tokens on the wrong side get 4x
    the weight and the fit is redone, until none is wrong or `rounds` are spent (boosting the hinge)."""
    scale = x.norm(dim=-1).mean()
    xa = torch.cat([x.double() / scale, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    target = positive.double() * 2 - 1
    weight = weight.double()
    w_pos, w_neg = (weight * positive).sum(), (weight * ~positive).sum()
    wts = torch.where(positive, 0.5 * weight / w_pos, 0.5 * weight / w_neg)
    ridge = 1e-6 * torch.eye(xa.shape[1], dtype=torch.float64)
    best = None
    for _ in range(rounds):
        weighted = xa * wts[:, None]
        coef = torch.linalg.solve(weighted.T @ xa + ridge, weighted.T @ target)
        score = xa @ coef
        values, order = score.sort(descending=True)
        hits = (positive[order].double() * weight[order]).cumsum(0)
        fired = weight[order].cumsum(0)
        f1 = 2 * hits / (fired + w_pos)
        j = int(f1.argmax())
        below = float(values[j + 1]) if j + 1 < len(values) else float(values[j]) - 1.0
        cut = (float(values[j]) + below) / 2  # between the last accepted score and the next
        fires = score > cut
        wrong = fires != positive
        if best is None or float(f1[j]) > best[0]:
            best = (float(f1[j]), coef.clone(), cut)
        if not bool(wrong.any()):
            break
        wts = wts * torch.where(wrong, 4.0, 1.0).double()
    _, coef, cut = best
    return (coef[:-1] / scale).float(), float(coef[-1] - cut)


@dataclass
class PlantedDictionary:
    """The dictionary, its concepts (latent i is concepts[i]) and each concept's member token ids."""

    dictionary: Dictionary
    concepts: tuple[Concept, ...]
    members: list[list[int]]
    accepted: list[list[int]]  # the token ids on which latent i fires

    def report(self, corpus_tokens: torch.Tensor | None = None) -> list[dict]:
        """Per latent: members, accepted tokens, and precision / recall of the latent against the concept
        over the vocabulary and (with `corpus_tokens`, a 1-D tensor of token ids) over occurrences."""
        out = []
        counts = None
        if corpus_tokens is not None:
            vocab = self.dictionary.cfg.metadata.get("vocab_size") or int(corpus_tokens.max()) + 1
            counts = torch.bincount(corpus_tokens.flatten().long(), minlength=vocab).double()
        for concept, members, accepted in zip(self.concepts, self.members, self.accepted, strict=True):
            m, a = set(members), set(accepted)
            row = {
                "latent": len(out), "concept": concept.name, "label": concept.label,
                "n_members": len(m), "n_accepted": len(a),
                "vocab_precision": len(m & a) / len(a) if a else 0.0,
                "vocab_recall": len(m & a) / len(m) if m else 0.0,
                "false_accepts": sorted(a - m)[:20], "misses": sorted(m - a)[:20],
            }  # fmt: skip
            if counts is not None:

                def occurrences(ids: set[int]) -> float:
                    kept = [t for t in ids if t < len(counts)]
                    return float(counts[kept].sum()) if kept else 0.0

                both, fired, true = occurrences(m & a), occurrences(a), occurrences(m)
                row |= {"corpus_precision": both / fired if fired else 0.0,
                        "corpus_recall": both / true if true else 0.0, "corpus_occurrences": int(true)}  # fmt: skip
            out.append(row)
        return out


def plant(
    lm: HookedLM,
    concepts: Sequence[Concept] = CONCEPTS,
    token_counts: torch.Tensor | None = None,
    rounds: int = 12,
    min_members: int = 1,
) -> PlantedDictionary:
    """A JumpReLU dictionary at `HOOK` with one latent per concept (see the module docstring).

    `token_counts` [vocab] (how often each token occurs in the corpus) weights the fit: token t weighs
    1 + sqrt(count_t), so a frequent token on the wrong side costs more (on the embedded corpus this took
    the capitalised-words latent from 0.45 to 0.998 precision over occurrences, the newline token no
    longer firing); special tokens never belong to a concept and never fire."""
    if not concepts:
        raise DataError("plant needs at least one concept.")
    table = token_residuals(lm)
    vocab = table.shape[0]
    texts = token_texts(lm.tokenizer, vocab)
    specials = special_token_ids(lm.tokenizer)
    usable = torch.tensor([i not in specials for i in range(vocab)])
    weight = torch.ones(vocab, dtype=torch.float32)
    if token_counts is not None:
        if token_counts.shape[0] < vocab:
            raise DataError(f"token_counts has {token_counts.shape[0]} entries; the vocabulary has {vocab}.")
        weight = weight + token_counts[:vocab].float().sqrt()
    cfg = DictionaryConfig(
        architecture="jumprelu", d_in=table.shape[1], d_sae=len(concepts), hook_name=HOOK,
        apply_b_dec_to_input=False, normalize_activations="none", b_dec_init="zeros",
        metadata={"planted": [{"name": c.name, "label": c.label} for c in concepts], "vocab_size": vocab},
    )  # fmt: skip
    dictionary = build_dictionary(cfg).eval()
    members, accepted = [], []
    with torch.no_grad():
        dictionary.b_dec.zero_()
    for i, concept in enumerate(concepts):
        member = torch.tensor([bool(concept.member(t)) for t in texts]) & usable
        if int(member.sum()) < min_members:
            raise DataError(
                f"no token of {lm.name}'s vocabulary belongs to the concept {concept.name!r}; "
                "drop it or change its rule."
            )
        rows = usable.nonzero()[:, 0]
        w, c = _fit_separator(table[rows], member[rows], weight[rows], rounds)
        score = table @ w + c
        typical = score[score > 0].median() if bool((score > 0).any()) else torch.tensor(1.0)
        scale = typical.clamp_min(1e-6)
        with torch.no_grad():
            dictionary.W_enc[:, i] = w / scale
            dictionary.b_enc[i] = c / scale + 1.0
            dictionary.log_threshold[i] = 0.0  # fires where w.x + c > 0, i.e. pre > 1 (typically ~2)
        members.append(member.nonzero()[:, 0].tolist())
    with torch.no_grad():
        fires = (dictionary.encode(table) > 0) & usable[:, None]  # what the latents do, float32 included
        for i in range(len(concepts)):
            accepted.append(fires[:, i].nonzero()[:, 0].tolist())
            mean = table[fires[:, i]].mean(0) if fires[:, i].any() else table[members[i]].mean(0)
            dictionary.W_dec[i] = mean / mean.norm().clamp_min(1e-8)
    return PlantedDictionary(dictionary, tuple(concepts), members, accepted)
