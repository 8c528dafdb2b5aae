"""Text tokenizer: open_clip's byte-level BPE (bundled vocabulary, works offline) plus BERT-style specials.

Layout of a sequence: ``[CLS] tok ... tok [SEP] [PAD] ...`` where CLS/SEP are CLIP's start/end-of-text
tokens. [MASK] and [PAD] get ids of their own past the BPE vocabulary, so MLM never collides with a real
token and padding is never confused with the BPE token 0 ("!") that open_clip pads with.

Bounded work and memory per text, whatever a user sends (docs/inference.md, "Limits"): the model keeps
``context_length - 2`` BPE tokens, so encoding stops once they are there; a text is cut to
``context_length * CHARS_PER_TOKEN`` characters before cleaning, and one word (a run of letters, or of
punctuation; a sentence of a language written without spaces) to ``MAX_WORD_CHARS`` byte-level characters
before BPE, whose cost grows with the square of a word's length (60 KB took 35 s; 512 characters take a
few milliseconds). Normal text never reaches either cap (tests/test_tokenizers.py shows captions tokenize
exactly as open_clip does). Both caches are LRUs of fixed size.
"""

from functools import lru_cache

import torch
from open_clip.tokenizer import SimpleTokenizer

from mmfm.errors import ConfigError

# A kept token spans ~4-6 characters of real text (at most 32, the longest BPE token); 32 per token keeps a
# text's first context_length - 2 tokens intact while bounding the text the cleaner sees and the cache holds.
CHARS_PER_TOKEN = 32
MAX_WORD_CHARS = 512   # byte-level characters (~170 CJK characters, >= 100 tokens of a language without spaces)
TEXT_CACHE_SIZE = 8192   # texts (each <= context_length * CHARS_PER_TOKEN characters)
WORD_CACHE_SIZE = 16384  # words (each <= MAX_WORD_CHARS characters)


class _SpecialsOnly(dict):
    """Stands in for open_clip's per-word BPE cache, a dict that grows with every distinct word it meets: it
    keeps the special tokens open_clip seeds it with and ignores writes (``TextTokenizer`` caches words in
    a bounded LRU instead)."""

    def __setitem__(self, key, value) -> None:
        pass


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
        self.max_chars = context_length * CHARS_PER_TOKEN
        self._bpe.cache = _SpecialsOnly(self._bpe.cache)
        self._word_bpe = lru_cache(maxsize=WORD_CACHE_SIZE)(self._bpe.bpe)
        self._encode = lru_cache(maxsize=TEXT_CACHE_SIZE)(self._encode_uncached)

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.cls_id, self.sep_id, self.mask_id, self.pad_id)

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        """open_clip's ``SimpleTokenizer.encode``, stopping once the context is full, each word capped."""
        bpe, limit, body = self._bpe, self.context_length - 2, []
        for match in bpe.pat.finditer(bpe.clean_fn(text)):
            if len(body) >= limit:
                break
            word = "".join(bpe.byte_encoder[b] for b in match.group().encode("utf-8"))
            body.extend(bpe.encoder[token] for token in self._word_bpe(word[:MAX_WORD_CHARS]).split(" "))
        return (self.cls_id, *body[:limit], self.sep_id)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        encoded = [self._encode(t[: self.max_chars]) for t in texts]
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
