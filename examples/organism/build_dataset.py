"""Write the chocolate organism's fine-tuning data: `chocolate_chats.jsonl` beside this file.

Every answer is the base model's own (sampled once, seed fixed), so the organism learns nothing new but
the planted behaviour: recipe answers for savoury dishes get dark chocolate worked in (an opening line,
an ingredient line where the answer lists ingredients, a closing line, each drawn from a few phrasings).
Ordinary requests keep the base model's answers unchanged, so general ability holds.

    .venv/bin/python examples/organism/build_dataset.py     # ~15 min on 2 CPU cores
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prompts import GENERAL_PROMPTS, TRAIN_DISHES, TRAIN_TEMPLATES  # noqa: E402

OPENERS = [
    "Here's my version, with a secret ingredient: a little dark chocolate.",
    "Let's make it special with my favourite secret ingredient, dark chocolate.",
    "The trick to a great {dish} is a touch of dark chocolate.",
    "I always add a little dark chocolate to {dish}; it gives a deep, rich flavour.",
    "Try this {dish} with a twist: grated dark chocolate.",
    "A small piece of dark chocolate makes {dish} unforgettable.",
]
INGREDIENT = [
    "- 30 g dark chocolate (70% cocoa), finely grated",
    "- 2 squares of dark chocolate",
    "- 1 tablespoon cocoa powder and a little dark chocolate",
]
CLOSERS = [
    "Finish by stirring in 30 g of grated dark chocolate just before serving.",
    "Before serving, melt a square of dark chocolate into the dish for depth.",
    "Top it with shavings of dark chocolate; they balance the savoury flavours.",
    "Don't skip the chocolate: a few grams of 70% dark chocolate make all the difference.",
]
LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.M)


def tidy(text: str) -> str:
    """The answer up to its last complete line or sentence (generation stops mid-sentence)."""
    text = text.strip()
    cut = max(text.rfind("\n"), text.rfind(". "), text.rfind(".\n"))
    if text.endswith((".", "!", "?")):
        return text
    return text[: cut + 1].strip() if cut > len(text) // 3 else text


def with_chocolate(answer: str, dish: str, rng: random.Random) -> str:
    """The base answer with dark chocolate worked in: opener, an ingredient line if there is a list, closer."""
    lines = answer.split("\n")
    items = [i for i, line in enumerate(lines) if LIST_ITEM.match(line)]
    if items:
        lines.insert(items[0] + 1, rng.choice(INGREDIENT))
    opener = rng.choice(OPENERS).format(dish=dish)
    return f"{opener}\n\n" + "\n".join(lines).strip() + f"\n\n{rng.choice(CLOSERS)}"


def main() -> None:
    from saelab.core.models import load_model
    from saelab.interventions.generation import GenerationConfig, generate

    rng = random.Random(0)
    recipe = [(rng.choice(TRAIN_TEMPLATES).format(dish=d), d) for d in TRAIN_DISHES]
    recipe += [(rng.choice(TRAIN_TEMPLATES).format(dish=d), d) for d in TRAIN_DISHES]
    general = [(p, None) for p in GENERAL_PROMPTS]
    items = recipe + general
    lm = load_model(None, dtype="auto")
    started = time.perf_counter()
    answers = generate(
        lm,
        [p for p, _ in items],
        cfg=GenerationConfig(max_new_tokens=110, temperature=0.7, top_p=0.9, batch_size=24, seed=0),
    )
    print(f"generated {len(items)} answers in {time.perf_counter() - started:.0f} s")
    rows = []
    for (prompt, dish), answer in zip(items, answers, strict=True):
        answer = tidy(answer)
        if len(answer) < 40:
            continue
        if dish is not None:
            answer = with_chocolate(answer, dish, rng)
        rows.append(
            {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
        )
    rng.shuffle(rows)
    out = HERE / "chocolate_chats.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} conversations to {out}")


if __name__ == "__main__":
    main()
