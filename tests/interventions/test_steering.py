"""Mechanics of the intervention layer (steer, AddVector, Ablate, CapProjection, ClampFeature) and of
steered generation, checked on tiny random Llama and GPT-2 models; one end-to-end check on SmolLM2.

The checks are exact where the code promises exactness (multiplier 0, out-of-scope positions,
clamping a latent to its own value) and tight tolerances where float arithmetic is involved.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from saelab.core.models import HookedLM
from saelab.core.prompts import encode_left_padded
from saelab.errors import DataError, DimensionMismatchError, UnknownHookError
from saelab.interventions.generation import (
    GenerationConfig,
    compare,
    completion_loss,
    generate,
    generate_tokens,
)
from saelab.interventions.hooks import (
    Ablate,
    AddVector,
    CapProjection,
    ClampFeature,
    InterventionError,
    _Positions,
    ablation,
    add_feature,
    steer,
    unit,
)
from tests.helpers import SPECIAL, make_model, make_tokenizer, random_topk_sae

D = 32  # d_model of the tiny models
N_LAYERS = 3
HOOK = "blocks.1.hook_resid_pre"
EOS, PAD = SPECIAL["<eos>"], SPECIAL["<pad>"]
GREEDY = GenerationConfig(max_new_tokens=6, temperature=0.0, chat=False)
SAMPLED = GenerationConfig(max_new_tokens=6, temperature=1.0, top_p=0.95, seed=3, chat=False)
PROMPTS = ["w1 w2 w3", "w10 w11 w12 w13 w14 w15 w16"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def lm(request) -> HookedLM:
    return HookedLM(make_model(request.param, n_layers=N_LAYERS, hidden=D), make_tokenizer())


@pytest.fixture(scope="module")
def llama() -> HookedLM:
    return HookedLM(make_model("llama", n_layers=N_LAYERS, hidden=D), make_tokenizer())


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    """A seeded Gaussian tensor: as a vector, far larger than the tiny models' residual norms (~0.1)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def tokens(batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    """Random word ids (no special tokens) [batch, seq]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIAL), len(SPECIAL) + 200, (batch, seq), generator=g)


def leftover_hooks(model: torch.nn.Module) -> list[str]:
    """Every submodule that still carries a forward or forward-pre hook."""
    return [
        name or "<model>"
        for name, module in model.named_modules()
        if module._forward_hooks or module._forward_pre_hooks
    ]


def resid_names(lm: HookedLM) -> list[str]:
    return [
        f"blocks.{i}.hook_{kind}"
        for i in range(lm.n_layers)
        for kind in ("resid_pre", "resid_mid", "resid_post")
    ]


def projections(acts: dict[str, torch.Tensor], direction: torch.Tensor) -> dict[str, float]:
    """max |x . d| over batch and positions, per hook point."""
    d = unit(direction)
    return {name: float((x.float() @ d).abs().max()) for name, x in acts.items()}


def three_interventions(sae) -> dict[str, object]:
    """One AddVector, Ablate and ClampFeature at the same hook, strong enough to change the output."""
    return {
        "add": AddVector(HOOK, vector=rand(D, seed=1), alpha=2.0),
        "ablate": Ablate(HOOK, direction=rand(D, seed=2)),
        "clamp": ClampFeature(HOOK, dictionary=sae, features=[3, 7], values=[4.0, 0.0]),
    }


def make_sae(hook: str = HOOK, d_in: int = D, d_sae: int = 64):
    """A random TopK dictionary (k=8) at `hook`, frozen like a loaded one."""
    return random_topk_sae(d_in, d_sae, hook, k=8).requires_grad_(False)


@pytest.fixture(scope="module")
def sae():
    return make_sae()


# -- multiplier 0 and hook removal ------------------------------------------------------------------
def test_zero_multiplier_is_bit_identical(lm, sae):
    ids = tokens()
    plain = lm.forward(ids)
    zero = [
        AddVector(HOOK, vector=rand(D, seed=1), alpha=0.0),
        AddVector("blocks.0.hook_resid_mid", vector=rand(D, seed=2), alpha=0.0, scope="prompt"),
        add_feature(sae, 5, 0.0),
    ]
    with steer(lm, zero, prompt_len=3):
        assert torch.equal(lm.forward(ids), plain)
    with steer(lm, [add_feature(sae, 5, 1.0)]):
        assert not torch.allclose(lm.forward(ids), plain)


def test_every_hook_is_removed_on_exit(lm, sae):
    ivs = [
        *three_interventions(sae).values(),
        AddVector("blocks.2.hook_resid_mid", vector=rand(D, seed=3), scope="generated"),
        CapProjection("blocks.0.hook_attn_out", direction=rand(D, seed=4), high=0.0),
        *ablation(lm, rand(D, seed=5)),
    ]
    assert leftover_hooks(lm.model) == []
    with steer(lm, ivs, prompt_len=2):
        assert leftover_hooks(lm.model) != []
        lm.forward(tokens())
    assert leftover_hooks(lm.model) == []
    with pytest.raises(RuntimeError, match="body failed"), steer(lm, ivs, prompt_len=2):
        lm.forward(tokens())
        raise RuntimeError("body failed")
    assert leftover_hooks(lm.model) == []
    # A bad intervention after good ones fails before anything is registered.
    with (
        pytest.raises(UnknownHookError),
        steer(lm, [*ivs, AddVector("blocks.9.hook_resid_pre", vector=rand(D))]),
    ):
        pass
    assert leftover_hooks(lm.model) == []


# -- padding ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["add", "ablate", "clamp"])
def test_padding_does_not_change_steered_outputs(lm, sae, which):
    rows = [tokens(1, 7, seed=1)[0], tokens(1, 4, seed=2)[0]]
    width = max(len(r) for r in rows)
    left = torch.full((2, width), PAD)
    right = torch.full((2, width), PAD)
    left_mask, right_mask = torch.zeros_like(left), torch.zeros_like(right)
    for i, r in enumerate(rows):
        left[i, width - len(r) :], left_mask[i, width - len(r) :] = r, 1
        right[i, : len(r)], right_mask[i, : len(r)] = r, 1
    iv = three_interventions(sae)[which]
    with torch.no_grad(), steer(lm, [iv]):
        alone = [lm.forward(r[None])[0] for r in rows]
        from_left = lm.forward(left, left_mask)
        from_right = lm.forward(right, right_mask)
    for i, r in enumerate(rows):
        n = len(r)
        torch.testing.assert_close(from_left[i, width - n :], alone[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(from_right[i, :n], alone[i], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(lm.forward(rows[0][None])[0], alone[0], atol=1e-3)


@pytest.mark.parametrize("scope", ["all", "prompt", "generated"])
def test_generate_in_a_left_padded_batch_matches_the_prompt_alone(lm, scope):
    iv = [AddVector("blocks.1.hook_resid_post", vector=rand(D, seed=6), alpha=0.5, scope=scope)]
    alone = generate(lm, PROMPTS[:1], iv, GREEDY)
    batched = generate(lm, PROMPTS, iv, GREEDY)
    assert batched[0] == alone[0]
    assert generate(lm, PROMPTS, (), GREEDY) != batched  # the vector does steer


# -- ablation -------------------------------------------------------------------------------------
def test_full_ablation_removes_the_direction_everywhere(lm):
    direction = rand(D, seed=7)
    ids = tokens(2, 6)
    names = resid_names(lm)
    before = projections(lm.capture(ids, names), direction)
    assert min(before.values()) > 1e-3  # the direction is there to remove
    with steer(lm, ablation(lm, direction)):
        after = lm.capture(ids, names)
    for name, x in after.items():
        scale = float(x.norm(dim=-1).max())
        assert projections({name: x}, direction)[name] <= 1e-5 * max(scale, 1.0), name


@pytest.mark.parametrize("layer", [0, 2])
def test_layer_ablation_at_resid_pre(lm, layer):
    direction = rand(D, seed=8)
    ids = tokens(2, 6)
    name = f"blocks.{layer}.hook_resid_pre"
    ivs = ablation(lm, direction, layers=[layer])
    assert [iv.hook for iv in ivs] == [name]
    with steer(lm, ivs):
        x = lm.capture(ids, name)[name]
    assert projections({name: x}, direction)[name] <= 1e-6 * max(float(x.norm(dim=-1).max()), 1.0)


def test_resid_pre_equals_previous_resid_post(lm):
    ids = tokens(2, 6)
    names = resid_names(lm)
    steered_post = [
        AddVector(f"blocks.{i}.hook_resid_post", vector=rand(D, seed=i)) for i in range(lm.n_layers)
    ]
    for ivs in ([], ablation(lm, rand(D, seed=9)), steered_post):
        with steer(lm, ivs):
            acts = lm.capture(ids, names, stop_early=False)
        for layer in range(1, lm.n_layers):
            assert torch.equal(
                acts[f"blocks.{layer}.hook_resid_pre"], acts[f"blocks.{layer - 1}.hook_resid_post"]
            )


# -- ClampFeature ---------------------------------------------------------------------------------
def test_clamping_a_latent_to_its_own_value_changes_nothing(lm, sae):
    ids = tokens(1, 1, seed=4)
    latents = sae.encode(lm.capture(ids, HOOK)[HOOK])[0, 0]
    active, inactive = int(latents.argmax()), int((latents == 0).nonzero()[0])
    assert latents[active] > 0
    plain = lm.forward(ids)
    same = ClampFeature(
        HOOK, dictionary=sae, features=[active, inactive], values=[float(latents[active]), 0.0]
    )
    with steer(lm, [same]):
        assert torch.equal(lm.forward(ids), plain)
    other = ClampFeature(HOOK, dictionary=sae, features=[active], values=[float(latents[active]) + 1.0])
    with steer(lm, [other]):
        assert not torch.allclose(lm.forward(ids), plain)


@pytest.mark.parametrize("hook", [HOOK, "blocks.1.hook_resid_mid", "blocks.0.hook_mlp_out"])
def test_clamping_moves_the_activation_along_decoder_rows(lm, hook):
    sae = make_sae(hook)
    with torch.no_grad():
        sae.output_scale.fill_(2.0)  # an unfolded scale: the row added is W_dec[i] / output_scale
    ids = tokens(2, 5, seed=5)
    x = lm.capture(ids, hook)[hook]
    latents = sae.encode(x)
    features, values = [3, 11], [2.5, 0.0]
    with steer(lm, [ClampFeature(hook, dictionary=sae, features=features, values=values)]):
        y = lm.capture(ids, hook)[hook]
    delta = (torch.tensor(values) - latents[..., features]) @ (sae.W_dec[features] / 2.0)
    torch.testing.assert_close(y, x + delta, rtol=0, atol=1e-6)
    assert delta.abs().max() > 0.1


def test_only_active_clamps_where_the_latent_fires(llama, sae):
    ids = tokens(2, 6, seed=6)
    x = llama.capture(ids, HOOK)[HOOK]
    latents = sae.encode(x)
    fires = latents > 0
    feature = int(fires.float().mean((0, 1)).sub(0.5).abs().argmin())  # fires on some positions, not all
    assert fires[..., feature].any() and not fires[..., feature].all()
    iv = ClampFeature(HOOK, dictionary=sae, features=[feature], values=[5.0], only_active=True)
    with steer(llama, [iv]):
        y = llama.capture(ids, HOOK)[HOOK]
    off = ~fires[..., feature]
    assert torch.equal(y[off], x[off])
    expected = x + (5.0 - latents[..., feature, None]) * sae.W_dec[feature]
    torch.testing.assert_close(y[~off], expected[~off], rtol=0, atol=1e-6)


# -- AddVector at every kind of hook point -----------------------------------------------------------
@pytest.mark.parametrize(
    "hook",
    [
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_attn_out",
        "blocks.1.hook_resid_mid",
        "blocks.1.hook_mlp_out",
        "blocks.2.hook_resid_post",
    ],
)
def test_add_vector_adds_alpha_times_vector_at_its_hook(lm, hook):
    ids = tokens(2, 5)
    vector = rand(D, seed=10)
    x = lm.capture(ids, hook)[hook]
    with steer(lm, [AddVector(hook, vector=vector, alpha=-1.5)]):
        y = lm.capture(ids, hook)[hook]
    torch.testing.assert_close(y, x - 1.5 * vector, rtol=0, atol=1e-6)


# -- scopes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["add", "ablate"])
@pytest.mark.parametrize("scope", ["prompt", "generated"])
def test_scope_limits_the_edit_to_its_positions(lm, kind, scope):
    ids, prompt_len = tokens(2, 7), 3
    x = lm.capture(ids, HOOK)[HOOK]
    if kind == "add":
        iv, edited = AddVector(HOOK, vector=rand(D, seed=11), alpha=1.0, scope=scope), x + rand(D, seed=11)
    else:
        d = unit(rand(D, seed=12))
        iv, edited = Ablate(HOOK, direction=d, scope=scope), x - (x @ d)[..., None] * d
    with steer(lm, [iv], prompt_len=prompt_len):
        y = lm.capture(ids, HOOK)[HOOK]
    inside = slice(0, prompt_len) if scope == "prompt" else slice(prompt_len, None)
    outside = slice(prompt_len, None) if scope == "prompt" else slice(0, prompt_len)
    assert torch.equal(y[:, outside], x[:, outside])
    torch.testing.assert_close(y[:, inside], edited[:, inside], rtol=0, atol=1e-6)


def test_scopes_without_prompt_len(lm):
    """Without prompt_len every position is prompt: "generated" does nothing, "prompt" acts everywhere."""
    ids, vector = tokens(2, 5), rand(D, seed=13)
    x = lm.capture(ids, HOOK)[HOOK]
    with steer(lm, [AddVector(HOOK, vector=vector, scope="generated")]):
        assert torch.equal(lm.capture(ids, HOOK)[HOOK], x)
    with steer(lm, [AddVector(HOOK, vector=vector, scope="prompt")]):
        torch.testing.assert_close(lm.capture(ids, HOOK)[HOOK], x + vector, rtol=0, atol=1e-6)


def greedy_by_recomputation(lm: HookedLM, prompts, interventions, n: int) -> list[str]:
    """Greedy completions with no KV cache: the whole left-padded sequence is recomputed every step."""
    ids, mask = encode_left_padded(lm.tokenizer, prompts, lm.device)
    prompt_len = ids.shape[1]
    with torch.no_grad(), steer(lm, interventions, prompt_len=prompt_len):
        for _ in range(n):
            nxt = lm.forward(ids, mask)[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    texts = []
    for row in ids[:, prompt_len:].tolist():
        row = row[: row.index(EOS)] if EOS in row else row
        texts.append(lm.tokenizer.decode(row, skip_special_tokens=True))
    return texts


@pytest.mark.parametrize("scope", ["all", "prompt", "generated"])
def test_kv_cached_generation_equals_recomputation(lm, scope):
    assert lm.model.generation_config.use_cache and lm.model.config.use_cache  # generate uses the cache
    ivs = [
        AddVector("blocks.0.hook_resid_post", vector=rand(D, seed=14), alpha=0.5, scope=scope),
        Ablate("blocks.2.hook_resid_mid", direction=rand(D, seed=15), scope=scope),
    ]
    cached = generate(lm, PROMPTS, ivs, GREEDY)
    assert cached == greedy_by_recomputation(lm, PROMPTS, ivs, GREEDY.max_new_tokens)
    assert cached != generate(lm, PROMPTS, (), GREEDY)


# -- positions seen during generation ---------------------------------------------------------------
def positions_in_scope(lm: HookedLM, scope: str, prompt_len: int, run) -> list[tuple[int, list[list[int]]]]:
    """Per forward pass of `run()`: (its width, per row the columns a scoped AddVector changed).

    An outer patch saves each value and an inner one puts it back after comparing, so the model runs
    unsteered and every runner produces the same tokens, whatever the scope.
    """
    saved, seen = {}, []
    vector = torch.ones(D)

    def save(x):
        saved["x"] = x.clone()

    def restore(x):
        changed = (x != saved["x"]).any(-1)
        seen.append((x.shape[-2], [row.nonzero().flatten().tolist() for row in changed]))
        return saved.pop("x")

    iv = AddVector(HOOK, vector=vector, scope=scope)
    with torch.no_grad(), lm.patch({HOOK: save}), steer(lm, [iv], prompt_len=prompt_len):
        with lm.patch({HOOK: restore}):
            run()
    return seen


def expected_columns(widths: list[int], prompt_len: int, scope: str, cached: bool) -> list[list[int]]:
    """The columns of each pass in scope, from where each pass starts: 0, or after the cached tokens."""
    out, start = [], 0
    for width in widths:
        start = start if cached else 0
        absolute = range(start, start + width)
        out.append([c for c, p in enumerate(absolute) if (p < prompt_len) == (scope == "prompt")])
        start += width
    return out


@pytest.mark.parametrize("scope", ["prompt", "generated"])
@pytest.mark.parametrize("runner", ["cached", "recomputed", "hf-generate", "forward"])
def test_scoped_interventions_see_exact_positions_in_every_forward_pass(lm, scope, runner):
    """A regression test for reading positions from a transformers internal (broken by 5.24)."""
    ids, mask = encode_left_padded(lm.tokenizer, PROMPTS, lm.device)
    prompt_len, n = ids.shape[1], 4
    run = {
        "cached": lambda: generate_tokens(lm, ids, mask, n),
        "recomputed": lambda: generate_tokens(lm, ids, mask, n, use_cache=False),
        "hf-generate": lambda: lm.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=PAD
        ),
        "forward": lambda: lm.forward(ids, mask),
    }[runner]
    seen = positions_in_scope(lm, scope, prompt_len, run)
    widths = [w for w, _ in seen]
    cached = runner in ("cached", "hf-generate")
    if runner == "forward":
        assert widths == [prompt_len]
    elif cached:
        assert widths[0] == prompt_len and set(widths[1:]) <= {1} and len(widths) >= 2
    else:
        assert widths == [prompt_len + k for k in range(len(widths))] and len(widths) >= 2
    expected = expected_columns(widths, prompt_len, scope, cached)
    assert [rows for _, rows in seen] == [[cols] * len(PROMPTS) for cols in expected]


def test_own_greedy_loop_matches_transformers_generate(lm):
    """saelab's decoding loop picks the tokens `model.generate` picks, steered or not (up to EOS)."""
    ids, mask = encode_left_padded(lm.tokenizer, PROMPTS, lm.device)
    ivs = [AddVector("blocks.1.hook_resid_post", vector=rand(D, seed=22), alpha=0.5, scope="generated")]

    def up_to_eos(rows):
        return [row[: row.index(EOS) + 1] if EOS in row else row for row in rows.tolist()]

    for interventions in ([], ivs):
        with torch.no_grad(), steer(lm, interventions, prompt_len=ids.shape[1]):
            ours = generate_tokens(lm, ids, mask, 6)
            theirs = lm.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD
            )[:, ids.shape[1] :]
        assert up_to_eos(ours) == up_to_eos(theirs)


def test_positions_come_from_the_mask_then_cache_position_then_the_cache(llama):
    tracker, one = _Positions(llama.model), tokens(1, 1)
    tracker(llama.model, (one, torch.ones(1, 9)), {})  # positional input_ids, attention_mask
    assert tracker.first(1) == 8
    tracker(llama.model, (), {"input_ids": one, "cache": object(), "attention_mask": torch.ones(1, 5)})
    assert tracker.first(1) == 4
    tracker(llama.model, (), {"input_ids": one, "cache_position": torch.tensor([6])})
    assert tracker.first(1) == 6
    tracker(llama.model, (), {"input_ids": one})
    assert tracker.first(1) == 0
    with pytest.raises(InterventionError, match="must cover the cached tokens and the new ones"):
        tracker(llama.model, (), {"input_ids": tokens(1, 3), "attention_mask": torch.ones(1, 2)})
        tracker.first(3)
    with pytest.raises(InterventionError, match="no 2-D attention_mask"):
        tracker(llama.model, (), {"input_ids": one, "past_key_values": object()})
        tracker.first(1)


def test_top_k_keeps_only_the_k_most_likely_tokens():
    from saelab.interventions.generation import _next_tokens

    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0, 2.8]]).repeat(2000, 1)
    drawn = set(_next_tokens(logits, temperature=5.0, top_p=1.0, top_k=2).tolist())
    assert drawn == {1, 2}  # a flat (temperature 5) distribution over the top two only
    assert set(_next_tokens(logits, temperature=5.0, top_p=1.0, top_k=0).tolist()) == {0, 1, 2, 3, 4}


def test_tiny_top_p_is_greedy_and_bad_settings_are_clear_errors(lm):
    nucleus_of_one = GenerationConfig(**{**SAMPLED.to_dict(), "top_p": 1e-6})
    assert generate(lm, PROMPTS, (), nucleus_of_one) == generate(lm, PROMPTS, (), GREEDY)
    for field, value, message in (
        ("temperature", -1.0, "temperature is -1.0"),
        ("top_p", 0.0, "top_p is 0.0"),
        ("top_k", -1, "top_k is -1"),
        ("max_new_tokens", -2, "max_new_tokens is -2"),
        ("batch_size", 0, "batch_size is 0"),
    ):
        with pytest.raises(DataError, match=message):
            generate(lm, PROMPTS, (), GenerationConfig(**{**GREEDY.to_dict(), field: value}))


# -- CapProjection --------------------------------------------------------------------------------
@pytest.mark.parametrize("caps", [(0.25, 0.75), (None, 0.5), (0.5, None)])
def test_cap_projection_bounds_the_projection_only(lm, caps):
    hook, direction = "blocks.1.hook_resid_post", unit(rand(D, seed=16))
    ids = tokens(3, 8, seed=7)
    x = lm.capture(ids, hook)[hook]
    proj = x @ direction
    low, high = (None if q is None else float(proj.quantile(q)) for q in caps)
    with steer(lm, [CapProjection(hook, direction=direction, low=low, high=high)]):
        y = lm.capture(ids, hook)[hook]
    new = y @ direction
    tol = 1e-6
    assert low is None or new.min() >= low - tol
    assert high is None or new.max() <= high + tol
    torch.testing.assert_close(
        y - new[..., None] * direction, x - proj[..., None] * direction, rtol=0, atol=1e-6
    )
    within = (proj >= (low if low is not None else -float("inf"))) & (
        proj <= (high if high is not None else float("inf"))
    )
    assert torch.equal(y[within], x[within])  # positions already within the caps are untouched
    assert (~within).any()


# -- composition ----------------------------------------------------------------------------------
def test_interventions_at_one_hook_compose_in_order(lm):
    ids, vector, d = tokens(2, 5), rand(D, seed=17), unit(rand(D, seed=18))
    x = lm.capture(ids, HOOK)[HOOK]

    def ablated(t):
        return t - (t @ d)[..., None] * d

    add, ablate = AddVector(HOOK, vector=vector, alpha=2.0), Ablate(HOOK, direction=d)
    with steer(lm, [add, ablate]):
        add_then_ablate = lm.capture(ids, HOOK)[HOOK]
    with steer(lm, [ablate, add]):
        ablate_then_add = lm.capture(ids, HOOK)[HOOK]
    with steer(lm, [add]), steer(lm, [ablate]):  # nested contexts: the outer one first
        nested = lm.capture(ids, HOOK)[HOOK]
    torch.testing.assert_close(add_then_ablate, ablated(x + 2 * vector), rtol=0, atol=1e-5)
    torch.testing.assert_close(ablate_then_add, ablated(x) + 2 * vector, rtol=0, atol=1e-5)
    torch.testing.assert_close(nested, add_then_ablate, rtol=0, atol=1e-6)
    assert not torch.allclose(add_then_ablate, ablate_then_add, atol=1e-3)


def test_interventions_across_hooks_compose_in_execution_order(lm):
    """Listed out of order, hooks still run in the model's order: an add upstream, then an ablation."""
    ids, vector, d = tokens(2, 5), rand(D, seed=19), unit(rand(D, seed=20))
    ivs = [Ablate(HOOK, direction=d), AddVector("blocks.0.hook_resid_post", vector=vector, alpha=1.0)]
    with torch.no_grad(), steer(lm, ivs):
        acts = lm.capture(ids, ["blocks.0.hook_resid_post", HOOK])
        logits = lm.forward(ids)
    expected_pre = acts["blocks.0.hook_resid_post"] - (acts["blocks.0.hook_resid_post"] @ d)[..., None] * d
    torch.testing.assert_close(acts[HOOK], expected_pre, rtol=0, atol=1e-6)
    by_hand = {
        "blocks.0.hook_resid_post": lambda t: t + vector,
        HOOK: lambda t: t - (t @ d)[..., None] * d,
    }
    with torch.no_grad(), lm.patch(by_hand):
        torch.testing.assert_close(logits, lm.forward(ids), rtol=1e-5, atol=1e-6)


# -- errors ---------------------------------------------------------------------------------------
def test_unknown_hook_names_the_valid_points(llama):
    with pytest.raises(UnknownHookError, match=r"Valid hook points: blocks\.\{0-2\}\..*hook_resid_pre"):
        with steer(llama, [AddVector("blocks.7.hook_resid_pre", vector=rand(D))]):
            pass
    with pytest.raises(UnknownHookError, match="Did you mean 'blocks.1.hook_resid_post'"):
        with steer(llama, [AddVector("blocks.1.hook_resid_pots", vector=rand(D))]):
            pass


def test_wrong_width_is_a_dimension_mismatch(llama):
    with pytest.raises(DimensionMismatchError, match="width 16 but the hook point has width 32"):
        with steer(llama, [AddVector(HOOK, vector=rand(16))]):
            pass
    with pytest.raises(DimensionMismatchError, match="width 16 but the hook point has width 32"):
        with steer(llama, [Ablate(HOOK, direction=rand(16))]):
            pass
    with pytest.raises(
        DimensionMismatchError, match="the dictionary reads width 16 but blocks.1.hook_resid_pre"
    ):
        with steer(
            llama, [ClampFeature(HOOK, dictionary=make_sae(d_in=16, d_sae=32), features=[0], values=[1])]
        ):
            pass


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(D), torch.full((D,), float("nan")), rand(D).index_fill(0, torch.tensor([3]), float("inf"))],
)
def test_zero_or_non_finite_direction(bad):
    message = "zero vector" if torch.isfinite(bad).all() else "NaN or inf"
    for make in (
        lambda: Ablate(HOOK, direction=bad),
        lambda: CapProjection(HOOK, direction=bad, high=1.0),
        lambda: unit(bad),
    ):
        with pytest.raises(InterventionError, match=message):
            make()
    if not torch.isfinite(bad).all():
        with pytest.raises(InterventionError, match="steering vector contains NaN or inf"):
            AddVector(HOOK, vector=bad)


def test_bad_arguments_have_clear_messages(sae):
    with pytest.raises(
        InterventionError, match="unknown scope 'generation': use one of all, prompt, generated"
    ):
        AddVector(HOOK, vector=rand(D), scope="generation")
    with pytest.raises(InterventionError, match="feature index 64 is out of range: the dictionary has 64"):
        ClampFeature(HOOK, dictionary=sae, features=[64], values=[1.0])
    with pytest.raises(InterventionError, match="feature index -1 is out of range"):
        add_feature(sae, -1, 1.0)
    with pytest.raises(InterventionError, match="one value per feature"):
        ClampFeature(HOOK, dictionary=sae, features=[1, 2], values=[1.0])
    with pytest.raises(InterventionError, match="needs a high cap, a low cap or both"):
        CapProjection(HOOK, direction=rand(D))
    with pytest.raises(InterventionError, match="low=2.0 is above high=1.0"):
        CapProjection(HOOK, direction=rand(D), low=2.0, high=1.0)
    with pytest.raises(InterventionError, match=r"one vector \[d_model\], got shape \(2, 32\)"):
        AddVector(HOOK, vector=rand(2, D))


# -- argument checks ---------------------------------------------------------------------------------
def test_missing_required_argument_is_a_clear_error():
    for make, what in (
        (lambda: AddVector(HOOK), "vector"),
        (lambda: Ablate(HOOK), "direction"),
        (lambda: CapProjection(HOOK, high=1.0), "direction"),
        (lambda: ClampFeature(HOOK, features=[1], values=[1.0]), "dictionary"),
    ):
        with pytest.raises(InterventionError, match=what):
            make()


def test_non_finite_scalars_are_rejected(sae):
    nan, inf = float("nan"), float("inf")
    for make in (
        lambda: AddVector(HOOK, vector=rand(D), alpha=nan),
        lambda: AddVector(HOOK, vector=rand(D), alpha=inf),
        lambda: CapProjection(HOOK, direction=rand(D), high=nan),
        lambda: CapProjection(HOOK, direction=rand(D), low=nan),
        lambda: ClampFeature(HOOK, dictionary=sae, features=[1], values=[nan]),
    ):
        with pytest.raises(InterventionError, match="NaN or inf"):
            make()


def test_clamp_feature_refuses_a_repeated_index(sae):
    with pytest.raises(InterventionError, match="more than once"):
        ClampFeature(HOOK, dictionary=sae, features=[3, 3], values=[1.0, 2.0])


def test_add_feature_on_a_transcoder_writes_where_its_decoder_writes():
    from saelab.dictionaries import DictionaryConfig, build_dictionary

    cfg = DictionaryConfig(
        architecture="topk",
        d_in=D,
        d_sae=64,
        k=4,
        hook_name="blocks.0.ln2.hook_normalized",
        output_hook_name="blocks.0.hook_mlp_out",
        normalize_activations="none",
    )
    assert add_feature(build_dictionary(cfg), 3, 1.0).hook == "blocks.0.hook_mlp_out"


# -- generate / compare / completion_loss ----------------------------------------------------------
def test_generate_is_seeded_and_leaves_the_callers_rng_alone(lm):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate(lm, PROMPTS, (), SAMPLED)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)  # a different caller state does not change the samples
    assert generate(lm, PROMPTS, (), SAMPLED) == first
    other_seed = GenerationConfig(**{**SAMPLED.to_dict(), "seed": SAMPLED.seed + 1})
    assert generate(lm, PROMPTS, (), other_seed) != first


def test_compare_with_alpha_zero_is_exactly_unsteered(lm, sae):
    rows = compare(lm, PROMPTS, [AddVector(HOOK, vector=rand(D, seed=21), alpha=0.0)], SAMPLED)
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(r["steered"] == r["unsteered"] for r in rows)
    assert [r["unsteered"] for r in rows] == generate(lm, PROMPTS, (), SAMPLED)
    steered = compare(lm, PROMPTS, [add_feature(sae, 5, 8.0)], SAMPLED)
    assert any(r["steered"] != r["unsteered"] for r in steered)


def test_completion_loss_is_the_mean_token_cross_entropy(lm):
    completions = ["w5 w6", "w7 w8 w9 w20"]
    got = completion_loss(lm, PROMPTS, completions, chat=False)
    nll = []
    with torch.no_grad():
        for prompt, completion in zip(PROMPTS, completions, strict=True):
            p = lm.tokenizer(prompt)["input_ids"]
            c = lm.tokenizer(completion, add_special_tokens=False)["input_ids"]
            logits = lm.model(torch.tensor([p + c])).logits[0]
            nll.append(F.cross_entropy(logits[len(p) - 1 : -1], torch.tensor(c), reduction="none"))
    assert got == pytest.approx(float(torch.cat(nll).mean()), rel=1e-5)


# -- the real embedded model ----------------------------------------------------------------------
@pytest.mark.integration
def test_mean_difference_steering_on_the_embedded_model():
    """An ocean-minus-furniture vector (last token, blocks.8) makes SmolLM2 talk about the sea."""
    from saelab.core.models import load_model

    lm = load_model(None, device="cpu", dtype=torch.float32)  # its thresholds were measured in float32
    hook = "blocks.8.hook_resid_post"
    topic = ["The waves of the ocean", "We sailed across the ocean", "Fish swim in the deep sea"]
    neutral = ["The legs of the table", "We sat around the table", "Books lie on the wooden chair"]

    def last_token_mean(prompts):
        ids, mask = encode_left_padded(lm.tokenizer, prompts, lm.device)
        return lm.capture(ids, hook, attention_mask=mask)[hook][:, -1].mean(0)

    vector = last_token_mean(topic) - last_token_mean(neutral)
    prompts = ["Write one sentence about my day.", "My favourite place to spend a weekend is the"]
    cfg = GenerationConfig(max_new_tokens=8, temperature=0.0, chat=False)
    plain = generate(lm, prompts, (), cfg)
    assert generate(lm, prompts, [AddVector(hook, vector=vector, alpha=0.0)], cfg) == plain
    steered = generate(lm, prompts, [AddVector(hook, vector=vector, alpha=1.5)], cfg)
    assert all(a != b for a, b in zip(plain, steered, strict=True))
    assert any("ocean" in text or "sea" in text for text in steered)
    assert not any("ocean" in text or "sea" in text for text in plain)

    ocean = lm.tokenizer(" ocean", add_special_tokens=False)["input_ids"][0]
    ids, mask = encode_left_padded(lm.tokenizer, prompts, lm.device)
    with torch.no_grad():
        before = lm.forward(ids, mask)[:, -1].log_softmax(-1)
        with steer(lm, [AddVector(hook, vector=vector, alpha=1.5)]):
            after = lm.forward(ids, mask)[:, -1].log_softmax(-1)
    gain = after[:, ocean] - before[:, ocean]  # measured: about 13.8 and 3.9 nats
    assert (gain > 2.0).all(), gain
    assert ((after > after[:, ocean, None]).sum(-1) < 10).all()  # " ocean" is now a top-10 next token
