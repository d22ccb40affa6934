"""The live model behind the web app: encode user text, steer generations, build vectors from prompts.

Encoding tokenizes and masks text the way the store's data config says (BOS prepended, BOS and special
tokens excluded), so live activations are comparable with the stored examples and statistics.
Steering and vectors use `saelab.interventions` (generation with the chat template, left padding), so the
web app shows what `saelab steer` would. One lock serialises every use of the model: interventions
are hooks on the shared model, and a request must never run inside another request's hooks.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from saelab.core.data import exclusion_mask
from saelab.core.models import HookedLM
from saelab.dictionaries.base import Dictionary
from saelab.errors import DimensionMismatchError, TextTooLongError
from saelab.interventions.decompose import Decomposition, decompose
from saelab.interventions.directions import mean_difference
from saelab.interventions.generation import GenerationConfig, compare
from saelab.interventions.hooks import ClampFeature, InterventionError, add_feature

MAX_TEXT_CHARS = 2000
MAX_TOKENS = 256
MAX_NEW_TOKENS = 64  # generation runs twice per request (unsteered and steered), on a CPU perhaps
MAX_STRENGTH = 1000.0
MAX_VECTOR_PROMPTS = 32  # per list
MAX_VECTOR_FEATURES = 50


def check_text(text: str, what: str = "text") -> None:
    """Refuse text over the character limit before it reaches the tokenizer."""
    if len(text) > MAX_TEXT_CHARS:
        raise TextTooLongError(
            f"{what} has {len(text)} characters; the live view takes at most {MAX_TEXT_CHARS} characters. "
            "Shorten it."
        )


class LiveModel:
    """A model plus dictionary behind a lock: hooks are registered per call, so calls must not overlap."""

    def __init__(
        self, lm: HookedLM, dictionary: Dictionary, data: dict | None = None, n_features: int | None = None
    ):
        data = data or {}
        hook = dictionary.cfg.hook_name
        width = lm.hook_dim(hook)
        if width != dictionary.cfg.d_in:
            raise DimensionMismatchError(
                f"the dictionary expects d_in={dictionary.cfg.d_in} but {hook!r} of {lm.name} has width "
                f"{width}. Serve the model the dictionary was trained on."
            )
        if n_features is not None and n_features and dictionary.cfg.d_sae != n_features:
            raise DimensionMismatchError(
                f"the dictionary has {dictionary.cfg.d_sae} latents but the feature store describes "
                f"{n_features}. Serve the dictionary that the store was analysed from."
            )
        self.lm, self.hook = lm, hook
        self.dictionary = dictionary.to(lm.device).eval()
        self.prepend_bos = bool(data.get("prepend_bos", True))
        self.exclude_bos = bool(data.get("exclude_bos", True))
        self.exclude_special = bool(data.get("exclude_special", True))
        self._lock = threading.Lock()
        self._clients: dict[str, object] = {}  # the explainer/judge and the self-explainer, made on first use

    def tokenize(self, text: str) -> list[int]:
        """Token ids as the analysis saw them: BOS first (if its data config prepended one), no other specials."""
        check_text(text)
        tok = self.lm.tokenizer
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        if self.prepend_bos:
            bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if bos is not None:
                ids = [int(bos), *ids]
        if len(ids) > MAX_TOKENS:
            raise TextTooLongError(
                f"text is {len(ids)} tokens long; the live view takes at most {MAX_TOKENS} tokens. Shorten the text."
            )
        return ids

    @torch.no_grad()
    def encode(self, text: str) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """(token ids, latent activations [T, d_sae] on the CPU with excluded tokens zeroed, excluded mask)."""
        ids = self.tokenize(text)
        if not ids:
            d = self.dictionary.cfg.d_sae
            return ids, torch.zeros(0, d), torch.zeros(0, dtype=torch.bool)
        input_ids = torch.tensor([ids], dtype=torch.long)
        excluded = exclusion_mask(input_ids, self.lm.tokenizer, self.exclude_bos, self.exclude_special)[0]
        with self._lock:
            x = self.lm.capture(input_ids.to(self.lm.device), self.hook)[self.hook]
            acts = self.dictionary.encode(x)[0].float().cpu()
        acts = acts * (~excluded)[:, None]
        return ids, acts, excluded

    @property
    def write_hook(self) -> str:
        """Where the decoder writes: the SAE's own hook point, or a transcoder's output hook."""
        cfg = self.dictionary.cfg
        return cfg.output_hook_name if cfg.is_transcoder else cfg.hook_name

    def check_prompt(self, prompt: str, what: str = "the prompt") -> None:
        """Character and token limits for a prompt (counted without the chat template)."""
        check_text(prompt, what)
        n = len(self.lm.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n > MAX_TOKENS:
            raise TextTooLongError(
                f"{what} is {n} tokens long; the live view takes at most {MAX_TOKENS} tokens. Shorten it."
            )

    def intervention(self, feature: int, strength: float, mode: str = "add", scope: str = "all"):
        """Mode "add": strength x the decoder row; "clamp": the latent set to `strength`, SAE error kept."""
        if mode == "add":
            return add_feature(self.dictionary, feature, strength, hook=self.write_hook, scope=scope)
        if mode == "clamp":
            if self.dictionary.cfg.is_transcoder:
                raise InterventionError(
                    "clamp sets a latent of an SAE at the hook point it reads and writes; this transcoder "
                    "reads one hook point and writes another. Use mode 'add'."
                )
            return ClampFeature(
                self.hook, dictionary=self.dictionary, features=[feature], values=[strength], scope=scope
            )
        raise InterventionError(f"unknown steering mode {mode!r}; use 'add' or 'clamp'.")

    def steer(
        self,
        feature: int,
        strength: float,
        prompt: str,
        mode: str = "add",
        scope: str = "all",
        cfg: GenerationConfig | None = None,
    ) -> dict:
        """{prompt, unsteered, steered}: one prompt completed without and with the feature, same seed."""
        self.check_prompt(prompt)
        intervention = self.intervention(feature, strength, mode, scope)
        with self._lock:
            return compare(self.lm, [prompt], [intervention], cfg or GenerationConfig())[0]

    def vector(
        self,
        positive: Sequence[str],
        negative: Sequence[str],
        n_features: int,
        chat: bool = True,
        method: str = "pursuit",
    ) -> Decomposition:
        """The mean-difference vector of two prompt lists at the write hook, decomposed into latents."""
        for name, prompts in (("positive", positive), ("negative", negative)):
            for i, p in enumerate(prompts):
                self.check_prompt(p, f"{name} prompt {i + 1}")
        hook = self.write_hook
        with self._lock:
            directions = mean_difference(
                self.lm, positive, negative, hooks=[hook], positions=(-1,), chat=chat
            )
        vector = directions.get(hook, -1)
        weights = self.dictionary.W_dec
        return decompose(self.dictionary, vector.to(weights.device, weights.dtype), n_features, method)

    def explain(self, store_path, idx: int, method: str = "auto") -> dict:
        """Explain latent `idx` now on this model ("auto": it reads the stored examples; "self": its decoder
        direction injected into the model) and score the new labels (`saelab.explain.pipeline.explain_now`)."""
        from saelab.explain.pipeline import explain_now

        with self._lock:
            judge = self._client("local")
            explainer = judge if method == "auto" else self._client(method, store_path)
            return explain_now(store_path, self.lm, self.dictionary, explainer, judge, idx)

    def _client(self, method: str, store_path=None):
        if method not in self._clients:
            if method == "local":
                from saelab.explain.clients import LocalClient

                self._clients[method] = LocalClient(lm=self.lm)
            elif method == "self":
                from saelab.explain.selfexplain import SelfExplainer, default_layer, typical_residual_norm

                layer = default_layer(self.lm.n_layers)
                norm = typical_residual_norm(self.lm, layer, [self._stored_windows(store_path)])
                self._clients[method] = SelfExplainer(self.lm, norm=norm)
            else:
                raise InterventionError(f"unknown explanation method {method!r}; use 'auto' or 'self'.")
        return self._clients[method]

    def _stored_windows(self, store_path, n_latents: int = 64) -> torch.Tensor:
        """Unpadded top-example windows of the most frequent latents, a BOS first: the analysed text, on
        which the self-explainer measures the typical residual norm (its unit of scale)."""
        from saelab.analysis.store import FeatureStore

        bos = self.lm.tokenizer.bos_token_id
        with FeatureStore(store_path, create=False) as store:
            rows = [
                r["tokens"]
                for f in store.list_features(sort="density", limit=n_latents, include_dead=False)
                for r in store.examples(f["idx"], "top")
            ]
        width = max((len(r) for r in rows), default=0)
        full = [([bos] if bos is not None else []) + r for r in rows if len(r) == width and min(r) >= 0]
        if not full:
            raise InterventionError(
                "the feature store holds no example windows to measure a residual norm on."
            )
        return torch.tensor(full[:256])
