"""Text tokenizer: open_clip's byte-level BPE (bundled vocabulary, works offline) plus BERT-style specials.

Layout of a sequence: ``[CLS] tok ... tok [SEP] [PAD] ...`` where CLS/SEP are CLIP's start/end-of-text
tokens. [MASK] and [PAD] get ids of their own past the BPE vocabulary, so MLM never collides with a real
token and padding is never confused with the BPE token 0 ("!") that open_clip pads with.
"""

from functools import lru_cache

import torch
from open_clip.tokenizer import SimpleTokenizer

from mmfm.errors import ConfigError


class TextTokenizer:
    """Callable: ``ids, mask = tok(["a red circle", ...])`` padded to the longest text (<= context_length)."""

    def __init__(self, context_length: int = 40):
        if context_length < 3:
            raise ConfigError(f"model.context_length={context_length}: must be >= 3 ([CLS], a token, [SEP])")
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)
        self.bpe_size = len(self._bpe.encoder)
        self.cls_id = self._bpe.sot_token_id
        self.sep_id = self._bpe.eot_token_id
        self.mask_id = self.bpe_size
        self.pad_id = self.bpe_size + 1
        self.vocab_size = self.bpe_size + 2
        self._encode = lru_cache(maxsize=65536)(self._encode_uncached)

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.cls_id, self.sep_id, self.mask_id, self.pad_id)

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        body = self._bpe.encode(text)[: self.context_length - 2]
        return (self.cls_id, *body, self.sep_id)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        encoded = [self._encode(t) for t in texts]
        length = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        for row, seq in enumerate(encoded):
            ids[row, : len(seq)] = torch.tensor(seq)
        return ids, ids != self.pad_id

    def decode(self, ids: list[int]) -> str:
        words = [i for i in ids if i < self.bpe_size and i not in (self.cls_id, self.sep_id)]
        return self._bpe.decode(words).strip()

    def __getstate__(self):
        return {"context_length": self.context_length}

    def __setstate__(self, state):
        self.__init__(state["context_length"])
