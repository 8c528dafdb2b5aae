"""The run's objective: one ``TaskLoss`` per training stream on one shared model.

What the losses share lives here: the model, the momentum (EMA) model and the optimizer-step count that
the distillation ramp reads. The EMA update and the step count advance once per optimizer step
(``after_step``, called by the Trainer), whatever the number of streams or micro-batches.
"""

from __future__ import annotations

import torch
from torch import nn

from mmfm.config import ObjectiveConfig
from mmfm.engine.trainer import Objective
from mmfm.models.model import MMFM
from mmfm.models.momentum import MomentumModel
from mmfm.tasks.base import get_task


class TaskObjective(Objective):
    """``TaskObjective(model, settings, ["image_text", "vqa"], alpha_warmup_steps)``: the losses of the
    named task streams, with the ``objective`` config block's ``settings``."""

    def __init__(self, model: nn.Module, settings: ObjectiveConfig, streams, alpha_warmup_steps: int = 1):
        super().__init__()
        tasks = {name: get_task(name) for name in streams}
        self.model = model
        self.alpha, self.alpha_warmup_steps = settings.alpha, max(1, alpha_warmup_steps)
        self.momentum = None
        if any(task.needs_momentum(settings) for task in tasks.values()):
            self.momentum = MomentumModel(model, settings.momentum, skip=("answer_heads", "answer_pair_heads"))
        self.losses = nn.ModuleDict({name: task.build_loss(settings, model) for name, task in tasks.items()})
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, stream: str, batch: dict) -> dict:
        if stream not in self.losses:
            raise KeyError(f"unknown training stream {stream!r}; this run trains {', '.join(self.losses)}")
        return self.losses[stream](batch, self)

    def current_alpha(self) -> float:
        """ALBEF's distillation weight, ramped linearly over ``alpha_warmup_steps`` optimizer steps."""
        if self.momentum is None:
            return 0.0
        return self.alpha * min(1.0, int(self.step) / self.alpha_warmup_steps)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.momentum is not None:
            self.momentum.update(self.model)
        self.step += 1

    def fusion_parameters(self) -> list[nn.Parameter]:
        return self.model.fusion_parameters() if isinstance(self.model, MMFM) else []

    def parameter_parts(self) -> dict[str, list[nn.Parameter]]:
        return self.model.parameter_parts() if isinstance(self.model, MMFM) else {}

    def parameter_layers(self) -> dict[str, int]:
        if not isinstance(self.model, MMFM):
            return {}
        return {f"model.{name}": layer for name, layer in self.model.parameter_layers().items()}

    def trained_model(self) -> nn.Module:
        return self.model
