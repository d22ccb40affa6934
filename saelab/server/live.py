"""Live encoding of user text: the model and dictionary run on demand, exactly as the analysis ran them.

The text is tokenized and masked the way the store's data config says (BOS prepended, BOS and special
tokens excluded), so live activations are comparable with the stored examples and statistics.
"""

from __future__ import annotations

import threading

import torch

from saelab.data import exclusion_mask
from saelab.errors import DimensionMismatchError, SaelabError

MAX_TEXT_CHARS = 2000
MAX_TOKENS = 256


class TextTooLongError(SaelabError):
    """User text beyond the live limits: the server answers 413 with this message."""


class LiveModel:
    """A model plus dictionary behind a lock: hooks are registered per call, so calls must not overlap."""

    def __init__(self, lm, dictionary, data: dict | None = None, n_features: int | None = None):
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

    def tokenize(self, text: str) -> list[int]:
        """Token ids as the analysis saw them: BOS first (if its data config prepended one), no other specials."""
        if len(text) > MAX_TEXT_CHARS:
            raise TextTooLongError(
                f"text has {len(text)} characters; the live view takes at most {MAX_TEXT_CHARS} characters. "
                "Shorten the text."
            )
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
