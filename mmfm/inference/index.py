"""A retrieval gallery: ITC features + the cached unimodal tokens of every item, searchable and saveable.

An `Index` holds, for N gallery items (images, videos or texts):

- ``features`` (N, E): L2-normalised ITC features, fp32, contiguous — exact search is one matmul;
- ``tokens`` (N, L, D) + ``mask`` / ``roll``: the unimodal residual stream that the fusion layers take,
  so ITM re-ranking of the top candidates runs ONLY the fusion layers (ALBEF / LAVIS);
- ``ids``: one string per item (file paths by default).

Searching needs the model that built the index (to encode the query and to fuse): an index is *bound*
to an `Encoder`, in practice a `Pipeline` — `pipe.index(...)` returns a bound index,
`Index.load(dir, pipeline=pipe)` binds on load, `index.bind(pipe)` later. Binding checks the model
fingerprint saved with the index (ModelError naming both models on mismatch).

Large indexes (`ApproxSearch`): below ``min_items`` (100k) items the top-k is exact (a torch matmul);
from there on, with faiss installed and the features on the CPU, an approximate faiss structure gives
the candidates (on a GPU the exact matmul stays faster). Inner product on normalised features = the
ITC cosine; the ITM re-rank runs on the approximate candidates as on exact ones. Kinds:

- ``pq`` (default): 4-bit product-quantisation fast-scan codes of every item (E/2 sub-quantisers,
  E/4 bytes an item) scanned in SIMD registers, then the best ``k_factor * depth`` re-scored exactly on
  the stored features (faiss ``PQ{E/2}x4fs,RFlat``; scores are exact cosines);
- ``ivf``: IVF-flat, nlist ≈ 4·sqrt(N) k-means lists trained on a sample, ``nprobe`` lists scanned;
- ``hnsw``: an HNSW graph of degree ``hnsw_m``, ``ef_search`` breadth.

Why ``pq``: on 200k random unit vectors of dim 128 (`tools/bench.py search --faiss`, one thread, 2
shared cores) it reaches recall@10 0.987 against exact at 0.6-0.7 ms a query (exact: 14-24 ms), built
in 1-2 s. IVF-flat needs 60% of its 1789 lists probed for 0.96 (6 ms; 0.29 at nprobe 64), HNSW32 gets
0.76 at efSearch 512 (8 ms) after an 80 s build. Random vectors are the worst case for partitions and
graphs (no clusters); on clustered real features ``ivf`` scans far less and scales past ~10M items,
where the linear PQ scan grows (``kind="ivf"``, raise ``nprobe`` for recall).

The faiss structure is built when first needed (a search or ``save`` at >= ``min_items`` items, or
``prepare()``), saved with the index (``faiss.write_index``: loading never retrains) and extended by
``add`` (IVF lists and PQ codebooks stay those trained on the first items; a rebuild happens only when
a build-time setting — ``kind``, ``hnsw_m`` — changes).

On disk (``save(dir)``): ``index.json`` (format version, ids, modality, model fingerprint, metadata,
search settings and the names of its data files), ``index-<tag>.safetensors`` (tensors) and
``ann-<tag>.faiss`` (the faiss structure, when built). Data files get a fresh tag each save and are
written atomically first; ``index.json`` is replaced atomically last and is the commit: a reader sees
the old complete index or the new one, never a mix (a directory rename cannot replace a non-empty
directory atomically, so the commit is this one file). Files the previous ``index.json`` named are
then removed.

Building a gallery can resume (`PartialBuild`): `Pipeline.index(..., partial=DIR)` encodes in chunks
and writes each finished chunk atomically to DIR; a re-run with the same items, ids and model continues
after the last finished chunk (`mmfm index build` does this in ``OUT/build.partial``).

Scores (LAVIS): ITC-only hits score the cosine similarity; re-ranked hits score ``itm + itc`` where
``itm`` is the positive-class ITM logit. With ``rerank=R`` the top ``R`` ITC candidates are re-scored
and sorted; when ``k > R`` the remaining hits follow in ITC order (``.itm`` is None for them).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import uuid
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from mmfm.errors import InputError, ModelError
from mmfm.fileio import atomic_path, atomic_write_text
from mmfm.models.trunk import TokenBatch

if TYPE_CHECKING:
    from mmfm.models.model import Encoded

MODALITIES = ("image", "video", "text")
META_FILE = "index.json"
INDEX_FORMAT = 2  # 2: data files named in index.json, search settings, faiss structure. 1: index.safetensors
READABLE_FORMATS = ("1", INDEX_FORMAT)
ANN_KINDS = ("pq", "ivf", "hnsw")
PARTIAL_FORMAT = 1


@dataclass
class ApproxSearch:
    """When and how an `Index` searches approximately (faiss); exact below ``min_items`` items.

    ``kind`` and ``hnsw_m`` shape the faiss structure (changing them rebuilds it); ``k_factor``,
    ``nprobe`` and ``ef_search`` are read at every search. See the module docstring for the measurements.
    """

    min_items: int = 100_000  # exact torch matmul below: <= ~15 ms a query on one core at dim 128
    kind: str = "pq"
    k_factor: int = 32  # pq: candidates re-scored exactly, per hit wanted
    nprobe: int = 64  # ivf: lists scanned (of nlist ≈ 4·sqrt(N))
    hnsw_m: int = 32  # hnsw: graph degree
    ef_search: int = 128  # hnsw: search breadth (at least the hits wanted)

    BUILD_FIELDS: ClassVar[tuple[str, ...]] = ("kind", "hnsw_m")
    MIN_ITEMS_FLOOR: ClassVar[int] = 1_000  # below, exact search takes microseconds and PQ cannot train

    def __post_init__(self):
        if self.kind not in ANN_KINDS:
            raise InputError(f"approximate search kind {self.kind!r}: use one of {', '.join(ANN_KINDS)}")
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name != "kind" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise InputError(f"approximate search {field.name}={value!r}: must be a positive integer")
        if self.min_items < self.MIN_ITEMS_FLOOR:
            raise InputError(f"approximate search min_items={self.min_items}: must be at least "
                             f"{self.MIN_ITEMS_FLOOR} (smaller indexes are searched exactly in microseconds)")


class Encoder(Protocol):
    """What an Index needs from the model that built it; `Pipeline` is the one mmfm ships."""

    name: str

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
                 fingerprint: str = "", metadata: dict | None = None, pipeline: Encoder | None = None,
                 approx: ApproxSearch | None = None):
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
        self._approx = approx or ApproxSearch()
        self._ann = None  # the faiss structure over the rows of `features`, built when first needed
        self._ann_lock = threading.Lock()
        self._warned_no_faiss = False
        if pipeline is not None:
            self.bind(pipeline)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"Index({self.modality}, {len(self)} items, tokens {tuple(self.tokens.x.shape)})"

    @property
    def approx(self) -> ApproxSearch:
        """The approximate-search settings; assign a new `ApproxSearch` (e.g. ``dataclasses.replace``)."""
        return self._approx

    @approx.setter
    def approx(self, value: ApproxSearch) -> None:
        if any(getattr(value, name) != getattr(self._approx, name) for name in ApproxSearch.BUILD_FIELDS):
            self._ann = None  # another structure: rebuilt when next needed
        self._approx = value

    # ---- binding --------------------------------------------------------------------------------

    def bind(self, pipeline: Encoder) -> Index:
        """Attach the model used for queries and re-ranking (the one that built the index); returns self."""
        if self.fingerprint and self.fingerprint != pipeline.fingerprint:
            raise ModelError(f"this {self.modality} index was built with another model: "
                             f"{self.metadata.get('model') or 'unnamed'!r} (fingerprint {self.fingerprint[:12]}), "
                             f"but the pipeline runs {pipeline.name or 'unnamed'!r} (fingerprint "
                             f"{pipeline.fingerprint[:12]}); search it with the model that built it or "
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

    # ---- growing --------------------------------------------------------------------------------

    def add(self, other: Index) -> Index:
        """Append the items of ``other`` (e.g. ``index.add(pipe.index(images=new_paths))``); returns self.

        ``other`` must hold the same modality, built by the same model, with ids not in this index. The
        faiss structure, when built, gets the new vectors added, not retrained. Not safe to run
        concurrently with searches of this index.
        """
        if other.modality != self.modality:
            raise InputError(f"cannot add {other.modality}s to an index of {self.modality}s")
        if self.fingerprint and other.fingerprint and self.fingerprint != other.fingerprint:
            raise ModelError(f"cannot add items encoded by model {other.metadata.get('model') or 'unnamed'!r} "
                             f"(fingerprint {other.fingerprint[:12]}) to an index built with "
                             f"{self.metadata.get('model') or 'unnamed'!r} (fingerprint {self.fingerprint[:12]}); "
                             "encode them with the index's model")
        if other.features.shape[1] != self.features.shape[1] or other.tokens.x.shape[2] != self.tokens.x.shape[2]:
            raise InputError(f"cannot add items of feature / token width {other.features.shape[1]} / "
                             f"{other.tokens.x.shape[2]} to an index of {self.features.shape[1]} / "
                             f"{self.tokens.x.shape[2]}; encode them with the index's model")
        known = set(self.ids)
        repeated = next((item for item in other.ids if item in known), None)
        if repeated is not None:
            raise InputError(f"cannot add {repeated!r}: the index already holds that id; pass ids=[...] "
                             "that are new")
        device = self.features.device
        features = other.features.to(device).float()
        self.tokens = _concat(self.tokens, TokenBatch(*(t if t is None else t.to(device) for t in
                                                        (other.tokens.x, other.tokens.mask, other.tokens.roll))))
        self.features = torch.cat([self.features, features]).contiguous()
        self.ids += other.ids
        with self._ann_lock:
            if self._ann is not None:
                self._ann.add(_numpy(features))
        return self

    def prepare(self) -> Index:
        """Build the faiss structure now if this index searches approximately (else at the first search)."""
        if self._approximate():
            self._ann_index()
        return self

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

    def search_features(self, features: torch.Tensor, k: int = 10) -> list[list[Hit]]:
        """Batched queries given as (B, E) L2-normalised ITC features (no model needed; ITC only)."""
        if features.ndim != 2 or features.shape[1] != self.features.shape[1]:
            raise InputError(f"query features of shape {tuple(features.shape)}: pass (B, "
                             f"{self.features.shape[1]}) L2-normalised ITC features")
        return self._search_encoded(None, features.to(self.features.device), "features", k, None)

    @torch.inference_mode()
    def _search_encoded(self, tokens: TokenBatch | None, features: torch.Tensor, query: str, k: int,
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
        """Inner-product top-``depth``: approximate (faiss) when `_approximate`, else an exact matmul."""
        ann = self._ann_index() if self._approximate() else None
        if ann is None:
            return (queries @ self.features.t()).topk(depth, dim=1)
        scores, idx = ann.search(_numpy(queries), depth, params=self._search_parameters(depth))
        scores, idx = torch.from_numpy(scores), torch.from_numpy(idx)
        short = (idx < 0).any(dim=1)  # fewer than depth candidates found (a tiny nprobe / ef_search)
        if short.any():
            exact_scores, exact_idx = (queries[short.to(queries.device)] @ self.features.t()).topk(depth, dim=1)
            scores[short], idx[short] = exact_scores.cpu(), exact_idx.cpu()
        return scores, idx

    def _approximate(self) -> bool:
        # On a GPU the exact matmul over even millions of items beats a CPU faiss search.
        return len(self) >= self.approx.min_items and self.features.device.type == "cpu"

    def _ann_index(self):
        """The faiss structure (built on first use), or None without faiss (then search is exact)."""
        with self._ann_lock:
            if self._ann is None:
                faiss = _import_faiss()
                if faiss is None:
                    if not self._warned_no_faiss:
                        warnings.warn(f"faiss is not installed: searching the {len(self)} items of this index "
                                      "exactly (slower); pip install 'mmfm[faiss]' for approximate search",
                                      stacklevel=3)
                        self._warned_no_faiss = True
                    return None
                self._ann = _build_ann(faiss, _numpy(self.features), self.approx)
            return self._ann

    def _search_parameters(self, depth: int):
        import faiss

        approx = self.approx
        if approx.kind == "pq":
            return faiss.IndexRefineSearchParameters(k_factor=approx.k_factor)
        if approx.kind == "ivf":
            return faiss.SearchParametersIVF(nprobe=approx.nprobe)
        return faiss.SearchParametersHNSW(efSearch=max(approx.ef_search, depth))

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
        """Write the index into ``directory``: data files first, ``index.json`` (the commit) last.

        At >= ``approx.min_items`` items the faiss structure is built if needed and saved too.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        previous = _data_files(directory)
        tag = uuid.uuid4().hex[:12]
        files = {"tensors": f"index-{tag}.safetensors"}
        tensors = {"features": self.features, "tokens": self.tokens.x}
        if self.tokens.mask is not None:
            tensors["mask"] = self.tokens.mask
        if self.tokens.roll is not None:
            tensors["roll"] = self.tokens.roll
        with atomic_path(directory / files["tensors"]) as tmp:
            save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(tmp))
        ann = self._ann_index() if len(self) >= self.approx.min_items else None
        if ann is not None:
            import faiss

            files["ann"] = f"ann-{tag}.faiss"
            with atomic_path(directory / files["ann"]) as tmp:
                faiss.write_index(ann, str(tmp))
        meta = {"format": INDEX_FORMAT, "modality": self.modality, "ids": self.ids,
                "fingerprint": self.fingerprint, "metadata": self.metadata, "approx": asdict(self.approx),
                "files": files}
        atomic_write_text(directory / META_FILE, json.dumps(meta))
        for name in set(previous.values()) - set(files.values()):
            (directory / name).unlink(missing_ok=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path, pipeline: Encoder | None = None) -> Index:
        """Read an index written by ``save``; bind it to ``pipeline`` when given."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise InputError(f"{directory}: not an mmfm index (no {META_FILE}); build one with "
                             "`mmfm index build` or Index.save")
        for attempt in range(2):  # a save may replace the data files between reading index.json and them
            try:
                meta = json.loads(meta_path.read_text())
                _check_format(directory, meta)
                files = _data_files(directory, meta)
                tensors = load_file(str(directory / files["tensors"]))
                ann = _read_ann(directory / files["ann"]) if "ann" in files else None
                break
            except FileNotFoundError as err:
                if attempt:
                    raise InputError(f"{directory}: incomplete index ({err.filename} is missing); "
                                     "rebuild it") from None
            except (json.JSONDecodeError, KeyError, TypeError, SafetensorError, RuntimeError, OSError) as err:
                raise InputError(f"{directory}: corrupt index ({type(err).__name__}: {err}); rebuild it") from None
        tokens = TokenBatch(tensors["tokens"], tensors.get("mask"), tensors.get("roll"))
        approx = ApproxSearch(**meta["approx"]) if "approx" in meta else None
        index = cls(meta["modality"], meta["ids"], tensors["features"], tokens, meta.get("fingerprint", ""),
                    meta.get("metadata"), approx=approx)
        if ann is not None:
            if ann.ntotal != len(index):
                raise InputError(f"{directory}: corrupt index (its faiss structure holds {ann.ntotal} items, "
                                 f"the index {len(index)}); rebuild it")
            index._ann = ann
        if pipeline is not None:
            try:
                index.bind(pipeline)
            except ModelError as err:
                raise ModelError(f"{directory}: {err}") from None
        return index


class PartialBuild:
    """The finished chunks of a gallery encoding, on disk, so that an interrupted build resumes.

    ``directory`` holds ``build.json`` (what is built: model fingerprint, modality, a digest of the
    items and ids, their count, the chunk size) and ``chunk-NNNNNN.safetensors``, each written atomically
    once its ``chunk_size`` items are encoded. Chunks left by a build of something else are removed.
    """

    def __init__(self, directory: str | Path, items: list[str], ids: list[str], modality: str,
                 fingerprint: str, chunk_size: int = 1024):
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise InputError(f"chunk_size={chunk_size!r}: must be a positive integer")
        self.directory, self.chunk_size, self.count = Path(directory), chunk_size, len(items)
        digest = hashlib.sha256(json.dumps([items, ids]).encode()).hexdigest()
        signature = {"format": PARTIAL_FORMAT, "fingerprint": fingerprint, "modality": modality,
                     "items": digest, "count": len(items), "chunk_size": chunk_size}
        build_file = self.directory / "build.json"
        try:
            resumable = json.loads(build_file.read_text()) == signature
        except (OSError, ValueError):
            resumable = False
        if not resumable:
            for stale in self.directory.glob("chunk-*.safetensors"):
                stale.unlink()
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_text(build_file, json.dumps(signature))

    @property
    def finished(self) -> int:
        """Items already encoded: those of the chunks 0, 1, ... present without a gap."""
        chunks = 0
        while self._chunk(chunks).is_file():
            chunks += 1
        return min(chunks * self.chunk_size, self.count)

    def write(self, start: int, tokens: TokenBatch, features: torch.Tensor) -> None:
        """Save the chunk of items ``start .. start + len(features)`` (``start`` a multiple of chunk_size)."""
        from safetensors.torch import save_file

        tensors = {"features": features, "tokens": tokens.x}
        if tokens.roll is not None:
            tensors["roll"] = tokens.roll
        with atomic_path(self._chunk(start // self.chunk_size)) as tmp:
            save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(tmp))

    def read(self) -> tuple[TokenBatch, torch.Tensor]:
        """All chunks, concatenated: (tokens, features) of the ``count`` items."""
        from safetensors.torch import load_file

        chunks = [load_file(str(self._chunk(i))) for i in range(-(-self.count // self.chunk_size))]
        tokens = torch.cat([chunk["tokens"] for chunk in chunks])
        features = torch.cat([chunk["features"] for chunk in chunks])
        return TokenBatch(tokens, roll=chunks[0].get("roll")), features

    def _chunk(self, number: int) -> Path:
        return self.directory / f"chunk-{number:06d}.safetensors"


def _import_faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _build_ann(faiss, features, approx: ApproxSearch):
    """The faiss structure of ``approx.kind`` over (N, E) float32 ``features`` (inner product)."""
    import numpy as np

    count, dim = features.shape
    if approx.kind == "hnsw":
        ann = faiss.index_factory(dim, f"HNSW{approx.hnsw_m},Flat", faiss.METRIC_INNER_PRODUCT)
    else:
        if approx.kind == "ivf":
            # faiss wants >= 39 training points a list; 40 x nlist sampled keeps k-means quick
            nlist = max(1, min(round(4 * math.sqrt(count)), count // 39))
            description, sample = f"IVF{nlist},Flat", 40 * nlist
        else:
            subquantizers = dim // 2 if dim % 2 == 0 else dim
            description, sample = f"PQ{subquantizers}x4fs,RFlat", 65_536
        ann = faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)
        rows = np.sort(np.random.default_rng(0).choice(count, min(count, sample), replace=False))
        ann.train(features[rows])
    ann.add(features)
    return ann


def _read_ann(path: Path):
    """The saved faiss structure; None without faiss installed (then search is exact, with a warning)."""
    if not path.is_file():  # faiss would raise a RuntimeError, not FileNotFoundError
        raise FileNotFoundError(2, "No such file", str(path))
    faiss = _import_faiss()
    return None if faiss is None else faiss.read_index(str(path))


def _check_format(directory: Path, meta: dict) -> None:
    version = meta.get("format")
    if version not in READABLE_FORMATS:
        raise InputError(f"{directory}: index format {version!r} is not one this mmfm reads "
                         f"(1 to {INDEX_FORMAT}); it was written by a newer mmfm: upgrade mmfm, or rebuild "
                         "the index with `mmfm index build`")


def _data_files(directory: Path, meta: dict | None = None) -> dict[str, str]:
    """The data files an index.json names (format 1: the fixed index.safetensors); {} when none."""
    if meta is None:
        try:
            meta = json.loads((directory / META_FILE).read_text())
        except (OSError, ValueError):
            return {}
    if meta.get("format") == "1":
        return {"tensors": "index.safetensors"}
    return dict(meta.get("files", {}))


def _numpy(features: torch.Tensor):
    return features.detach().float().cpu().contiguous().numpy()


def _concat(first: TokenBatch, second: TokenBatch) -> TokenBatch:
    """Rows of ``second`` after those of ``first``; padded to the longer sequence (mask False) if needed."""
    if (first.roll is None) != (second.roll is None) or (first.roll is not None and not torch.equal(first.roll,
                                                                                                     second.roll)):
        raise InputError("cannot add items whose token layout (video rolling) differs from the index's; "
                         "encode them with the index's model and frame count")
    length = max(first.x.shape[1], second.x.shape[1])
    masked = first.mask is not None or second.mask is not None or first.x.shape[1] != second.x.shape[1]
    xs, masks = [], []
    for part in (first, second):
        pad = length - part.x.shape[1]
        xs.append(torch.nn.functional.pad(part.x, (0, 0, 0, pad)))
        if masked:
            mask = part.mask if part.mask is not None else part.x.new_ones(part.x.shape[:2], dtype=torch.bool)
            masks.append(torch.nn.functional.pad(mask, (0, pad), value=False))
    return TokenBatch(torch.cat(xs), torch.cat(masks) if masked else None, first.roll)


def _take(tokens: TokenBatch, index: torch.Tensor) -> TokenBatch:
    """Rows ``index`` of a padded token batch (repeats allowed)."""
    return TokenBatch(tokens.x[index], None if tokens.mask is None else tokens.mask[index], tokens.roll)


def _check_k(k: int, rerank: int | None) -> None:
    if not isinstance(k, int) or k < 1:
        raise InputError(f"k={k!r}: the number of hits must be a positive integer")
    if rerank is not None and (not isinstance(rerank, int) or rerank < 0):
        raise InputError(f"rerank={rerank!r}: the number of re-ranked candidates must be an integer >= 0")
