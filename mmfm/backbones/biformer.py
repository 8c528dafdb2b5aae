"""BiFormer: Vision Transformer with Bi-Level Routing Attention.

Paper: `BiFormer: Vision Transformer with Bi-Level Routing Attention` - https://arxiv.org/abs/2303.08810
Lei Zhu, Xinjiang Wang, Zhanghan Ke, Wayne Zhang, Rynson Lau (CVPR 2023).
Original code: https://github.com/rayleizhu/BiFormer (`models/biformer.py`, `ops/bra_legacy.py`,
`models/_common.py`), MIT license. This file is a re-implementation; it does not copy that code.

Bi-level routing attention (BRA): the (H, W) map is split into n_win x n_win regions; region queries/keys are
the means of the region's q/k; region affinity (q_r k_r^T, scaled by qk_dim^-0.5, gradient-free) keeps the
top-k regions per region; each region's tokens then attend to the tokens of its k routed regions (scale
qk_dim^-0.5 for every head, as the official code does), plus a depth-wise 5x5 conv of V (LCE/LePE).

What differs from the official code (outputs and weights are interchangeable):
* Memory layout only: the official `KVGather` copies K/V of every region's top-k regions at once, a
  (regions x topk x tokens x C) tensor (~100 GB reported at 600x500). Here `bra_chunked` (the default,
  `bra_impl='lean'`) walks the regions in chunks, gathers the routed K/V of one chunk at a time and runs
  fused SDPA, so neither the top-k K/V copy nor the attention matrix exists for all regions at once.
  `bra_gather` is the official all-at-once formulation, kept as the reference (`bra_impl='gather'`).
* Any input size: BRA zero-pads H, W to a multiple of n_win and crops back (the official `auto_pad`, off in
  its classification models; identical when the size divides).
* Module names follow timm: `Mlp` (official `mlp.0`/`mlp.3` -> `mlp.fc1`/`mlp.fc2`), `LayerScale`
  (`gamma1`/`gamma2` -> `ls1.gamma`/`ls2.gamma`), a flat qkv Linear (`attn.qkv.qkv` -> `attn.qkv`);
  `checkpoint_filter_fn` renames official checkpoints. Everything else keeps the official names.
* The last stage (topk=-2) is the official `AttentionLePE` as published: 8 heads, head_dim^-0.5 scale,
  no qkv bias and LePE applied to the attention *input* (not V); run with fused SDPA.
* Options that no published config uses (kv down-sampling, learned/differentiable/soft routing, post-norm,
  topk 0/-1 attention variants, representation layer) are left out.
"""
import re

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath,
    LayerScale,
    Mlp,
    SelectAdaptivePool2d,
    register_notrace_module,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ['BiFormer', 'BiLevelRoutingAttention', 'bra_chunked', 'bra_gather']


def _to_regions(x: torch.Tensor, n_win: int) -> torch.Tensor:
    """(N, n_win*h, n_win*w, C) -> (N, n_win^2, h*w, C), regions in row-major order."""
    N, H, W, C = x.shape
    x = x.reshape(N, n_win, H // n_win, n_win, W // n_win, C).transpose(2, 3)
    return x.reshape(N, n_win * n_win, (H // n_win) * (W // n_win), C)


def _from_regions(x: torch.Tensor, n_win: int, h: int, w: int) -> torch.Tensor:
    """(N, n_win^2, h*w, C) -> (N, n_win*h, n_win*w, C)."""
    N, _, _, C = x.shape
    x = x.reshape(N, n_win, n_win, h, w, C).transpose(2, 3)
    return x.reshape(N, n_win * h, n_win * w, C)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., L, C) -> (..., num_heads, L, C // num_heads)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., num_heads, L, c) -> (..., L, num_heads * c)."""
    return x.transpose(-3, -2).flatten(-2)


def bra_gather(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, num_heads: int, scale: float,
) -> torch.Tensor:
    """Reference token-to-token BRA, the official formulation: gather the K/V of every region's top-k at once.

    q, k: (N, R, T, Cqk), v: (N, R, T, Cv) per region; idx: (N, R, topk) routed regions. Returns (N, R, T, Cv).
    Materialises (N, R, topk, T, Cqk + Cv) K/V and the (N, R, heads, T, topk * T) attention matrix.
    """
    _, R, T, _ = q.shape
    kv = torch.cat([k, v], dim=-1)
    index = idx[..., None, None].expand(-1, -1, -1, T, kv.shape[-1])
    kv_sel = torch.gather(kv[:, None].expand(-1, R, -1, -1, -1), 2, index).flatten(2, 3)
    k_sel, v_sel = kv_sel.split([k.shape[-1], v.shape[-1]], dim=-1)
    q, k_sel, v_sel = _split_heads(q, num_heads), _split_heads(k_sel, num_heads), _split_heads(v_sel, num_heads)
    attn = ((q * scale) @ k_sel.transpose(-2, -1)).softmax(dim=-1)
    return _merge_heads(attn @ v_sel)


def bra_chunked(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, num_heads: int, scale: float,
        chunk: int | None = None,
) -> torch.Tensor:
    """Lean token-to-token BRA, same result as `bra_gather`.

    Query regions are processed `chunk` at a time (default: regions // (4 * topk), so one chunk's routed K/V is
    at most a quarter of K/V); each chunk gathers only its own routed regions and runs fused SDPA, which never
    builds the attention matrix. Results are written into one preallocated output.
    """
    N, R, T = q.shape[0], q.shape[1], q.shape[2]
    step = max(1, R // (4 * idx.shape[-1])) if chunk is None or chunk == 0 else chunk
    batch = torch.arange(N, device=q.device)[:, None, None]
    out = q.new_empty(N, R, T, v.shape[-1])
    for start in range(0, R, step):
        sel = idx[:, start:start + step]  # (N, c, topk)
        q_c = _split_heads(q[:, start:start + step], num_heads).flatten(0, 1)
        k_c = _split_heads(k[batch, sel].flatten(2, 3), num_heads).flatten(0, 1)  # (N c, heads, topk * T, C')
        v_c = _split_heads(v[batch, sel].flatten(2, 3), num_heads).flatten(0, 1)
        o = F.scaled_dot_product_attention(q_c, k_c, v_c, scale=scale)
        out[:, start:start + step] = _merge_heads(o).unflatten(0, (N, -1))
    return out


@register_notrace_module  # reason: FX can't trace the padding to n_win and the region-chunk loop (input-size control flow)
class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention on NHWC maps (official `attn` keys: qkv, wo, lepe)."""

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            n_win: int = 7,
            topk: int = 4,
            side_dwconv: int = 5,
            impl: str = 'lean',
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'BiFormer: dim {dim} must be divisible by num_heads {num_heads}')
        if not 0 < topk <= n_win * n_win:
            raise ValueError(f'BiFormer: topk {topk} must be in [1, n_win^2 = {n_win * n_win}]')
        if impl not in ('lean', 'gather'):
            raise ValueError(f"BiFormer: bra_impl must be 'lean' or 'gather', got {impl!r}")
        self.dim = self.qk_dim = dim
        self.num_heads = num_heads
        self.n_win = n_win
        self.topk = topk
        self.scale = self.qk_dim ** -0.5  # official: one scale for all heads, not head_dim ** -0.5
        self.impl = impl
        self.qkv = nn.Linear(dim, 2 * self.qk_dim + dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.wo = nn.Linear(dim, dim)

    def route(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Top-k region indices (N, R, topk) from region-mean q/k (N, R, T, C); not differentiable."""
        q_r, k_r = q.detach().mean(2), k.detach().mean(2)
        logits = (q_r * self.scale) @ k_r.transpose(-2, -1)
        return logits.topk(self.topk, dim=-1)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1], x.shape[2]
        pad_h, pad_w = -H % self.n_win, -W % self.n_win
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        h, w = (H + pad_h) // self.n_win, (W + pad_w) // self.n_win
        # project in region layout (as the official code): q, k, v are views, no per-tensor re-layout copies
        q, k, v = self.qkv(_to_regions(x, self.n_win)).split([self.qk_dim, self.qk_dim, self.dim], dim=-1)
        idx = self.route(q, k)
        if self.impl == 'gather':
            out = bra_gather(q, k, v, idx, self.num_heads, self.scale)
        else:
            out = bra_chunked(q, k, v, idx, self.num_heads, self.scale)
        lepe = self.lepe(_from_regions(v, self.n_win, h, w).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = _from_regions(out, self.n_win, h, w) + lepe
        return self.wo(out[:, :H, :W])


class AttentionLePE(nn.Module):
    """Full attention of the last stage (topk=-2), as the official `AttentionLePE` (NHWC in and out)."""

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, H, W, C = x.shape
        q, k, v = self.qkv(x.reshape(N, H * W, C)).view(N, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = _merge_heads(F.scaled_dot_product_attention(q, k, v)).view(N, H, W, C)  # scale head_dim ** -0.5
        return self.proj(out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class Block(nn.Module):
    """DWConv position encoding, then pre-norm attention and MLP on NHWC; NCHW in and out."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            n_win: int = 7,
            topk: int = 4,
            mlp_ratio: float = 3.,
            side_dwconv: int = 5,
            before_attn_dwconv: int = 3,
            layer_scale_init_value: float = -1.,
            drop_path: float = 0.,
            bra_impl: str = 'lean',
    ):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, before_attn_dwconv, padding=before_attn_dwconv // 2, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if topk > 0:
            self.attn = BiLevelRoutingAttention(dim, num_heads, n_win, topk, side_dwconv, impl=bra_impl)
        elif topk == -2:
            self.attn = AttentionLePE(dim, side_dwconv=side_dwconv)
        else:
            raise ValueError(f'BiFormer: topk must be > 0 (routing) or -2 (full attention), got {topk}')
        self.ls1 = LayerScale(dim, layer_scale_init_value) if layer_scale_init_value > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, layer_scale_init_value) if layer_scale_init_value > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x + self.pos_embed(x)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x.permute(0, 3, 1, 2)


def _downsample(in_chs: int, out_chs: int, stem: bool = False) -> nn.Sequential:
    """Overlapping 3x3/2 conv + BN; the stem is two of them (total stride 4) with a GELU between."""
    if not stem:
        return nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, 2, 1), nn.BatchNorm2d(out_chs))
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs // 2, 3, 2, 1), nn.BatchNorm2d(out_chs // 2), nn.GELU(),
        nn.Conv2d(out_chs // 2, out_chs, 3, 2, 1), nn.BatchNorm2d(out_chs),
    )


class BiFormer(nn.Module):
    """BiFormer; keyword names follow the official constructor."""

    def __init__(
            self,
            depth: tuple[int, ...] = (2, 2, 8, 2),
            embed_dim: tuple[int, ...] = (64, 128, 256, 512),
            head_dim: int = 32,
            topks: tuple[int, ...] = (1, 4, 16, -2),
            n_win: int = 7,
            mlp_ratios: tuple[float, ...] = (3, 3, 3, 3),
            side_dwconv: int = 5,
            before_attn_dwconv: int = 3,
            layer_scale_init_value: float = -1.,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            bra_impl: str = 'lean',
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = embed_dim[-1]
        self.grad_checkpointing = False
        self.downsample_layers = nn.ModuleList([_downsample(in_chans, embed_dim[0], stem=True)])
        self.downsample_layers.extend(_downsample(embed_dim[i], embed_dim[i + 1]) for i in range(len(depth) - 1))
        dpr = torch.linspace(0, drop_path_rate, sum(depth), device='cpu').tolist()  # cpu: also builds on meta
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i, (d, dim) in enumerate(zip(depth, embed_dim)):
            self.stages.append(nn.Sequential(*[Block(
                dim, dim // head_dim, n_win=n_win, topk=topks[i], mlp_ratio=mlp_ratios[i], side_dwconv=side_dwconv,
                before_attn_dwconv=before_attn_dwconv, layer_scale_init_value=layer_scale_init_value,
                drop_path=dpr[sum(depth[:i]) + j], bra_impl=bra_impl) for j in range(d)]))
            self.feature_info.append({'num_chs': dim, 'reduction': 2 ** (i + 2), 'module': f'stages.{i}'})
        self.norm = nn.BatchNorm2d(self.num_features)
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Nothing beyond biases/norms (1-D, excluded by timm's optimizer factory); the official
        {'pos_embed', 'cls_token'} matches no parameter name."""
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _forward_stage(self, downsample: nn.Module, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (NCHW); `norm` applies the final BatchNorm to the last stage's output."""
        if output_fmt != 'NCHW':
            raise ValueError(f"BiFormer: output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        intermediates = []
        num_stages = max_index + 1 if stop_early else len(self.stages)
        for i, (downsample, stage) in enumerate(zip(self.downsample_layers[:num_stages], self.stages[:num_stages])):
            x = self._forward_stage(downsample, stage, x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm and i == last_idx else x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if num_stages - 1 == last_idx else x), intermediates

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages (and norm/head) that the given intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.downsample_layers = self.downsample_layers[:max_index + 1]
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # zip over the ModuleLists, inlined: TorchScript can neither index them with a loop variable nor pass
        # modules to a method
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = downsample(x)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_OFFICIAL_RENAMES = (
    (r'\.attn\.qkv\.qkv\.', '.attn.qkv.'),
    (r'\.mlp\.0\.', '.mlp.fc1.'),
    (r'\.mlp\.3\.', '.mlp.fc2.'),
    (r'\.gamma([12])$', r'.ls\1.gamma'),
)


def checkpoint_filter_fn(state_dict: dict, model: BiFormer) -> dict:
    """Official checkpoint (`{'model': state_dict}` or the bare state dict) -> this model's keys."""
    state_dict = state_dict.get('model', state_dict)
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _OFFICIAL_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _create_biformer(variant: str, pretrained: bool = False, **kwargs) -> BiFormer:
    return build_model_with_cfg(
        BiFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={'out_indices': (0, 1, 2, 3), 'feature_cls': 'getter'},
        **kwargs)


def _cfg(url: str = '', **kwargs) -> dict:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'downsample_layers.0.0', 'classifier': 'head', 'license': 'mit',
        'paper_ids': 'arXiv:2303.08810', 'origin_url': 'https://github.com/rayleizhu/BiFormer', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # official release links (unreachable offline): load a local file with pretrained_cfg_overlay=dict(file=PATH)
    'biformer_tiny.in1k': _cfg(url='https://matix.li/e36fe9fb086c'),
    'biformer_small.in1k': _cfg(url='https://matix.li/5bb436318902'),
})


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-T: 13.1M params, 81.4 top-1 (official table)."""
    model_args = {'depth': (2, 2, 8, 2), 'embed_dim': (64, 128, 256, 512), 'head_dim': 32, 'topks': (1, 4, 16, -2)}
    return _create_biformer('biformer_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def biformer_small(pretrained: bool = False, **kwargs) -> BiFormer:
    """BiFormer-S: 25.5M params, 83.8 top-1 (official table)."""
    model_args = {'depth': (4, 4, 18, 4), 'embed_dim': (64, 128, 256, 512), 'head_dim': 32, 'topks': (1, 4, 16, -2)}
    return _create_biformer('biformer_small', pretrained=pretrained, **dict(model_args, **kwargs))
