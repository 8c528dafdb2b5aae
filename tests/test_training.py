"""End-to-end training through tools/train.py: artefacts, loss goes down, exact kill-and-resume, 2 processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_MODEL
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
                                           "objective.loss_weights.mlm=1",
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
    # max_minutes=0: a wall-time budget ends the cosine early by elapsed time, which a loaded machine changes
    overrides = tiny_overrides + ["train.max_steps=24", "train.max_minutes=0", "train.save_every=6",
                                  "train.keep_last=5", "objective.loss_weights.mlm=1",
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


def test_a_run_without_momentum_queue_resumes(tmp_path, tiny_overrides):
    """The demo's setting (queue_size 0): an empty queue once went missing from checkpoints and broke resume."""
    overrides = tiny_overrides + ["objective.momentum=0", "objective.queue_size=0", "train.save_every=2",
                                  "train.tasks={image_text: 1.0}"]
    assert _train(tmp_path / "r", overrides + ["train.max_steps=2"], "--no-eval").returncode == 0
    resumed = _train(tmp_path / "r", overrides + ["train.max_steps=4"], "--no-eval", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in _history(tmp_path / "r")] == [1, 2, 3, 4]


def test_resume_rejects_a_path_that_is_not_a_checkpoint(tmp_path, tiny_overrides):
    result = _train(tmp_path / "r", tiny_overrides + ["train.max_steps=2"], "--resume", str(tmp_path))
    assert result.returncode == 2 and "not a checkpoint directory" in result.stderr


@pytest.fixture(scope="module")
def checkpoint(tiny_shapes, tmp_path_factory):
    """The step-2 checkpoint of a 2-step run, and the overrides that run used."""
    overrides = [f"data.root={tiny_shapes}", *TINY_MODEL, "train.max_steps=2", "train.save_every=2"]
    run = tmp_path_factory.mktemp("resume") / "run"
    result = _train(run, overrides, "--no-eval")
    assert result.returncode == 0, result.stderr[-3000:]
    return run / "checkpoints" / "step_00000002", overrides


def _damaged_copy(checkpoint, tmp_path, name, content):
    """A copy of the checkpoint with file `name` overwritten by `content` (None: deleted)."""
    copy = tmp_path / "step_00000002"
    shutil.copytree(checkpoint, copy)
    if content is None:
        (copy / name).unlink()
    else:
        (copy / name).write_bytes(content)
    return copy


@pytest.mark.parametrize("name,content,match", [
    ("train_state.json", b"garbage", "train_state.json is unreadable"),
    ("train_state.json", b'{"step": "2"}', "train_state.json is not a train state"),
    ("model.safetensors", b"garbage", "cannot restore this checkpoint (SafetensorError"),
    ("optimizer.bin", None, "cannot restore this checkpoint (FileNotFoundError"),
])
def test_resume_from_a_damaged_checkpoint_is_one_line_and_exit_2(tmp_path, checkpoint, name, content, match):
    damaged = _damaged_copy(checkpoint[0], tmp_path, name, content)
    result = _train(tmp_path / "again", checkpoint[1], "--no-eval", "--resume", str(damaged))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mmfm train: error: --resume {damaged}") and match in last


def test_resume_with_a_damaged_rng_file_warns_and_continues(tmp_path, checkpoint):
    """Chosen: warn and go on with fresh random state (accelerate alone skips the file silently); refusing
    would strand a run whose weights, optimizer and data position are all intact."""
    damaged = _damaged_copy(checkpoint[0], tmp_path, "random_states_0.pkl", b"garbage")
    overrides = [*checkpoint[1], "train.max_steps=3"]
    result = _train(tmp_path / "again", overrides, "--no-eval", "--resume", str(damaged))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "random_states_0.pkl is unreadable" in result.stderr and "fresh random state" in result.stderr
    assert [r["step"] for r in _history(tmp_path / "again")] == [3]


def test_missing_data_is_a_clear_error(tmp_path, tiny_overrides):
    result = _train(tmp_path / "r", tiny_overrides + [f"data.root={tmp_path}/nowhere"])
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "make_data.py" in result.stderr


def test_two_processes_match_one_process_with_momentum_and_queue(tmp_path, tiny_overrides):
    """Gathered ITC over [momentum batch ; queue] on 2 ranks = 1 rank with the global batch: same losses at
    every step and the same weights after 4 optimizer steps (so the same gradients at each of them)."""
    overrides = tiny_overrides + ["train.max_steps=4", "train.batch_size=16", "train.tasks={image_text: 1.0}",
                                  "model.fusion_layer=3", "objective.momentum=0.9", "objective.queue_size=24",
                                  "objective.alpha_warmup_steps=2", "train.save_every=0"]
    single = tmp_path / "single"
    assert _train(single, overrides, "--no-eval").returncode == 0
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    result = _train(double, overrides, "--no-eval", env=env, launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((double / "metrics.json").read_text())["world_size"] == 2
    for one, two in zip(_history(single), _history(double), strict=True):
        assert abs(one["itc"] - two["itc"]) < 1e-4, (one["step"], one["itc"], two["itc"])
    expected, got = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) < 1e-4


def test_resolved_config_reproduces_the_run_and_mmfm_train_is_tools_train(tmp_path, tiny_overrides):
    first = tmp_path / "first"
    overrides = tiny_overrides + ["train.max_steps=3", "train.tasks={image_text: 1.0, vqa: 0.5}"]
    assert _train(first, overrides, "--no-eval").returncode == 0
    resolved = yaml.safe_load((first / "config.yaml").read_text())
    captions = len(json.loads((Path(resolved["data"]["root"]) / "annotations" / "pretrain.json").read_text()))
    assert resolved["objective"]["alpha_warmup_steps"] == captions // 16, "the ramp length is resolved before saving"
    assert resolved["model"]["arch"] == "mmfm-demo" and resolved["model"]["width"] == 64
    again = tmp_path / "again"
    cmd = [sys.executable, "-m", "mmfm.cli", "train", "--config", str(first / "config.yaml"), "--output", str(again),
           "--quiet", "--no-eval"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (again / "config.yaml").read_text() == (first / "config.yaml").read_text()
    expected, got = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) <= 1e-5


def test_distillation_ramp_and_ema_count_optimizer_steps(tmp_path, tiny_shapes):
    """grad_accum 2 over two streams: 6 forward calls per step, yet the ramp and the EMA advance once."""
    from mmfm.config import load_config
    from mmfm.engine.trainer import Trainer, make_accelerator
    from mmfm.run import build_run

    cfg = load_config(ROOT / "configs" / "demo_shapes.yaml",
                      [f"data.root={tiny_shapes}", *TINY_MODEL, "train.max_steps=3", "train.grad_accum=2",
                       "train.tasks={image_text: 1.0, vqa: 1.0}", "objective.alpha_warmup_steps=10",
                       "objective.momentum=0.5", "train.save_every=0"])
    run = build_run(cfg)
    updates = []
    update = run.objective.momentum.update
    run.objective.momentum.update = lambda online: updates.append(1) or update(online)
    calls = []
    forward = run.objective.forward
    run.objective.forward = lambda stream, batch: calls.append(stream) or forward(stream, batch)
    trainer = Trainer(run.cfg.train, tmp_path, make_accelerator(run.cfg.train), quiet=True)
    trainer.fit(run.objective, run.streams)
    assert len(calls) == 6 and set(calls) == {"image_text", "vqa"}
    assert int(run.objective.step) == 3 and len(updates) == 3
    assert run.objective.current_alpha() == pytest.approx(0.4 * 3 / 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 autocast step is checked on the GPU machine")
def test_bf16_step_on_cuda(tmp_path, tiny_overrides):
    assert _train(tmp_path / "bf16", tiny_overrides + ["train.max_steps=2", "train.precision=bf16"],
                  "--no-eval").returncode == 0


def test_fusion_lr_scale_speeds_up_only_the_fusion_layers_and_their_heads():
    from mmfm.config import ModelConfig, ObjectiveConfig, TrainConfig
    from mmfm.engine.schedule import lr_factor
    from mmfm.engine.trainer import make_optimizer
    from mmfm.models.model import MMFM
    from mmfm.tasks.objective import TaskObjective

    model = MMFM(ModelConfig(width=64, depth=3, heads=2, fusion_layer=2, fusion_mode="cross", img_size=32,
                             patch_size=8, itm_pair_features=True), answers={"vqa": ["yes", "no"]})
    objective = TaskObjective(model, ObjectiveConfig(momentum=0.0, queue_size=0), ["image_text"], 10)
    optimizer = make_optimizer(objective, TrainConfig(lr=1e-3, fusion_lr_scale=5.0), torch.device("cpu"))
    lr_of = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    assert len(lr_of) == sum(1 for p in objective.parameters() if p.requires_grad)
    fast = (model.trunk.blocks[2].mlp.fc1.weight, model.itm_head.weight, model.itm_pair_head.weight,
            model.answer_heads["vqa"][0].weight)
    assert all(lr_of[id(p)][0] == pytest.approx(5e-3) for p in fast)
    slow = (model.trunk.blocks[1].mlp.fc1.weight, model.trunk.vision_tokenizer.proj.weight, model.text_proj.weight)
    assert all(lr_of[id(p)] == (pytest.approx(1e-3), 0.02) for p in slow)
    assert lr_of[id(model.trunk.blocks[2].norm1.weight)] == (pytest.approx(5e-3), 0.0)
    assert lr_of[id(model.temp)] == (pytest.approx(1e-3), 0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 2, 10))
    optimizer.step()
    scheduler.step()
    assert sorted({round(lr / min(scheduler.get_last_lr()), 6) for lr in scheduler.get_last_lr()}) == [1.0, 5.0]


def test_questions_on_alignment_batches_train_answer_heads_only_through_fusion_layers(tiny_shapes):
    from mmfm.config import load_config
    from mmfm.run import answer_lists
    from mmfm.tasks import get_task

    def heads(cfg, streams):
        return set(answer_lists(cfg, [get_task(s) for s in streams]))

    demo = ROOT / "configs" / "demo_shapes.yaml"
    streams = ["image_text", "video_text"]
    root = [f"data.root={tiny_shapes}"]
    assert heads(load_config(demo, root), streams) == {"vqa", "video_qa"}
    contrastive_only = load_config(demo, [*root, "model.fusion_layer=5"])
    assert heads(contrastive_only, streams) == set(), "the ablation's heads would never be trained"
    assert heads(contrastive_only, [*streams, "vqa"]) == {"vqa"}, "a VQA stream trains its head itself"


def test_contrastive_only_ablation_trains_and_reports_no_answer_figures(tmp_path, tiny_overrides):
    out = tmp_path / "dual"
    result = _train(out, tiny_overrides + ["model.fusion_layer=3", "train.max_steps=4",
                                           "eval.metrics=[retrieval, binding, vqa, video_qa]"])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"img_r1", "txt_r1", "binding_acc"} <= set(metrics)
    assert not {"vqa_acc", "videoqa_acc", "itc_img_r1"} & set(metrics), "no fusion: no ITM re-rank, no answer heads"
