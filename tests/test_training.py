"""End-to-end training through tools/train.py: artefacts, loss goes down, exact kill-and-resume, 2 processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, str(ROOT / "tools" / "train.py"), "--config", str(ROOT / "configs" / "demo_shapes.yaml")]


def _train(output, overrides, *extra, env=None, launcher=None):
    cmd = (launcher or []) + (TRAIN[1:] if launcher else TRAIN) + ["--output", str(output), "--quiet", *extra,
                                                                     *overrides]
    return subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def _history(output):
    return [json.loads(line) for line in (Path(output) / "history.jsonl").read_text().splitlines()]


def test_short_run_learns_and_writes_every_artefact(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    result = _train(out, tiny_overrides + ["train.max_steps=50", "train.lr=1e-3", "train.save_every=25",
                                           "train.loss_weights.mlm=1",
                                           "train.tasks={image_text: 1.0, vqa: 0.5}",
                                           "eval.metrics=[retrieval, binding, vqa]"])
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.yaml", "model.safetensors", "metrics.json", "history.jsonl", "curves.png"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000025", "step_00000050"]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5", "txt_r10", "r_mean", "binding_acc",
                "vqa_acc", "train_seconds", "samples_per_s", "bad_samples", "itc_img_r1", "itc_txt_r1",
                "itc_binding_acc"):
        assert key in metrics, key
    assert "vid_r1" not in metrics and metrics["bad_samples"] == 0
    losses = [r["loss/image_text"] for r in _history(out) if "loss/image_text" in r]
    assert sum(losses[-8:]) / 8 < 0.95 * sum(losses[:8]) / 8


def _wait_for(path, proc, seconds=300):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if path.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def test_killed_run_resumes_to_identical_weights(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["train.max_steps=24", "train.save_every=6", "train.keep_last=5",
                                  "train.loss_weights.mlm=1",
                                  "train.tasks={image_text: 1.0, video_text: 0.5, vqa: 0.5}"]
    reference = tmp_path / "reference"
    assert _train(reference, overrides, "--no-eval").returncode == 0
    killed = tmp_path / "killed"
    cmd = TRAIN + ["--output", str(killed), "--quiet", "--no-eval", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert _wait_for(killed / "checkpoints" / "step_00000012" / "train_state.json", proc), "no checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before it could be killed"
    resumed = _train(killed, overrides, "--no-eval", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = load_file(reference / "model.safetensors")
    got = load_file(killed / "model.safetensors")
    assert expected.keys() == got.keys()
    worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    # Two uninterrupted CPU runs already differ by ~1e-6 (float kernel nondeterminism, see
    # docs/training.md); a wrong batch, RNG state or optimizer state would move weights by >1e-3.
    assert worst <= 1e-5, f"resumed weights differ by {worst}"
    history = _history(killed)
    assert [r["step"] for r in history] == list(range(1, 25))
    for mine, theirs in zip(history, _history(reference)):
        for key in ("itc", "vqa", "loss/video_text"):
            if key in theirs:
                assert abs(mine[key] - theirs[key]) < 1e-3, (mine["step"], key)


def test_resume_rejects_a_path_that_is_not_a_checkpoint(tmp_path, tiny_overrides):
    result = _train(tmp_path / "r", tiny_overrides + ["train.max_steps=2"], "--resume", str(tmp_path))
    assert result.returncode == 2 and "not a checkpoint directory" in result.stderr


def test_missing_data_is_a_clear_error(tmp_path, tiny_overrides):
    result = _train(tmp_path / "r", tiny_overrides + [f"data.root={tmp_path}/nowhere"])
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "make_data.py" in result.stderr


def test_two_processes_match_one_process_at_step_zero(tmp_path, tiny_overrides):
    overrides = tiny_overrides + ["train.max_steps=1", "train.batch_size=16", "train.tasks={image_text: 1.0}",
                                  "model.momentum=0", "model.queue_size=0"]
    single = tmp_path / "single"
    assert _train(single, overrides, "--no-eval").returncode == 0
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    result = _train(double, overrides, "--no-eval", env=env, launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((double / "metrics.json").read_text())["world_size"] == 2
    one, two = _history(single)[0], _history(double)[0]
    assert abs(one["itc"] - two["itc"]) < 1e-5, (one["itc"], two["itc"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast step is checked on the GPU machine")
def test_bf16_step_on_cuda(tmp_path, tiny_overrides):
    assert _train(tmp_path / "bf16", tiny_overrides + ["train.max_steps=2", "train.precision=bf16"],
                  "--no-eval").returncode == 0


def test_fusion_lr_scale_speeds_up_only_the_fusion_layers_and_their_heads():
    from mmfm.config import ModelConfig, TrainConfig
    from mmfm.engine.schedule import lr_factor
    from mmfm.engine.trainer import make_optimizer
    from mmfm.models.model import MMFM
    from mmfm.objectives.tasks import MultiTaskObjective

    model = MMFM(ModelConfig(width=64, depth=3, heads=2, fusion_layer=2, fusion_mode="cross", img_size=32,
                             patch_size=8, itm_pair_features=True, momentum=0.0, queue_size=0,
                             answers={"vqa": ["yes", "no"]}))
    objective = MultiTaskObjective(model, {"itc": 1.0, "itm": 1.0}, ["image_text"], 10)
    optimizer = make_optimizer(objective, TrainConfig(lr=1e-3, fusion_lr_scale=5.0), torch.device("cpu"))
    lr_of = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    assert len(lr_of) == sum(1 for p in objective.parameters() if p.requires_grad)
    fast = (model.trunk.blocks[2].mlp.fc1.weight, model.itm_head.weight, model.itm_pair_head.weight,
            model.answer_heads["vqa"][0].weight)
    assert all(lr_of[id(p)][0] == pytest.approx(5e-3) for p in fast)
    slow = (model.trunk.blocks[1].mlp.fc1.weight, model.trunk.patch_embed.proj.weight, model.text_proj.weight)
    assert all(lr_of[id(p)] == (pytest.approx(1e-3), 0.02) for p in slow)
    assert lr_of[id(model.trunk.blocks[2].norm1.weight)] == (pytest.approx(5e-3), 0.0)
    assert lr_of[id(model.temp)] == (pytest.approx(1e-3), 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 2, 10))
    optimizer.step()
    scheduler.step()
    assert sorted({round(lr / min(scheduler.get_last_lr()), 6) for lr in scheduler.get_last_lr()}) == [1.0, 5.0]


def test_questions_on_alignment_batches_train_answer_heads_only_through_fusion_layers():
    from mmfm.config import load_config
    from mmfm.factory import answer_heads

    demo = ROOT / "configs" / "demo_shapes.yaml"
    streams = ["image_text", "video_text"]
    assert answer_heads(load_config(demo, []), streams) == {"vqa", "video_qa"}
    contrastive_only = load_config(demo, ["model.fusion_layer=5"])
    assert answer_heads(contrastive_only, streams) == set(), "the ablation's heads would never be trained"
    assert answer_heads(contrastive_only, [*streams, "vqa"]) == {"vqa"}, "a VQA stream trains its head itself"


def test_contrastive_only_ablation_trains_and_reports_no_answer_figures(tmp_path, tiny_overrides):
    out = tmp_path / "dual"
    result = _train(out, tiny_overrides + ["model.fusion_layer=3", "train.max_steps=4",
                                           "eval.metrics=[retrieval, binding, vqa, video_qa]"])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"img_r1", "txt_r1", "binding_acc"} <= set(metrics)
    assert not {"vqa_acc", "videoqa_acc", "itc_img_r1"} & set(metrics), "no fusion: no ITM re-rank, no answer heads"
