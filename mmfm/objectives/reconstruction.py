"""Reconstruction losses of the video tokenizer: L1 and L2 on pixels, and a perceptual distance on the features
of a small fixed convolutional net.

No pretrained perceptual network (LPIPS' VGG) can be downloaded at run time, so ``ConvFeatures`` is a seeded,
never-trained conv net: its multi-scale responses to edges and textures still penalise a blurred
reconstruction more than an L2 on pixels does (random-weight features as a perceptual loss: He, Wang and
Hopcroft 2016).
"""

import torch
import torch.nn.functional as F
from torch import nn


def reconstruction_losses(recon: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean absolute and mean squared error over every pixel (any matching shapes)."""
    error = recon - target
    return {"recon_l1": error.abs().mean(), "recon_l2": error.pow(2).mean()}


class ConvFeatures(nn.Module):
    """Three 3x3 stride-2 convs with ReLU, weights fixed from ``seed`` (no gradient, no state to save)."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        fan_ins = (3, *channels[:-1])
        for k, (fan_in, fan_out) in enumerate(zip(fan_ins, channels)):
            weight = torch.randn(fan_out, fan_in, 3, 3, generator=generator) * (2.0 / (9 * fan_in)) ** 0.5
            self.register_buffer(f"weight{k}", weight, persistent=False)

    def forward(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) -> the ReLU output of every conv."""
        features, x = [], frames
        for weight in self.buffers():
            x = F.relu(F.conv2d(x, weight, stride=2, padding=1))
            features.append(x)
        return features


def perceptual_loss(net: ConvFeatures, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared distance between the features of (N, 3, H, W) frames, summed over the net's layers."""
    with torch.no_grad():
        wanted = net(target)
    return sum(F.mse_loss(got, want) for got, want in zip(net(recon), wanted))
