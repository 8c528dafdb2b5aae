"""A retrieval gallery: ITC features + the cached unimodal tokens of every item, searchable and saveable.

An `Index` holds, for N gallery items (images, videos or texts):

- ``features`` (N, E): L2-normalised ITC features, fp32, contiguous — exact search is one matmul;
- ``tokens`` (N, L, D) + ``mask`` / ``roll``: the unimodal residual stream that the fusion layers take,
  so ITM re-ranking of the top candidates runs ONLY the fusion layers (ALBEF / LAVIS);
- ``ids``: one string per item (file paths by default).

Searching needs the model that built the index (to encode the query and to fuse): an index is *bound*
to an `Encoder`, in practice a `Pipeline` — `pipe.index(...)` returns a bound index,
`Index.load(dir, pipeline=pipe)` binds on load, `index.bind(pipe)` later. Binding checks the model
fingerprint saved with the index (ModelError on mismatch).

On disk (``save(dir)``): ``index.safetensors`` (tensors) and ``index.json`` (ids, modality, model
fingerprint, metadata), each written atomically; the JSON is written last.

Scores (LAVIS): ITC-only hits score the cosine similarity; re-ranked hits score ``itm + itc`` where
``itm`` is the positive-class ITM logit. With ``rerank=R`` the top ``R`` ITC candidates are re-scored
and sorted; when ``k > R`` the remaining hits follow in ITC order (``.itm`` is None for them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from mmfm.errors import InputError, ModelError
from mmfm.fileio import atomic_path, atomic_write_text
from mmfm.models.trunk import TokenBatch

if TYPE_CHECKING:
    from mmfm.models.model import Encoded

MODALITIES = ("image", "video", "text")
TENSORS_FILE = "index.safetensors"
META_FILE = "index.json"
INDEX_FORMAT = "1"
FAISS_MIN_ITEMS = 1_000_000


class Encoder(Protocol):
    """What an Index needs from the model that built it; `Pipeline` is the one mmfm ships."""

    @property
    def device(self) -> torch.device: ...

    @property
    def fingerprint(self) -> str: ...

    def read_image(self, path: str | Path) -> torch.Tensor: ...

    def read_video(self, path: str | Path) -> torch.Tensor: ...

    def encode_texts(self, texts: list[str]) -> tuple[TokenBatch, torch.Tensor]: ...

    def encode_pixels(self, pixels: torch.Tensor) -> Encoded: ...

    def itm_scores(self, text: TokenBatch, vision: TokenBatch, text_idx: torch.Tensor,
                   vision_idx: torch.Tensor) -> torch.Tensor:
        """Positive-class ITM logits of the pairs (text row text_idx[i], vision row vision_idx[i])."""


@dataclass
class Hit:
    """One search result: gallery id, final score, and its ITC / ITM parts when re-ranked."""

    id: str
    score: float
    itc: float | None = None
    itm: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class Index:
    """Gallery features + cached unimodal tokens; see the module docstring."""

    def __init__(self, modality: str, ids: list[str], features: torch.Tensor, tokens: TokenBatch,
                 fingerprint: str = "", metadata: dict | None = None, pipeline: Encoder | None = None):
        if modality not in MODALITIES:
            raise InputError(f"index modality {modality!r}: use one of {', '.join(MODALITIES)}")
        if len(ids) != len(features) or len(ids) != len(tokens.x):
            raise InputError(f"index of {len(ids)} ids but {len(features)} features / {len(tokens.x)} tokens")
        if len(set(ids)) != len(ids):
            raise InputError("index ids must be unique; pass ids=[...] when file names repeat")
        self.modality, self.ids = modality, list(ids)
        self.features = features.float().contiguous()
        self.tokens = TokenBatch(tokens.x.contiguous(), tokens.mask, tokens.roll)
        self.fingerprint, self.metadata = fingerprint, dict(metadata or {})
        self.pipeline: Encoder | None = None
        self._faiss = None
        if pipeline is not None:
            self.bind(pipeline)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Index({self.modality}, {len(self)} items, tokens {tuple(self.tokens.x.shape)})"

    # ---- binding --------------------------------------------------------------------------------

    def bind(self, pipeline: Encoder) -> Index:
        """Attach the model used for queries and re-ranking (the one that built the index); returns self."""
        if self.fingerprint and self.fingerprint != pipeline.fingerprint:
            raise ModelError(f"this {self.modality} index was built with another model (fingerprint "
                             f"{self.fingerprint[:12]}, pipeline has {pipeline.fingerprint[:12]}); "
                             "rebuild it with `mmfm index build` for this model")
        self.pipeline = pipeline
        device = pipeline.device
        self.features = self.features.to(device)
        self.tokens = TokenBatch(*(t if t is None else t.to(device) for t in
                                   (self.tokens.x, self.tokens.mask, self.tokens.roll)))
        return self

    def _bound(self) -> Encoder:
        if self.pipeline is None:
            raise InputError("this index is not bound to a model: use Index.load(dir, pipeline=pipe), "
                             "index.bind(pipe) or pipe.search(index, ...)")
        return self.pipeline

    # ---- search ---------------------------------------------------------------------------------

    def search(self, text: str | None = None, image: str | None = None, video: str | None = None,
               k: int = 10, rerank: int | None = None) -> list[Hit]:
        """Top-``k`` hits for ONE query (a text, or an image / video file path)."""
        given = {name: value for name, value in (("text", text), ("image", image), ("video", video))
                 if value is not None}
        if len(given) != 1:
            raise InputError("search takes exactly one of text=, image=, video=")
        (kind, value), = given.items()
        encoder = self._bound()
        if kind == "text":
            return self.search_texts([value], k, rerank)[0]
        pixels = encoder.read_video(value) if kind == "video" else encoder.read_image(value)
        return self.search_pixels(pixels[None], k, rerank)[0]

    def search_texts(self, texts: list[str], k: int = 10, rerank: int | None = None) -> list[list[Hit]]:
        """Batched text queries (one model call for all of them)."""
        if self.modality == "text":
            raise InputError("text queries need an image or video index; this index holds texts")
        tokens, features = self._bound().encode_texts(texts)
        return self._search_encoded(tokens, features, "text", k, rerank)

    def search_pixels(self, pixels: torch.Tensor, k: int = 10, rerank: int | None = None) -> list[list[Hit]]:
        """Batched image (B, 3, H, W) or video (B, T, 3, H, W) queries."""
        encoded = self._bound().encode_pixels(pixels)
        return self._search_encoded(encoded.tokens, encoded.feat, "vision", k, rerank)

    @torch.inference_mode()
    def _search_encoded(self, tokens: TokenBatch, features: torch.Tensor, query: str, k: int,
                        rerank: int | None) -> list[list[Hit]]:
        _check_k(k, rerank)
        k = min(k, len(self))
        if rerank and (query == "text") == (self.modality == "text"):
            raise InputError("rerank needs a text query over an image/video index or the reverse; "
                             "same-modality search is ITC only")
        depth = max(k, min(rerank or 0, len(self)))
        top_scores, top_idx = self._top(features.float(), depth)
        if not rerank:
            return [[Hit(self.ids[j], s) for s, j in zip(row_s, row_j)]
                    for row_s, row_j in zip(top_scores[:, :k].tolist(), top_idx[:, :k].tolist())]
        return self._rerank(tokens, top_scores, top_idx, query, k, min(rerank, len(self)))

    def _top(self, queries: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact inner-product top-``depth`` (faiss for >= 1M items when installed)."""
        if len(self) >= FAISS_MIN_ITEMS and (faiss_index := self._faiss_index()) is not None:
            scores, idx = faiss_index.search(queries.cpu().numpy(), depth)
            return torch.from_numpy(scores), torch.from_numpy(idx)
        return (queries @ self.features.t()).topk(depth, dim=1)

    def _faiss_index(self):
        if self._faiss is None:
            try:
                import faiss
            except ImportError:
                return None
            self._faiss = faiss.IndexFlatIP(self.features.shape[1])
            self._faiss.add(self.features.cpu().numpy())
        return self._faiss

    def _rerank(self, tokens: TokenBatch, top_scores, top_idx, query: str, k: int, rerank: int) -> list[list[Hit]]:
        """ITM on the cached tokens of each query's top-``rerank`` candidates (fusion layers only)."""
        encoder = self._bound()
        device = self.features.device
        candidates = top_idx[:, :rerank].reshape(-1).to(device)
        queries = torch.arange(len(top_idx), device=device).repeat_interleave(rerank)
        if query == "text":
            pairs = torch.arange(len(candidates), device=device)
            itm = encoder.itm_scores(tokens, _take(self.tokens, candidates), queries, pairs)
        else:
            itm = encoder.itm_scores(self.tokens, tokens, candidates, queries)
        itm = itm.view(len(top_idx), rerank).cpu()
        results = []
        for row in range(len(top_idx)):
            itc, idx = top_scores[row].tolist(), top_idx[row].tolist()
            reranked = sorted((Hit(self.ids[idx[c]], itm_c + itc[c], itc[c], itm_c)
                               for c, itm_c in enumerate(itm[row].tolist())), key=lambda h: -h.score)
            rest = [Hit(self.ids[j], s, s) for s, j in zip(itc[rerank:], idx[rerank:])]
            results.append((reranked + rest)[:k])
        return results

    # ---- persistence ----------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Write ``index.safetensors`` + ``index.json`` into ``directory`` (atomic per file, JSON last)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"features": self.features, "tokens": self.tokens.x}
        if self.tokens.mask is not None:
            tensors["mask"] = self.tokens.mask
        if self.tokens.roll is not None:
            tensors["roll"] = self.tokens.roll
        with atomic_path(directory / TENSORS_FILE) as tmp:
            save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(tmp))
        meta = {"format": INDEX_FORMAT, "modality": self.modality, "ids": self.ids,
                "fingerprint": self.fingerprint, "metadata": self.metadata}
        atomic_write_text(directory / META_FILE, json.dumps(meta))
        return directory

    @classmethod
    def load(cls, directory: str | Path, pipeline: Encoder | None = None) -> Index:
        """Read an index written by ``save``; bind it to ``pipeline`` when given."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path, tensor_path = directory / META_FILE, directory / TENSORS_FILE
        if not meta_path.is_file() or not tensor_path.is_file():
            raise InputError(f"{directory}: not an mmfm index (expected {META_FILE} and {TENSORS_FILE}); "
                             "build one with `mmfm index build` or Index.save")
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(tensor_path))
        except (json.JSONDecodeError, SafetensorError, OSError) as err:
            raise InputError(f"{directory}: corrupt index ({err}); rebuild it") from None
        tokens = TokenBatch(tensors["tokens"], tensors.get("mask"), tensors.get("roll"))
        return cls(meta["modality"], meta["ids"], tensors["features"], tokens, meta.get("fingerprint", ""),
                   meta.get("metadata"), pipeline)


def _take(tokens: TokenBatch, index: torch.Tensor) -> TokenBatch:
    """Rows ``index`` of a padded token batch (repeats allowed)."""
    return TokenBatch(tokens.x[index], None if tokens.mask is None else tokens.mask[index], tokens.roll)


def _check_k(k: int, rerank: int | None) -> None:
    if not isinstance(k, int) or k < 1:
        raise InputError(f"k={k!r}: the number of hits must be a positive integer")
    if rerank is not None and (not isinstance(rerank, int) or rerank < 0):
        raise InputError(f"rerank={rerank!r}: the number of re-ranked candidates must be an integer >= 0")
