"""mmfm export: ONNX graphs and torch.export programs of the vision / text / fusion parts reproduce eager
PyTorch (as mmfm's inference computes them) on real ShapesWorld images, captions and questions, at several
batch sizes and text lengths; the CLI writes the files and sidecars; bad requests fail in one line."""

import importlib.util
import json

import pytest
import torch

from mmfm.cli import main
from mmfm.config import ModelConfig
from mmfm.errors import ModelError
from mmfm.inference.export import PARTS, VOCABULARY, export_model
from mmfm.inference.pipeline import Pipeline, load
from mmfm.models.io import save_model
from mmfm.models.model import MMFM
from mmfm.models.segmentation import SegmentationModel

HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="ONNX export needs onnx, onnxscript and onnxruntime: "
                                                     "pip install -e '.[export]'")
TOLERANCE = 1e-4          # max abs difference of features and logits
BATCHES = (slice(0, 1), slice(1, 6), slice(6, 16))   # 16 samples at batch sizes 1, 5 and 10
OUTPUTS = {"vision": ("feature", "tokens"), "text": ("feature", "tokens"),
           "fusion": ("itm_logits", "answer_logits_vqa")}


@pytest.fixture(scope="module")
def zoo() -> Pipeline:
    return load("mmfm-shapes-s", device="cpu")


@pytest.fixture(scope="module")
def tiny(tiny_shapes) -> Pipeline:
    """A random model unlike the zoo one: joint fusion, patch tokenizer, no pair features, 32 px input."""
    annotations = tiny_shapes / "annotations"
    answers = {"vqa": json.loads((annotations / "answer_list.json").read_text()),
               "video_qa": json.loads((annotations / "videoqa_answer_list.json").read_text())}
    torch.manual_seed(0)
    arch = ModelConfig(width=32, depth=2, heads=2, fusion_layer=1, embed_dim=16, img_size=32, patch_size=8,
                       context_length=24)
    return Pipeline(MMFM(arch, answers, {"image_size": 32}), "cpu")


@pytest.fixture(scope="module")
def samples(tiny_shapes) -> dict:
    """16 distinct real images with their captions, and 16 real VQA questions."""
    entries = json.loads((tiny_shapes / "annotations" / "pretrain.json").read_text())
    questions = json.loads((tiny_shapes / "annotations" / "vqa_test.json").read_text())
    picked = {entry["image"]: entry["caption"] for entry in entries[::7]}
    images = [str(tiny_shapes / image) for image in list(picked)[:16]]
    return {"images": images, "captions": list(picked.values())[:16],
            "questions": [q["question"] for q in questions[::3][:16]]}


FORMAT = "all" if HAS_ONNX else "torch-export"   # "all": both formats from one trace per part


@pytest.fixture(scope="module")
def zoo_exported(tmp_path_factory):
    """All parts of the zoo model in every available format, written by the CLI."""
    out = tmp_path_factory.mktemp("zoo")
    assert main(["export", "--model", "mmfm-shapes-s", "--part", "all", "--format", FORMAT, "--out", str(out)]) == 0
    return out


TINY_PARTS = ("vision", "fusion")   # its text part runs the zoo's code at other sizes: one export less


@pytest.fixture(scope="module")
def tiny_exported(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("tiny")
    for part in TINY_PARTS:
        export_model(tiny.model, part, out, FORMAT)
    return out


# ---- runners ------------------------------------------------------------------------------------

def _onnx_runners(out, parts=PARTS) -> dict:
    import onnxruntime as ort

    def runner(session):
        def run(*inputs):
            feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
            return [torch.from_numpy(y) for y in session.run(None, feeds)]
        return run
    return {part: runner(ort.InferenceSession(str(out / f"{part}.onnx"), providers=["CPUExecutionProvider"]))
            for part in parts}


def _program_runners(out, parts=PARTS) -> dict:
    return {part: torch.export.load(str(out / f"{part}.pt2")).module() for part in parts}


@torch.no_grad()
def _eager_and_inputs(model, pixels, ids, mask):
    """Per part: (inputs, eager outputs), as mmfm.inference.encode computes them."""
    vision, text = model.encode_vision(pixels), model.encode_text(ids, mask)
    itm = model.itm_logits(text.tokens, model.fusion_context(vision.tokens))
    answers = model.answer_logits("vqa", text.tokens, vision.tokens)
    return {"vision": ((pixels,), (vision.feat, vision.tokens.x)),
            "text": ((ids, mask.long()), (text.feat, text.tokens.x)),
            "fusion": ((text.tokens.x, mask.long(), vision.tokens.x), (itm, answers))}


@torch.no_grad()
def _max_diffs(pipe, samples, runners) -> tuple[dict, set]:
    """Max abs difference of each part's outputs over all batches; the (batch, text length) shapes run."""
    pixels = torch.stack([pipe.read_image(path) for path in samples["images"]])
    diffs, shapes = {}, set()
    for rows in BATCHES:
        for texts in (samples["captions"][rows], samples["questions"][rows]):
            ids, mask = pipe.model.tokenizer(texts)
            shapes.add(tuple(ids.shape))
            eager = _eager_and_inputs(pipe.model, pixels[rows], ids, mask)
            for part, run in runners.items():
                inputs, expected = eager[part]
                for name, got, want in zip(OUTPUTS[part], run(*inputs), expected, strict=True):
                    # tokens are the unnormalised residual stream: their difference relative to their scale
                    scale = want.abs().max().clamp(min=1) if name == "tokens" else 1
                    key = f"{part}.{name}"
                    diffs[key] = max(diffs.get(key, 0.0), float((got - want).abs().max() / scale))
    return diffs, shapes


def _check_parity(pipe, samples, runners):
    diffs, shapes = _max_diffs(pipe, samples, runners)
    assert len(diffs) == sum(len(OUTPUTS[part]) for part in runners) > 0
    assert len({b for b, _ in shapes}) >= 3 and len({n for _, n in shapes}) >= 4, shapes  # really dynamic
    print(json.dumps(diffs))
    assert all(diff <= TOLERANCE for diff in diffs.values()), diffs


# ---- parity ---------------------------------------------------------------------------------------

@needs_onnx
def test_zoo_onnx_matches_eager(zoo, zoo_exported, samples):
    _check_parity(zoo, samples, _onnx_runners(zoo_exported))


def test_zoo_torch_export_matches_eager(zoo, zoo_exported, samples):
    _check_parity(zoo, samples, _program_runners(zoo_exported))


@needs_onnx
def test_tiny_onnx_matches_eager(tiny, tiny_exported, samples):
    _check_parity(tiny, samples, _onnx_runners(tiny_exported, TINY_PARTS))


def test_tiny_torch_export_matches_eager(tiny, tiny_exported, samples):
    _check_parity(tiny, samples, _program_runners(tiny_exported, TINY_PARTS))


@needs_onnx
def test_onnx_axes_are_named_and_dynamic(zoo_exported):
    import onnxruntime as ort

    shapes = {part: {i.name: i.shape for i in ort.InferenceSession(str(zoo_exported / f"{part}.onnx")).get_inputs()}
              for part in PARTS}
    assert shapes["vision"] == {"pixels": ["batch", 3, 64, 64]}
    assert shapes["text"] == {"ids": ["batch", "text_length"], "mask": ["batch", "text_length"]}
    assert shapes["fusion"] == {"text_tokens": ["batch", "text_length", 96], "text_mask": ["batch", "text_length"],
                                "vision_tokens": ["batch", 65, 96]}


# ---- CLI and sidecars -----------------------------------------------------------------------------

@needs_onnx
def test_cli_writes_models_sidecars_and_vocabulary(zoo, zoo_exported):
    import onnx
    import onnxruntime as ort

    assert sorted(p.name for p in zoo_exported.iterdir()) == sorted(  # no temporaries left behind
        [VOCABULARY, *(f"{part}{ext}" for part in PARTS for ext in (".onnx", ".onnx.json", ".pt2", ".pt2.json"))])
    for part in PARTS:
        sidecar = json.loads((zoo_exported / f"{part}.onnx.json").read_text())
        session = ort.InferenceSession(str(zoo_exported / f"{part}.onnx"))
        assert [(i["name"], i["shape"]) for i in sidecar["inputs"]] == [(i.name, i.shape) for i in session.get_inputs()]
        assert [(o["name"], o["shape"]) for o in sidecar["outputs"]] == [(o.name, o.shape) for o in session.get_outputs()]
        assert onnx.load(str(zoo_exported / f"{part}.onnx")).opset_import[0].version == sidecar["opset"]
        assert sidecar["opset"] == 18 and sidecar["model"] == "mmfm-shapes-s" and sidecar["file"] == f"{part}.onnx"
    vision, text, fusion = (json.loads((zoo_exported / f"{part}.onnx.json").read_text()) for part in PARTS)
    assert vision["preprocess"]["image_size"] == 64 and vision["preprocess"]["mean"] == zoo.model.preprocess["mean"]
    assert text["tokenizer"]["context_length"] == 40 and text["tokenizer"]["pad_id"] == zoo.model.tokenizer.pad_id
    assert fusion["answers"] == {"vqa": zoo.model.answers["vqa"]}   # video_qa needs video tokens: not exported


def test_sidecar_of_torch_export(zoo_exported):
    sidecar = json.loads((zoo_exported / "text.pt2.json").read_text())
    assert sidecar["format"] == "torch-export" and sidecar["file"] == "text.pt2"
    assert [i["name"] for i in sidecar["inputs"]] == ["ids", "mask"]


# ---- bad requests ---------------------------------------------------------------------------------

def _cli_error(capsys, *argv) -> str:
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mmfm export: error:")
    return err


def test_unknown_part(capsys, tmp_path):
    err = _cli_error(capsys, "--model", "mmfm-shapes-s", "--part", "audio", "--out", str(tmp_path))
    assert "'audio'" in err and "vision, text, fusion" in err


def test_opset_below_what_torch_onnx_writes(capsys, tmp_path):
    err = _cli_error(capsys, "--model", "mmfm-shapes-s", "--part", "text", "--opset", "17", "--out", str(tmp_path))
    assert "--opset 17" in err and "18" in err


def test_output_dir_that_is_a_file(capsys, tmp_path):
    (tmp_path / "taken").write_text("")
    err = _cli_error(capsys, "--model", "mmfm-shapes-s", "--part", "text", "--out", str(tmp_path / "taken"))
    assert "is a file" in err


def test_segmentation_model_has_no_text_tower(capsys, tmp_path):
    save_model(SegmentationModel("test_resnet", 3), tmp_path / "seg.safetensors")
    err = _cli_error(capsys, "--model", str(tmp_path / "seg.safetensors"), "--part", "vision",
                     "--format", "torch-export", "--out", str(tmp_path / "out"))
    assert "SegmentationModel" in err and "text tower" in err
    assert not (tmp_path / "out").exists()


def test_dual_encoder_has_no_fusion_part(tmp_path):
    model = MMFM(ModelConfig(width=32, depth=2, heads=2, fusion_layer=2, embed_dim=16, img_size=32, patch_size=8))
    with pytest.raises(ModelError, match="no fusion layers"):
        export_model(model, "fusion", tmp_path, "torch-export")
