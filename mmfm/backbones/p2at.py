""" P2AT: Pyramid Pooling Axial Transformer

Paper:
* `P2AT: Pyramid Pooling Axial Transformer for Real-time Semantic Segmentation`
  - Elhassan, Zhou, Benabid, Adam, 2023 - https://arxiv.org/abs/2310.15025

Original code: https://github.com/mohamedac29/P2AT (models/P2AT.py, models/common_blocks.py;
no trained weights released). This is a rewrite for timm, not a port of the original weights.

Architecture (top to bottom in this file):
* encoder: timm ResNet-18 (`p2at_small`) / ResNet-34 (`p2at_medium`) stem + 4 stages,
  strides 4, 8, 16, 32, widths 64, 128, 256, 512.
* context (PPAA): the stride-32 map is reduced to `embed_dim` channels and run through
  `depth` pyramid-pooling axial-attention blocks. Each block pools the map with cascaded
  stride-1 average pools (3, 5, 7: the pyramid of receptive fields, resolution kept so rows and
  columns survive at any input size), runs squeezed axial self-attention on the pooled map (row
  attention over H on the width-mean and column attention over W on the height-mean, each with
  a learned 1D position embedding interpolated to the current length), broadcasts both back onto
  the values, projects, and gates the result with a local detail branch; then a conv MLP.
  Row and column attention read the same pooled q/k/v and are summed (as in the original code),
  rather than chained, so neither waits on the other.
* decoder: two Bidirectional Fusion (BiF) modules. Each combines a shallow stage (bottom-up
  detail), the next stage (same-level semantics) and the decoded deeper map (top-down context)
  at the shallow resolution: fuse(cat(d, s, u)) + s * u + d * sigmoid(s). A Global Context
  Enhancer (image-level pooled context added back) and a ConvNeXt-like decoder block
  (depthwise k = 3, 5, 7 for the three decoder levels) follow each level.
* a multi-scale fusion merges the stride-4, 8 and 32 decoded maps at stride 4; the
  segmentation head (BN-ReLU-3x3 conv-BN-ReLU-1x1 conv) gives `num_classes` logits, upsampled
  bilinearly to the input size (any size, odd sizes included).

Changes from the original code:
* the paper does not give decoder widths; the original code uses 64 everywhere. Here the width is
  `embed_dim` (104 for the small/medium models), which puts `p2at_small` at 12.63M parameters
  (11 classes; ResNet-18 trunk 11.18M of it), within 1% of the ~12.7M reported for P2AT-S.
* the BiF detail gate is d * sigmoid(s) (original: sigmoid(s * d)); the detail/up branches are
  plain 1x1 ConvNormAct instead of the original LFR/SFU sub-blocks; the Global Context Enhancer
  uses two biased 1x1 convs (no BatchNorm on a 1x1 map, so batch size 1 trains).
* the auxiliary training heads are left out (the training loop owns losses); PReLU -> ReLU.
* `forward_features` returns the final fused stride-4 decoder map (what the head consumes);
  `forward_intermediates` / `features_only` return the 4 encoder stages and the PPAA context map
  (strides 4, 8, 16, 32, 32). The stride-8/4 decoder maps are not listed there because timm's
  FeatureInfo requires non-decreasing strides; the stride-4 one is `forward_features`.
"""
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    ConvNormAct,
    DropPath,
    LayerScale2d,
    calculate_drop_path_rates,
    register_notrace_function,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ['P2AT']


def _check_no_pool(global_pool: str | None) -> None:
    if global_pool:
        raise ValueError(f"P2AT predicts a dense map and has no global pooling: global_pool must be '' or None, "
                         f"got {global_pool!r}")


@register_notrace_function  # reason: FX can't trace the size comparison; a public name, as FX autowraps no `_name`
def resize_to(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    if list(x.shape[-2:]) == list(size):
        return x
    return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


class PyramidPool(nn.Module):
    """ Cascaded stride-1 average pools; the maps of all scales are fused by a 1x1 conv. """

    def __init__(self, dim: int, kernel_sizes: tuple[int, ...] = (3, 5, 7)):
        super().__init__()
        self.pools = nn.ModuleList([
            nn.AvgPool2d(k, stride=1, padding=k // 2, count_include_pad=False) for k in kernel_sizes])
        self.fuse = ConvNormAct(dim * len(kernel_sizes), dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = []
        for pool in self.pools:
            x = pool(x)
            maps.append(x)
        return self.fuse(torch.cat(maps, dim=1))


class AxialPosEmbed(nn.Module):
    """ Learned 1D position embedding, linearly interpolated to the axis length. """

    def __init__(self, dim: int, length: int = 16):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(1, dim, length))
        trunc_normal_(self.pos, std=.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.interpolate(self.pos, size=x.shape[-1], mode='linear', align_corners=False)


class PyramidAxialAttention(nn.Module):
    """ PPAA: squeezed row / column self-attention on the pyramid-pooled map, gated by local detail. """

    def __init__(self, dim: int, num_heads: int = 8, key_dim: int = 16, attn_ratio: float = 2.):
        super().__init__()
        self.num_heads = num_heads
        self.qk_dim = key_dim * num_heads
        self.v_dim = int(attn_ratio * key_dim) * num_heads
        self.pyramid = PyramidPool(dim)
        self.qkv = nn.Conv2d(dim, 2 * self.qk_dim + self.v_dim, 1)
        self.pos_q = nn.ModuleList([AxialPosEmbed(self.qk_dim) for _ in range(2)])
        self.pos_k = nn.ModuleList([AxialPosEmbed(self.qk_dim) for _ in range(2)])
        self.proj = ConvNormAct(self.v_dim, dim, 1)
        self.detail = nn.Sequential(
            ConvNormAct(dim, dim, 1, apply_act=False),
            ConvNormAct(dim, dim, 3, groups=dim),
        )

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """ Self-attention along one spatial axis of (B, C, L) sequences squeezed from the other axis. """
        B, _, L = q.shape
        q = q.reshape(B, self.num_heads, -1, L).transpose(-1, -2)
        k = k.reshape(B, self.num_heads, -1, L).transpose(-1, -2)
        v = v.reshape(B, self.num_heads, -1, L).transpose(-1, -2)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(-1, -2).reshape(B, self.v_dim, L)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.pyramid(x)).split([self.qk_dim, self.qk_dim, self.v_dim], dim=1)
        # position embeddings by literal index: TorchScript cannot index a ModuleList with a variable
        rows = self._attend(self.pos_q[0](q.mean(-1)), self.pos_k[0](k.mean(-1)), v.mean(-1))  # (B, Cv, H)
        cols = self._attend(self.pos_q[1](q.mean(-2)), self.pos_k[1](k.mean(-2)), v.mean(-2))  # (B, Cv, W)
        out = v + rows.unsqueeze(-1) + cols.unsqueeze(-2)
        return self.proj(out) * self.detail(x)


class ConvMlp(nn.Module):
    """ 1x1 expand, 3x3 depthwise, act, 1x1 project. """

    def __init__(self, dim: int, mlp_ratio: float = 4.):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = ConvNormAct(dim, hidden, 1, apply_act=False)
        self.dw = ConvNormAct(hidden, hidden, 3, groups=hidden)
        self.fc2 = ConvNormAct(hidden, dim, 1, apply_act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dw(self.fc1(x)))


class PPAABlock(nn.Module):
    """ Transformer block: pyramid-pooled axial attention, then conv MLP, both residual. """

    def __init__(self, dim: int, num_heads: int = 8, key_dim: int = 16, mlp_ratio: float = 4.,
                 drop_path: float = 0.):
        super().__init__()
        self.attn = PyramidAxialAttention(dim, num_heads=num_heads, key_dim=key_dim)
        self.mlp = ConvMlp(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x))
        return x + self.drop_path(self.mlp(x))


class DecoderBlock(nn.Module):
    """ ConvNeXt-like block: kxk depthwise + BN, inverted 1x1 MLP, layer scale, residual. """

    def __init__(self, dim: int, kernel_size: int, expansion: int = 4, init_values: float = 1e-6):
        super().__init__()
        self.dw = ConvNormAct(dim, dim, kernel_size, groups=dim, bias=True, apply_act=False)
        self.pw1 = nn.Conv2d(dim, dim * expansion, 1)
        self.act = nn.Hardswish()
        self.pw2 = nn.Conv2d(dim * expansion, dim, 1)
        self.ls = LayerScale2d(dim, init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ls(self.pw2(self.act(self.pw1(self.dw(x)))))


class GlobalContextEnhancer(nn.Module):
    """ Adds image-level (globally pooled) context back onto every position. """

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, dim, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))


class BiFusion(nn.Module):
    """ Bidirectional fusion of shallow detail (bottom-up), same-level and deep context (top-down). """

    def __init__(self, detail_chs: int, skip_chs: int, dim: int):
        super().__init__()
        self.detail = ConvNormAct(detail_chs, dim, 1)
        self.skip = ConvNormAct(skip_chs, dim, 1, apply_act=False)
        self.up = ConvNormAct(dim, dim, 1)
        self.fuse = ConvNormAct(3 * dim, dim, 1, apply_act=False)

    def forward(self, detail: torch.Tensor, skip: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        d = self.detail(detail)
        s = resize_to(self.skip(skip), d.shape[-2:])
        u = resize_to(self.up(up), d.shape[-2:])
        return self.fuse(torch.cat([d, s, u], dim=1)) + s * u + d * s.sigmoid()


class MultiScaleFusion(nn.Module):
    """ Merges the stride-4 map with the upsampled stride-8 and stride-32 maps. """

    def __init__(self, dim: int):
        super().__init__()
        self.fuse_mid = ConvNormAct(2 * dim, dim, 3)
        self.fuse_deep = ConvNormAct(2 * dim, dim, 3)

    def forward(self, fine: torch.Tensor, mid: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        size = fine.shape[-2:]
        x = self.fuse_mid(torch.cat([fine, resize_to(mid, size)], dim=1))
        return self.fuse_deep(torch.cat([x, resize_to(deep, size)], dim=1))


class SegHead(nn.Module):
    """ BN-ReLU-3x3 conv-BN-ReLU, then a 1x1 classifier conv. """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.pre = nn.Sequential(
            nn.BatchNorm2d(dim), nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU())
        self.fc = nn.Conv2d(dim, num_classes, 1) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre(x)
        return x if pre_logits else self.fc(x)


class P2AT(nn.Module):
    """ P2AT segmentation network: ResNet encoder, PPAA context, BiF decoder, segmentation head.

    timm's model interface with a dense (segmentation) output, where a classifier returns (B, num_classes):
    * `forward(x)`: logits (B, num_classes, H, W) at the input size; with num_classes=0, the pre-logits map
      (B, num_features, H/4, W/4), as `forward_head(forward_features(x), pre_logits=True)`.
    * `forward_features(x)`: the fused decoder map (B, num_features, H/4, W/4) (NCHW, `pool_size` None:
      no pooled size); `forward_head(x, pre_logits, size)`: the head, resized to `size` if given.
    * `reset_classifier(n)` / `get_classifier()`: the 1x1 classifier conv (`head.fc`, the cfg `classifier`);
      `global_pool` is accepted as '' / None only.
    Intermediate maps (`forward_intermediates`, `features_only`), in order: encoder stages
    (stride 4, 8, 16, 32), then the PPAA context (stride 32, `embed_dim` channels).
    """

    def __init__(
            self,
            encoder: str = 'resnet18',
            in_chans: int = 3,
            num_classes: int = 11,
            embed_dim: int = 104,
            depth: int = 2,
            num_heads: int = 8,
            key_dim: int = 16,
            mlp_ratio: float = 4.,
            drop_path_rate: float = 0.,
            pretrained_encoder: bool = False,
            global_pool: str = '',
    ):
        """
        Args:
            encoder: timm ResNet name used as the CNN encoder.
            in_chans: input channels.
            num_classes: segmentation classes (logit channels).
            embed_dim: width of the context and decoder.
            depth: number of PPAA blocks.
            num_heads, key_dim: attention heads and per-head query/key width in PPAA.
            mlp_ratio: PPAA MLP expansion.
            drop_path_rate: stochastic depth over the PPAA blocks.
            pretrained_encoder: load timm's ImageNet weights into the encoder (needs the HF hub).
            global_pool: only '' (timm's keyword for "no pooling"; a dense model has none).
        """
        super().__init__()
        _check_no_pool(global_pool)
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = embed_dim
        self.grad_checkpointing = False

        resnet = timm.create_model(encoder, pretrained=pretrained_encoder, in_chans=in_chans)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.act1, resnet.maxpool)
        self.stages = nn.ModuleList([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4])
        enc_chs = [stage[-1].conv2.out_channels for stage in self.stages]

        self.reduce = ConvNormAct(enc_chs[3], embed_dim, 1)
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.context = nn.Sequential(*[
            PPAABlock(embed_dim, num_heads, key_dim, mlp_ratio, drop_path=dpr[i]) for i in range(depth)])
        self.dec32 = DecoderBlock(embed_dim, kernel_size=3)
        self.bif8 = BiFusion(enc_chs[1], enc_chs[2], embed_dim)
        self.dec8 = nn.Sequential(GlobalContextEnhancer(embed_dim), DecoderBlock(embed_dim, kernel_size=5))
        self.bif4 = BiFusion(enc_chs[0], enc_chs[1], embed_dim)
        self.dec4 = nn.Sequential(GlobalContextEnhancer(embed_dim), DecoderBlock(embed_dim, kernel_size=7))
        self.fusion = MultiScaleFusion(embed_dim)
        self.head = SegHead(embed_dim, num_classes)

        self.feature_info = [
            {'num_chs': c, 'reduction': r, 'module': f'stages.{i}'} for i, (c, r) in enumerate(zip(enc_chs, (4, 8, 16, 32)))
        ] + [{'num_chs': embed_dim, 'reduction': 32, 'module': 'context'}]
        self._init_decoder()

    def _init_decoder(self):
        for name, m in self.named_modules():
            if name.startswith(('stem', 'stages')):
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        """ New 1x1 classifier conv (none for 0); `global_pool` only '' / None: a dense model has no pooling. """
        _check_no_pool(global_pool)
        self.num_classes = num_classes
        self.head.fc = nn.Conv2d(self.num_features, num_classes, 1) if num_classes > 0 else nn.Identity()

    # Gradient checkpointing wraps each module call. The `if self.grad_checkpointing and not
    # torch.jit.is_scripting()` tests are spelled out at each call site because TorchScript drops such a branch
    # only when the test is written in it (and cannot pass modules to a helper method).
    def _encode(self, x: torch.Tensor, last_index: int = 4) -> list[torch.Tensor]:
        """ Encoder stage maps, then the PPAA context map, up to `last_index`. """
        x = checkpoint(self.stem, x) if self.grad_checkpointing and not torch.jit.is_scripting() else self.stem(x)
        maps: list[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            if i <= last_index:
                x = checkpoint(stage, x) if self.grad_checkpointing and not torch.jit.is_scripting() else stage(x)
                maps.append(x)
        if last_index == 4:
            x = self.reduce(x)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                maps.append(checkpoint(self.context, x))
            else:
                maps.append(self.context(x))
        return maps

    def _decode(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """ BiF decoder: encoder stage maps + context -> fused stride-4 map. """
        e4, e8, e16, context = maps[0], maps[1], maps[2], maps[4]
        if self.grad_checkpointing and not torch.jit.is_scripting():
            p32 = checkpoint(self.dec32, context)
            p8 = checkpoint(self.dec8, checkpoint(self.bif8, e8, e16, p32))
            p4 = checkpoint(self.dec4, checkpoint(self.bif4, e4, e8, p8))
            return checkpoint(self.fusion, p4, p8, p32)
        p32 = self.dec32(context)
        p8 = self.dec8(self.bif8(e8, e16, p32))
        p4 = self.dec4(self.bif4(e4, e8, p8))
        return self.fusion(p4, p8, p32)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """ Forward returning intermediate maps (see class docstring for their order).

        Args:
            x: input images (B, C, H, W).
            indices: take last n maps if int, those listed if a sequence, all if None.
            norm: unused (no final norm), kept for the timm interface.
            stop_early: stop after the last requested map (then the final output is that map).
            output_fmt: only 'NCHW'.
            intermediates_only: return only the intermediate maps.
        """
        assert output_fmt == 'NCHW', 'Output format must be NCHW.'
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        last_index = max_index if stop_early or intermediates_only else 4
        maps = self._encode(x, last_index)
        intermediates = [maps[i] for i in take_indices]
        if intermediates_only:
            return intermediates
        return (self._decode(maps) if last_index == 4 else maps[-1]), intermediates

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """ Drop what the requested maps do not need: the head and decoder, then later stages. """
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        if prune_head:
            for name in ('dec32', 'bif8', 'dec8', 'bif4', 'dec4', 'fusion', 'head'):
                setattr(self, name, nn.Identity())
            self.num_classes = 0
        if max_index < 4:
            self.stages = self.stages[:max_index + 1]
            self.reduce, self.context = nn.Identity(), nn.Identity()
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """ Final fused decoder map, (B, embed_dim, H/4, W/4). """
        return self._decode(self._encode(x))

    def forward_head(
            self,
            x: torch.Tensor,
            pre_logits: bool = False,
            size: list[int] | None = None,
    ) -> torch.Tensor:
        """ Segmentation logits at the feature resolution, or bilinearly resized to `size`.

        Without a classifier (num_classes=0) this is the pre-logits map, never resized (timm: a model with
        its classifier removed returns what `forward_head(pre_logits=True)` does).
        """
        x = self.head(x, pre_logits=pre_logits)
        if pre_logits or self.num_classes == 0 or size is None:
            return x
        return resize_to(x, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x), size=x.shape[-2:])


def _create_p2at(variant: str, pretrained: bool = False, **kwargs) -> P2AT:
    out_indices = kwargs.pop('out_indices', tuple(range(5)))
    return build_model_with_cfg(
        P2AT,
        variant,
        pretrained,
        feature_cfg={'feature_cls': 'getter', 'out_indices': out_indices},
        **kwargs,
    )


def _cfg(url: str = '', **kwargs):
    return {
        'url': url,
        'num_classes': 11, 'input_size': (3, 720, 960), 'pool_size': None,
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0', 'classifier': 'head.fc',
        'paper_ids': 'arXiv:2310.15025', 'paper_name': 'P2AT: Pyramid Pooling Axial Transformer',
        'origin_url': 'https://github.com/mohamedac29/P2AT',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'p2at_small.untrained': _cfg(),
    'p2at_medium.untrained': _cfg(),
})


@register_model
def p2at_small(pretrained: bool = False, **kwargs) -> P2AT:
    """ P2AT-S: ResNet-18 encoder. """
    model_args = {'encoder': 'resnet18', 'embed_dim': 104}
    return _create_p2at('p2at_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def p2at_medium(pretrained: bool = False, **kwargs) -> P2AT:
    """ P2AT-M: ResNet-34 encoder. """
    model_args = {'encoder': 'resnet34', 'embed_dim': 104}
    return _create_p2at('p2at_medium', pretrained=pretrained, **dict(model_args, **kwargs))
