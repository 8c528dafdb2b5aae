""" HorNet

Paper: `HorNet: Efficient High-Order Spatial Interactions with Recursive Gated Convolutions`
    - https://arxiv.org/abs/2207.14284

@inproceedings{rao2022hornet,
    title={HorNet: Efficient High-Order Spatial Interactions with Recursive Gated Convolutions},
    author={Rao, Yongming and Zhao, Wenliang and Tang, Yansong and Zhou, Jie and Lim, Ser-Nam and Lu, Jiwen},
    booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
    year={2022}
}

Original code: https://github.com/raoyongming/HorNet/blob/master/hornet.py (MIT License)

Changes from the original:
* timm model interface: classifier head is timm's `NormMlpClassifierHead` (official `norm.*` / `head.*`
  keys map to `head.norm.*` / `head.fc.*` in `checkpoint_filter_fn`; every other key is unchanged),
  `forward_intermediates`, `features_only`, gradient checkpointing, `reset_classifier`.
* The global filter runs its FFT in fp32 with autocast disabled and casts back, so it works (silently)
  under bf16/fp16 autocast; its complex weights are resized to any feature map size, as the original does.
* Channels-first LayerNorm is timm's `LayerNorm2d` (same math and keys); no debug prints.
"""
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath,
    LayerNorm2d,
    NormMlpClassifierHead,
    calculate_drop_path_rates,
    register_notrace_function,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models import load_pretrained as timm_load_pretrained
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ['HorNet']


def _global_filter_fp32(x: torch.Tensor, complex_weight: torch.Tensor) -> torch.Tensor:
    """ x * filter in the rfft2 domain, computed in fp32 (no FFT kernels for bf16), cast back to x's dtype. """
    H, W = x.shape[-2], x.shape[-1]
    freq = torch.fft.rfft2(x.float(), dim=(2, 3), norm='ortho')
    weight = complex_weight.float()
    if weight.shape[1:3] != freq.shape[2:4]:
        weight = F.interpolate(
            weight.permute(3, 0, 1, 2), size=freq.shape[2:4], mode='bilinear', align_corners=True,
        ).permute(1, 2, 3, 0)
    freq = freq * torch.view_as_complex(weight.contiguous())
    return torch.fft.irfft2(freq, s=(H, W), dim=(2, 3), norm='ortho').to(x.dtype)


@register_notrace_function  # reason: the weights are resized to the input's size (shape-dependent control flow)
def global_filter(x: torch.Tensor, complex_weight: torch.Tensor) -> torch.Tensor:
    """ The global filter in fp32 whatever autocast says (TorchScript runs no autocast, so no context there). """
    if torch.jit.is_scripting():
        return _global_filter_fp32(x, complex_weight)
    else:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _global_filter_fp32(x, complex_weight)


class GlobalLocalFilter(nn.Module):
    """ Depth-wise branch of the GF variant: half the channels see a 3x3 depth-wise conv, the other half
    a learned global filter in the 2D Fourier domain; the two halves are interleaved channel-wise.
    """

    def __init__(self, dim: int, h: int = 14, w: int = 8):
        super().__init__()
        self.dw = nn.Conv2d(dim // 2, dim // 2, kernel_size=3, padding=1, bias=False, groups=dim // 2)
        self.complex_weight = nn.Parameter(torch.zeros(dim // 2, h, w, 2))
        trunc_normal_(self.complex_weight, std=.02)
        self.pre_norm = LayerNorm2d(dim, eps=1e-6)
        self.post_norm = LayerNorm2d(dim, eps=1e-6)

    def global_filter(self, x: torch.Tensor) -> torch.Tensor:
        return global_filter(x, self.complex_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(x)
        x1, x2 = x.chunk(2, dim=1)
        x1 = self.dw(x1)
        x2 = self.global_filter(x2)
        x = torch.stack([x1, x2], dim=2).flatten(1, 2)  # interleave channels: x1[0], x2[0], x1[1], ...
        return self.post_norm(x)


class GnConv(nn.Module):
    """ Recursive gated convolution g^n Conv.

    proj_in maps C -> 2C, split into p (C / 2^(n-1) channels) and q_0..q_{n-1} (channel widths
    C / 2^(n-1), ..., C / 2, C). The q's go through one depth-wise filter (7x7 conv or global filter),
    scaled by `scale`; then x = p * q_0, x = pws_k(x) * q_{k+1} for k < n - 1, and proj_out(x).
    """

    def __init__(
            self,
            dim: int,
            order: int = 5,
            scale: float = 1.0 / 3.0,
            gf_size: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.dims = [dim // 2 ** i for i in range(order)][::-1]
        self.scale = scale
        self.proj_in = nn.Conv2d(dim, 2 * dim, 1)
        if gf_size is None:
            self.dwconv = nn.Conv2d(sum(self.dims), sum(self.dims), 7, padding=3, groups=sum(self.dims))
        else:
            self.dwconv = GlobalLocalFilter(sum(self.dims), *gf_size)
        self.pws = nn.ModuleList([nn.Conv2d(self.dims[i], self.dims[i + 1], 1) for i in range(order - 1)])
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.proj_in(x).split((self.dims[0], sum(self.dims)), dim=1)
        q = (self.dwconv(q) * self.scale).split(self.dims, dim=1)
        x = p * q[0]
        for i, pw in enumerate(self.pws):  # indexing q, not zip(pws, q[1:]): TorchScript and FX friendly
            x = pw(x) * q[i + 1]
        return self.proj_out(x)


class HorBlock(nn.Module):
    """ HorNet block: x + gamma1 * gnConv(LN(x)), then x + gamma2 * MLP(LN(x)), each with drop path. """

    def __init__(
            self,
            dim: int,
            order: int,
            scale: float = 1.0 / 3.0,
            gf_size: tuple[int, int] | None = None,
            mlp_ratio: float = 4.,
            ls_init_value: float = 1e-6,
            drop_path: float = 0.,
    ):
        super().__init__()
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        self.gnconv = GnConv(dim, order=order, scale=scale, gf_size=gf_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, int(mlp_ratio * dim))
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(int(mlp_ratio * dim), dim)
        self.gamma1 = nn.Parameter(ls_init_value * torch.ones(dim))
        self.gamma2 = nn.Parameter(ls_init_value * torch.ones(dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.gamma1[:, None, None] * self.gnconv(self.norm1(x)))
        y = self.pwconv2(self.act(self.pwconv1(self.norm2(x.permute(0, 2, 3, 1)))))
        return x + self.drop_path((self.gamma2 * y).permute(0, 3, 1, 2))


class HorNet(nn.Module):
    """ HorNet: a ConvNeXt-like 4-stage hierarchy whose token mixer is the recursive gated conv. """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            depths: Sequence[int] = (2, 3, 18, 2),
            base_dim: int = 64,
            orders: Sequence[int] = (2, 3, 4, 5),
            gf_sizes: Sequence[tuple[int, int] | None] = (None, None, None, None),
            scale: float = 1.0 / 3.0,
            mlp_ratio: float = 4.,
            ls_init_value: float = 1e-6,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            head_init_scale: float = 1.,
    ):
        """
        Args:
            in_chans: Number of input image channels.
            num_classes: Number of classes for the classification head (0: no classifier).
            global_pool: Global pooling type ('avg', 'max', ... or '' for none).
            depths: Number of blocks per stage.
            base_dim: Channels of the first stage; stage i has base_dim * 2^i.
            orders: gnConv order per stage.
            gf_sizes: Global-filter (h, w) per stage at the default input size, None for a 7x7 dwconv.
            scale: Scale s applied to the depth-wise output inside gnConv.
            mlp_ratio: MLP hidden ratio.
            ls_init_value: Layer-scale (gamma1/gamma2) initial value.
            drop_rate: Dropout before the classifier.
            drop_path_rate: Stochastic depth rate, linearly increasing over all blocks.
            head_init_scale: Scale applied to the initial classifier weights and bias.
        """
        super().__init__()
        dims = [base_dim * 2 ** i for i in range(4)]
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        self.downsample_layers = nn.ModuleList([
            nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        ] + [
            nn.Sequential(LayerNorm2d(dims[i], eps=1e-6), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2))
            for i in range(3)
        ])
        dpr = calculate_drop_path_rates(drop_path_rate, list(depths), stagewise=False)
        self.stages = nn.ModuleList()
        self.feature_info = []
        for i in range(4):
            self.stages.append(nn.Sequential(*[
                HorBlock(
                    dims[i],
                    order=orders[i],
                    scale=scale,
                    gf_size=gf_sizes[i],
                    mlp_ratio=mlp_ratio,
                    ls_init_value=ls_init_value,
                    drop_path=dpr[sum(depths[:i]) + j],
                )
                for j in range(depths[i])
            ]))
            self.feature_info.append({'num_chs': dims[i], 'reduction': 4 * 2 ** i, 'module': f'stages.{i}'})

        self.num_features = self.head_hidden_size = dims[-1]
        self.head = NormMlpClassifierHead(
            self.num_features,
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            norm_layer=partial(LayerNorm2d, eps=1e-6),
        )
        self.apply(self._init_weights)
        if isinstance(self.head.fc, nn.Linear):
            self.head.fc.weight.data.mul_(head_init_scale)
            self.head.fc.bias.data.mul_(head_init_scale)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            trunc_normal_(module.weight, std=.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """ Full names of the layer scales (1-D). Global-filter weights keep weight decay, as officially. """
        return {n for n, _ in self.named_parameters() if n.endswith(('.gamma1', '.gamma2'))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {
            'stem': r'^downsample_layers\.0',
            'blocks': r'^(?:downsample_layers|stages)\.(\d+)' if coarse else [
                (r'^downsample_layers\.(\d+)', (0,)),
                (r'^stages\.(\d+)\.(\d+)', None),
            ],
        }

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False):
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other, in_features=self.num_features)
        self.head_hidden_size = self.head.num_features

    def _run_stage(self, downsample: nn.Module, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str) -> None:
        """ Load an official or timm-layout checkpoint file (timm's `custom_load` hook, see `_official`):
        timm's `load_pretrained` on the file, so the classifier and input conv are adapted as for any
        timm model when num_classes / in_chans differ. """
        cfg = dict(self.pretrained_cfg, file=checkpoint_path, url=None, custom_load=False)
        timm_load_pretrained(
            self, cfg, num_classes=self.num_classes, in_chans=self.downsample_layers[0][0].in_channels,
            filter_fn=checkpoint_filter_fn,
        )

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """ Forward returning the stage outputs chosen by `indices` (last n if int, all if None).

        `norm` is accepted for API compatibility: HorNet's final norm acts on pooled features (in the
        head), so there is no feature-map norm to apply.
        """
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        num_stages = max_index + 1 if stop_early else len(self.stages)
        intermediates = []
        for i, (downsample, stage) in enumerate(zip(self.downsample_layers[:num_stages], self.stages[:num_stages])):
            x = self._run_stage(downsample, stage, x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: int | list[int] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """ Drop the stages (and the head) not needed for the given intermediates. """
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.downsample_layers = self.downsample_layers[:max_index + 1]
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_norm or prune_end:
            self.reset_classifier(0, '', reset_other=True)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # zip over the ModuleLists (TorchScript cannot index them with a loop variable); inlined, as
        # TorchScript cannot pass modules to a method either
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = downsample(x)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: HorNet) -> dict:
    """ Official HorNet checkpoint ({'model': state_dict}) -> this model: only the head is renamed. """
    state_dict = state_dict.get('model', state_dict)
    if 'head.fc.weight' in state_dict:
        return state_dict
    out = {}
    for k, v in state_dict.items():
        if k.startswith('norm.'):
            k = 'head.' + k
        elif k.startswith('head.'):
            k = 'head.fc.' + k[len('head.'):]
        out[k] = v
    return out


def _create_hornet(variant: str, pretrained: bool = False, **kwargs) -> HorNet:
    return build_model_with_cfg(
        HorNet,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg={'out_indices': (0, 1, 2, 3), 'feature_cls': 'getter'},
        **kwargs,
    )


def _cfg(url: str | tuple[str, str] = '', **kwargs) -> dict:
    return {
        'url': url,
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'downsample_layers.0.0', 'classifier': 'head.fc',
        'license': 'mit', 'paper_ids': 'arXiv:2207.14284',
        'origin_url': 'https://github.com/raoyongming/HorNet', **kwargs,
    }


def _official(share_id: str, file_name: str) -> dict:
    """ An official release on Tsinghua Cloud. Its link ends in `/?dl=1`, from which torch.hub would derive an
    empty file name (and try to load the cache directory), so the url is timm's (url, file name) pair; that
    form is downloaded by `download_cached_file`, timm's `custom_load` path, which hands the file to
    `HorNet.load_pretrained` (the official layout goes through `checkpoint_filter_fn` there). """
    return {'url': (f'https://cloud.tsinghua.edu.cn/f/{share_id}/?dl=1', file_name), 'custom_load': True}


default_cfgs = generate_default_cfgs({
    'hornet_tiny_7x7.in1k': _cfg(**_official('762f05c3c8cd4743b534', 'hornet_tiny_7x7.pth')),
    'hornet_tiny_gf.in1k': _cfg(**_official('395dd6c443ed4a339739', 'hornet_tiny_gf.pth')),
    'hornet_small_7x7.in1k': _cfg(**_official('9d7043023da14e4b8b2e', 'hornet_small_7x7.pth')),
})

# GF filter sizes at 224 px: stage 3 is 14x14 (rfft width 14 // 2 + 1 = 8), stage 4 is 7x7 (width 4).
_GF_SIZES = (None, None, (14, 8), (7, 4))


@register_model
def hornet_tiny_7x7(pretrained: bool = False, **kwargs) -> HorNet:
    """ HorNet-T 7x7 (22.4M). Official ImageNet recipe: drop_path_rate=0.2. """
    model_args = {'depths': (2, 3, 18, 2), 'base_dim': 64, 'orders': (2, 3, 4, 5)}
    return _create_hornet('hornet_tiny_7x7', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hornet_tiny_gf(pretrained: bool = False, **kwargs) -> HorNet:
    """ HorNet-T GF (23.0M): global filters in stages 3-4. Official ImageNet recipe: drop_path_rate=0.2. """
    model_args = {'depths': (2, 3, 18, 2), 'base_dim': 64, 'orders': (2, 3, 4, 5), 'gf_sizes': _GF_SIZES}
    return _create_hornet('hornet_tiny_gf', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def hornet_small_7x7(pretrained: bool = False, **kwargs) -> HorNet:
    """ HorNet-S 7x7 (49.5M). Official ImageNet recipe: drop_path_rate=0.4. """
    model_args = {'depths': (2, 3, 18, 2), 'base_dim': 96, 'orders': (2, 3, 4, 5)}
    return _create_hornet('hornet_small_7x7', pretrained=pretrained, **dict(model_args, **kwargs))
