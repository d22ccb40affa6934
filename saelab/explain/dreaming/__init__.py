"""Fluent dreaming: EPO (evolutionary prompt optimisation) for an SAE latent, a direction or a logit.

EPO (Thompson, Straznickas and Sklar 2024, "Fluent dreaming for language models", arXiv 2402.01702;
reference code `Confirm-Solutions/dreamy`, `dreamy/epo.py` and `dreamy/runners.py`), applied to SAE
latents as Tan, Kharlapenko et al. do, searches for prompts of `seq_len` tokens that make a target
large while staying fluent. It keeps one population member per fluency penalty λ_j and maximises,
for member j, ``objective(prompt) - λ_j * CE(prompt)``.

0. **Start.** `init="sample"` (default): each member is `seq_len` tokens sampled from the model itself
   at temperature 1 after BOS (ordinary tokens only, seeded). `init="random"`: uniform random ordinary
   tokens, as dreamy starts. Random tokens sit at ~13 nats of cross-entropy on SmolLM2; dreamy's 300
   iterations x 256 children climb down from there, but the CPU budget here (60 x 32) did not: on two
   demo-SAE latents the whole front stayed above 12 nats. The model's own samples start at 3.5-6.5.

Each iteration:

1. **Candidates.** For each member, the gradient of its own ``objective - λ_j CE`` with respect to a
   one-hot encoding of every prompt token (as in GCG): the `top_k` tokens with the largest gradient
   at each position. We take the gradient with respect to the input embeddings and multiply by the
   embedding matrix, which is the one-hot gradient (up to a positive scale where an embedding module
   scales its rows) without a [batch, seq, vocab] forward product. A member that survived unchanged
   keeps its candidates.
2. **Children.** `children` per member: child c copies member c mod population, picks one position and
   one of that position's top_k candidates uniformly at random, and swaps it in (dreamy's order).
3. **Selection.** Every new child is run once; then member j becomes the prompt with the largest
   ``objective - λ_j CE`` among the members and this iteration's children (several members may hold
   the same prompt). Ties go to the earlier prompt, members first.
4. **Restarts.** At iterations 0, `restart_every`, 2 `restart_every`, ... every member becomes the one
   prompt of the pool that is best under a penalty drawn uniformly from [restart_lambda / spread,
   restart_lambda * spread] (dreamy: 2.0 and 3.0, restarting its "Pareto frontier" to one point).

The result is the Pareto front of activation (higher is better) against cross-entropy (lower is better)
over *every* prompt evaluated in the run: the prompts no other evaluated prompt beats on both.

Definitions:

- **Prompt.** `seq_len` token ids, never a special token, drawn from ids below the smaller of the
  tokenizer's and the model's vocabulary. A BOS token is prepended when the tokenizer has one (as the
  analysis does) and is never part of the activation: position 0 is an attention sink (residual
  norm ~25,000 in SmolLM2 against ~175 elsewhere).
- **Cross-entropy.** The mean next-token loss (nats) of the prompt's tokens under the model: all
  `seq_len` tokens when a BOS is prepended (the first one predicted from BOS alone), tokens 2..seq_len
  without one (so seq_len must then be at least 2).
- **Activation.** The target read at the **last prompt token** (`position="last"`, dreamy's
  convention: the prompt is the context that leads to that token), or its maximum over the prompt's
  tokens (`position="max"`, how the feature store's max_act is taken over a context's tokens).
  Latents: ``dictionary.encode(x)[..., idx]`` at ``dictionary.cfg.hook_name``, exactly what the analysis
  records. Directions: the projection ``x . v / |v|`` at a hook point. Logits: the final position's logit.
- **Objective.** What EPO maximises: the activation, except that a latent which does not fire scores
  ``min(pre - tau, 0)`` (its encoder pre-activation minus its firing threshold: the learned threshold
  where the family has one, else the smallest pre-activation among the latents that fire on that token,
  which is TopK's k-th value): a dead zero gives no gradient, and dreamy's targets (MLP neurons, logits,
  residual projections) are never flat. A prompt on which the latent fires always beats one on which it
  does not.
- **Re-tokenisation.** With `retokenize` (default) a child whose decoded text does not tokenise back to
  the same ids is discarded before it is run, and initial prompts are redrawn until they are stable, so
  every dreamed text reproduces its activation when pasted back. dreamy has this check as an option
  (`check_retokenization`, off by default), scoring failing prompts at -inf.

Where this differs from dreamy: the start (above); unstable children are skipped, not run; children
already evaluated are not run again (their values are reused); each member's gradient uses its own λ
(dreamy passes the first penalties to newly selected members), and members that hold the same prompt
share one forward and two backward passes (objective and CE, combined per λ); the restart penalty is the randomly drawn one its docstring
describes (its code draws one and then uses 2.0); the front is the full non-dominated set, not only the
points that some λ in a grid selects; default sizes fit a CPU (see `DreamConfig`).
"""

from saelab.explain.dreaming.epo import (
    Dream,
    DreamConfig,
    DreamResult,
    dream,
    log_lambdas,
    pareto_front,
)
from saelab.explain.dreaming.targets import POSITIONS, Target, direction_target, latent_target, logit_target

__all__ = [
    "POSITIONS",
    "Dream",
    "DreamConfig",
    "DreamResult",
    "Target",
    "direction_target",
    "dream",
    "latent_target",
    "log_lambdas",
    "logit_target",
    "pareto_front",
]
