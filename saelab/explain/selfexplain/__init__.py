"""Self-explanation of SAE latents: the model describes a direction put into its own residual stream.

SelfIE (Chen et al. 2024, arXiv:2403.10949) and Patchscopes (Ghandeharioun et al. 2024,
arXiv:2401.06102) applied to SAE features, as in Kharlapenko, Neverix, Nanda, Conmy, "Self-explaining
SAE features" (alignmentforum.org/posts/8ev6coxChSWcxCDy8, 2024). The default prompt is the write-up's
"meaning" prompt (its research code: github.com/neverix/micrlhf-progress, ``sprint/``), through the
model's chat template: user ``What is the meaning of the word "X"?``, assistant prefill
``The meaning of the word "X" is "`` (`SelfTemplate`; its "repeat" prompt, ``Repeat "X" four times...``,
is one `SelfTemplate` away). The residual stream at every token of the placeholder X (user turn and
prefill) is *replaced* by ``scale * norm * d / |d|`` at ``blocks.{layer}.hook_resid_pre`` and the model
goes on from the prefill. ``layer`` is an early one (`default_layer`: block 1 of SmolLM2's 30, chosen by
a calibration on word residuals, not on SAE latents). ``norm`` is `typical_residual_norm` (median over
held-out text of the embedded corpus or ``norm_source``, position 0 and special tokens excluded), so
scales are in units of a typical residual at the injection site: 0.25 to 8 by default.

**The sweep** (one batch: a scale-0 baseline row plus one row per scale). The definitions are the
write-up's, as its research code computes them (``sprint/scale_tuning_gemma.py``; read for the
definitions, not copied):
- *self-similarity*: cosine of the last block's ``hook_resid_post`` at the last prompt position with
  the injected direction (does the direction survive to the end of the network?);
- *entropy*: entropy (nats) of the next-token distribution at the last prompt position, i.e. of the
  first explanation token (is the model confident what to say?);
- the 5 most likely first explanation tokens (ids, text, probabilities).

**The choice** (`SelfExplainer.choose`). The write-up picks the scale by combining the two criteria:
a good scale keeps the direction visible at the last layer (high self-similarity) while the model is
confident (low entropy). Rule ``composite`` (default): over the points with scale > 0, min-max normalise
self-similarity and entropy across the sweep and take the largest ``self_similarity - entropy``; ties go
to the smaller scale. (Both normalisations are shift-invariant, so subtracting the scale-0 baseline, as
the research code does, changes nothing.) ``self_similarity`` (the research code's argmax) and
``entropy`` (the lowest entropy) are the single-criterion rules. On the layer calibration's 40 words
(`default_layer`) the words were named at the scale each rule chose for 24 / 25 / 20 of 40 at layer 1,
14 / 10 / 17 at layer 2 and 14 / 11 / 11 at layer 3 (composite / self-similarity / entropy): no single
criterion does better throughout. On this 135M model self-similarity is small (cosines of 0.0-0.1).

**Samples**: ``n`` explanations at the chosen scale in one batch. Sample i is drawn with its own
generator seeded ``seed + i`` (Gumbel-max on the logits, exactly sampling at ``temperature``), so it
depends on the seed and i only, not on n (up to float rounding of a different batch size).
Temperature 0 is greedy. The label is the reply up to the quote that closes the prefill's opening
quote, then `parse_label`; junk gives ``text=None, error=...`` as the explainer does.

**"Top 5 tokens of the self-explanation"** (the acceptance check, ``benchmarks/acceptance_self_explain.py``):
the 5 most likely first explanation tokens (right after the prefill) at the chosen scale,
``chosen.top_ids``; a token counts as found when one of them has the same text, whitespace stripped and
case folded (after an opening quote the model writes ``word`` where the text had `` word``).
"""

from saelab.explain.selfexplain.explainer import (
    METHOD_VERSION,
    RULES,
    ScalePoint,
    SelfExplainConfig,
    SelfExplainer,
)
from saelab.explain.selfexplain.prompt import (
    SelfTemplate,
    build_prompt,
    default_layer,
    injection_hook,
    parse_self_label,
    source_norm,
    typical_residual_norm,
)

__all__ = [
    "METHOD_VERSION", "RULES", "ScalePoint", "SelfExplainConfig", "SelfExplainer", "SelfTemplate",
    "build_prompt", "default_layer", "injection_hook", "parse_self_label", "source_norm",
    "typical_residual_norm",
]  # fmt: skip
