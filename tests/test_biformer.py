"""BiFormer: parameter counts, lean BRA == official gather formulation, timm API, official checkpoint layout."""
import re

import pytest
import timm
import torch
import torch.nn.functional as F

import mmfm.backbones  # noqa: F401  (registers biformer_* with timm)
from mmfm.backbones.biformer import BiLevelRoutingAttention, bra_chunked, bra_gather, checkpoint_filter_fn

SMALL = {'depth': (1, 1, 2, 1)}  # reduced depth for speed; published widths/topks/n_win


def _params(model):
    return sum(p.numel() for p in model.parameters())


def official_bra(attn, x):
    """BRA as in the official ops/bra_legacy.py (auto_pad=True), written independently: NHWC in and out."""
    S, qk, N, H, W, C = attn.n_win, attn.qk_dim, *x.shape
    x = F.pad(x, (0, 0, 0, -W % S, 0, -H % S))
    h, w = x.shape[1] // S, x.shape[2] // S
    x = x.view(N, S, h, S, w, C).permute(0, 1, 3, 2, 4, 5).reshape(N, S * S, h, w, C)  # n (j i) h w c
    q, kv = F.linear(x, attn.qkv.weight, attn.qkv.bias).split([qk, qk + C], dim=-1)
    q_win, k_win = q.mean([2, 3]), kv[..., :qk].mean([2, 3])
    v_img = kv[..., qk:].reshape(N, S, S, h, w, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, S * h, S * w)
    lepe = attn.lepe(v_img).permute(0, 2, 3, 1)
    r_idx = ((q_win * attn.scale) @ k_win.transpose(-2, -1)).topk(attn.topk, dim=-1).indices
    kv_pix = kv.flatten(2, 3)  # (N, p2, w2, c)
    T, ckv, k = kv_pix.shape[2], kv_pix.shape[3], attn.topk
    kv_sel = torch.gather(kv_pix.view(N, 1, S * S, T, ckv).expand(-1, S * S, -1, -1, -1), 2,
                          r_idx.view(N, S * S, k, 1, 1).expand(-1, -1, -1, T, ckv))
    m = attn.num_heads
    k_sel = kv_sel[..., :qk].reshape(N * S * S, k * T, m, qk // m).permute(0, 2, 3, 1)  # (n p2) m c (k w2)
    v_sel = kv_sel[..., qk:].reshape(N * S * S, k * T, m, C // m).transpose(1, 2)
    q_pix = q.reshape(N * S * S, T, m, qk // m).transpose(1, 2)
    out = ((q_pix * attn.scale) @ k_sel).softmax(-1) @ v_sel  # (n p2) m w2 c
    out = out.transpose(1, 2).reshape(N, S, S, h, w, C).permute(0, 1, 3, 2, 4, 5).reshape(N, S * h, S * w, C)
    return attn.wo(out + lepe)[:, :H, :W]


def official_attention_lepe(attn, x):
    """The official models/_common.py AttentionLePE (last stage, topk=-2), NHWC in and out."""
    N, H, W, C = x.shape
    m = attn.num_heads
    qkv = F.linear(x.reshape(N, H * W, C), attn.qkv.weight).reshape(N, H * W, 3, m, C // m).permute(2, 0, 3, 1, 4)
    lepe = attn.lepe(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
    a = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (C // m) ** -0.5).softmax(-1)
    return attn.proj((a @ qkv[2]).transpose(1, 2).reshape(N, H * W, C) + lepe).view(N, H, W, C)


def official_keys(depth, topks, layer_scale=False):
    """State-dict keys of the official models/biformer.py BiFormer, written out from its module tree."""
    bn = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
    keys = [f'downsample_layers.0.{i}.{p}' for i in (0, 3) for p in ('weight', 'bias')]
    keys += [f'downsample_layers.0.{i}.{p}' for i in (1, 4) for p in bn]
    for s in range(1, 4):
        keys += [f'downsample_layers.{s}.0.{p}' for p in ('weight', 'bias')]
        keys += [f'downsample_layers.{s}.1.{p}' for p in bn]
    for s, (d, topk) in enumerate(zip(depth, topks)):
        attn = ['qkv.qkv.weight', 'qkv.qkv.bias', 'wo.weight', 'wo.bias'] if topk > 0 else \
            ['qkv.weight', 'proj.weight', 'proj.bias']
        for j in range(d):
            names = ['pos_embed.weight', 'pos_embed.bias', 'norm1.weight', 'norm1.bias', 'norm2.weight',
                     'norm2.bias', 'mlp.0.weight', 'mlp.0.bias', 'mlp.3.weight', 'mlp.3.bias',
                     'attn.lepe.weight', 'attn.lepe.bias'] + [f'attn.{a}' for a in attn]
            names += ['gamma1', 'gamma2'] if layer_scale else []
            keys += [f'stages.{s}.{j}.{n}' for n in names]
    return keys + [f'norm.{p}' for p in bn] + ['head.weight', 'head.bias']


def to_official(state_dict):
    """Our state dict under the official key names (values only; the key list is checked separately)."""
    renames = ((r'\.attn\.qkv\.(weight|bias)$', r'.attn.qkv.qkv.\1'), (r'\.mlp\.fc1\.', '.mlp.0.'),
               (r'\.mlp\.fc2\.', '.mlp.3.'), (r'\.ls([12])\.gamma$', r'.gamma\1'))
    out = {}
    for key, value in state_dict.items():
        if not key.startswith('stages.3.'):  # last stage: official AttentionLePE also uses attn.qkv
            key = re.sub(*renames[0], key)
        for pattern, repl in renames[1:]:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)


def test_param_counts():
    with torch.device('meta'):
        tiny, small = _params(timm.create_model('biformer_tiny')), _params(timm.create_model('biformer_small'))
    assert abs(tiny / 13.1e6 - 1) < 0.01, tiny  # 13,142,760
    assert abs(small / 25.5e6 - 1) < 0.01, small  # 25,536,232


@pytest.mark.parametrize('topk,size', [(1, (14, 14)), (4, (17, 23)), (16, (9, 30)), (49, (7, 7))])
def test_bra_lean_gather_official_equal(topk, size):
    torch.manual_seed(0)
    attn = BiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=topk).eval()
    x = torch.randn(2, *size, 64)
    with torch.no_grad():
        lean = attn(x)
        attn.impl = 'gather'
        gather = attn(x)
        ref = official_bra(attn, x)
    assert lean.shape == x.shape
    torch.testing.assert_close(gather, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(lean, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize('chunk', [1, 5, 100])
def test_bra_chunked_any_chunk(chunk):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 6, 16), torch.randn(2, 9, 6, 16), torch.randn(2, 9, 6, 24)
    idx = torch.rand(2, 9, 9).topk(3, dim=-1).indices
    torch.testing.assert_close(bra_chunked(q, k, v, idx, 4, 0.25, chunk=chunk), bra_gather(q, k, v, idx, 4, 0.25),
                               rtol=0, atol=1e-5)


def test_last_stage_attention_matches_official():
    torch.manual_seed(0)
    attn = timm.create_model('biformer_tiny', **SMALL).stages[3][0].attn
    x = torch.randn(2, 3, 5, 512)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), official_attention_lepe(attn, x), rtol=0, atol=1e-5)


def test_model_lean_equals_gather_non_divisible():
    torch.manual_seed(0)
    lean = timm.create_model('biformer_tiny', **SMALL).eval()
    gather = timm.create_model('biformer_tiny', bra_impl='gather', **SMALL).eval()
    _randomize_bn(lean)
    gather.load_state_dict(lean.state_dict())
    x = torch.randn(2, 3, 70, 90)  # stage maps 18x23, 9x12, 5x6, 3x3: none divisible by n_win=7
    with torch.no_grad():
        out_lean, out_gather = lean.forward_features(x), gather.forward_features(x)
    assert out_lean.shape == (2, 512, 3, 3)
    torch.testing.assert_close(out_lean, out_gather, rtol=0, atol=1e-5)


def test_invalid_config_errors():
    with pytest.raises(ValueError, match='topk 50'):
        BiLevelRoutingAttention(64, num_heads=2, n_win=7, topk=50)
    with pytest.raises(ValueError, match='bra_impl'):
        BiLevelRoutingAttention(64, num_heads=2, impl='cuda')


def test_features_only():
    model = timm.create_model('biformer_tiny', features_only=True, **SMALL).eval()
    assert model.feature_info.channels() == [64, 128, 256, 512]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]


def test_forward_intermediates_and_prune():
    torch.manual_seed(0)
    model = timm.create_model('biformer_tiny', **SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [f.shape[1] for f in inter] == [64, 128, 256, 512]
        last_two = model.forward_intermediates(x, indices=2, norm=True, intermediates_only=True)
        torch.testing.assert_close(last_two[0], inter[2])
        torch.testing.assert_close(last_two[1], model.norm(inter[3]))
        _, early = model.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(early[0], inter[1])
        assert model.prune_intermediate_layers([1]) == [1]
        assert len(model.stages) == 2 and isinstance(model.head, torch.nn.Identity)
        torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True)[-1], inter[1])


def test_head_api():
    model = timm.create_model('biformer_tiny', **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert model.forward_head(feats, pre_logits=True).shape == (2, 512)
        model.reset_classifier(7)
        assert model.get_classifier().out_features == 7 and model(x).shape == (2, 7)
        model.reset_classifier(0, global_pool='')
        assert model(x).shape == (2, 512, 2, 2)
    assert model.no_weight_decay() == set()


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = timm.create_model('biformer_tiny', num_classes=5, **SMALL)
    b = timm.create_model('biformer_tiny', num_classes=5, **SMALL)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    for model in (a, b):
        model(x).square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize('layer_scale', [False, True])
def test_official_checkpoint_layout(tmp_path, layer_scale):
    torch.manual_seed(0)
    kwargs = {'layer_scale_init_value': 0.5} if layer_scale else {}
    kwargs.update(SMALL)
    src = timm.create_model('biformer_tiny', **kwargs).eval()
    _randomize_bn(src)
    official = to_official(src.state_dict())
    assert sorted(official) == sorted(official_keys(SMALL['depth'], (1, 4, 16, -2), layer_scale))
    dst = timm.create_model('biformer_tiny', **kwargs).eval()
    dst.load_state_dict(checkpoint_filter_fn({'model': official}, dst), strict=True)
    path = tmp_path / 'biformer_tiny_in1k.pth'
    torch.save({'model': official}, path)
    loaded = timm.create_model('biformer_tiny', pretrained=True, pretrained_cfg_overlay={'file': str(path)},
                               **kwargs).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = src(x)
        torch.testing.assert_close(dst(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)


def test_training_step():
    torch.manual_seed(0)
    model = timm.create_model('biformer_tiny', num_classes=4, drop_path_rate=0.1, **SMALL).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 3])
    before = model.head.weight.detach().clone()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.stages[0][0].attn.qkv.weight.grad.abs().sum() > 0
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.head.weight)
