"""`mmfm export`: the towers of a model as ONNX graphs or ``torch.export`` programs, for deployment.

    mmfm export --model mmfm-shapes-s --part all --format onnx --out deploy/
    export_model(model, "text", "deploy/", "torch-export")      # the same from Python; returns the paths

Parts (images only; B and L are dynamic, everything else is fixed by the checkpoint):
  vision  pixels (B, 3, H, W) float32, preprocessed -> feature (B, E), tokens (B, N, D)
  text    ids (B, L) int64, mask (B, L) int64 1 = token -> feature (B, E), tokens (B, L, D)
  fusion  text_tokens (B, L, D), text_mask (B, L), vision_tokens (B, N, D)
          -> itm_logits (B, 2) [no match, match], answer_logits_<head> (B, answers) per image answer head
``feature`` is the L2-normalised ITC feature retrieval compares; ``tokens`` the unimodal residual stream
the fusion layers read (what an Index caches). Fusion runs the fusion layers once for all heads, as
`mmfm.inference.encode` scores pairs. Each part writes ``DIR/<part>.onnx`` (opset >= 18, one file) or
``DIR/<part>.pt2`` and a sidecar ``<file>.json``: input/output names, dtypes and shapes, and what a
deployment needs without mmfm (image preprocessing, the tokenizer and its vocabulary, answer lists).

Attention exports through the ``math`` backend (explicit matmul / masked_fill / softmax), whatever the
model was built with: xformers has no export, and torch.onnx lowers SDPA to a graph that is as faithful
here but a fifth larger, with NaN guards for fully masked rows that mmfm never has (docs/inference.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from mmfm.errors import ConfigError, InputError, ModelError
from mmfm.fileio import atomic_path, atomic_write_bytes, atomic_write_text
from mmfm.models.trunk import TokenBatch

PARTS = ("vision", "text", "fusion")
FORMATS = {"onnx": ".onnx", "torch-export": ".pt2"}
DEFAULT_OPSET = 18
MIN_OPSET = 18   # torch.onnx's lowest; asked for 17 it writes parts of the model at 18 anyway
EXPORT_BACKEND = "math"
# torch.export specialises a dimension whose example size is 0 or 1, and the text bigram's shift (L - 1)
# must not be 1 either; [CLS] token [SEP] is the shortest text anyway.
MIN_TEXT_LENGTH = 3
EXAMPLE_BATCH = 2
VOCABULARY = "bpe_simple_vocab_16e6.txt.gz"


def register(subparsers) -> None:
    """Add the `export` command."""
    parser = subparsers.add_parser("export", help="export the vision / text / fusion towers (ONNX, torch.export)")
    parser.add_argument("--model", required=True, help="zoo name, run directory or .safetensors file")
    parser.add_argument("--part", required=True, help=f"{' | '.join(PARTS)} | all")
    parser.add_argument("--format", default="onnx", help=f"{' | '.join(FORMATS)} | all (default onnx)")
    parser.add_argument("--out", required=True, help="directory to write <part>.onnx / <part>.pt2 and sidecars")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (>= {MIN_OPSET})")
    parser.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from mmfm.factory import create_model

    check_request(args.part, args.format, args.out, args.opset)
    model = create_model(args.model, attention_backend=EXPORT_BACKEND)
    for path in export_model(model, args.part, args.out, args.format, args.opset, name=args.model):
        print(f"wrote {path} (+ {path.name}.json)")
    return 0


def check_request(part: str, fmt: str, out, opset: int = DEFAULT_OPSET) -> None:
    """Fail before any work: an unknown part or format, a too old opset, an output directory that is a file,
    ONNX without its exporter."""
    if part not in (*PARTS, "all"):
        raise InputError(f"--part {part!r}: choose one of {', '.join(PARTS)} or all")
    if fmt not in (*FORMATS, "all"):
        raise InputError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)} or all")
    if opset < MIN_OPSET:
        raise InputError(f"--opset {opset}: torch.onnx writes opset {MIN_OPSET} or later (ONNX Runtime >= 1.14 "
                         "runs it)")
    if Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"--out {out}: is a file, not a directory; pass a directory to write the parts into")
    if fmt != "torch-export" and importlib.util.find_spec("onnxscript") is None:
        raise ConfigError("ONNX export needs onnx and onnxscript (torch.onnx's exporter): "
                          "pip install 'mmfm[export]', or use --format torch-export")


def export_model(model: nn.Module, part: str, out, fmt: str = "onnx", opset: int = DEFAULT_OPSET,
                 name: str = "", attention_backend: str = EXPORT_BACKEND) -> list[Path]:
    """Write ``part`` (one of PARTS, or "all": every part the model has) of ``model`` into directory ``out``
    in format ``fmt`` (one of FORMATS, or "all": both from one trace).

    The model is rebuilt on the CPU in float32 with ``attention_backend`` (the caller's is untouched).
    Returns the model files written; each has its sidecar ``<file>.json``.
    """
    check_request(part, fmt, out, opset)
    towers = build_towers(model, attention_backend, name)
    if part != "all" and part not in towers:
        raise ModelError(f"{name or 'this model'} has no fusion layers (model.fusion_layer == depth), so it has "
                         "no fusion part; export vision and text")
    parts = list(towers) if part == "all" else [part]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if "text" in parts:
        _copy_vocabulary(out)
    formats = list(FORMATS) if fmt == "all" else [fmt]
    return [path for p in parts for path in _export_tower(towers[p], p, out, formats, opset, name)]


def build_towers(model: nn.Module, attention_backend: str = EXPORT_BACKEND, name: str = "") -> dict[str, nn.Module]:
    """The exportable modules of ``model``, by part: vision, text and (if the model fuses) fusion."""
    from mmfm.models.model import MMFM

    if not isinstance(model, MMFM):
        raise ModelError(f"{name or 'this model'} is a {type(model).__name__}: it has no text tower or ITC "
                         "features to export; `mmfm export` takes vision-language models (family 'mmfm')")
    copy = _rebuilt(model, attention_backend)
    towers = {"vision": VisionTower(copy), "text": TextTower(copy)}
    if copy.fuses:
        towers["fusion"] = FusionTower(copy)
    return towers


def _rebuilt(model: nn.Module, attention_backend: str) -> nn.Module:
    """A CPU float32 copy of ``model`` whose attention modules were built with ``attention_backend``."""
    from mmfm.models.io import build_model

    copy = build_model(model.cfg, model.answers, model.preprocess, attention_backend=attention_backend)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


class VisionTower(nn.Module):
    """pixels (B, 3, H, W) -> (feature, tokens): ``MMFM.encode_vision``."""

    input_names, output_names = ("pixels",), ("feature", "tokens")

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.model.encode_vision(pixels)
        return encoded.feat, encoded.tokens.x

    def example(self) -> tuple[torch.Tensor, ...]:
        size = self.model.preprocess["image_size"]
        return (torch.zeros(EXAMPLE_BATCH, 3, size, size),)

    def dynamic_shapes(self) -> dict:
        return {"pixels": {0: _batch_dim()}}


class TextTower(nn.Module):
    """ids, mask (B, L) -> (feature, tokens): ``MMFM.encode_text``."""

    input_names, output_names = ("ids", "mask"), ("feature", "tokens")

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.model.encode_text(ids, mask != 0)
        return encoded.feat, encoded.tokens.x

    def example(self) -> tuple[torch.Tensor, ...]:
        ids = torch.full((EXAMPLE_BATCH, _example_length(self.model)), self.model.tokenizer.cls_id)
        return ids, torch.ones_like(ids)

    def dynamic_shapes(self) -> dict:
        batch, length = _batch_dim(), _length_dim(self.model)
        return {"ids": {0: batch, 1: length}, "mask": {0: batch, 1: length}}


class FusionTower(nn.Module):
    """text tokens, text mask, vision tokens -> (itm_logits, answer logits of each image answer head).

    One fusion pass feeds every head; ITM sees the vision side as a `FusionContext`, as `itm_scores` does.
    """

    input_names = ("text_tokens", "text_mask", "vision_tokens")

    def __init__(self, model: nn.Module):
        from mmfm.tasks import answer_heads_by_modality

        super().__init__()
        self.model = model
        image_head = answer_heads_by_modality().get("image")
        self.heads = [image_head] if image_head in model.answer_heads else []
        self.output_names = ("itm_logits", *(f"answer_logits_{head}" for head in self.heads))

    def forward(self, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                vision_tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        text = TokenBatch(text_tokens, text_mask != 0)
        context = self.model.fusion_context(TokenBatch(vision_tokens))
        fused = self.model.fuse(text, context)
        answers = (self.model.fused_answer_logits(head, fused, text, context) for head in self.heads)
        return self.model.fused_itm_logits(fused, text, context), *answers

    def example(self) -> tuple[torch.Tensor, ...]:
        ids, mask = TextTower(self.model).example()
        pixels, = VisionTower(self.model).example()
        with torch.no_grad():
            return self.model.encode_text(ids, mask != 0).tokens.x, mask, self.model.encode_vision(pixels).tokens.x

    def dynamic_shapes(self) -> dict:
        batch, length = _batch_dim(), _length_dim(self.model)
        return {"text_tokens": {0: batch, 1: length}, "text_mask": {0: batch, 1: length},
                "vision_tokens": {0: batch}}


def _batch_dim():
    return torch.export.Dim("batch", min=1)


def _length_dim(model: nn.Module):
    return torch.export.Dim("text_length", min=MIN_TEXT_LENGTH, max=model.cfg.context_length)


def _example_length(model: nn.Module) -> int:
    # strictly inside (min, max): an example at a bound would let export specialise on it
    return min(MIN_TEXT_LENGTH + 1, model.cfg.context_length)


# ---- writers ------------------------------------------------------------------------------------

def _export_tower(tower: nn.Module, part: str, out: Path, formats: list[str], opset: int,
                  name: str) -> list[Path]:
    """Trace ``tower`` once; write it and its sidecar in each of ``formats``."""
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations, fake-tensor notes), not the user's
        program = torch.export.export(tower, tower.example(), dynamic_shapes=tower.dynamic_shapes())
        for fmt in formats:
            path = out / f"{part}{FORMATS[fmt]}"
            if fmt == "onnx":
                _write_onnx(program, tower, path, opset)
            else:
                with atomic_path(path) as tmp, tmp.open("wb") as file:
                    torch.export.save(program, file)
            sidecar = describe(tower, part, fmt, path.name, name, opset if fmt == "onnx" else None)
            atomic_write_text(out / f"{path.name}.json", json.dumps(sidecar, indent=2) + "\n")
            paths.append(path)
    return paths


def _write_onnx(program, tower: nn.Module, path: Path, opset: int) -> None:
    # dynamic_shapes again only names the graph's symbolic dimensions (batch, text_length, not s23)
    onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=opset, verbose=False,
                                     input_names=list(tower.input_names), output_names=list(tower.output_names),
                                     dynamic_shapes=tower.dynamic_shapes())
    with atomic_path(path) as tmp:
        onnx_program.save(tmp, external_data=False)


def _copy_vocabulary(out: Path) -> None:
    from open_clip.tokenizer import default_bpe

    atomic_write_bytes(out / VOCABULARY, Path(default_bpe()).read_bytes())


# ---- sidecar ------------------------------------------------------------------------------------

def describe(tower: nn.Module, part: str, fmt: str, file: str, name: str, opset: int | None) -> dict:
    """The sidecar of an exported part: its inputs and outputs and what preparing the inputs needs."""
    model = tower.model
    dims = {"batch": {"min": 1}, "text_length": {"min": MIN_TEXT_LENGTH, "max": model.cfg.context_length}}
    sidecar = {"mmfm_export": 1, "model": name, "part": part, "format": fmt, "file": file, "opset": opset,
               "inputs": _io(model, part, tower.input_names), "outputs": _io(model, part, tower.output_names),
               "dynamic_dims": dims if part != "vision" else {"batch": dims["batch"]}}
    if part == "vision":
        sidecar["preprocess"] = _image_preprocess(model)
    if part == "text":
        sidecar["tokenizer"] = _tokenizer(model)
    if part != "fusion":
        sidecar["itc_temperature"] = float(model.temp.detach())
    if part == "fusion":
        sidecar["itm"] = "itm_logits[:, 1] is the match logit (retrieval re-ranks by it); softmax gives p(match)"
        sidecar["answers"] = {head: model.answers[head] for head in tower.heads}
        sidecar["answer_activation"] = "sigmoid"
    return sidecar


def _io(model: nn.Module, part: str, names: tuple[str, ...]) -> list[dict]:
    size, width, embed = model.preprocess["image_size"], model.cfg.width, model.cfg.embed_dim
    grid = model.trunk.vision_tokenizer.grid_for(size)
    vision_len = 1 + grid[0] * grid[1]
    shapes = {
        "pixels": ("float32", ["batch", 3, size, size], "preprocessed images (see preprocess)"),
        "ids": ("int64", ["batch", "text_length"], "token ids (see tokenizer)"),
        "mask": ("int64", ["batch", "text_length"], "1 = token, 0 = padding"),
        "feature": ("float32", ["batch", embed], "L2-normalised ITC feature; cosine = dot product"),
        "tokens": ("float32", ["batch", "text_length" if part == "text" else vision_len, width],
                   "unimodal tokens, input of the fusion part"),
        "text_tokens": ("float32", ["batch", "text_length", width], "tokens of the text part"),
        "text_mask": ("int64", ["batch", "text_length"], "the text part's mask"),
        "vision_tokens": ("float32", ["batch", vision_len, width], "tokens of the vision part"),
        "itm_logits": ("float32", ["batch", 2], "[no match, match] logits"),
    }
    for head, answers in model.answers.items():
        shapes[f"answer_logits_{head}"] = ("float32", ["batch", len(answers)], f"logits over answers[{head!r}]")
    return [{"name": n, "dtype": shapes[n][0], "shape": shapes[n][1], "meaning": shapes[n][2]} for n in names]


def _image_preprocess(model: nn.Module) -> dict:
    """What ``mmfm.data.transforms.eval_transform`` does (num_frames: the frames a video model samples)."""
    pre = model.preprocess
    size = pre["image_size"]
    steps = ["RGB", "crop the largest centred square", f"resize to {size}x{size}, bilinear", "x / 255",
             "(x - mean) / std per channel", "layout (3, H, W)"]
    return {"image_size": size, "mean": pre["mean"], "std": pre["std"], "num_frames": pre["num_frames"],
            "steps": steps}


def _tokenizer(model: nn.Module) -> dict:
    tok = model.tokenizer
    return {"type": "CLIP byte-level BPE (open_clip SimpleTokenizer: ftfy, whitespace clean, lower case)",
            "vocabulary": VOCABULARY, "context_length": tok.context_length, "cls_id": tok.cls_id,
            "sep_id": tok.sep_id, "pad_id": tok.pad_id,
            "layout": f"[cls_id] up to {tok.context_length - 2} BPE ids [sep_id], right-padded with pad_id "
                      "(mask 0) to the longest text of the batch"}
