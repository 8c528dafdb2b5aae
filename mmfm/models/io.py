"""The ONE model I/O module: the checkpoint format, saving, loading and reading a checkpoint's metadata.

An mmfm checkpoint is ONE safetensors file. Its metadata holds, as JSON: the architecture under
``mmfm_arch`` (a ``model`` config block, ``family`` included), the preprocessing under ``mmfm_preprocess``
(image size, mean, std, frames), the answer lists of the answer heads under ``mmfm_answers``, and the format
version under ``mmfm_format``. The run's training knobs are not in it. Foreign weights load from safetensors
or from pickles through ``torch.load(weights_only=True)`` only: nothing here ever unpickles code.
Every error is a ``ModelError`` naming the file. torch is imported on first load, so ``mmfm zoo
list/verify`` and the downloader start fast.

A stored architecture (a checkpoint's metadata, a zoo entry's ``architecture``) is data from a file, not an
instruction: its keys must be the fields of ``ModelConfig`` / ``SegmentationModelConfig`` /
``TokenizerModelConfig`` (anything else is a ``ModelError``), and the backbone / vision-tokenizer kwargs that
name a weight source (``WEIGHT_SOURCE_KEYS``: a URL, a file, a Hub id, a cache folder, ``pretrained``, a
C-ViViT ``checkpoint``) are dropped, so building it never downloads or opens anything; the weights come from
the checkpoint.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from mmfm.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch
    from torch import nn

ARCH_KEY = "mmfm_arch"
PREPROCESS_KEY = "mmfm_preprocess"
ANSWERS_KEY = "mmfm_answers"
FORMAT_KEY = "mmfm_format"
FORMAT_VERSION = "2"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
# Backbone kwargs that say where weights come from: ``timm.create_model``'s own (pretrained_cfg and its overlay
# may hold a url / file / hf_hub_id; checkpoint_path is opened even without ``pretrained``) and mmfm's
# pretrained_file, and the cvivit vision tokenizer's checkpoint (a trunk stores that tokenizer's architecture and
# weights itself). tests/test_zoo_model.py checks that every I/O parameter of timm.create_model is listed.
WEIGHT_SOURCE_KEYS = frozenset({"pretrained", "pretrained_file", "pretrained_cfg", "pretrained_cfg_overlay",
                                "checkpoint_path", "cache_dir", "checkpoint"})
# The kwargs block of each family that may name a weight source (a tokenizer model has none).
WEIGHT_KWARGS = {"mmfm": "vision_tokenizer_kwargs", "segmentation": "backbone_kwargs"}


@dataclass
class CheckpointInfo:
    """What a checkpoint says about its model, read from the metadata alone."""

    arch: dict
    preprocess: dict
    answers: dict


def save_model(model: nn.Module, path: str | Path) -> None:
    """Weights + architecture + preprocessing + answer lists in one safetensors file, written atomically."""
    from safetensors.torch import save_model as save_safetensors

    from mmfm.fileio import atomic_path

    metadata = {ARCH_KEY: json.dumps(model.arch_dict()), PREPROCESS_KEY: json.dumps(model.preprocess),
                ANSWERS_KEY: json.dumps(model.answers), FORMAT_KEY: FORMAT_VERSION}
    with atomic_path(path) as tmp:
        save_safetensors(model, str(tmp), metadata=metadata)


def build_model(arch, answers: dict | None = None, preprocess: dict | None = None,
                attention_backend: str = "auto") -> nn.Module:
    """A fresh model of architecture ``arch`` (a ModelConfig / SegmentationModelConfig / TokenizerModelConfig)
    by its family."""
    if arch.family == "segmentation":
        from mmfm.models.segmentation import SegmentationModel

        return SegmentationModel(arch.backbone, arch.num_classes, arch.backbone_kwargs, preprocess)
    if arch.family == "tokenizer":
        from mmfm.tokenizers.cvivit import CViViT

        return CViViT(arch, preprocess, attention_backend)
    from mmfm.models.model import MMFM

    return MMFM(arch, answers, preprocess, attention_backend=attention_backend)


def load_model(path: str | Path, attention_backend: str = "auto") -> nn.Module:
    """The model saved by ``save_model`` at ``path`` (a file, or a run directory holding model.safetensors),
    rebuilt from its metadata and loaded strictly, in eval mode."""
    path = checkpoint_file(path)
    info = read_info(path)
    return load_weights(build_stored(info.arch, path, info.answers, info.preprocess, attention_backend), path)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """``model`` with the weights of the safetensors file ``path``, loaded strictly, in eval mode."""
    from safetensors.torch import load_model as load_safetensors

    try:
        load_safetensors(model, str(path), strict=True)
    except (RuntimeError, OSError, ValueError, SafetensorError) as err:
        raise ModelError(f"{path}: weights do not fit the architecture they are loaded into: {err}") from None
    return model.eval()


def checkpoint_file(path: str | Path) -> Path:
    """``path`` itself, or the model.safetensors of a run directory."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise ModelError(f"{path}: no such checkpoint; pass a .safetensors file or a run directory "
                         "written by `mmfm train` (it holds model.safetensors)")
    return file


def read_info(path: str | Path) -> CheckpointInfo:
    """Architecture, preprocessing and answer lists of an mmfm checkpoint, without loading its tensors."""
    metadata = read_metadata(path)
    version = metadata.get(FORMAT_KEY)
    if version is None or ARCH_KEY not in metadata:
        raise ModelError(f"checkpoint {path} has no {ARCH_KEY!r} metadata: it was not saved by mmfm "
                         "(load foreign weights with mmfm.models.io.load_state_dict)")
    if version != FORMAT_VERSION:
        raise ModelError(f"checkpoint {path} has format {version!r}; this mmfm reads format {FORMAT_VERSION!r}: "
                         "re-export it with the mmfm version that wrote it, or retrain")
    arch, preprocess, answers = (_json_object(metadata, key, path) for key in (ARCH_KEY, PREPROCESS_KEY,
                                                                               ANSWERS_KEY))
    for head, answer_list in answers.items():
        if not isinstance(answer_list, list) or not all(isinstance(answer, str) for answer in answer_list):
            raise ModelError(f"checkpoint {path}: metadata {ANSWERS_KEY!r}[{head!r}] must be a list of strings")
    return CheckpointInfo(arch, preprocess, answers)


def _json_object(metadata: dict, key: str, path) -> dict:
    try:
        value = json.loads(metadata.get(key, "{}"))
    except json.JSONDecodeError as err:
        raise ModelError(f"checkpoint {path}: metadata {key!r} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ModelError(f"checkpoint {path}: metadata {key!r} must be a JSON object")
    return value


def build_stored(arch: dict, where, answers: dict | None = None, preprocess: dict | None = None,
                 attention_backend: str = "auto") -> nn.Module:
    """A fresh model of a stored architecture (``stored_architecture``); a block that names ``where`` and
    cannot be built (a negative width, a wrong type) is a ModelError, not a traceback."""
    arch = stored_architecture(arch, where)
    try:
        return build_model(arch, answers, preprocess, attention_backend)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ModelError(f"{where}: the architecture it stores cannot be built ({type(err).__name__}: {err}); "
                         "the file is damaged or was not written by mmfm") from None


def stored_architecture(arch: dict, where):
    """The ModelConfig of a stored architecture block: only its dataclass's keys, no weight source (the
    checkpoint holds the weights, so ``pretrained`` and every kwarg naming a URL or a file are dropped)."""
    from dataclasses import replace

    from mmfm.config import model_config

    try:
        config = model_config(arch, prefix=f"{where}: architecture ", presets=False)
    except ConfigError as err:
        raise ModelError(str(err)) from None
    field = WEIGHT_KWARGS.get(config.family)
    if field is None:
        return config
    kwargs = getattr(config, field)
    return replace(config, **{field: {k: v for k, v in kwargs.items() if k not in WEIGHT_SOURCE_KEYS}})


def load_state_dict(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load any checkpoint file's tensors -> (state_dict, metadata); metadata is empty for pickles."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, device)
    if path.suffix in PICKLE_SUFFIXES:
        return _load_pickle(path, device), {}
    raise ModelError(
        f"checkpoint {path}: unknown format {path.suffix!r}; use .safetensors (or .pth/.pt/.bin tensors)"
    )


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file, without loading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ModelError(
            f"checkpoint {path} is not a readable safetensors file ({err}); re-download or re-export it"
        ) from err


def count_parameters(path: str | Path) -> int:
    """Number of scalars stored in a safetensors file, read from its header only."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = handle.keys()  # a safe_open handle is not iterable
            return sum(_numel(handle.get_slice(key).get_shape()) for key in keys)
    except (SafetensorError, OSError) as err:
        raise ModelError(f"checkpoint {path} is not a readable safetensors file ({err})") from err


def _numel(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def _load_safetensors(path: Path, device: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    try:
        return load_file(str(path), device=device), metadata
    except (SafetensorError, OSError) as err:
        raise ModelError(f"checkpoint {path} is corrupt ({err}); delete it and download it again") from err


def _load_pickle(path: Path, device: str) -> dict[str, torch.Tensor]:
    import torch

    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelError(
            f"refusing to load {path}: the pickle holds code or objects other than tensors, and unpickling "
            f"them could run arbitrary code. Only if you trust its origin, convert it to safetensors. ({err})"
        ) from err
    except Exception as err:  # a damaged pickle fails in many ways: RuntimeError, EOFError, KeyError, ValueError...
        raise ModelError(f"checkpoint {path} is corrupt or not a torch file ({type(err).__name__}: {err})") from err
    return _state_dict_of(obj, path)


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict or the common {"state_dict": ...} / {"model": ...} wrappers."""
    import torch

    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"checkpoint {path} is not a state dict (a mapping of names to tensors)")
    return obj
