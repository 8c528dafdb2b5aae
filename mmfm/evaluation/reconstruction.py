"""Tokenizer metrics: reconstruction PSNR (``recon_psnr``, dB) and codebook usage (``code_usage``, a fraction)."""

import torch


def psnr(recon: torch.Tensor, target: torch.Tensor, mean, std) -> torch.Tensor:
    """PSNR in dB of each sample (B, ...) on [0, 1] pixels: both de-normalised with the channel ``mean`` /
    ``std`` of (..., 3, H, W) tensors, the reconstruction clamped to [0, 1] as a decoder's output is shown."""
    shape = (3, 1, 1)
    mean = torch.as_tensor(mean, dtype=recon.dtype, device=recon.device).view(shape)
    std = torch.as_tensor(std, dtype=recon.dtype, device=recon.device).view(shape)
    recon = (recon * std + mean).clamp(0, 1)
    mse = (recon - (target * std + mean)).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp(min=1e-10))


class CodeUsage:
    """How often every code of a codebook occurs; ``fraction()`` = codes used at least once / codebook size."""

    def __init__(self, codebook_size: int):
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, codes: torch.Tensor) -> None:
        self.counts += torch.bincount(codes.flatten().cpu(), minlength=len(self.counts))

    def fraction(self) -> float:
        return (self.counts > 0).float().mean().item()
