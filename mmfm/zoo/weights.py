"""Safe checkpoint reading: safetensors first, pickles only through `torch.load(weights_only=True)`.

An mmfm checkpoint is ONE safetensors file whose metadata holds the model config as JSON under
`mmfm_config` and the format version under `mmfm_format`. Nothing here ever unpickles code.
torch is imported on first load, so `mmfm zoo list/verify` and the downloader start fast.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from mmfm.errors import ZooError

if TYPE_CHECKING:
    import torch

CONFIG_KEY = "mmfm_config"
FORMAT_KEY = "mmfm_format"
FORMAT_VERSION = "1"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")


def load_state_dict(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a checkpoint file -> (state_dict, metadata). Metadata is empty for pickled checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise ZooError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, device)
    if path.suffix in PICKLE_SUFFIXES:
        return _load_pickle(path, device), {}
    raise ZooError(
        f"checkpoint {path}: unknown format {path.suffix!r}; use .safetensors (or .pth/.pt/.bin tensors)"
    )


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file, without loading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ZooError(
            f"checkpoint {path} is not a readable safetensors file ({err}); re-download or re-export it"
        ) from err


def read_config(path: str | Path) -> dict[str, Any]:
    """The model config stored in an mmfm safetensors checkpoint (metadata key `mmfm_config`)."""
    metadata = read_metadata(path)
    if CONFIG_KEY not in metadata:
        raise ZooError(f"checkpoint {path} has no {CONFIG_KEY!r} metadata: it was not saved by mmfm")
    try:
        config = json.loads(metadata[CONFIG_KEY])
    except json.JSONDecodeError as err:
        raise ZooError(f"checkpoint {path}: metadata {CONFIG_KEY!r} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ZooError(f"checkpoint {path}: metadata {CONFIG_KEY!r} must be a JSON object")
    return config


def count_parameters(path: str | Path) -> int:
    """Number of scalars stored in a safetensors file, read from its header only."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = handle.keys()  # a safe_open handle is not iterable
            return sum(_numel(handle.get_slice(key).get_shape()) for key in keys)
    except (SafetensorError, OSError) as err:
        raise ZooError(f"checkpoint {path} is not a readable safetensors file ({err})") from err


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
        raise ZooError(f"checkpoint {path} is corrupt ({err}); delete it and download it again") from err


def _load_pickle(path: Path, device: str) -> dict[str, torch.Tensor]:
    import torch

    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ZooError(
            f"refusing to load {path}: the pickle holds code or objects other than tensors, and unpickling "
            f"them could run arbitrary code. Only if you trust its origin, convert it to safetensors. ({err})"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ZooError(f"checkpoint {path} is corrupt or not a torch file ({err})") from err
    return _state_dict_of(obj, path)


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict or the common {"state_dict": ...} / {"model": ...} wrappers."""
    import torch

    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ZooError(f"checkpoint {path} is not a state dict (a mapping of names to tensors)")
    return obj
