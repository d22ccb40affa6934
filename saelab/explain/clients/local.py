"""An LM client on any Hugging Face causal LM, run here through transformers (offline by default).

The model comes from `saelab.core.models.load_model` (the embedded SmolLM2-135M-Instruct by default,
else a hub id, a local folder or a .gguf file; the GPU when there is one; dtype "auto"). Generation
is saelab's own decoding loop (`saelab.core.decoding`) on left-padded batches. Greedy prompts are
batched; sampled prompts run one at a time, each from `seed`, so a prompt's sample depends on its
text and the seed only, not on which other prompts share its batch (an HTTP server that takes one
chat per request gives the same text).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saelab.core.decoding import cache_keyword, decode_new, generate_tokens, returned_cache, stop_ids
from saelab.core.models import HookedLM, load_model
from saelab.core.prompts import encode_left_padded, pad_rows, pad_token_id, prompt_token_ids
from saelab.errors import ClientError, DataError
from saelab.explain.clients.base import (
    Prompt,
    TokenScores,
    candidate_logprob,
    check_generation,
    check_prompts,
    check_scoring,
    format_chat,
)


class LocalClient:
    """`LMClient` on a local model. Pass a loaded `lm`, or a `model` name for `load_model`."""

    kind = "local"

    def __init__(
        self,
        model: str | None = None,
        *,
        lm: HookedLM | None = None,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype = "auto",
        batch_size: int = 16,
        top_p: float = 1.0,
        top_k: int = 0,
        min_prefix: int = 8,
    ):
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise DataError(f"batch_size is {batch_size!r}; use a whole number >= 1.")
        if not (0 < top_p <= 1):
            raise DataError(f"top_p is {top_p!r}; use a value in (0, 1] (1 keeps every token).")
        if not (isinstance(min_prefix, int) and min_prefix >= 1):
            raise DataError(f"min_prefix is {min_prefix!r}; use a whole number >= 1 (tokens).")
        if not (isinstance(top_k, int) and top_k >= 0):
            raise DataError(f"top_k is {top_k!r}; use a whole number >= 0 (0 keeps every token).")
        self.lm = lm if lm is not None else load_model(model, device=device, dtype=dtype)
        self.batch_size, self.top_p, self.top_k = batch_size, float(top_p), top_k
        self.min_prefix = min_prefix

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    def format(self, prompt: Prompt) -> str:
        """The exact text the model reads: plain strings as they are, chats through the chat template."""
        return prompt if isinstance(prompt, str) else format_chat(self.tokenizer, prompt)

    # -- generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Prompt], *, max_new_tokens: int, temperature: float = 0.0, seed: int = 0
    ) -> list[str]:
        check_generation(max_new_tokens, temperature, seed)
        texts = [self.format(p) for p in check_prompts(prompts)]
        step = self.batch_size if temperature == 0 else 1
        out: list[str] = []
        for start in range(0, len(texts), step):
            out += self._generate(texts[start : start + step], max_new_tokens, float(temperature), seed)
        return out

    def _generate(self, texts: list[str], max_new_tokens: int, temperature: float, seed: int) -> list[str]:
        lm = self.lm
        ids, mask = encode_left_padded(lm.tokenizer, texts, lm.device)
        with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
            torch.manual_seed(seed)
            new = generate_tokens(lm, ids, mask, max_new_tokens, temperature, self.top_p, top_k=self.top_k)
        return decode_new(lm.tokenizer, new, stop_ids(lm))

    # -- scoring ----------------------------------------------------------------------------------
    def _tokens(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        tokenizer = self.tokenizer
        if not getattr(tokenizer, "is_fast", False):
            raise ClientError(
                f"the tokenizer of {self.lm.name} is a slow (Python) tokenizer, which gives no character "
                "offsets, so candidate tokens cannot be found; save the model with its fast tokenizer "
                "(tokenizer.json) or use another model."
            )
        add_bos = not text.startswith(tokenizer.bos_token or "\0")
        enc = tokenizer(text, add_special_tokens=add_bos, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    @torch.no_grad()
    def score_tokens(self, texts: Sequence[str]) -> list[TokenScores]:
        """Every token of each text with its span and log P(token | the tokens before it) (first: None).

        This is what an OpenAI-compatible server returns for `echo=True, max_tokens=0`.
        """
        encoded = [self._tokens(t) for t in texts]
        out: list[TokenScores] = []
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            ids, mask = pad_rows([e[0] for e in chunk], pad_token_id(self.tokenizer), left=False)
            logits = self.lm.forward(ids, mask).float()
            ids = ids.to(logits.device)
            picked = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0].cpu()
            for row, (token_ids, offsets) in enumerate(chunk):
                text = texts[start + row]
                logprobs = [None] + [float(x) for x in picked[row, : len(token_ids) - 1]]
                out.append(
                    TokenScores(
                        tokens=[text[a:b] for a, b in offsets],
                        starts=[a for a, _ in offsets],
                        ends=[b for _, b in offsets],
                        logprobs=logprobs,
                    )
                )
        return out

    def logprobs(self, prompts: Sequence[str], candidates: Sequence[str]) -> list[list[float]]:
        """log P(candidate | prompt) for every prompt and candidate, as `candidate_logprob` sums it over
        `score_tokens`, computed with fewer forwards: the context of each text (its tokens but the last)
        runs once however many texts share it (a one-token " Yes" and " No" after the same prompt share
        one), batches are grouped by length and left-padded (position ids count real tokens only),
        and the unembedding and softmax run on the candidate's positions only."""
        prompts, candidates = check_scoring(prompts, candidates)
        texts = [p + c for p in prompts for c in candidates]
        encoded = [self._tokens(t) for t in texts]
        cuts = []  # per text: the index of its first token that covers a candidate character
        for (ids, offsets), p in zip(encoded, [p for p in prompts for _ in candidates], strict=True):
            cuts.append(next((i for i, (_, end) in enumerate(offsets) if end > len(p)), len(ids)))
        # One context per distinct ids[:-1], with the (position from its end, token) log-probs it needs.
        wanted: dict[tuple[int, ...], set[tuple[int, int]]] = {}
        for (ids, _), cut in zip(encoded, cuts, strict=True):
            context = tuple(ids[:-1])
            if context and cut < len(ids):
                need = wanted.setdefault(context, set())
                need.update((i - len(ids), ids[i]) for i in range(max(cut, 1), len(ids)))
        tails = self._tail_logprobs(wanted)
        where = f"the local model {self.lm.name}"
        flat = []
        for text, (ids, offsets), cut, p in zip(
            texts, encoded, cuts, [p for p in prompts for _ in candidates], strict=True
        ):
            logprobs: list[float | None] = [None] * len(ids)
            context = tuple(ids[:-1])
            if context in tails:
                table = tails[context]  # {(position from the end, token): log-prob}
                for i in range(max(cut, 1), len(ids)):
                    logprobs[i] = table[i - len(ids), ids[i]]
            scores = TokenScores(
                tokens=[text[a:b] for a, b in offsets], starts=[a for a, _ in offsets],
                ends=[b for _, b in offsets], logprobs=logprobs,
            )  # fmt: skip
            flat.append(candidate_logprob(scores, len(p), len(text), where))
        n = len(candidates)
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]

    @torch.no_grad()
    def _tail_logprobs(self, wanted: dict[tuple[int, ...], set[tuple[int, int]]]) -> dict:
        """{context: {(position from its end, token): log P(token)}} for the wanted pairs of each
        context (position -1: the token after the context); only the log-probs asked for leave the
        device.

        Contexts run in batches of `batch_size`, sorted so that contexts sharing a beginning sit
        together (every judge prompt about one explanation starts with the same chat template,
        instructions and explanation). When a batch's contexts share a prefix of at least
        `min_prefix` tokens (and the model keeps a plain key/value cache), the prefix runs once and
        only the rest of each context runs, on a copy of the prefix's cache, right-padded so every
        token keeps its position; otherwise the batch runs whole, left-padded."""
        out: dict[tuple[int, ...], dict[tuple[int, int], float]] = {}
        order = sorted(wanted)  # lexicographic: shared beginnings are neighbours
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            depth = {c: max(-pos for pos, _ in wanted[c]) for c in chunk}  # positions needed from the end
            shared = _common_prefix(chunk, limit=min(len(c) - depth[c] for c in chunk))
            if shared >= self.min_prefix and self._prefix_cache_ok():
                hidden, ends = self._run_after_prefix(chunk, shared)
            else:
                hidden, ends = self._run_whole(chunk)
            pairs = [(row, pos, tok) for row, c in enumerate(chunk) for pos, tok in sorted(wanted[c])]
            rows = torch.tensor([r for r, _, _ in pairs], device=hidden.device)
            cols = torch.tensor([ends[r] + pos for r, pos, _ in pairs], device=hidden.device)
            tokens = torch.tensor([t for _, _, t in pairs], device=hidden.device)
            logits = self._logits(hidden[rows, cols]).float()  # [pairs, vocab]
            values = (logits.gather(-1, tokens[:, None])[:, 0] - logits.logsumexp(-1)).tolist()
            for (row, pos, tok), value in zip(pairs, values, strict=True):
                out.setdefault(chunk[row], {})[pos, tok] = value
        return out

    def _run_whole(self, chunk: list[tuple[int, ...]]) -> tuple[torch.Tensor, list[int]]:
        """Left-padded contexts run whole: (hidden states or logits [batch, T, *], each row's end index)."""
        ids, mask = pad_rows(chunk, pad_token_id(self.tokenizer), left=True)
        inputs = self.lm.prepare(ids, mask)
        parts = self._split_head()
        states = parts[0](**inputs).last_hidden_state if parts else self.lm.model(**inputs).logits
        return states, [ids.shape[1]] * len(chunk)

    def _run_after_prefix(self, chunk: list[tuple[int, ...]], shared: int) -> tuple[torch.Tensor, list[int]]:
        """The first `shared` tokens (common to the chunk) once, then each row's rest on a copy of their
        key/value cache, right-padded: (hidden states or logits [batch, S, *], each row's end index)."""
        model, parts = self.lm.model, self._split_head()
        runner = parts[0] if parts else model
        key = cache_keyword(runner)
        prefix = torch.tensor([chunk[0][:shared]], device=self.lm.device)
        first = runner(input_ids=prefix, use_cache=True, return_dict=True)
        cache = returned_cache(first)
        rests = [c[shared:] for c in chunk]
        ids, mask = pad_rows(rests, pad_token_id(self.tokenizer), left=False)
        ids, mask = ids.to(self.lm.device), mask.to(self.lm.device)
        cache.batch_repeat_interleave(len(chunk))
        width = ids.shape[1]
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.cat([torch.ones_like(mask[:, :1]).expand(-1, shared), mask], 1),
            "position_ids": (shared + torch.arange(width, device=ids.device)).expand(len(chunk), -1),
            "use_cache": True,
            "return_dict": True,
            key: cache,
        }
        output = runner(**inputs)
        states = output.last_hidden_state if parts else output.logits
        return states, [len(r) for r in rests]

    def _logits(self, states: torch.Tensor) -> torch.Tensor:
        """Logits of gathered hidden states (the split path), or the gathered logits themselves."""
        parts = self._split_head()
        return parts[1](states) if parts else states

    def _prefix_cache_ok(self) -> bool:
        """Whether a prefix's key/value cache can be shared: the model returns a cache whose layers all
        keep every token (no sliding window, no recurrent state) and can be repeated over a batch."""
        if not hasattr(self, "_prefix_ok"):
            ok = False
            parts = self._split_head()
            runner = parts[0] if parts else self.lm.model
            try:
                probe = torch.tensor([[self.tokenizer.bos_token_id or 0] * 2], device=self.lm.device)
                cache = returned_cache(runner(input_ids=probe, use_cache=True, return_dict=True))
                layers = getattr(cache, "layers", None)
                ok = (
                    cache is not None
                    and callable(getattr(cache, "batch_repeat_interleave", None))
                    and cache.get_seq_length() == 2
                    and (layers is None or all(type(layer).__name__ == "DynamicLayer" for layer in layers))
                )
            except (TypeError, ValueError, AttributeError):
                ok = False
            self._prefix_ok = ok
        return self._prefix_ok

    def _split_head(self):
        """(decoder, unembedding) when the logits are exactly unembedding(decoder output), else None (a
        model that scales or soft-caps its logits runs whole). `logits_to_keep` is not used: on CPU it
        slices the hidden states non-contiguously, which made bfloat16 forwards twice as slow."""
        if not hasattr(self, "_head_parts"):
            model, parts = self.lm.model, None
            config = getattr(model, "config", None)
            plain = not any(
                getattr(config, name, None) not in (None, 1, 1.0)
                for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")
            )
            get_decoder, get_head = (
                getattr(model, n, None) for n in ("get_decoder", "get_output_embeddings")
            )
            if plain and callable(get_decoder) and callable(get_head):
                try:
                    decoder, head = get_decoder(), get_head()
                except (AttributeError, NotImplementedError):
                    decoder = head = None
                if isinstance(decoder, torch.nn.Module) and isinstance(head, torch.nn.Linear):
                    parts = (decoder, head)
            self._head_parts = parts
        return self._head_parts

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Mean of the last hidden states over each text's tokens [n, d_model] (float32, CPU)."""
        texts = list(texts)
        if not all(isinstance(t, str) and t for t in texts):
            raise DataError("embed takes non-empty strings; give every text some characters.")
        rows = [prompt_token_ids(self.tokenizer, t) for t in texts]
        out = []
        for start in range(0, len(rows), self.batch_size):
            ids, mask = pad_rows(
                rows[start : start + self.batch_size], pad_token_id(self.tokenizer), left=False
            )
            inputs = self.lm.prepare(ids, mask)
            parts = self._split_head()
            if parts is not None:  # the decoder alone: no logits over the vocabulary at every position
                hidden = parts[0](**inputs).last_hidden_state.float()
            else:
                hidden = self.lm.model(**inputs, output_hidden_states=True).hidden_states[-1].float()
            weights = inputs["attention_mask"].to(hidden.dtype)[..., None]
            out.append(((hidden * weights).sum(1) / weights.sum(1)).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.lm.d_model)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "model": self.lm.name,
            "hf_id": self.lm.hf_id,
            "device": str(self.lm.device),
            "dtype": str(self.lm.model.dtype).removeprefix("torch."),
            "batch_size": self.batch_size,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }


def _common_prefix(rows: Sequence[Sequence[int]], limit: int) -> int:
    """How many leading tokens all `rows` share, at most `limit`."""
    first, n = rows[0], max(0, limit)
    for row in rows[1:]:
        n = min(n, len(row))
        n = next((i for i in range(n) if row[i] != first[i]), n)
    return n
