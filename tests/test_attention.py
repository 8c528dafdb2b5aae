"""Attention backends agree and are fixed per module; packed attention equals per-sample attention without
any (T x T) mask."""

import pytest
import torch

import mmfm.layers.attention as attn_mod
from mmfm.errors import ConfigError
from mmfm.layers.attention import (
    PackedSeqs,
    attention,
    check_backend,
    length_buckets,
    packed_attention,
    resolve_backend,
    xformers_available,
)
from mmfm.models.trunk import UnifiedTrunk

CPU = torch.device("cpu")
needs_xformers = pytest.mark.skipif(
    not (torch.cuda.is_available() and xformers_available()), reason="needs CUDA and xformers"
)


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv("MMFM_ATTN_BACKEND", raising=False)


def _qkv(batch=3, heads=2, length=11, dim=16, seed=0, device="cpu", dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, generator=generator).to(device, dtype) for _ in range(3)]


def _key_padding(lengths, width, device="cpu"):
    return (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).to(device)


def _real_rows(out, mask):
    """Outputs at real query positions only (padded queries are meaningless)."""
    return out.transpose(1, 2)[mask]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_equals_math(causal, masked):
    q, k, v = _qkv()
    mask = _key_padding([11, 7, 3], 11) if masked else None
    sdpa = attention(q, k, v, mask=mask, causal=causal, backend="sdpa")
    math = attention(q, k, v, mask=mask, causal=causal, backend="math")
    rows = mask if masked else torch.ones(3, 11, dtype=torch.bool)
    assert (_real_rows(sdpa, rows) - _real_rows(math, rows)).abs().max() <= 1e-5


def test_key_padding_ignores_padded_keys():
    q, k, v = _qkv(batch=1)
    mask = _key_padding([5], 11)
    full = attention(q, k, v, mask=mask, backend="math")
    alone = attention(q, k[:, :, :5], v[:, :, :5], backend="math")
    assert (full - alone).abs().max() <= 1e-6


def test_causal_matches_explicit_lower_triangle():
    q, k, v = _qkv()
    tril = torch.ones(1, 1, 11, 11, dtype=torch.bool).tril()
    assert (attention(q, k, v, causal=True) - attention(q, k, v, mask=tril, backend="math")).abs().max() <= 1e-5


def test_auto_picks_sdpa_on_cpu():
    assert resolve_backend("auto", CPU) == "sdpa"


def test_env_override(monkeypatch):
    monkeypatch.setenv("MMFM_ATTN_BACKEND", "math")
    assert resolve_backend("auto", CPU) == "math"
    called = []
    monkeypatch.setitem(attn_mod._PADDED, "math", lambda *a: called.append(1) or attn_mod._math_attention(*a))
    attention(*_qkv())
    assert called


def test_named_backend_beats_env(monkeypatch):
    monkeypatch.setenv("MMFM_ATTN_BACKEND", "math")
    assert resolve_backend("sdpa", CPU) == "sdpa"


@pytest.mark.parametrize("bad", ["flash", "SDPA", ""])
def test_bad_backend_name_raises(bad, monkeypatch):
    with pytest.raises(ConfigError, match=f"attention_backend={bad!r}.*auto, xformers, sdpa, math"):
        check_backend(bad)
    with pytest.raises(ConfigError, match="attention_backend"):
        UnifiedTrunk(width=8, depth=1, num_heads=2, img_size=8, patch_size=4, vocab_size=10, attention_backend=bad)
    monkeypatch.setenv("MMFM_ATTN_BACKEND", bad or "nope")
    with pytest.raises(ConfigError, match="MMFM_ATTN_BACKEND"):
        attention(*_qkv())


def test_xformers_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="xformers"):
        resolve_backend("xformers", CPU)


# ---- per-module backends ----------------------------------------------------------------------------


@pytest.fixture
def called_backends(monkeypatch):
    """The backend name of every padded-backend call."""
    calls = []
    for name, fn in list(attn_mod._PADDED.items()):
        monkeypatch.setitem(attn_mod._PADDED, name, lambda *args, name=name, fn=fn: calls.append(name) or fn(*args))
    return calls


def _tiny_trunk(backend: str) -> UnifiedTrunk:
    torch.manual_seed(0)
    return UnifiedTrunk(width=32, depth=2, num_heads=2, fusion_layer=1, img_size=16, patch_size=4, vocab_size=50,
                        context_length=8, fusion_mode="cross", attention_backend=backend).eval()


def _forward_all_paths(trunk: UnifiedTrunk) -> torch.Tensor:
    """Padded images, packed texts and cross fusion: every attention call site of the trunk."""
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.arange(8)[None] < torch.tensor([8, 3])[:, None]
    image = trunk.unimodal(trunk.embed_image(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))))
    packed = trunk.unimodal(trunk.embed_texts_packed(ids, mask)).x
    fused = trunk.fuse(trunk.unimodal(trunk.embed_text(ids, mask)), image).x[mask]
    return torch.cat([image.x.flatten(0, 1), packed, fused])


@torch.no_grad()
def test_two_trunks_keep_their_own_backends_and_agree(called_backends):
    math_trunk = _tiny_trunk("math")
    sdpa_trunk = _tiny_trunk("sdpa")
    assert {block.attn.backend for block in math_trunk.blocks} == {"math"}, "building another trunk changed it"
    math_out = _forward_all_paths(math_trunk)
    assert called_backends and set(called_backends) == {"math"}
    called_backends.clear()
    sdpa_out = _forward_all_paths(sdpa_trunk)
    assert called_backends and set(called_backends) == {"sdpa"}
    assert (math_out - sdpa_out).abs().max() <= 1e-5


def test_auto_module_follows_the_env_var(monkeypatch, called_backends):
    trunk = _tiny_trunk("auto")
    monkeypatch.setenv("MMFM_ATTN_BACKEND", "math")
    with torch.no_grad():
        trunk.forward_image(torch.randn(1, 3, 16, 16))
    assert set(called_backends) == {"math"}


# ---- packed (variable length) -----------------------------------------------------------------------


def _packed_inputs(lengths, heads=2, dim=16, seed=0, device="cpu", dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    return [torch.randn(total, heads, dim, generator=generator).to(device, dtype) for _ in range(3)]


def _per_sample(q, k, v, lengths, causal, backend):
    """Reference: each sequence alone through the padded entry point (no padding at all)."""
    outs, start = [], 0
    for n in lengths:
        one = [t[start:start + n].transpose(0, 1)[None] for t in (q, k, v)]
        outs.append(attention(*one, causal=causal, backend=backend)[0].transpose(0, 1))
        start += n
    return torch.cat(outs)


def _text_lengths(count=64, seed=0):
    return torch.randint(4, 78, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture
def recorded_calls(monkeypatch):
    """Every padded-backend call's (query length, key length), to prove no (T x T) attention happens."""
    calls = []
    for name, fn in list(attn_mod._PADDED.items()):
        def spy(q, k, v, mask, causal, fn=fn):
            calls.append((q.shape[-2], k.shape[-2]))
            return fn(q, k, v, mask, causal)

        monkeypatch.setitem(attn_mod._PADDED, name, spy)
    return calls


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("causal", [False, True])
def test_packed_texts_equal_per_sample(backend, causal, recorded_calls):
    lengths = _text_lengths()
    q, k, v = _packed_inputs(lengths)
    expected = _per_sample(q, k, v, lengths, causal, backend)
    recorded_calls.clear()
    packed = packed_attention(q, k, v, PackedSeqs(lengths, CPU), causal=causal, backend=backend)
    assert (packed - expected).abs().max() <= 1e-5
    assert max(width for width, _ in recorded_calls) == max(lengths) < sum(lengths)
    assert len(recorded_calls) < len(set(lengths)), "length buckets should batch similar lengths"


def test_packed_accepts_cu_seqlens_tensor():
    lengths = [3, 9, 1, 9]
    q, k, v = _packed_inputs(lengths)
    cu = torch.tensor([0, 3, 12, 13, 22], dtype=torch.int32)
    assert (packed_attention(q, k, v, cu) - _per_sample(q, k, v, lengths, False, "sdpa")).abs().max() <= 1e-5


@pytest.mark.parametrize("slack", [1.0, 1.25, 4.0])
def test_any_bucketing_gives_the_same_result(slack):
    lengths = [197, 1 + 12 * 16, 50, 1025, 65, 197, 4]
    q, k, v = _packed_inputs(lengths)
    out = packed_attention(q, k, v, PackedSeqs(lengths, CPU, slack))
    assert (out - _per_sample(q, k, v, lengths, False, "sdpa")).abs().max() <= 1e-5


def test_equal_lengths_need_no_gather_at_all():
    lengths = [197] * 4
    layout = PackedSeqs(lengths, CPU)
    assert layout.slot_token is None and layout.token_slot is None and len(layout.buckets) == 1
    q, k, v = _packed_inputs(lengths)
    assert (packed_attention(q, k, v, layout) - _per_sample(q, k, v, lengths, False, "sdpa")).abs().max() <= 1e-5


def test_length_buckets_bound_the_padding():
    lengths = _text_lengths(seed=3)
    buckets = length_buckets(lengths, 1.25)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for bucket in buckets:
        width = max(lengths[i] for i in bucket)
        assert width * len(bucket) <= 1.25 * sum(lengths[i] for i in bucket)
    assert [len(b) for b in length_buckets([5, 5, 5], 1.0)] == [3]
    assert len(length_buckets([5, 4, 3], 1.0)) == 3


def test_packed_rejects_empty_sequences():
    with pytest.raises(ValueError, match="lengths"):
        PackedSeqs([3, 0], CPU)


# ---- xformers (GPU only; run by tools/gpu_check.sh) ------------------------------------------------


@pytest.mark.gpu
@needs_xformers
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_xformers_equals_sdpa_padded(causal, masked):
    q, k, v = _qkv(length=37, dim=64, device="cuda")
    mask = _key_padding([37, 20, 5], 37, "cuda") if masked else None
    xf = attention(q, k, v, mask=mask, causal=causal, backend="xformers")
    ref = attention(q, k, v, mask=mask, causal=causal, backend="sdpa")
    rows = mask if masked else torch.ones(3, 37, dtype=torch.bool, device="cuda")
    assert (_real_rows(xf, rows) - _real_rows(ref, rows)).abs().max() <= 1e-4


@pytest.mark.gpu
@needs_xformers
@pytest.mark.parametrize("causal", [False, True])
def test_xformers_equals_sdpa_packed(causal):
    lengths = _text_lengths()
    q, k, v = _packed_inputs(lengths, dim=64, device="cuda")
    layout = PackedSeqs(lengths, torch.device("cuda"))
    xf = packed_attention(q, k, v, layout, causal=causal, backend="xformers")
    ref = packed_attention(q, k, v, layout, causal=causal, backend="sdpa")
    assert (xf - ref).abs().max() <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_picks_xformers_on_cuda_when_installed():
    expected = "xformers" if xformers_available() else "sdpa"
    assert resolve_backend("auto", torch.device("cuda")) == expected
