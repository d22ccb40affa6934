"""LM clients on a tiny random Llama: the local client against direct forward passes, the HTTP client
against a real OpenAI-compatible server (tests/openai_server.py) that wraps the local client, and every
error a user can meet (unreachable endpoint, refused key, empty or junk replies, 429, timeouts)."""

from __future__ import annotations

import time

import pytest
import torch

from saelab.core.models import HookedLM
from saelab.errors import ClientError, ClientSpecError, DataError
from saelab.explain.clients import (
    CLIENT_KINDS,
    LMClient,
    LocalClient,
    OpenAIClient,
    RateLimiter,
    TokenScores,
    candidate_logprob,
    format_chat,
    make_client,
    parse_spec,
)
from tests.helpers import SPECIAL, make_model, make_tokenizer
from tests.openai_server import closed_port, serve

TEMPLATE = (
    "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}{% if add_generation_prompt %}w3{% endif %}"
)
PLAIN = ["w5 w6 w7", "w9", "w10 w11 w12 w13 w14 w15", "w20 w21"]
CHATS = [
    [{"role": "user", "content": "w30 w31"}],
    [{"role": "system", "content": "w40"}, {"role": "user", "content": "w41 w42 w43"}],
]
CANDIDATES = [" w50", " w51 w52", " w7"]
KEY_ENV = "SAELAB_TEST_API_KEY"


def tiny_lm(template: bool = True) -> HookedLM:
    tokenizer = make_tokenizer()
    if template:
        tokenizer.chat_template = TEMPLATE
    # A wider init than the default 0.02 gives peaked, prompt-dependent next-token distributions.
    model = make_model("llama", n_layers=2, hidden=32, seed=3, initializer_range=0.3)
    return HookedLM(model, tokenizer, name="tiny-llama")


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def local(lm):
    return LocalClient(lm=lm, batch_size=3)


@pytest.fixture(scope="module")
def running(local):
    with serve(local, model="tiny") as server:
        yield server


@pytest.fixture
def server(running):
    """The module's server, behaving: no fault left over from another test."""
    running.faults.status.clear()
    running.faults.mode = None
    yield running
    running.faults.status.clear()
    running.faults.mode = None


@pytest.fixture
def http(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    return make_client(f"openai:tiny@{server.url}", api_key_env=KEY_ENV, timeout=20, max_retries=0)


def direct_logprob(lm, ids: list[int], first: int) -> float:
    """log P(ids[first:] | ids[:first]) from one plain forward pass, no padding."""
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = logits.log_softmax(-1)
    return float(sum(logprobs[i - 1, ids[i]] for i in range(first, len(ids))))


def word_ids(text: str) -> list[int]:
    """The ids of "w5 w6" words, by construction of the test vocabulary (the tokenizer adds no BOS)."""
    return [len(SPECIAL) + int(w[1:]) for w in text.split()]


# -- the local client ---------------------------------------------------------------------------
def test_both_clients_satisfy_the_protocol(local, http):
    assert isinstance(local, LMClient) and isinstance(http, LMClient)


def test_batched_generation_equals_one_prompt_at_a_time(lm):
    batched, single = LocalClient(lm=lm, batch_size=4), LocalClient(lm=lm, batch_size=1)
    prompts = PLAIN + CHATS
    greedy = batched.generate(prompts, max_new_tokens=6)
    assert greedy == single.generate(prompts, max_new_tokens=6)
    assert all(text.strip() for text in greedy)
    sampled = batched.generate(prompts, max_new_tokens=6, temperature=1.0, seed=4)
    assert sampled == single.generate(prompts, max_new_tokens=6, temperature=1.0, seed=4)
    assert sampled == [batched.generate([p], max_new_tokens=6, temperature=1.0, seed=4)[0] for p in prompts]


def test_greedy_is_deterministic_and_is_the_argmax(lm, local):
    first = local.generate(PLAIN, max_new_tokens=5)
    assert first == local.generate(PLAIN, max_new_tokens=5)
    for prompt, text in zip(PLAIN, first, strict=True):
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([word_ids(prompt)])).logits
        best = int(logits[0, -1].argmax())
        expected = lm.tokenizer.decode([best], skip_special_tokens=True)
        assert text.split()[0] == expected, (prompt, text)


def test_seeded_sampling_is_reproducible_and_leaves_the_callers_rng_alone(local):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = local.generate(PLAIN, max_new_tokens=8, temperature=1.5, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    assert a == local.generate(PLAIN, max_new_tokens=8, temperature=1.5, seed=7)
    assert a != local.generate(PLAIN, max_new_tokens=8, temperature=1.5, seed=8)
    assert a != local.generate(PLAIN, max_new_tokens=8)


def test_logprobs_equal_a_direct_forward_pass(lm, local):
    got = local.logprobs(PLAIN, CANDIDATES)
    assert len(got) == len(PLAIN) and all(len(row) == len(CANDIDATES) for row in got)
    for prompt, row in zip(PLAIN, got, strict=True):
        context = word_ids(prompt)
        for candidate, value in zip(CANDIDATES, row, strict=True):
            expected = direct_logprob(lm, context + word_ids(candidate), len(context))
            assert value == pytest.approx(expected, abs=1e-5)
    one_by_one = LocalClient(lm=lm, batch_size=1).logprobs(PLAIN, CANDIDATES)
    assert torch.allclose(torch.tensor(got), torch.tensor(one_by_one), atol=1e-5)


def test_logprobs_equal_the_echo_path_with_shared_contexts_run_once(lm, local):
    """logprobs runs each distinct context once (one-token candidates after one prompt share it) and
    gives what summing `score_tokens` over the candidate gives."""
    prompts, candidates = PLAIN + [PLAIN[0]], [" w50", " w51", " w51 w52"]
    expected = [
        [
            candidate_logprob(s, len(p), len(p + c), "test")
            for s, c in zip(local.score_tokens([p + c for c in candidates]), candidates, strict=True)
        ]
        for p in prompts
    ]
    whole = LocalClient(lm=lm, batch_size=3)
    whole._head_parts = None  # the whole-model path (logits at every position) agrees too
    rows = []
    hook = lm.model.get_decoder().register_forward_pre_hook(
        lambda _module, _args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        got = local.logprobs(prompts, candidates)
    finally:
        hook.remove()
    for values in (got, whole.logprobs(prompts, candidates)):
        assert torch.allclose(
            torch.tensor(values, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), atol=1e-4
        )
    # distinct contexts: per distinct prompt one shared by " w50" / " w51", one for " w51 w52"
    assert sum(rows) == 2 * len(set(prompts))


def test_a_token_that_straddles_the_boundary_counts_for_the_candidate(lm, local):
    """'w5 w6' + 'w7' tokenises as w5, <unk> ('w6w7'): the merged token is the candidate's."""
    (value,) = local.logprobs(["w5 w6"], ["w7"])[0]
    ids = [*word_ids("w5"), SPECIAL["<unk>"]]
    assert value == pytest.approx(direct_logprob(lm, ids, 1), abs=1e-5)


def test_chat_prompts_are_the_chat_template_applied(lm, local):
    text = format_chat(lm.tokenizer, CHATS[1])
    assert text == "w1 w40 w2 w1 w41 w42 w43 w2 w3"
    assert local.generate(CHATS, max_new_tokens=5) == local.generate(
        [format_chat(lm.tokenizer, c) for c in CHATS], max_new_tokens=5
    )
    assert local.generate(CHATS[:1], max_new_tokens=5) != local.generate(["w30 w31"], max_new_tokens=5)
    bare = tiny_lm(template=False).tokenizer
    assert format_chat(bare, CHATS[1]) == "system: w40\n\nuser: w41 w42 w43\n\nassistant:"


def test_embeddings_are_mean_pooled_last_hidden_states(lm, local):
    got = local.embed(PLAIN)
    assert got.shape == (len(PLAIN), lm.d_model) and got.dtype == torch.float32
    with torch.no_grad():
        ids = torch.tensor([word_ids(PLAIN[2])])
        hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    assert torch.allclose(got[2], hidden.mean(0), atol=1e-5)
    assert not torch.allclose(got[0], got[1])


def test_bad_prompts_and_settings_are_clear_errors(local):
    with pytest.raises(DataError, match="wrap one prompt"):
        local.generate("w1 w2", max_new_tokens=3)
    with pytest.raises(DataError, match="prompt 1 is neither"):
        local.generate(["w1", [{"role": "robot", "content": "w2"}]], max_new_tokens=3)
    with pytest.raises(DataError, match="prompt 0 is empty"):
        local.generate([""], max_new_tokens=3)
    with pytest.raises(DataError, match="max_new_tokens"):
        local.generate(["w1"], max_new_tokens=0)
    with pytest.raises(DataError, match="temperature"):
        local.generate(["w1"], max_new_tokens=3, temperature=-1)
    with pytest.raises(DataError, match="plain-text prompts"):
        local.logprobs([CHATS[0]], [" w1"])
    with pytest.raises(DataError, match="candidate"):
        local.logprobs(["w1"], [""])


def test_describe_names_the_model_and_settings(local):
    info = local.describe()
    assert info["kind"] == "local" and info["model"] == "tiny-llama"
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["batch_size"] == 3


# -- the HTTP client against a real server wrapping the local client ----------------------------
def test_http_client_gives_exactly_what_the_local_client_gives(local, http, server):
    prompts = [PLAIN[0], CHATS[0], PLAIN[1], CHATS[1], PLAIN[2]]
    for temperature, seed in ((0.0, 0), (1.2, 5)):
        settings = {"max_new_tokens": 6, "temperature": temperature, "seed": seed}
        assert http.generate(prompts, **settings) == local.generate(prompts, **settings)
    remote, here = (
        torch.tensor(http.logprobs(PLAIN, CANDIDATES)),
        torch.tensor(local.logprobs(PLAIN, CANDIDATES)),
    )
    assert torch.allclose(remote, here, atol=1e-5, rtol=0)
    assert torch.allclose(http.embed(PLAIN), local.embed(PLAIN), atol=1e-5, rtol=0)
    paths = {path for _, path in server.seen}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/embeddings"} <= paths


def test_http_logprobs_read_offsets_shifted_by_rendered_special_tokens(http):
    """A server that renders BOS as '<s>' shifts every offset by 3; the shift is read off the end."""

    class Choice:
        text = "w5 w6 w7"

        class logprobs:
            tokens = ["<s>", "w5", " w6", " w7"]
            text_offset = [0, 3, 5, 8]
            token_logprobs = [None, -1.0, -2.0, -4.0]

    scores, shift = http._echoed(Choice, "w5 w6 w7")
    assert shift == 3
    assert candidate_logprob(scores, len("w5 w6") + shift, len("w5 w6 w7") + shift, "x") == -4.0


def test_candidate_tokens_must_have_log_probs():
    scores = TokenScores(["a", " b"], [0, 1], [1, 3], [None, None])
    with pytest.raises(ClientError, match="no usable log-prob"):
        candidate_logprob(scores, 1, 3, "the server")
    with pytest.raises(ClientError, match="no token for the candidate"):
        candidate_logprob(scores, 3, 3, "the server")


# -- errors -----------------------------------------------------------------------------------------
def test_an_unreachable_endpoint_is_a_quick_clear_error():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    client = make_client(f"openai:tiny@{url}", timeout=2, max_retries=0)
    start = time.monotonic()
    with pytest.raises(ClientError, match="could not reach .*Is the server running") as err:
        client.generate(["w1"], max_new_tokens=2)
    assert time.monotonic() - start < 5
    assert url in str(err.value)


def test_a_refused_key_names_the_variable_and_never_the_key(local, monkeypatch):
    secret = "sk-test-0123456789abcdef"
    with serve(local, model="tiny", api_key="sk-the-right-one") as server:
        monkeypatch.setenv(KEY_ENV, secret)
        client = make_client(f"openai:tiny@{server.url}", api_key_env=KEY_ENV, max_retries=0)
        with pytest.raises(ClientError, match=f"refused the API key \\(401: .*\\*\\*\\*.*{KEY_ENV}") as err:
            client.logprobs(["w1"], [" w2"])
        assert secret not in str(err.value) and "not accept" in str(err.value)
        assert secret not in repr(err.value.__cause__) and err.value.__suppress_context__
        assert secret not in repr(client.describe()) and secret not in repr(client)
        assert client.describe()["api_key_set"] is True
        monkeypatch.delenv(KEY_ENV)
        unset = make_client(f"openai:tiny@{server.url}", api_key_env=KEY_ENV, max_retries=0)
        with pytest.raises(ClientError, match=f"{KEY_ENV} is not set"):
            unset.generate(["w1"], max_new_tokens=2)
        monkeypatch.setenv(KEY_ENV, "sk-the-right-one")
        right = make_client(f"openai:tiny@{server.url}", api_key_env=KEY_ENV, max_retries=0)
        assert right.generate(["w1"], max_new_tokens=2) == local.generate(["w1"], max_new_tokens=2)


@pytest.mark.parametrize(
    ("mode", "call", "message"),
    [
        ("empty", "generate", "returned 0 choices"),
        ("empty", "chat", "returned 0 choices"),
        ("empty", "embed", "0 embeddings"),
        ("junk", "generate", "text is NoneType"),
        ("junk", "chat", "text is NoneType"),
        ("no_logprobs", "logprobs", "must support echo=True"),
        ("not_json", "generate", "not a valid OpenAI-style response|without choices"),
    ],
)
def test_empty_or_junk_replies_are_clear_errors(http, server, mode, call, message):
    server.faults.mode = mode
    run = {
        "generate": lambda: http.generate(PLAIN[:1], max_new_tokens=2),
        "chat": lambda: http.generate(CHATS[:1], max_new_tokens=2),
        "embed": lambda: http.embed(PLAIN[:2]),
        "logprobs": lambda: http.logprobs(PLAIN[:1], CANDIDATES[:1]),
    }[call]
    with pytest.raises(ClientError, match=message):
        run()


def test_a_wrong_model_name_is_a_clear_error(server):
    client = make_client(f"openai:no-such-model@{server.url}", max_retries=0)
    with pytest.raises(ClientError, match="404 for model 'no-such-model'.*model name is wrong"):
        client.generate(["w1"], max_new_tokens=2)


def test_429_once_is_retried_and_then_succeeds(local, server):
    client = make_client(f"openai:tiny@{server.url}", max_retries=2, timeout=20)
    server.faults.status[:] = [429]
    before = len(server.seen)
    assert client.generate(PLAIN[:2], max_new_tokens=3) == local.generate(PLAIN[:2], max_new_tokens=3)
    assert len(server.seen) - before == 2


def test_server_errors_beyond_the_retries_are_clear_errors(server):
    client = make_client(f"openai:tiny@{server.url}", max_retries=1, timeout=20)
    server.faults.status[:] = [503, 503]
    with pytest.raises(ClientError, match="answered 503 after 1 retries"):
        client.generate(["w1"], max_new_tokens=2)
    server.faults.status[:] = [429, 429]
    with pytest.raises(ClientError, match="429 .*lower requests_per_minute"):
        client.generate(["w1"], max_new_tokens=2)


def test_timeouts_after_retries_are_clear_errors(server):
    client = make_client(f"openai:tiny@{server.url}", max_retries=1, timeout=0.3)
    server.faults.mode, server.faults.delay = "slow", 1.5
    start = time.monotonic()
    with pytest.raises(ClientError, match="did not answer within 0.3 s, 2 tries"):
        client.generate(["w1"], max_new_tokens=2)
    assert time.monotonic() - start < 5


def test_requests_are_spaced_by_the_rate_limit(server):
    client = make_client(f"openai:tiny@{server.url}", requests_per_minute=300, batch_size=1, max_retries=0)
    before = len(server.seen)
    client.generate(PLAIN, max_new_tokens=1)
    times = [t for t, _ in server.seen[before:]]
    assert len(times) == len(PLAIN)
    assert min(b - a for a, b in zip(times, times[1:], strict=False)) >= 0.2 - 0.02


def test_rate_limiter_books_evenly_spaced_slots():
    now, slept = [0.0], []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(120, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.wait()
    assert slept == [0.5, 0.5]
    now[0] += 2.0
    limiter.wait()
    assert slept == [0.5, 0.5]  # idle long enough: no wait
    RateLimiter(None).wait()
    with pytest.raises(DataError, match="requests_per_minute"):
        RateLimiter(0)


# -- the factory ----------------------------------------------------------------------------------
def test_specs_name_the_client(lm, monkeypatch):
    assert isinstance(make_client("local", lm=lm), LocalClient)
    assert parse_spec("local:HuggingFaceTB/SmolLM2-135M-Instruct") == (
        CLIENT_KINDS["local"],
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    client = make_client("openai:Qwen2.5-7B@http://127.0.0.1:8000/v1", timeout=5, requests_per_minute=None)
    assert isinstance(client, OpenAIClient)
    info = client.describe()
    assert (info["kind"], info["model"], info["base_url"]) == (
        "openai",
        "Qwen2.5-7B",
        "http://127.0.0.1:8000/v1",
    )
    assert info["api_key_env"] == "OPENAI_API_KEY" and info["timeout"] == 5.0 and info["api_key_set"] is False
    hosted = make_client("openai:gpt-4o-mini").describe()
    assert hosted["base_url"] == "https://api.openai.com/v1" and hosted["model"] == "gpt-4o-mini"


def test_local_specs_load_a_model_folder(tmp_path):
    from tests.helpers import save_model

    client = make_client(f"local:{save_model(tmp_path / 'tiny')}", device="cpu", dtype="float32")
    assert client.describe()["model"] == str(tmp_path / "tiny")
    assert len(client.generate(["w1 w2"], max_new_tokens=2)) == 1


@pytest.mark.parametrize(
    ("spec", "options", "message"),
    [
        ("", {}, "spec is empty; use one of 'local'"),
        ("gpt4", {}, "unknown LM client spec 'gpt4'; use one of 'local', 'local:<hub id"),
        ("local:", {}, "ends in ':'"),
        ("openai", {}, "names no model; write openai:<model>@<base_url>"),
        ("openai:m@127.0.0.1:8000", {}, "does not start with http"),
        (
            "openai:m@http://x/v1",
            {"device": "cpu"},
            "device= does not apply to the openai client; it takes api_key_env=",
        ),
        ("local", {"timeout": 3}, "timeout= does not apply to the local client; it takes lm=, device="),
    ],
)
def test_bad_specs_list_the_forms(spec, options, message):
    with pytest.raises(ClientSpecError, match=message.replace("(", "\\(")) as err:
        make_client(spec, **options)
    if "use one of" in message:
        assert "openai:<model>@<base_url>" in str(err.value)


LONG = ["w60 w61 w62 w63 w64 " + tail for tail in ("w70 w71", "w72", "w73 w74 w75", "w70 w76")] + ["w80 w81"]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_neox", "gemma", "gemma2", "olmo2"])
def test_a_shared_prefix_runs_once_and_changes_no_log_prob(kind):
    """Contexts that begin alike run their common prefix once (then the rest on its key/value cache);
    every log-prob equals the one of the whole context run from scratch."""
    model = make_model(kind, n_layers=2, hidden=32, seed=3, initializer_range=0.3)
    lm = HookedLM(model, make_tokenizer(), name=f"tiny-{kind}")
    shared = LocalClient(lm=lm, batch_size=4, min_prefix=2)
    whole = LocalClient(lm=lm, batch_size=4, min_prefix=10_000)
    sharing = shared._prefix_cache_ok()
    tokens = []
    hook = lm.model.get_decoder().register_forward_pre_hook(
        lambda _module, _args, kwargs: tokens.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    try:
        got = shared.logprobs(LONG, CANDIDATES)
        run_shared = sum(tokens)
        tokens.clear()
        expected = whole.logprobs(LONG, CANDIDATES)
        run_whole = sum(tokens)
    finally:
        hook.remove()
    assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-5)
    if sharing:
        assert run_shared < run_whole
    else:  # a cache that cannot be shared (a sliding window) runs whole
        assert kind == "gemma2" and run_shared == run_whole
