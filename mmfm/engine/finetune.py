"""Fine-tuning controls: frozen parts (``train.freeze``), layer-wise lr decay (``train.layer_decay``) and an
EMA of the weights for evaluation (``train.ema_decay``).

The objective declares what they act on (``Objective.parameter_parts``, ``parameter_layers``,
``trained_model``), so nothing here knows a concrete model. The weight EMA is not the momentum encoder of
ALBEF's objective: that one is a teacher inside the loss; this one only replaces the weights a run saves.
"""

from functools import partial
from pathlib import Path

from safetensors.torch import load_model, save_model
from timm.utils import ModelEmaV3
from torch import nn

from mmfm.errors import ConfigError, ModelError

EMA_FILE = "ema.safetensors"  # the EMA's state in a run checkpoint directory


def freeze_parts(objective: nn.Module, names: list[str]) -> None:
    """``requires_grad=False`` on the parameters of the objective's parts ``names``.

    Frozen modules keep the objective's train mode: dropout / drop-path still act in them, and the
    batch-norm statistics of a backbone tokenizer still update (only the parameters are fixed).
    """
    parts = objective.parameter_parts()
    for name in names:
        if name not in parts:
            valid = f"use {', '.join(parts)}" if parts else "this model declares no parts; leave it empty"
            raise ConfigError(f"train.freeze: {name!r} is not a part of the model; {valid}")
        for param in parts[name]:
            param.requires_grad_(False)


def layer_lr_scales(objective: nn.Module, decay: float) -> dict[str, float]:
    """Parameter name -> lr multiplier of layer-wise lr decay (BEiT; timm's ``param_groups_layer_decay``):
    ``decay ** (top - layer)``, where ``top`` is the deepest layer the objective declares (the heads keep
    the lr, each layer below gets one more factor). {} when ``decay`` is 1."""
    if decay == 1:
        return {}
    layers = objective.parameter_layers()
    if not layers:
        raise ConfigError(f"train.layer_decay={decay}: this model declares no layers to decay over; "
                          "set train.layer_decay=1")
    top = max(layers.values())
    return {name: decay ** (top - layer) for name, layer in layers.items()}


def weight_ema(accelerator, model: nn.Module, decay: float) -> ModelEmaV3 | None:
    """An EMA of ``model``'s weights (None when ``decay`` is 0), kept in the run checkpoints as ``EMA_FILE``.

    ``update(model, step=optimizer_step)`` after every optimizer step: step 1 copies the weights, then the
    decay warms up as ``1 - (1 + step)^(-2/3)`` up to ``decay`` (timm's ``use_warmup``), so a short run is
    not an average dominated by its starting weights. The state goes through accelerate's save/load-state
    hooks as safetensors, not ``register_for_checkpointing``, whose files accelerate unpickles with
    ``weights_only=False``.
    """
    if decay <= 0:
        return None
    # exclude_buffers: the other path walks state_dict(), which lists a tied tensor once per name (the MLM
    # head's decoder is the token embedding) and so moves it two or three times per update.
    ema = ModelEmaV3(model, decay=decay, use_warmup=True, exclude_buffers=True)
    accelerator.register_save_state_pre_hook(partial(_save_ema, ema, accelerator.is_main_process))
    accelerator.register_load_state_pre_hook(partial(_load_ema, ema))
    return ema


def _save_ema(ema: ModelEmaV3, main_process: bool, models, weights, directory: str) -> None:
    if main_process:
        save_model(ema.module, str(Path(directory) / EMA_FILE))


def _load_ema(ema: ModelEmaV3, models, directory: str) -> None:
    path = Path(directory) / EMA_FILE
    if not path.is_file():
        raise ModelError(f"{EMA_FILE} is missing, so the checkpoint was written without a weight EMA; resume "
                         "with train.ema_decay=0, or start the run again with it")
    load_model(ema.module, str(path))
