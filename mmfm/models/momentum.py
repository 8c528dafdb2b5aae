"""Momentum (EMA) copy of a model, the teacher of ALBEF's distillation and the source of queue features."""

import copy

import torch
from torch import nn


class MomentumModel(nn.Module):
    """Holds a frozen deep copy of ``model`` (minus ``skip`` submodules) updated by EMA."""

    def __init__(self, model: nn.Module, momentum: float, skip: tuple[str, ...] = ()):
        super().__init__()
        self.momentum = momentum
        self.model = copy.deepcopy(model)
        for name in skip:
            setattr(self.model, name, None)
        self.model.requires_grad_(False)
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _parameter_pairs(self, online: nn.Module):
        if self._pairs is None:
            online_params = dict(online.named_parameters())
            self._pairs = [(p, online_params[n]) for n, p in self.model.named_parameters()]
        return self._pairs

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        pairs = self._parameter_pairs(online)
        ema = [p for p, _ in pairs]
        torch._foreach_mul_(ema, self.momentum)
        torch._foreach_add_(ema, [o.detach() for _, o in pairs], alpha=1 - self.momentum)

    def forward(self, *args, **kwargs):
        raise RuntimeError("call the wrapped model's methods through .model")
