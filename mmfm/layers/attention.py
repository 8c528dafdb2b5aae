"""The one attention function of mmfm, with interchangeable backends.

Backends, chosen by availability unless named:
  ``xformers``  memory-efficient CUDA kernels (optional extra; no CPU kernel, so never picked on CPU)
  ``sdpa``      torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient / math kernels)
  ``math``      explicit softmax(q k^T / sqrt(d)) v, materialises the full score matrix (reference)
A module names its backend when it is built (timm's ``fused_attn`` habit; the trunk's ``attention_backend``)
and passes it on every call; ``auto`` reads ``MMFM_ATTN_BACKEND=name`` and otherwise picks by device. There
is no process-wide switch: two models in one process can run different backends.

Two entry points:
  ``attention(q, k, v)`` on padded batches (B, H, L, D) with an optional key-padding mask;
  ``packed_attention(q, k, v, cu_seqlens)`` on variable-length sequences concatenated without padding
  (T, H, D), ByteTransformer style: attention never crosses samples and no (T x T) mask is ever built.
"""

import itertools
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

from mmfm.errors import ConfigError

BACKENDS = ("auto", "xformers", "sdpa", "math")


def check_backend(name: str) -> str:
    """``name`` if it is a backend, else a ConfigError naming it and the choices."""
    if name not in BACKENDS:
        raise ConfigError(f"attention_backend={name!r} is not an attention backend; choose one of "
                          f"{', '.join(BACKENDS)}")
    return name


@lru_cache(maxsize=1)
def xformers_available() -> bool:
    """xformers imports and, where CUDA is present, its kernel runs (a wheel built for another torch
    imports but has no working kernels; ``auto`` must then fall back to SDPA)."""
    try:
        import xformers.ops as xops

        if torch.cuda.is_available():
            probe = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
            xops.memory_efficient_attention(probe, probe, probe)
    except Exception:  # noqa: BLE001  (any import or kernel failure means: not usable here)
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run: a named one, else (``auto``) the env var, else the best for the device."""
    check_backend(backend)
    if backend == "auto":
        backend = os.environ.get("MMFM_ATTN_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ConfigError(f"MMFM_ATTN_BACKEND={backend!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    if backend == "xformers" and not (device.type == "cuda" and xformers_available()):
        raise ConfigError("attention backend 'xformers' needs CUDA tensors and `pip install mmfm[xformers]`; "
                          "use 'sdpa' on this machine")
    return backend


def _expand_key_padding(mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, S) keep-mask -> (B, 1, L, S) boolean, broadcastable over heads."""
    return mask[:, None, None, :].expand(-1, 1, q_len, -1)


def _causal_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


def _math_attention(q, k, v, mask, causal):
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        scores = scores.masked_fill(~_causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def _sdpa_attention(q, k, v, mask, causal):
    if causal and mask is not None:
        mask = mask & _causal_mask(q.shape[-2], k.shape[-2], q.device)
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def _xformers_attention(q, k, v, mask, causal):
    import xformers.ops as xops

    bias = None
    if causal:
        bias = xops.LowerTriangularMask()
    if mask is not None:
        dense = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        if causal:
            dense = dense.masked_fill(~_causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
        bias = _aligned_bias(dense.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


def _aligned_bias(bias: torch.Tensor) -> torch.Tensor:
    """xformers wants the bias's last dimension allocated in multiples of 8."""
    length = bias.shape[-1]
    padded = torch.empty(*bias.shape[:-1], (length + 7) // 8 * 8, dtype=bias.dtype, device=bias.device)
    padded[..., :length] = bias
    return padded[..., :length]


_PADDED = {"math": _math_attention, "sdpa": _sdpa_attention, "xformers": _xformers_attention}


def attention(q, k, v, *, mask: torch.Tensor | None = None, causal: bool = False, backend: str = "auto"):
    """Scaled dot-product attention on (B, H, L, D) tensors.

    ``mask``: boolean, True = attend. Either a key-padding mask (B, S) or anything broadcastable to
    (B, H, L, S). Every query must keep at least one key.
    """
    if mask is not None and mask.dim() == 2:
        mask = _expand_key_padding(mask, q.shape[-2])
    return _PADDED[resolve_backend(backend, q.device)](q, k, v, mask, causal)


@dataclass(frozen=True)
class LengthBucket:
    """``count`` sequences of similar length, right-padded to ``width``, at slot ``offset`` of the slot axis.

    ``keep`` (count, width) is the key mask of the real slots, None when no slot is padding.
    """

    count: int
    width: int
    offset: int
    keep: torch.Tensor | None


def length_buckets(lengths: list[int], slack: float) -> list[list[int]]:
    """Sequence indices grouped longest first; a bucket grows while width * count <= slack * its real tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets, current, real = [], [], 0
    for i in order:
        if current and lengths[current[0]] * (len(current) + 1) > slack * (real + lengths[i]):
            buckets.append(current)
            current, real = [], 0
        current.append(i)
        real += lengths[i]
    return buckets + [current]


@dataclass
class PackedSeqs:
    """Layout of variable-length sequences concatenated along one token axis.

    The SDPA/math backends run one batched call per length bucket: sequences of similar length are
    right-padded to the bucket's longest with a key-padding mask, so padding stays within ``slack`` (1.25:
    at most 25% extra slots) and a batch of 64 texts of 74 possible lengths needs a handful of calls, not
    one per length (slack=1: one call per distinct length, no padding at all). All buckets live on one
    "slot" axis: ``slot_token`` gathers tokens into slots and ``token_slot`` brings the results back, one
    index_select each way per tensor, whatever the number of buckets. Never a (T x T) mask; xformers uses
    one block-diagonal bias over everything.
    """

    lengths: list[int]
    device: torch.device
    slack: float = 1.25
    cu_seqlens: torch.Tensor = field(init=False)
    buckets: list[LengthBucket] = field(init=False)
    slot_token: torch.Tensor | None = field(init=False)
    token_slot: torch.Tensor | None = field(init=False)
    _xformers_bias: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"packed sequences need lengths >= 1, got {self.lengths}")
        starts = torch.tensor([0, *self.lengths]).cumsum(0)
        self.cu_seqlens = starts.to(torch.int32).to(self.device)
        self.buckets, gathers, real_slots, offset = [], [], [], 0
        for members in length_buckets(self.lengths, self.slack):
            lengths = torch.tensor([self.lengths[i] for i in members])
            width = int(lengths.max())
            keep = torch.arange(width)[None] < lengths[:, None]
            gathers.append((starts[members][:, None] + torch.where(keep, torch.arange(width), 0)).flatten())
            real_slots.append(keep.flatten().nonzero().flatten() + offset)
            self.buckets.append(LengthBucket(len(members), width, offset, None if keep.all() else keep.to(self.device)))
            offset += len(members) * width
        self._set_slot_maps(torch.cat(gathers), torch.cat(real_slots), int(starts[-1]))

    def _set_slot_maps(self, slot_token: torch.Tensor, real_slots: torch.Tensor, total: int) -> None:
        """Index maps token axis -> slot axis and back; both None when the two axes coincide."""
        token_slot = torch.empty(total, dtype=torch.long)
        token_slot[slot_token[real_slots]] = real_slots
        identity = len(slot_token) == total and torch.equal(slot_token, torch.arange(total))
        self.slot_token = None if identity else slot_token.to(self.device)
        self.token_slot = None if identity else token_slot.to(self.device)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor) -> "PackedSeqs":
        bounds = cu_seqlens.tolist()
        return cls([b - a for a, b in itertools.pairwise(bounds)], cu_seqlens.device)

    @property
    def total(self) -> int:
        return int(self.cu_seqlens[-1])

    def xformers_bias(self):
        if self._xformers_bias is None:
            from xformers.ops.fmha.attn_bias import BlockDiagonalMask

            self._xformers_bias = BlockDiagonalMask.from_seqlens(self.lengths)
        return self._xformers_bias


def packed_attention(q, k, v, cu_seqlens, *, causal: bool = False, backend: str = "auto"):
    """Attention over packed (T, H, D) tensors; ``cu_seqlens`` is the (N+1,) offsets tensor or a PackedSeqs."""
    layout = cu_seqlens if isinstance(cu_seqlens, PackedSeqs) else PackedSeqs.from_cu_seqlens(cu_seqlens)
    name = resolve_backend(backend, q.device)
    if name == "xformers":
        import xformers.ops as xops

        bias = layout.xformers_bias()
        if causal:
            bias = bias.make_causal()
        return xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
    if layout.slot_token is not None:
        q, k, v = (t.index_select(0, layout.slot_token) for t in (q, k, v))
    results = []
    for bucket in layout.buckets:
        padded = [_bucket_batch(t, bucket) for t in (q, k, v)]
        mask = None if bucket.keep is None else _expand_key_padding(bucket.keep, bucket.width)
        results.append(_PADDED[name](*padded, mask, causal).transpose(1, 2).flatten(0, 1))
    out = results[0] if len(results) == 1 else torch.cat(results)
    return out if layout.token_slot is None else out.index_select(0, layout.token_slot)


def _bucket_batch(slots: torch.Tensor, bucket: LengthBucket) -> torch.Tensor:
    """(S, H, D) slot axis -> (count, H, width, D): the bucket's right-padded batch (a view, no copy)."""
    rows = slots.narrow(0, bucket.offset, bucket.count * bucket.width)
    return rows.view(bucket.count, bucket.width, *slots.shape[1:]).transpose(1, 2)
