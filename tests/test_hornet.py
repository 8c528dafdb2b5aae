"""HorNet backbone: published sizes, official checkpoint layout, numerics vs. the paper's equations,
the global filter under bf16 autocast and at any size, and the timm model interface."""
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

import mmfm.backbones  # noqa: F401  (registers the models with timm)
from mmfm.backbones.hornet import GlobalLocalFilter, HorBlock, checkpoint_filter_fn

SMALL = {'depths': (1, 1, 2, 1)}
GF = (None, None, (14, 8), (7, 4))


# ---------------------------------------------------------------- official layout and reference math
def gn_dims(dim, order):
    """Channel widths of p_0 (first) ... q_{n-1}: C / 2^(n-1), ..., C / 2, C."""
    return [dim // 2 ** (order - 1 - k) for k in range(order)]


def official_shapes(depths, base, orders, gf_sizes, num_classes=1000):
    """Key -> shape of an official HorNet state dict (raoyongming/HorNet hornet.py)."""
    dims = [base * 2 ** i for i in range(4)]
    shapes = {'downsample_layers.0.0.weight': (dims[0], 3, 4, 4), 'downsample_layers.0.0.bias': (dims[0],),
              'downsample_layers.0.1.weight': (dims[0],), 'downsample_layers.0.1.bias': (dims[0],)}
    for i in range(1, 4):
        shapes.update({f'downsample_layers.{i}.0.weight': (dims[i - 1],),
                       f'downsample_layers.{i}.0.bias': (dims[i - 1],),
                       f'downsample_layers.{i}.1.weight': (dims[i], dims[i - 1], 2, 2),
                       f'downsample_layers.{i}.1.bias': (dims[i],)})
    for i in range(4):
        c, gd = dims[i], gn_dims(dims[i], orders[i])
        for j in range(depths[i]):
            p = f'stages.{i}.{j}.'
            shapes.update({p + 'gamma1': (c,), p + 'gamma2': (c,),
                           p + 'norm1.weight': (c,), p + 'norm1.bias': (c,),
                           p + 'norm2.weight': (c,), p + 'norm2.bias': (c,),
                           p + 'pwconv1.weight': (4 * c, c), p + 'pwconv1.bias': (4 * c,),
                           p + 'pwconv2.weight': (c, 4 * c), p + 'pwconv2.bias': (c,),
                           p + 'gnconv.proj_in.weight': (2 * c, c, 1, 1), p + 'gnconv.proj_in.bias': (2 * c,),
                           p + 'gnconv.proj_out.weight': (c, c, 1, 1), p + 'gnconv.proj_out.bias': (c,)})
            for k in range(orders[i] - 1):
                shapes[p + f'gnconv.pws.{k}.weight'] = (gd[k + 1], gd[k], 1, 1)
                shapes[p + f'gnconv.pws.{k}.bias'] = (gd[k + 1],)
            s = sum(gd)
            if gf_sizes[i] is None:
                shapes.update({p + 'gnconv.dwconv.weight': (s, 1, 7, 7), p + 'gnconv.dwconv.bias': (s,)})
            else:
                h, w = gf_sizes[i]
                shapes.update({p + 'gnconv.dwconv.dw.weight': (s // 2, 1, 3, 3),
                               p + 'gnconv.dwconv.complex_weight': (s // 2, h, w, 2)})
                for n in ('pre_norm', 'post_norm'):
                    shapes.update({p + f'gnconv.dwconv.{n}.weight': (s,), p + f'gnconv.dwconv.{n}.bias': (s,)})
    shapes.update({'norm.weight': (dims[3],), 'norm.bias': (dims[3],),
                   'head.weight': (num_classes, dims[3]), 'head.bias': (num_classes,)})
    return shapes


def random_official(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith('weight') and len(shape) == 1:  # LayerNorm scales
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif 'gamma' in k:
            sd[k] = 0.5 + 0.1 * torch.randn(shape, generator=g)  # layer scale large enough to matter
        else:
            sd[k] = 0.1 * torch.randn(shape, generator=g)
    return sd


def ln_ref(x, sd, p):
    """LayerNorm over channels of NCHW, as the paper code writes it out."""
    u = x.mean(1, keepdim=True)
    v = (x - u).pow(2).mean(1, keepdim=True)
    return sd[p + 'weight'][:, None, None] * (x - u) / torch.sqrt(v + 1e-6) + sd[p + 'bias'][:, None, None]


def conv_ref(x, sd, p, **kw):
    return F.conv2d(x, sd[p + 'weight'], sd.get(p + 'bias'), **kw)


def gf_ref(x, sd, p):
    """Global-local filter: LN, half 3x3 dwconv / half rfft2 * W (bilinear-resized), interleave, LN."""
    x = ln_ref(x, sd, p + 'pre_norm.')
    x1, x2 = x.chunk(2, 1)
    x1 = conv_ref(x1, sd, p + 'dw.', padding=1, groups=x1.shape[1])
    B, C, H, W = x2.shape
    f = torch.fft.rfft2(x2, dim=(2, 3), norm='ortho')
    w = sd[p + 'complex_weight']
    if w.shape[1:3] != f.shape[2:4]:
        w = F.interpolate(w.permute(3, 0, 1, 2), size=f.shape[2:4], mode='bilinear', align_corners=True)
        w = w.permute(1, 2, 3, 0)
    x2 = torch.fft.irfft2(f * torch.complex(w[..., 0], w[..., 1]), s=(H, W), dim=(2, 3), norm='ortho')
    x = torch.cat([x1.unsqueeze(2), x2.unsqueeze(2)], 2).reshape(B, 2 * C, H, W)
    return ln_ref(x, sd, p + 'post_norm.')


def gnconv_ref(x, sd, p, order, s=1 / 3, gf=False):
    """Eq. (3)-(4) of the paper: [p0, q0..q_{n-1}] = phi_in(x); q = s * f(q);
    p_{k+1} = g_k(p_k) * q_k; out = phi_out(p_n)."""
    dims = gn_dims(x.shape[1], order)
    y = conv_ref(x, sd, p + 'proj_in.')
    p0, q = y[:, :dims[0]], y[:, dims[0]:]
    q = gf_ref(q, sd, p + 'dwconv.') if gf else conv_ref(q, sd, p + 'dwconv.', padding=3, groups=q.shape[1])
    qs = list((q * s).split(dims, 1))
    out = p0 * qs[0]
    for k in range(order - 1):
        out = conv_ref(out, sd, p + f'pws.{k}.') * qs[k + 1]
    return conv_ref(out, sd, p + 'proj_out.')


def block_ref(x, sd, p, order, gf=False):
    x = x + sd[p + 'gamma1'][:, None, None] * gnconv_ref(ln_ref(x, sd, p + 'norm1.'), sd, p + 'gnconv.', order, gf=gf)
    y = ln_ref(x, sd, p + 'norm2.').permute(0, 2, 3, 1)
    y = F.linear(F.gelu(F.linear(y, sd[p + 'pwconv1.weight'], sd[p + 'pwconv1.bias'])),
                 sd[p + 'pwconv2.weight'], sd[p + 'pwconv2.bias'])
    return x + (sd[p + 'gamma2'] * y).permute(0, 3, 1, 2)


def hornet_ref(x, sd, depths, orders, gf_sizes):
    x = ln_ref(conv_ref(x, sd, 'downsample_layers.0.0.', stride=4), sd, 'downsample_layers.0.1.')
    for i in range(4):
        if i:
            x = conv_ref(ln_ref(x, sd, f'downsample_layers.{i}.0.'), sd, f'downsample_layers.{i}.1.', stride=2)
        for j in range(depths[i]):
            x = block_ref(x, sd, f'stages.{i}.{j}.', orders[i], gf=gf_sizes[i] is not None)
    x = F.layer_norm(x.mean((2, 3)), (x.shape[1],), sd['norm.weight'], sd['norm.bias'], 1e-6)
    return F.linear(x, sd['head.weight'], sd['head.bias'])


def randomize_(module, seed=0):
    """Random weights with norm scales near 1 and layer scales near 0.5, so every branch matters."""
    with torch.no_grad():
        module.load_state_dict(random_official({k: v.shape for k, v in module.state_dict().items()}, seed))
    return module


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize('name, base, gf_sizes, published', [
    ('hornet_tiny_7x7', 64, (None,) * 4, 22.4e6),
    ('hornet_tiny_gf', 64, GF, 23.0e6),
    ('hornet_small_7x7', 96, (None,) * 4, 49.5e6),
])
def test_param_counts(name, base, gf_sizes, published):
    n = sum(p.numel() for p in timm.create_model(name).parameters())
    assert abs(n - published) / published < 0.01, n
    official = official_shapes((2, 3, 18, 2), base, (2, 3, 4, 5), gf_sizes)
    assert n == sum(torch.Size(shape).numel() for shape in official.values())


@pytest.mark.parametrize('order, gf_size, hw', [
    (2, None, (9, 11)), (3, None, (8, 8)), (4, None, (7, 5)), (5, None, (6, 6)),
    (4, (14, 8), (14, 14)),  # global filter at its native size
    (5, (7, 4), (10, 6)),  # global filter with resized complex weights
])
def test_block_matches_paper_equations(order, gf_size, hw):
    torch.manual_seed(0)
    block = randomize_(HorBlock(32, order=order, gf_size=gf_size)).eval()
    x = torch.randn(2, 32, *hw)
    sd = {k: v.detach() for k, v in block.state_dict().items()}
    expected = block_ref(x, sd, '', order, gf=gf_size is not None)
    torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name, gf_sizes, size', [
    ('hornet_tiny_7x7', (None,) * 4, (64, 64)), ('hornet_tiny_gf', GF, (96, 128))])
def test_official_checkpoint_strict_load_and_outputs(name, gf_sizes, size, tmp_path):
    shapes = official_shapes(SMALL['depths'], 64, (2, 3, 4, 5), gf_sizes)
    official = random_official(shapes)
    model = timm.create_model(name, **SMALL).eval()
    result = model.load_state_dict(checkpoint_filter_fn({'model': official}, model), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, *size)
    expected = hornet_ref(x, official, SMALL['depths'], (2, 3, 4, 5), gf_sizes)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-3, atol=1e-3)

    # the same file through timm's pretrained path (local file via pretrained_cfg_overlay)
    path = tmp_path / 'official.pth'
    torch.save({'model': official}, path)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={'file': str(path)}, **SMALL).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-3, atol=1e-3)


def test_global_filter_bf16_autocast_no_warnings():
    torch.manual_seed(0)
    gf = GlobalLocalFilter(32, h=7, w=4)
    model = timm.create_model('hornet_tiny_gf', depths=(1, 1, 1, 1), base_dim=16, ls_init_value=1.0).eval()
    x = torch.randn(2, 3, 64, 64)
    q = torch.randn(2, 32, 7, 7)
    with torch.no_grad():
        ref, ref_gf = model(x), gf(q)
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            with torch.autocast('cpu', dtype=torch.bfloat16):
                out, out_gf = model(x), gf(q.bfloat16())
    assert out_gf.dtype == torch.bfloat16
    # a bf16 model without autocast: the FFT still runs in fp32 inside (no bf16 FFT kernels on CPU)
    with torch.no_grad():
        out_cast = gf.bfloat16()(q.bfloat16())
    assert out_cast.dtype == torch.bfloat16
    for a, b in ((out, ref), (out_gf, ref_gf), (out_cast, ref_gf)):
        assert torch.isfinite(a).all()
        assert (a.float() - b).norm() / b.norm() < 0.05


def test_global_filter_any_size():
    model = timm.create_model('hornet_tiny_gf', num_classes=5, **SMALL).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 96, 128))
        assert feats.shape == (1, 512, 3, 4)
        assert model.forward_head(feats).shape == (1, 5)
        # odd sizes too: the rfft width is W // 2 + 1 and irfft2 restores W
        assert model.forward_features(torch.randn(1, 3, 80, 112)).shape == (1, 512, 2, 3)


def test_features_only():
    model = timm.create_model('hornet_tiny_7x7', features_only=True).eval()
    assert model.feature_info.channels() == [64, 128, 256, 512]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]
    sub = timm.create_model('hornet_tiny_gf', features_only=True, out_indices=(1, 2), **SMALL)
    assert len(sub.model.stages) == 3  # stage 4 pruned
    assert [f.shape[1] for f in sub(torch.randn(1, 3, 64, 64))] == [128, 256]


def test_forward_intermediates_and_head():
    model = timm.create_model('hornet_tiny_7x7', num_classes=7, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1] for t in inter] == [64, 128, 256, 512]
        assert len(model.forward_intermediates(x, indices=2, intermediates_only=True)) == 2
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[1])
        assert model.forward_head(final, pre_logits=True).shape == (2, 512)
        assert model(x).shape == (2, 7)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 512)
    params = dict(model.named_parameters())
    assert model.no_weight_decay() == {n for n in params if 'gamma' in n} and 'stages.2.1.gamma2' in params


def test_grad_checkpointing_same_gradients():
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = timm.create_model('hornet_tiny_gf', num_classes=4, drop_path_rate=0.2, **SMALL).train()
        model.set_grad_checkpointing(ckpt)
        torch.manual_seed(1)
        model(x).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_training_step():
    torch.manual_seed(0)
    model = timm.create_model('hornet_tiny_gf', num_classes=3, depths=(1, 1, 1, 1), base_dim=16,
                              drop_path_rate=0.1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any('complex_weight' in n for n in changed) and any('gamma1' in n for n in changed)
