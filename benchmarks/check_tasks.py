"""Build the shipped circuit tasks and check that the embedded model solves them.

`--build` generates candidate rows from the word lists below (deterministic: seed 0), keeps only those
the embedded SmolLM2-135M-Instruct solves, writes saelab/circuits/data/*.jsonl and prints the share
kept. Without it, the shipped files are scored as they are. A pairs row is solved when the clean
answer beats the patch answer on the clean prefix AND the patch answer beats the clean answer on the
patch prefix; a single prompt is solved when its target is the top-1 next token.

Usage: python benchmarks/check_tasks.py [--build] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict

import torch

from saelab.circuits.tasks import (
    DATA_DIR,
    PAIRS,
    PromptPair,
    TargetPrompt,
    Task,
    last_logits,
    list_tasks,
    load_task,
)
from saelab.core.devices import describe_machine
from saelab.core.models import HookedLM, load_model

# Regular nouns whose singular and plural (+s) are each one token for SmolLM2 (checked by --build).
NOUNS = (
    "author pilot surgeon farmer manager customer officer teacher senator doctor minister dancer guard "
    "student lawyer driver artist player worker writer singer nurse judge chef soldier leader actor "
    "engineer executive architect mechanic clerk painter athlete consultant professor scientist "
    "neighbor poet critic editor reporter"
).split()
# Main verbs after the subject: (singular, plural), every form one token with its leading space.
MAIN_VERBS = [
    ("is", "are"), ("was", "were"), ("has", "have"), ("runs", "run"), ("walks", "walk"),
    ("smiles", "smile"), ("works", "work"), ("lives", "live"), ("talks", "talk"), ("writes", "write"),
    ("sings", "sing"), ("plays", "play"), ("thinks", "think"), ("knows", "know"),
]  # fmt: skip
# Transitive verbs for relative clauses: (singular, plural).
RC_VERBS = [
    ("likes", "like"), ("loves", "love"), ("knows", "know"), ("sees", "see"), ("helps", "help"),
    ("needs", "need"), ("meets", "meet"), ("trusts", "trust"), ("fears", "fear"), ("follows", "follow"),
    ("watches", "watch"), ("pays", "pay"), ("visits", "visit"), ("praises", "praise"),
]  # fmt: skip
PREPOSITIONS = ("near", "behind", "beside", "next to", "with", "across from")
# Countries and capitals whose capital is one token with its leading space (checked by --build).
CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Greece": "Athens", "Portugal": "Lisbon",
    "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Hungary": "Budapest",
    "the Czech Republic": "Prague", "England": "London", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Kenya": "Nairobi", "India": "Delhi", "Iran": "Tehran",
    "Iraq": "Baghdad", "Syria": "Damascus", "Cuba": "Havana", "Peru": "Lima", "Chile": "Santiago",
    "Canada": "Ottawa", "Australia": "Canberra", "Afghanistan": "Kabul", "the Philippines": "Manila",
    "South Korea": "Seoul", "Bulgaria": "Sofia", "Scotland": "Edinburgh", "Wales": "Cardiff",
    "Tunisia": "Tunis", "Switzerland": "Bern", "Jamaica": "Kingston", "the United States": "Washington",
    "New Zealand": "Wellington", "Northern Ireland": "Belfast",
}  # fmt: skip
CANDIDATES = 400  # per agreement structure, before the model filter
SEED = 0


# -- generation -----------------------------------------------------------------------------------
def _pair(clean: str, patch: str, verb: tuple[str, str], singular: bool, case: str) -> PromptPair:
    """One row: the clean answer agrees with the clean prefix, the patch answer with the patch prefix."""
    sing, plur = f" {verb[0]}", f" {verb[1]}"
    return PromptPair(clean, patch, sing if singular else plur, plur if singular else sing, case)


def _number(noun: str, plural: bool) -> str:
    return noun + "s" if plural else noun


def _agreement(structure: str, rng: random.Random) -> PromptPair:
    """A random row of one structure; the clean subject is singular in half the rows."""
    singular = rng.random() < 0.5
    noun, other = rng.sample(NOUNS, 2)
    subject, flipped = _number(noun, not singular), _number(noun, singular)
    attractor_plural = rng.random() < 0.5
    attractor = _number(other, attractor_plural)
    label = "singular" if singular else "plural"
    if structure == "simple":
        return _pair(f"The {subject}", f"The {flipped}", rng.choice(MAIN_VERBS), singular, label)
    case = f"{label}_{'plural' if attractor_plural else 'singular'}"  # subject's number, then attractor's
    if structure == "across_pp":
        prep = rng.choice(PREPOSITIONS)
        return _pair(
            f"The {subject} {prep} the {attractor}",
            f"The {flipped} {prep} the {attractor}",
            rng.choice(MAIN_VERBS),
            singular,
            case,
        )
    if structure == "across_rc":
        inner = rng.choice(RC_VERBS)[1 if attractor_plural else 0]
        return _pair(
            f"The {subject} that the {attractor} {inner}",
            f"The {flipped} that the {attractor} {inner}",
            rng.choice(MAIN_VERBS),
            singular,
            case,
        )
    # within_rc: the verb agrees with the relative clause's subject; the head noun is the attractor.
    case = f"{label}_{'plural' if attractor_plural else 'singular'}"
    return _pair(
        f"The {attractor} that the {subject}",
        f"The {attractor} that the {flipped}",
        rng.choice(RC_VERBS),
        singular,
        case,
    )


def agreement_candidates(structure: str, n: int = CANDIDATES) -> Task:
    rng = random.Random(f"{SEED}-{structure}")
    rows: dict[PromptPair, None] = {}
    for _ in range(50 * n):
        if len(rows) == n:
            break
        rows.setdefault(_agreement(structure, rng))
    return Task(f"agreement_{structure}", list(rows), PAIRS)


def capital_prompts() -> Task:
    rows = [TargetPrompt(f"The capital of {c} is", f" {a}", c) for c, a in CAPITALS.items()]
    return Task("capitals", rows, "prompts")


def capital_pairs(tokenizer) -> Task:
    """Each country against the next one (in list order) whose prompt has as many tokens."""
    by_length: dict[int, list[str]] = {}
    for country in CAPITALS:
        by_length.setdefault(len(tokenizer(f"The capital of {country} is")["input_ids"]), []).append(country)
    rows = []
    for group in by_length.values():
        for i, country in enumerate(group):
            other = group[(i + 1) % len(group)]
            if other != country:
                rows.append(
                    PromptPair(
                        f"The capital of {country} is",
                        f"The capital of {other} is",
                        f" {CAPITALS[country]}",
                        f" {CAPITALS[other]}",
                        f"{country}|{other}",
                    )
                )
    return Task("capitals_pairs", rows, PAIRS)


# -- scoring --------------------------------------------------------------------------------------
def score(lm: HookedLM, task: Task) -> dict:
    """Per-row results: for pairs the logit diff on both prefixes, for prompts log-prob and top-1."""
    batch = task.encode(lm.tokenizer)
    clean = last_logits(lm, batch.clean_ids, batch.clean_mask, batch.last)
    if task.kind == PAIRS:
        rows = torch.arange(len(batch))
        patch = last_logits(lm, batch.patch_ids, batch.patch_mask, batch.last)
        on_clean = clean[rows, batch.clean_answer] - clean[rows, batch.patch_answer]
        on_patch = patch[rows, batch.clean_answer] - patch[rows, batch.patch_answer]
        return {"diff": on_clean, "diff_patch": on_patch, "solved": (on_clean > 0) & (on_patch < 0)}
    logprob = torch.log_softmax(clean, -1)[torch.arange(len(batch)), batch.clean_answer]
    return {"logprob": logprob, "solved": clean.argmax(-1) == batch.clean_answer}


def summary(task: Task, result: dict) -> str:
    n = len(task)
    if task.kind == PAIRS:
        clean_acc = float((result["diff"] > 0).float().mean())
        patch_acc = float((result["diff_patch"] < 0).float().mean())
        return (
            f"{task.name:22s} {n:5d}  acc clean {clean_acc:6.1%}  acc patch {patch_acc:6.1%}  "
            f"both {float(result['solved'].float().mean()):6.1%}  mean logit diff {float(result['diff'].mean()):6.2f}"
        )
    return (
        f"{task.name:22s} {n:5d}  top-1 {float(result['solved'].float().mean()):6.1%}  "
        f"mean log-prob {float(result['logprob'].mean()):6.2f}"
    )


def write(task: Task, keep: torch.Tensor) -> int:
    rows = [row for row, kept in zip(task.rows, keep.tolist(), strict=True) if kept]
    path = DATA_DIR / f"{task.name}.jsonl"
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def build(lm: HookedLM) -> None:
    """Generate candidates, score them, ship the solved rows (top-1 filter for capitals prompts)."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    tasks = [agreement_candidates(s) for s in ("simple", "across_pp", "across_rc", "within_rc")]
    tasks += [capital_prompts(), capital_pairs(lm.tokenizer)]
    print("candidates (before the filter):")
    for task in tasks:
        result = score(lm, task)
        kept = write(task, result["solved"])
        print(f"  {summary(task, result)}  -> kept {kept}/{len(task)} ({kept / len(task):.0%})", flush=True)


def check(lm: HookedLM) -> None:
    print("shipped tasks:")
    for name in list_tasks():
        task = load_task(name)
        print(f"  {summary(task, score(lm, task))}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="regenerate and filter the shipped jsonl files")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 spares a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(None, device="cpu", dtype=torch.float32)
    print(describe_machine("float32"))
    start = time.perf_counter()
    if args.build:
        build(lm)
    check(lm)
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
