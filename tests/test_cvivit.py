"""C-ViViT (mmfm/tokenizers/cvivit.py) and the tokenizer task: the first-frame path, causality, the quantiser round
trip (one or several codes a token) and code usage, frame counts, training through `mmfm train` (artefacts,
resume, reload), the trunk's frozen `cvivit` vision tokenizer (also from a zoo name) and `mmfm reconstruct`."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import mmfm
from mmfm.cli import main as mmfm_main
from mmfm.config import TokenizerModelConfig, load_config
from mmfm.data.transforms import eval_transform
from mmfm.data.video import VideoRetrievalEvalDataset, load_clip
from mmfm.errors import InputError, ModelError
from mmfm.evaluation.reconstruction import CodeUsage, psnr
from mmfm.inference.reconstruct import reconstruct_annotations
from mmfm.models.io import load_model, save_model
from mmfm.tokenizers.cvivit import CViViT
from mmfm.tokenizers.vision import create_vision_tokenizer

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
TINY = {"img_size": SIZE, "patch_size": 8, "tubelet_size": 4, "width": 32, "heads": 2, "spatial_depth": 1,
        "temporal_depth": 1, "levels": [5, 5, 5], "codebook_size": 64}
CODEBOOKS = {"fsq": 125, "lfq": 64}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def tiny(quantizer: str = "fsq", **change) -> CViViT:
    torch.manual_seed(0)
    return CViViT(TokenizerModelConfig(**(TINY | change), quantizer=quantizer)).eval()


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- the model -----------------------------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("quantizer", CODEBOOKS)
def test_a_still_clip_tokenizes_like_its_image(quantizer):
    model = tiny(quantizer)
    image = randn(2, 3, SIZE, SIZE)
    still = image[:, None].expand(2, 9, 3, SIZE, SIZE)
    alone, clip = model.encode(image[:, None]), model.encode(still)
    assert alone.codes.shape == (2, 1, 16) and clip.codes.shape == (2, 3, 16)
    assert torch.equal(clip.codes[:, :1], alone.codes), "the first frame is tokenized alone, as an image"
    assert torch.allclose(clip.quantized[:, :1], alone.quantized, atol=1e-6)
    assert torch.allclose(model(still)[0][:, :1], model(image[:, None])[0], atol=1e-5), "and decoded alone"
    tokenizer = create_vision_tokenizer("cvivit", 48, SIZE, 8, arch=TINY | {"quantizer": quantizer})
    tokenizer.encoder.load_state_dict(model.encoder.state_dict())
    tokenizer.quantizer.load_state_dict(model.quantizer.state_dict())
    assert torch.allclose(tokenizer.forward_video(still)[0][:, 0], tokenizer(image)[0], atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("quantizer", CODEBOOKS)
@pytest.mark.parametrize("frame", [1, 4, 5, 8])
def test_changing_a_frame_changes_no_code_of_earlier_frames(quantizer, frame):
    model = tiny(quantizer)
    clip = randn(2, 9, 3, SIZE, SIZE)
    edited = clip.clone()
    edited[:, frame] = randn(2, 3, SIZE, SIZE, seed=1)
    (recon, before), (recon_edited, after) = model(clip), model(edited)
    changed = 1 + (frame - 1) // 4  # frames 1-4 are token-frame 1, frames 5-8 token-frame 2
    assert torch.equal(before.codes[:, :changed], after.codes[:, :changed])
    assert torch.allclose(before.quantized[:, :changed], after.quantized[:, :changed], atol=1e-6)
    assert not torch.equal(before.codes[:, changed], after.codes[:, changed])
    earlier_frames = 1 + 4 * (changed - 1)
    assert torch.allclose(recon[:, :earlier_frames], recon_edited[:, :earlier_frames], atol=1e-5), "causal decoder"


@torch.no_grad()
@pytest.mark.parametrize("quantizer", CODEBOOKS)
@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_quantiser_round_trip(quantizer, num_codebooks):
    model = tiny(quantizer, num_codebooks=num_codebooks)
    size = model.codebook_size
    assert size == CODEBOOKS[quantizer]
    recon, encoding = model(randn(2, 5, 3, SIZE, SIZE))
    assert encoding.codes.shape == (2, 2, 16, num_codebooks)[:3 if num_codebooks == 1 else 4]
    assert encoding.codes.dtype == torch.long and 0 <= encoding.codes.min() <= encoding.codes.max() < size
    latents = model.quantizer.codes_to_latents(encoding.codes.flatten(1, 2)).view_as(encoding.quantized)
    assert torch.allclose(latents, encoding.quantized, atol=1e-5), "codes -> latents gives the quantised latents"
    assert torch.allclose(model.decode_codes(encoding.codes, encoding.grid), recon, atol=1e-5)
    codes = torch.arange(size)[None] if num_codebooks == 1 else torch.arange(size)[None, :, None].expand(1, size, 2)
    every_code = model.quantizer.codes_to_latents(codes)[0]
    assert len(torch.unique(every_code, dim=0)) == size, "each code is its own latent"


def test_lfq_has_entropy_and_commitment_losses_when_training_and_fsq_none():
    model = tiny("lfq").train()
    losses = model.encode(randn(2, 5, 3, SIZE, SIZE)).losses
    assert set(losses) == {"lfq_entropy", "lfq_commit"} and all(v.requires_grad for v in losses.values())
    assert model.eval().encode(randn(2, 5, 3, SIZE, SIZE)).losses == {}
    assert tiny("fsq").train().encode(randn(2, 5, 3, SIZE, SIZE)).losses == {}


def test_code_usage_counts_the_codes_used_at_least_once():
    usage = CodeUsage(8)
    usage.update(torch.tensor([[0, 0, 3], [3, 5, 0]]))
    assert usage.fraction() == 3 / 8
    usage.update(torch.tensor([7]))
    assert usage.fraction() == 0.5 and usage.counts.tolist() == [3, 0, 0, 2, 0, 1, 0, 1]


def test_psnr_is_measured_on_denormalised_pixels():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]
    target = torch.rand(2, 3, 3, 8, 8)
    normalise = (torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1))
    pixels = (target - normalise[0]) / normalise[1]
    off_by_a_tenth = (target.clamp(0, 0.9) + 0.1 - normalise[0]) / normalise[1]
    error = (target.clamp(0, 0.9) + 0.1 - target).pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr(off_by_a_tenth, pixels, mean, std), -10 * torch.log10(error), atol=1e-3)
    assert (psnr(pixels, pixels, mean, std) >= 90).all()


@torch.no_grad()
def test_any_frame_count_one_plus_k_tubelets_works_and_others_are_clear_errors():
    model = tiny()
    for frames, token_frames in [(1, 1), (5, 2), (9, 3), (13, 4)]:
        recon, encoding = model(randn(1, frames, 3, SIZE, SIZE))
        assert recon.shape == (1, frames, 3, SIZE, SIZE) and encoding.codes.shape == (1, token_frames, 16)
    for frames in (2, 4, 6, 8):
        with pytest.raises(ModelError, match=rf"clip of {frames} frames: .*1 \+ k\*4 frames"):
            model.encode(randn(1, frames, 3, SIZE, SIZE))
    with pytest.raises(ModelError, match="30x32 is not a multiple of patch 8"):
        model.encode(randn(1, 1, 3, 30, SIZE))
    trunk_tokenizer = create_vision_tokenizer("cvivit", 48, SIZE, 8, arch=TINY)
    with pytest.raises(ModelError, match=r"1 \+ k\*4"):
        trunk_tokenizer.forward_video(randn(1, 3, 3, SIZE, SIZE))


@pytest.mark.parametrize("change, message", [
    ({"quantizer": "vq"}, "model.quantizer='vq': use one of fsq, lfq"),
    ({"quantizer": "lfq", "codebook_size": 100}, "model.codebook_size=100: LFQ needs a power of two"),
    ({"levels": [8, 2]}, r"model.levels=\[8, 2\]: FSQ needs a list of integers >= 3"),
    ({"width": 30, "heads": 4}, "model.width=30 must be even and divisible by model.heads=4"),
    ({"num_codebooks": 0}, "model.num_codebooks=0: a token needs at least one code"),
])
def test_bad_architectures_are_clear_errors(change, message):
    with pytest.raises(ModelError, match=message):
        CViViT(TokenizerModelConfig(**(TINY | change)))


def test_the_trunk_tokenizer_names_what_is_missing_or_wrong(tmp_path):
    with pytest.raises(ModelError, match="needs model.vision_tokenizer_kwargs.checkpoint"):
        create_vision_tokenizer("cvivit", 48, SIZE, 8)
    with pytest.raises(ModelError, match="use='pixels': use one of latents, codes"):
        create_vision_tokenizer("cvivit", 48, SIZE, 8, arch=TINY, use="pixels")
    with pytest.raises(ModelError, match="use=codes passes no gradient.*set frozen: true"):
        create_vision_tokenizer("cvivit", 48, SIZE, 8, arch=TINY, use="codes", frozen=False)
    with pytest.raises(ModelError, match="arch.widht.*did you mean 'width'"):
        create_vision_tokenizer("cvivit", 48, SIZE, 8, arch={"widht": 32})
    trunk = mmfm.create_model("mmfm-demo", depth=2, fusion_layer=1)
    save_model(trunk, tmp_path / "trunk.safetensors")
    with pytest.raises(ModelError, match="holds a 'mmfm' model, not a C-ViViT"):
        create_vision_tokenizer("cvivit", 48, SIZE, 8, checkpoint=str(tmp_path / "trunk.safetensors"))


# ---- the tokenizer task through `mmfm train` -----------------------------------------------------------------

RUN = ["data.image_size=32", "data.num_frames=5", "data.num_workers=0", "model.img_size=32", "model.width=32",
       "model.heads=2", "model.spatial_depth=1", "model.temporal_depth=1", "model.levels=[5, 5, 5]",
       "train.batch_size=8", "train.video_batch_size=8", "train.max_steps=50", "train.max_minutes=0",
       "train.warmup_steps=5", "train.lr=3e-3", "train.log_every=1", "train.save_every=25", "train.threads=1",
       "eval.batch_size=32"]


@pytest.fixture(scope="module")
def tokenizer_run(tiny_shapes, tmp_path_factory):
    output = tmp_path_factory.mktemp("tokenizer") / "run"
    overrides = [f"data.root={tiny_shapes}", *RUN]
    assert mmfm_main(["train", "--config", str(REPO / "configs" / "tokenizer_cvivit.yaml"), "--output", str(output),
                      "--quiet", *overrides]) == 0
    return output, overrides


def losses_of(output: Path) -> list[float]:
    return [json.loads(line)["loss/tokenizer"] for line in (output / "history.jsonl").read_text().splitlines()]


def test_the_task_lowers_the_reconstruction_loss_and_writes_every_artefact(tokenizer_run, tiny_shapes):
    output, _ = tokenizer_run
    losses = losses_of(output)
    assert len(losses) == 50
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["recon_psnr"] > 10 and metrics["recon_psnr_image"] > 10
    assert 0 < metrics["code_usage"] <= 1
    for name in ("model.safetensors", "config.yaml", "curves.png", "history.jsonl", "tensorboard",
                 "checkpoints/step_00000025", "checkpoints/step_00000050"):
        assert (output / name).exists(), name
    clips = min(4, len(json.loads((tiny_shapes / "annotations" / "video_test.json").read_text())))
    with Image.open(output / "reconstructions.png") as strip:  # test clips over their reconstructions, 5 frames
        assert strip.size == (1 + 5 * (SIZE + 1), 1 + 2 * clips * (SIZE + 1))


def test_resume_continues_the_run_exactly_and_the_model_reloads(tokenizer_run, tmp_path):
    output, overrides = tokenizer_run
    copy = tmp_path / "resumed"
    shutil.copytree(output, copy)
    assert mmfm_main(["train", "--config", str(REPO / "configs" / "tokenizer_cvivit.yaml"), "--output", str(copy),
                      "--resume", str(copy / "checkpoints" / "step_00000025"), "--quiet", "--no-eval",
                      *overrides]) == 0
    assert losses_of(copy) == pytest.approx(losses_of(output), rel=1e-4)
    model = load_model(output)
    assert isinstance(model, CViViT) and model.cfg.width == 32 and model.preprocess["num_frames"] == 5
    assert mmfm_main(["eval", "--checkpoint", str(output), "--config", str(REPO / "configs" / "tokenizer_cvivit.yaml"),
                      "--output", str(tmp_path / "eval"), "--quiet", *overrides]) == 0
    again, first = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "eval", output))
    assert again["recon_psnr"] == pytest.approx(first["recon_psnr"], abs=1e-3)
    assert again["code_usage"] == first["code_usage"] and (tmp_path / "eval" / "reconstructions.png").is_file()


# ---- the trunk's cvivit tokenizer -----------------------------------------------------------------------------


def trunk_with(checkpoint, **kwargs):
    torch.manual_seed(0)
    return mmfm.create_model("mmfm-demo", depth=2, fusion_layer=1, img_size=SIZE, max_frames=4,
                             vision_tokenizer="cvivit", vision_tokenizer_kwargs={"checkpoint": str(checkpoint), **kwargs})


def test_a_frozen_tokenizer_gets_no_gradient_in_trunk_training(tokenizer_run):
    output, _ = tokenizer_run
    model = trunk_with(output).train()
    tokenizer = model.trunk.vision_tokenizer
    assert not tokenizer.encoder.training and not tokenizer.quantizer.training, "frozen: kept in eval mode"
    before = {name: param.detach().clone() for name, param in tokenizer.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        optimizer.zero_grad()
        video = model.encode_vision(randn(2, 5, 3, SIZE, SIZE, seed=step)).feat
        image = model.encode_vision(randn(2, 3, SIZE, SIZE, seed=step)).feat
        (video @ image.t()).sum().backward()
        optimizer.step()
    for name, param in tokenizer.named_parameters():
        if name.startswith("proj."):
            assert param.grad is not None and not torch.equal(param, before[name]), name
        else:
            assert param.grad is None and torch.equal(param, before[name]), name


@torch.no_grad()
def test_codes_of_several_codebooks_embed_as_the_sum_of_one_table_per_position():
    arch = TINY | {"num_codebooks": 2}
    tokenizer = create_vision_tokenizer("cvivit", 48, SIZE, 8, arch=arch, use="codes")
    clip = randn(2, 5, 3, SIZE, SIZE)
    tokens, grid = tokenizer.forward_video(clip)
    codes = tokenizer.quantizer(tokenizer.encoder(clip)[0].flatten(1, 2))[1]
    size = tokenizer.quantizer.codebook_size
    expected = tokenizer.embed.weight[codes[..., 0]] + tokenizer.embed.weight[size + codes[..., 1]]
    assert grid == (4, 4) and torch.allclose(tokens.flatten(1, 2), expected, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("use", ["latents", "codes"])
def test_a_trunk_checkpoint_rebuilds_its_tokenizer_without_the_tokenizer_file(tokenizer_run, tmp_path, use):
    output, _ = tokenizer_run
    local = tmp_path / "tokenizer.safetensors"
    shutil.copy(output / "model.safetensors", local)
    trunk = trunk_with(local, use=use).eval()
    clip = randn(1, 5, 3, SIZE, SIZE)
    assert trunk.encode_vision(clip).tokens.x.shape == (1, 1 + 2 * 16, 96)
    assert trunk.encode_vision(clip[:, 0]).tokens.x.shape == (1, 1 + 16, 96), "an image is a one-frame clip"
    save_model(trunk, tmp_path / "trunk.safetensors")
    local.unlink()
    again = load_model(tmp_path / "trunk.safetensors")
    assert again.arch_dict()["vision_tokenizer_kwargs"]["arch"]["width"] == 32
    assert torch.allclose(again.encode_vision(clip).feat, trunk.encode_vision(clip).feat, atol=1e-6)


def test_a_zoo_name_as_the_tokenizer_checkpoint_becomes_its_local_file(tmp_path, monkeypatch):
    from mmfm.run import with_local_tokenizer

    monkeypatch.setenv("MMFM_HOME", str(tmp_path))
    cfg = load_config(REPO / "configs" / "demo_shapes.yaml", [
        "model.vision_tokenizer=cvivit", "model.vision_tokenizer_kwargs={checkpoint: mmfm-cvivit-shapes}"])
    local = Path(with_local_tokenizer(cfg.model).vision_tokenizer_kwargs["checkpoint"])
    assert local.is_file() and tmp_path in local.parents
    assert isinstance(load_model(local), CViViT)
    cfg.model.vision_tokenizer_kwargs["checkpoint"] = "mmfm-cvivit-nope"
    with pytest.raises(ModelError, match="mmfm-cvivit-nope: no such run directory .* `mmfm zoo list`"):
        with_local_tokenizer(cfg.model)


# ---- `mmfm reconstruct` ----------------------------------------------------------------------------------------

VIDEO_FILES = ["annotations/video_test.json", "annotations/videoqa_test.json"]


def test_reconstruct_writes_every_video_losslessly_beside_the_annotations(tokenizer_run, tiny_shapes, tmp_path,
                                                                          capsys):
    output, _ = tokenizer_run
    out = tmp_path / "recon"
    assert mmfm_main(["--quiet", "reconstruct", "--model", str(output), "--root", str(tiny_shapes), "--out", str(out),
                      "--annotations", *VIDEO_FILES, "--batch-size", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    videos = sorted({e["video"] for name in VIDEO_FILES for e in json.loads((tiny_shapes / name).read_text())})
    assert summary["videos"] == summary["reconstructed"] == len(videos) and summary["psnr"] > 10
    for name in VIDEO_FILES:
        assert (out / name).read_bytes() == (tiny_shapes / name).read_bytes()
    model = load_model(output)
    original = load_clip(str(tiny_shapes / videos[0]), 4)  # the tiny corpus: 4 frames of 64 px
    resize = eval_transform(SIZE)  # the tokenizer's size, 32 px
    pixels = resize.frames(original, resize.sample(64, 64, None))
    padded = torch.cat([pixels, pixels[-1:]])[None]  # 4 frames -> 5 = 1 + 4 * 1
    with torch.no_grad():
        expected = ((model(padded)[0][0, :4] * STD + MEAN).clamp(0, 1) * 255).round()
    written = load_clip(str(out / videos[0]), 4).permute(0, 3, 1, 2).float()
    assert written.shape == expected.shape == (4, 3, SIZE, SIZE)
    assert (written - expected).abs().max() <= 3, "lossless: only the RGB -> YUV rounding"
    assert (written - (pixels * STD + MEAN) * 255).abs().mean() > 1, "a reconstruction, not a copy"
    again = VideoRetrievalEvalDataset(out / VIDEO_FILES[0], root=str(out), num_frames=2)
    assert again[0]["video"].shape[0] == 2, "evaluation reads the reconstructions with data.root=OUT"
    stamp = (out / videos[0]).stat().st_mtime_ns
    assert mmfm_main(["--quiet", "reconstruct", "--model", str(output), "--root", str(tiny_shapes), "--out", str(out),
                      "--annotations", *VIDEO_FILES]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reconstructed"] == 0
    assert (out / videos[0]).stat().st_mtime_ns == stamp, "a re-run keeps what is already written"


def test_reconstruct_names_bad_input(tokenizer_run, tiny_shapes, tmp_path, capsys):
    output, _ = tokenizer_run
    absolute = tmp_path / "absolute.json"
    absolute.write_text(json.dumps([{"video": str(tiny_shapes / "videos" / "x.mp4"), "caption": "x"}]))
    with pytest.raises(InputError, match="absolute.json: video .* is absolute"):
        reconstruct_annotations(load_model(output), tmp_path, ["absolute.json"], tmp_path / "out")
    images = "annotations/retrieval_test.json"
    with pytest.raises(InputError, match="retrieval_test.json: .* is not an ALBEF video annotation list"):
        reconstruct_annotations(load_model(output), tiny_shapes, [images], tmp_path / "out")
    with pytest.raises(InputError, match="is the data root itself"):
        reconstruct_annotations(load_model(output), tiny_shapes, VIDEO_FILES, tiny_shapes)
    trunk = tmp_path / "trunk.safetensors"
    save_model(mmfm.create_model("mmfm-demo", depth=2, fusion_layer=1), trunk)
    assert mmfm_main(["reconstruct", "--model", str(trunk), "--root", str(tiny_shapes), "--out", str(tmp_path / "o"),
                      "--annotations", VIDEO_FILES[0]]) == 2
    assert "a 'mmfm' model, not a video tokenizer" in capsys.readouterr().err
