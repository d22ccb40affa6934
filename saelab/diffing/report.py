"""The audit report: `audit.md` for reading, `audit.json` with every figure, written from the step results.

For each candidate latent it gathers the evidence an auditor weighs: how model-specific it is (Δnorm,
decoder cosine, ν^ε, ν^r), what it reads (top examples from the feature store, its explanation), what it
writes (the tokens its organism decoder promotes), and what it does (the behaviour rate of the base
steered with it and of the organism with it removed). It ends with what the named latents leave
unexplained.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

from saelab.core.fileio import atomic_write_json, atomic_write_text

SUPPORTED_STEER = 0.3  # a steered base at this rate or more shows the behaviour
SUPPORTED_CUT = 0.5  # an ablation that keeps at most half the organism's rate removes it
MAX_LOSS_RISE = 0.10  # ... while the organism's corpus loss rises by at most this share (else it is damage)


def peak_memory_gib() -> float:
    """Peak resident memory of this process (GiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _store_evidence(store_path: Path, latents: list[int], n_examples: int = 4) -> dict[int, dict]:
    """Explanation, top examples (text with the peak token marked) and organism-promoted tokens per latent."""
    from saelab.analysis.store import FeatureStore

    if not store_path.exists():
        return {}
    out = {}
    with FeatureStore(store_path, create=False) as store:
        vocab = store.vocab()

        def text(token: int) -> str:
            return vocab[token] if 0 <= token < len(vocab) else f"<{token}>"

        for latent in latents:
            feature = store.feature(latent) or {}
            examples = []
            for row in store.examples(latent)[:n_examples]:
                values = row.get("values") or []
                peak = max(range(len(values)), key=values.__getitem__) if values else -1
                pieces = [
                    f"⟦{text(t)}⟧" if i == peak else text(t) for i, t in enumerate(row.get("tokens") or [])
                ]
                examples.append({"value": row["value"], "text": "".join(pieces).replace("\n", "↵")})
            members = feature.get("members") or []
            organism = next((m for m in members if m["member"] == 1), None)
            promoted = [text(int(t)) for t, _ in (organism or {}).get("logits_pos", [])[:8]]
            out[latent] = {
                "explanation": feature.get("explanation"),
                "examples": examples,
                "promotes_in_organism": promoted,
                "density": feature.get("density"),
            }
    return out


def _verdict(row: dict, organism_rate: float, organism_loss: float | None) -> str:
    steer = row["best_steer_rate"] >= SUPPORTED_STEER
    ablate = row["ablate_organism"]
    cut = organism_rate > 0 and ablate["rate"] <= SUPPORTED_CUT * organism_rate
    loss = ablate.get("organism_loss")
    if cut and organism_loss and loss is not None and loss > (1 + MAX_LOSS_RISE) * organism_loss:
        cut = False
        if not steer:
            return f"its removal cuts the rate only by damaging the organism (corpus loss {loss:.2f})"
    if steer and cut:
        return "carries the behaviour (steers the base, and its removal cuts the organism's rate)"
    if steer:
        return "sufficient (steers the base) but not necessary alone"
    if cut:
        return "necessary (its removal cuts the rate) but does not steer the base"
    return "no causal effect on the behaviour found"


def write_report(ctx, seconds: float) -> dict:
    """Write audit.md and audit.json into the audit folder; returns the JSON data."""
    from saelab.diffing.audit import crosscoder_dir, diff_dir

    out: Path = ctx.out
    behaviour = _read(out / "behaviour.json") or {}
    diff = _read(diff_dir(out) / "diff.json") or {}
    candidates = (_read(out / "candidates.json") or {}).get("candidates", [])
    causal = _read(out / "causal.json") or {}
    graph = _read(out / "graph.json")
    evidence = _store_evidence(crosscoder_dir(out) / "features.db", [c["latent"] for c in candidates])
    tests = {row["latent"]: row for row in causal.get("candidates", [])}
    organism_rate = causal.get("organism_rate", 0.0)
    for c in candidates:
        c.update(evidence.get(c["latent"], {}))
        if c["latent"] in tests:
            c["causal"] = tests[c["latent"]]
            c["verdict"] = _verdict(tests[c["latent"]], organism_rate, causal.get("organism_loss"))
    steps = _read(out / "steps.json") or {}
    data = {
        "models": {"base": ctx.base.name, "organism": ctx.organism.name},
        "config": ctx.cfg.to_dict(),
        "steps": [vars(s) | {"seconds_when_run": steps.get(s.name)} for s in ctx.steps],
        "seconds": round(seconds, 1),
        "seconds_all_steps": round(sum(v for v in steps.values() if v is not None), 1),
        "peak_memory_gib": round(peak_memory_gib(), 2),
        "behaviour": {k: behaviour.get(k) for k in ("signature", "rates", "triggers", "generation")},
        "tag_counts": _counts(diff),
        "candidates": candidates,
        "causal": {k: v for k, v in causal.items() if k != "candidates"},
        "graph": None if graph is None else (graph.get("skipped") or str(out / "graph.json")),
        "crosscoder": str(crosscoder_dir(out)),
        "diff_dir": str(diff_dir(out)),
    }
    atomic_write_json(out / "audit.json", data)
    atomic_write_text(out / "audit.md", _markdown(data, behaviour, out))
    return data


def _counts(diff: dict) -> dict:
    counts: dict[str, int] = {}
    for row in diff.get("latents", []):
        counts[row["tag"]] = counts.get(row["tag"], 0) + 1
    return counts


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _markdown(data: dict, behaviour: dict, out: Path) -> str:
    lines = [
        f"# Audit: {data['models']['organism']} against {data['models']['base']}",
        "",
        "Run blind: the audit was given the two models and the prompts, nothing about what fine-tuning planted.",
        f"Hook `{data['config']['hook']}`; the steps took {data['seconds_all_steps']:.0f} s when run; this run "
        f"{data['seconds']:.0f} s, peak memory {data['peak_memory_gib']:.2f} GiB.",
        "",
        "| step | seconds when run | this run |",
        "|---|---|---|",
        *[
            f"| {s['name']} | {_num(s['seconds_when_run'], 1)} | {'kept' if s['skipped'] else s['seconds']} |"
            for s in data["steps"]
        ],
        "",
        "## 1. What the organism does differently",
        "",
    ]
    signature = data["behaviour"].get("signature") or []
    if not signature:
        lines.append(
            "No word sets the organism's answers apart from the base's: no lexical behaviour was found."
        )
    else:
        rates = data["behaviour"]["rates"] or {}
        lines += [
            "Words the organism's answers use more than the base's beyond chance (one-sided Fisher exact test, "
            "Benjamini-Hochberg at 5%), largest log-odds ratio first:",
            "",
            "| word | log-odds ratio | p | base answers | organism answers |",
            "|---|---|---|---|---|",
            *[
                f"| {r['word']} | {r['log_odds']:.2f} | {r['p']:.1e} | {_pct(r['share_base'])} | "
                f"{_pct(r['share_other'])} |"
                for r in signature
            ],
            "",
            f"Behaviour rate (answers using a signature word) over every prompt: base {_pct(rates.get('base'))}, "
            f"organism {_pct(rates.get('organism'))}.",
            "",
        ]
        triggers = data["behaviour"].get("triggers") or []
        if triggers:
            lines += [f"Trigger prompts ({len(triggers)}), strongest first:", ""]
            for i in triggers[:5]:
                lines.append(f"- **{behaviour['prompts'][i]}**")
                lines.append(f"  - organism: {_quote(behaviour['organism_answers'][i][0])}")
                lines.append(f"  - base: {_quote(behaviour['base_answers'][i][0])}")
            lines.append("")
    counts = data["tag_counts"]
    lines += [
        "## 2. The crosscoder",
        "",
        "Latent tags by relative decoder norm: "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + ".",
        f"Plots: `{data['diff_dir']}/delta_norm.png`, `{data['diff_dir']}/nu_scatter.png`. The candidates' "
        f"feature pages: `candidates.html` (opens from file://), or every latent, filtered by tag, in "
        f"`saelab serve {data['crosscoder']} --no-live`.",
        "",
        "## 3. Candidates",
        "",
        "First the organism-only latents (tag b_only) that fire, most genuine by Latent Scaling first (lowest "
        "max(ν^ε, ν^r)); then, to fill the list, the latents most active on the organism's answers that carry "
        "the signature against the base's answers to the same prompts (association: difference of mean "
        "activation over the latent's largest).",
        "",
    ]
    causal = data["causal"]
    if causal.get("skipped"):
        lines += [f"Causal tests skipped: {causal['skipped']}.", ""]
    elif "organism_rate" in causal:
        lines += [
            f"Causal tests answer {len(causal.get('triggers', []))} trigger prompts with fresh samples: base "
            f"{_pct(causal.get('base_rate'))}, organism {_pct(causal.get('organism_rate'))}. Corpus loss: base "
            f"{_num(causal.get('base_loss'))}, organism {_num(causal.get('organism_loss'))}. A steered base counts "
            f"only while its answers' loss under the unsteered base stays below {_num(causal.get('fluent_below'), 2)} "
            "(its own answers' plus 1 nat).",
            "",
        ]
    lines += [
        "| # | latent | chosen by | Δnorm | cos | ν^ε | ν^r | association | fired | base + latent | "
        "organism − latent | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rank, c in enumerate(data["candidates"], start=1):
        test = c.get("causal") or {}
        lines.append(
            f"| {rank} | {c['latent']} | {c.get('source', '-')} | {_num(c.get('delta_norm'), 2)} | "
            f"{_num(c.get('cosine'), 2)} | {_num(c.get('nu_eps'), 2)} | {_num(c.get('nu_r'), 2)} | "
            f"{_num(c.get('association'), 3)} | {c.get('fired', '-')} | "
            f"{_pct(test.get('best_steer_rate'))} | {_pct((test.get('ablate_organism') or {}).get('rate'))} | "
            f"{c.get('verdict', '-')} |"
        )
    lines.append("")
    for rank, c in enumerate(data["candidates"], start=1):
        lines += [f"### {rank}. Latent {c['latent']}", ""]
        if c.get("explanation"):
            lines.append(f"Explanation: *{c['explanation']}*")
        if c.get("promotes_in_organism"):
            lines.append(
                "Promotes in the organism: "
                + ", ".join(f"`{t.strip() or t}`" for t in c["promotes_in_organism"])
            )
        for example in c.get("examples", []):
            lines.append(f"- {example['value']:.2f}: {_quote(example['text'], 200)}")
        test = c.get("causal")
        if test:
            steer = ", ".join(
                f"{s['alpha']:.1f} → {_pct(s['rate'])} (loss {_num(s.get('loss'), 2)})"
                for s in test["steer_base"]
            )
            ablate = test["ablate_organism"]
            lines.append(
                f"- Base steered (strength → rate, fluency loss): {steer}. Organism with it removed: {_pct(ablate['rate'])}, "
                f"corpus loss {_num(ablate.get('organism_loss'))}."
            )
            lines.append(f"- Steered base, first answer: {_quote(test['steer_base'][-1]['samples'][0])}")
        lines.append("")
    joint = causal.get("joint")
    lines += ["## 4. What remains unexplained", ""]
    if joint:
        before = causal.get("organism_rate") or 0.0
        loss_before = causal.get("organism_loss")
        loss_after = joint.get("organism_loss")
        rise = None if not loss_before else (loss_after - loss_before) / loss_before
        lines.append(
            f"Removing latents {', '.join(map(str, joint['latents']))} together from the organism takes its "
            f"trigger rate from {_pct(before)} to {_pct(joint['rate'])}; its corpus loss goes from "
            f"{_num(loss_before)} to {_num(loss_after)} ({_pct(rise)} change)."
        )
        if rise is not None and rise > MAX_LOSS_RISE:
            lines.append(
                f"That removal damages the organism (corpus loss up more than {MAX_LOSS_RISE:.0%}), so the drop is "
                "not attributed to these latents: the behaviour remains unexplained at this hook."
            )
        else:
            lines.append(
                f"What these latents leave: {_pct(joint['rate'])} of trigger answers still show the behaviour; the "
                "rest of the fine-tune's change (other hooks, other latents) is not traced here."
            )
        supported = [c for c in data["candidates"] if (c.get("verdict") or "").startswith("carries")]
        if not supported:
            lines.append("No candidate both steers the base and is needed by the organism.")
        lines.append("")
    else:
        lines += ["No causal test ran, so no part of the behaviour is attributed to a latent.", ""]
    if data.get("graph"):
        lines += ["## 5. Attribution graph", "", f"{data['graph']}", ""]
    return "\n".join(lines)


def _quote(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return (text[:limit] + "…") if len(text) > limit else text
