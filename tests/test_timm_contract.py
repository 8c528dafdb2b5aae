"""mmfm's timm models (HorNet, BiFormer, P2AT) against timm's model contract, as timm's own tests/test_models.py
checks it: forward / backward, default cfgs and the head API, features_only / forward_intermediates,
TorchScript, FX (torchvision feature extraction with timm's no-trace registrations) and FX + TorchScript.

One small variant per family (reduced depth / width, published cfg) at small inputs, so the file stays fast;
docs/backbones.md says how timm's test file itself runs on these models. P2AT is a segmentation model: its
forward gives a dense (B, classes, H, W) map where a classifier gives (B, classes), so the class axis is
checked at dim 1 and the head API as timm's NON_STD (spatial output) cfg test does it.
"""
import math
import os

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import (
    NodePathTracer,
    create_feature_extractor,
    get_graph_node_names,
)

import mmfm.backbones  # noqa: F401  (registers the models with timm)
from mmfm.backbones import hornet

# (model name, kwargs making it small): the cfg (input_size, pool_size, classifier, ...) is the registered one
CLASSIFIERS = {
    'hornet': ('hornet_tiny_gf', {'depths': (1, 1, 1, 1), 'base_dim': 16}),  # 7x7 dwconv stages 1-2, GF 3-4
    'biformer': ('biformer_tiny', {'depth': (1, 1, 1, 1)}),  # BRA stages 1-3, full attention stage 4
}
DENSE = {'p2at': ('p2at_small', {'depth': 1})}
FAMILIES = {**CLASSIFIERS, **DENSE}
SIZE = (64, 64)
pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')


def _create(family: str, **kwargs):
    name, small = FAMILIES[family]
    return timm.create_model(name, **dict(small, **kwargs))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- forward / backward (timm: test_model_forward,
# test_model_backward; the class axis is -1 for a classifier, 1 for P2AT's dense logits)
@pytest.mark.parametrize('family', FAMILIES)
def test_forward_backward(family):
    model = _create(family, num_classes=42).train()
    x = torch.randn(2, 3, *SIZE)
    out = model(x)
    expected = (2, 42) if family in CLASSIFIERS else (2, 42, *SIZE)
    assert out.shape == expected and not torch.isnan(out).any()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing

    model.eval()
    with torch.no_grad():
        ref = model(x)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- default cfg and head API
# (timm: test_model_default_cfgs for the classifiers, test_model_default_cfgs_non_std for P2AT)
def _check_cfg_names(model):
    cfg, state_dict = model.pretrained_cfg, model.state_dict()
    for key in ('input_size', 'num_classes', 'mean', 'std', 'first_conv', 'classifier', 'architecture', 'tag'):
        assert key in cfg, key
    if cfg.get('num_classes'):
        assert cfg['classifier'] + '.weight' in state_dict
    assert cfg['first_conv'] + '.weight' in state_dict


@pytest.mark.parametrize('family', CLASSIFIERS)
def test_default_cfg_and_head_classifier(family):
    model = _create(family).eval()
    cfg = model.pretrained_cfg
    _check_cfg_names(model)
    assert model.num_classes == cfg['num_classes'] == 1000 and model.num_features > 0 and model.head_hidden_size > 0
    assert any(cfg.get(k) for k in ('url', 'hf_hub_id', 'file'))  # a weight source (network: not loaded here)
    x = torch.randn(1, *cfg['input_size'])  # pool_size is the feature size at the cfg input size
    feat_axis, spatial = get_channel_dim('NCHW'), get_spatial_dim('NCHW')
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert tuple(feats.shape[i] for i in spatial) == cfg['pool_size']
        assert feats.shape[feat_axis] == model.num_features and pre.shape == (1, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0 and model(x).shape == pre.shape
        model.reset_classifier(0, '')  # no classifier, no pooling: the unpooled map
        assert model(x).shape == feats.shape
        bare = _create(family, num_classes=0, global_pool='').eval()
        assert bare(x).shape == feats.shape


def test_default_cfg_and_head_dense():
    model = _create('p2at').eval()
    cfg = model.pretrained_cfg
    _check_cfg_names(model)
    assert cfg['pool_size'] is None  # dense output: no pooled feature size
    assert model.num_classes == cfg['num_classes'] == 11 and model.num_features == model.head_hidden_size == 104
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        feats = model.forward_features(x)
        pre = model.forward_head(feats, pre_logits=True)
        assert feats.shape == (1, 104, 16, 16) and pre.shape == feats.shape
        assert model(x).shape == (1, 11, *SIZE)
        # no classifier: forward gives what forward_head(pre_logits=True) does (timm's convention)
        model.reset_classifier(0)
        assert model.num_classes == 0 and model(x).shape == pre.shape
        model.reset_classifier(0, '')
        with pytest.raises(ValueError, match='no global pooling'):
            model.reset_classifier(0, 'avg')
        bare = _create('p2at', num_classes=0, global_pool='').eval()
        assert bare(x).shape == (1, bare.num_features, 16, 16)
    with pytest.raises(ValueError, match='no global pooling'):
        _create('p2at', global_pool='avg')


# ---------------------------------------------------------------- features (timm: test_model_forward_features,
# test_model_forward_intermediates)
@pytest.mark.parametrize('family', FAMILIES)
def test_features_and_intermediates(family):
    x = torch.randn(1, 3, 64, 96)
    features = _create(family, features_only=True).eval()
    model = _create(family).eval()
    channels, reductions = features.feature_info.channels(), features.feature_info.reduction()
    assert len(channels) >= 3
    with torch.no_grad():
        maps = features(x)
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
    assert len(maps) == len(inter) == len(channels)
    for c, r, f, i in zip(channels, reductions, maps, inter):
        assert f.shape[1] == i.shape[1] == c
        assert f.shape[2] <= math.ceil(64 / r) + 1 and f.shape[3] <= math.ceil(96 / r) + 1
        assert f.shape[0] == 1 and not torch.isnan(f).any()


# ---------------------------------------------------------------- TorchScript (timm: test_model_forward_torchscript)
@pytest.mark.parametrize('family', FAMILIES)
def test_torchscript(family):
    model = _create(family).eval()
    with timm.set_scriptable(True):
        scripted = torch.jit.script(_create(family).eval())
    scripted.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 48, 80)  # not a multiple of BiFormer's 7 regions: the padding path is scripted too
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- FX (timm: test_model_forward_fx,
# test_model_backward_fx, test_model_forward_fx_torchscript); the helper is timm's _create_fx_model
def _create_fx_model(model, train=False):
    tracer_kwargs = {'leaf_modules': get_notrace_modules(), 'autowrap_functions': get_notrace_functions(),
                     'param_shapes_constant': True}
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes, train_return_nodes = [eval_nodes[-1]], [train_nodes[-1]]
    if train:
        graph_nodes = list(reversed(NodePathTracer(**tracer_kwargs).trace(model).nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes]
        graph_node_names = [n.name for n in graph_nodes]
        train_return_nodes = [train_nodes[-graph_node_names.index(name)] for name in output_node_names]
    return create_feature_extractor(model, train_return_nodes=train_return_nodes,
                                    eval_return_nodes=eval_return_nodes, tracer_kwargs=tracer_kwargs)


def test_notrace_registrations():
    """What FX leaves opaque, and why (the reasons are on the decorators): input-size control flow only."""
    from mmfm.backbones import biformer, p2at
    assert biformer.BiLevelRoutingAttention in get_notrace_modules()
    assert {hornet.global_filter, p2at.resize_to} <= set(get_notrace_functions())


@pytest.mark.parametrize('family', FAMILIES)
def test_fx(family):
    model = _create(family).eval()
    x = torch.randn(1, 3, 48, 80)
    with torch.inference_mode():
        ref = model(x)
        fx_model = _create_fx_model(model)
        out = torch.cat(tuple(fx_model(x).values()))
    assert torch.equal(out, ref)

    with torch.inference_mode():  # the traced graph scripts too (notrace functions/modules included)
        scripted = torch.jit.script(fx_model)
        torch.testing.assert_close(torch.cat(tuple(scripted(x).values())), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('family', FAMILIES)
def test_fx_backward(family):
    model = _create(family, num_classes=42).train()
    num_params = sum(p.numel() for p in model.parameters())
    fx_model = _create_fx_model(model, train=True)
    out = torch.cat(tuple(fx_model(torch.randn(2, 3, 48, 48)).values()))
    out.mean().backward()
    missing = [n for n, p in fx_model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert sum(p.grad.numel() for p in fx_model.parameters()) == num_params
    assert out.shape[1 if family in DENSE else -1] == 42 and not torch.isnan(out).any()


# ---------------------------------------------------------------- pretrained sources (offline)
def _official_hornet_checkpoint(model):
    """A timm-layout HorNet state dict in the official file layout ({'model': ...}, head.norm -> norm, head.fc -> head)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith('head.norm.'):
            k = k[len('head.'):]
        elif k.startswith('head.fc.'):
            k = 'head.' + k[len('head.fc.'):]
        out[k] = v.clone()
    return {'model': out}


def test_hornet_pretrained_url_names_its_file(tmp_path, monkeypatch):
    """The official links end in '/?dl=1': the cfg names the file, so the download lands on a file (torch.hub
    derived '' from the link and loaded the cache directory). The download itself is faked (no network)."""
    for tag in ('hornet_tiny_7x7.in1k', 'hornet_tiny_gf.in1k', 'hornet_small_7x7.in1k'):
        cfg = timm.models.get_pretrained_cfg(tag)
        url, file_name = cfg.url
        assert url.endswith('/?dl=1') and file_name == tag.split('.')[0] + '.pth' and cfg.custom_load
    for tag in ('biformer_tiny.in1k', 'biformer_small.in1k'):
        assert os.path.basename(timm.models.get_pretrained_cfg(tag).url)

    small = {'depths': (1, 1, 1, 1), 'base_dim': 16}
    source = timm.create_model('hornet_tiny_7x7', **small).eval()
    downloads = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        downloads.append((url, dst))
        torch.save(_official_hornet_checkpoint(source), dst)

    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    monkeypatch.setattr(timm.models._hub, 'download_url_to_file', fake_download)
    model = timm.create_model('hornet_tiny_7x7', pretrained=True, **small).eval()
    (url, dst), = downloads
    assert url == timm.models.get_pretrained_cfg('hornet_tiny_7x7.in1k').url[0]
    assert os.path.isfile(dst) and os.path.basename(dst) == 'hornet_tiny_7x7.pth'
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
    # timm's adaptation on top (timm: test_model_load_pretrained): 1 input channel, a new 5-class head;
    # the cached file is reused
    adapted = timm.create_model('hornet_tiny_7x7', pretrained=True, in_chans=1, num_classes=5, **small)
    assert len(downloads) == 1
    stem = adapted.downsample_layers[0][0].weight
    assert stem.shape[1] == 1
    torch.testing.assert_close(stem, source.downsample_layers[0][0].weight.sum(1, keepdim=True))
    assert adapted.head.fc.out_features == 5
    features = timm.create_model('hornet_tiny_7x7', pretrained=True, features_only=True, **small)
    torch.testing.assert_close(features.model.stages[3][0].gamma1, source.stages[3][0].gamma1)
