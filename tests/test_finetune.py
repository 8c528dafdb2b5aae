"""Fine-tuning controls: train.freeze, train.layer_decay and train.ema_decay (mmfm/engine/finetune.py)."""

from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL
from safetensors.torch import load_file

from mmfm.config import ModelConfig, ObjectiveConfig, TrainConfig, load_config
from mmfm.engine.finetune import EMA_FILE
from mmfm.engine.schedule import lr_factor
from mmfm.engine.trainer import Trainer, make_accelerator, make_optimizer
from mmfm.errors import ConfigError, ModelError
from mmfm.models.model import MMFM, PARTS
from mmfm.run import build_run, train
from mmfm.tasks.objective import TaskObjective

ROOT = Path(__file__).resolve().parent.parent


def _config(tiny_shapes, *overrides):
    """The demo config on the tiny corpus: image-text with its questions, MLM on, no momentum encoder."""
    return load_config(ROOT / "configs" / "demo_shapes.yaml",
                       [f"data.root={tiny_shapes}", *TINY_MODEL, "objective.momentum=0", "objective.queue_size=0",
                        "objective.loss_weights.mlm=1", "train.tasks={image_text: 1.0}", "train.lr=1e-3",
                        "train.max_minutes=0", "train.save_every=0", *overrides])


def _changed_after_training(cfg, output) -> tuple[set[str], dict[str, set[str]]]:
    """Names of the model's parameters that a short run changed, and the names of each part."""
    accelerator = make_accelerator(cfg.train)
    run = build_run(cfg)
    names = {id(p): n for n, p in run.model.named_parameters()}
    parts = {part: {names[id(p)] for p in params} for part, params in run.model.parameter_parts().items()}
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    Trainer(run.cfg.train, output, accelerator, quiet=True).fit(run.objective, run.streams)
    return {n for n, p in run.model.named_parameters() if not torch.equal(p.detach(), before[n])}, parts


@pytest.fixture(scope="module")
def trained_unfrozen(tiny_shapes, tmp_path_factory):
    return _changed_after_training(_config(tiny_shapes, "train.max_steps=2"), tmp_path_factory.mktemp("unfrozen"))


def test_parts_cover_every_parameter_once():
    model = MMFM(ModelConfig(width=32, depth=3, heads=2, fusion_layer=2, img_size=32, patch_size=8,
                             itm_pair_features=True, answer_pair_features=True, word_head=True),
                 answers={"vqa": ["yes", "no"]})
    parts = model.parameter_parts()
    assert tuple(parts) == PARTS
    listed = [id(p) for params in parts.values() for p in params]
    assert len(listed) == len(set(listed)) and set(listed) == {id(p) for p in model.parameters()}
    assert model.trunk.token_embed.weight in parts["text_embed"]  # the MLM decoder's tied weight
    assert {id(p) for p in parts["fusion"]} == {id(p) for p in model.trunk.blocks[2].parameters()}


@pytest.mark.parametrize("part", PARTS)
def test_frozen_part_stays_bit_identical_and_the_rest_trains(part, trained_unfrozen, tiny_shapes, tmp_path):
    unfrozen, parts = trained_unfrozen
    assert parts[part] & unfrozen, f"{part} does not train even unfrozen: the test would prove nothing"
    changed, _ = _changed_after_training(_config(tiny_shapes, "train.max_steps=2", f"train.freeze=[{part}]"),
                                         tmp_path)
    assert changed == unfrozen - parts[part]


def _tiny_objective(**arch):
    model = MMFM(ModelConfig(width=32, depth=3, heads=2, fusion_layer=2, fusion_mode="cross", img_size=32,
                             patch_size=8, itm_pair_features=True, **arch), answers={"vqa": ["yes", "no"]})
    return model, TaskObjective(model, ObjectiveConfig(momentum=0.0, queue_size=0), ["image_text"], 10)


def test_frozen_parameters_are_left_out_of_the_optimizer():
    model, objective = _tiny_objective()
    optimizer = make_optimizer(objective, TrainConfig(freeze=["vision_tokenizer", "heads"]), torch.device("cpu"))
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen = {id(p) for part in ("vision_tokenizer", "heads") for p in model.parameter_parts()[part]}
    assert frozen and not optimised & frozen
    assert optimised == {id(p) for p in model.parameters()} - frozen
    assert not any(p.requires_grad for p in model.itm_head.parameters())


def test_unknown_part_is_a_config_error_naming_the_parts(tiny_shapes):
    _, objective = _tiny_objective()
    with pytest.raises(ConfigError, match="train.freeze: 'bogus' is not a part of the model; use vision_tokenizer, "
                                          "vision_embed, text_embed, type_embed, unimodal, fusion, norm"):
        make_optimizer(objective, TrainConfig(freeze=["bogus"]), torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.freeze: 'bogus' is not a part of the model; use vision_tokenizer"):
        _config(tiny_shapes, "train.freeze=[bogus]")
    with pytest.raises(ConfigError, match="did you mean 'unimodal'"):
        _config(tiny_shapes, "train.freeze=[unimodl]")


@pytest.mark.parametrize("override,match", [("train.layer_decay=0", "train.layer_decay=0.0: give a number in"),
                                            ("train.layer_decay=1.5", "train.layer_decay=1.5"),
                                            ("train.ema_decay=1", "train.ema_decay=1.0: give a number in"),
                                            ("train.freeze=heads", "train.freeze' must be a list")])
def test_bad_finetune_values_name_their_key(tiny_shapes, override, match):
    with pytest.raises(ConfigError, match=match):
        _config(tiny_shapes, override)


def _lr_of(optimizer) -> dict[int, tuple[float, float]]:
    return {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}


def test_layer_decay_lrs_follow_the_formula_with_fusion_scale_and_weight_decay():
    model, objective = _tiny_objective()
    lr, decay, fusion = 1e-3, 0.5, 5.0
    optimizer = make_optimizer(objective, TrainConfig(lr=lr, fusion_lr_scale=fusion, layer_decay=decay),
                               torch.device("cpu"))
    lr_of = _lr_of(optimizer)
    trunk = model.trunk
    # depth 3: embeddings layer 0, block i layer i + 1, final norm with the last block (3), heads 4 (timm)
    expected = {
        trunk.token_embed.weight: (lr * decay ** 4, 0.0),
        trunk.vision_tokenizer.proj.weight: (lr * decay ** 4, 0.02),
        trunk.pos_embed: (lr * decay ** 4, 0.0),
        trunk.blocks[0].mlp.fc1.weight: (lr * decay ** 3, 0.02),
        trunk.blocks[1].norm1.weight: (lr * decay ** 2, 0.0),
        trunk.blocks[2].mlp.fc1.weight: (lr * decay * fusion, 0.02),  # a fusion layer
        trunk.blocks[2].mlp.fc1.bias: (lr * decay * fusion, 0.0),
        trunk.norm.weight: (lr * decay, 0.0),
        model.text_proj.weight: (lr, 0.02),
        model.temp: (lr, 0.0),
        model.itm_head.weight: (lr * fusion, 0.02),
        model.mlm_head.dense.weight: (lr, 0.02),
    }
    for param, (want_lr, want_wd) in expected.items():
        assert lr_of[id(param)] == (pytest.approx(want_lr), want_wd)
    layers = model.parameter_layers()
    fusion_ids = {id(p) for p in model.fusion_parameters()}
    for name, param in model.named_parameters():
        want = lr * decay ** (4 - layers[name]) * (fusion if id(param) in fusion_ids else 1.0)
        assert lr_of[id(param)][0] == pytest.approx(want), name
    assert optimizer.param_groups[0]["lr"] == lr, "group 0 (the logged lr) is the top layer's base lr"
    initial = [group["lr"] for group in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 2, 10))
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([x * lr_factor(3, 2, 10) for x in initial])


def _groups_before_layer_decay(objective, weight_decay, lr, fusion_lr_scale):
    """param_groups as it was before train.layer_decay (the reference that decay 1 must reproduce)."""
    skip = set()
    for name, module in objective.named_modules():
        if hasattr(module, "no_weight_decay"):
            skip |= {f"{name}.{n}" if name else n for n in module.no_weight_decay()}
    fusion = {id(p) for p in objective.fusion_parameters()}
    groups = {}
    for name, param in objective.named_parameters():
        decays = not (param.ndim < 2 or name in skip or any(name.endswith(f".{s}") for s in skip))
        groups.setdefault((decays, id(param) in fusion), []).append(param)
    return [([id(p) for p in params], weight_decay if decays else 0.0, lr * (fusion_lr_scale if in_fusion else 1.0))
            for (decays, in_fusion), params in sorted(groups.items())]


def test_layer_decay_one_gives_exactly_the_groups_without_it():
    _, objective = _tiny_objective()
    optimizer = make_optimizer(objective, TrainConfig(lr=3e-4, fusion_lr_scale=5.0, layer_decay=1.0),
                               torch.device("cpu"))
    got = [([id(p) for p in g["params"]], g["weight_decay"], g["lr"]) for g in optimizer.param_groups]
    assert got == _groups_before_layer_decay(objective, 0.02, 3e-4, 5.0)


def test_layer_decay_needs_an_objective_that_declares_layers():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def fusion_parameters(self):
            return []

        def parameter_parts(self):
            return {}

        def parameter_layers(self):
            return {}

    with pytest.raises(ConfigError, match="train.layer_decay=0.7: this model declares no layers"):
        make_optimizer(Bare(), TrainConfig(layer_decay=0.7), torch.device("cpu"))


def _ema_by_hand(snapshots: list[dict], decay: float) -> dict:
    """timm ModelEmaV3 with warm-up, from its formula: step 1 copies, step t then uses
    min(decay, 1 - t ** (-2/3)) (its warm-up of step t - 1 with gamma 1)."""
    ema = {k: v.clone() for k, v in snapshots[0].items()}
    for t, weights in enumerate(snapshots[1:], start=2):
        d = min(decay, 1 - t ** (-2 / 3))
        ema = {k: d * ema[k] + (1 - d) * weights[k] for k in ema}
    return ema


def test_ema_weights_are_the_ema_of_the_raw_weights_and_are_what_the_run_saves(tiny_shapes, tmp_path,
                                                                                 monkeypatch):
    snapshots = []
    after_step = TaskObjective.after_step

    def recording(objective):
        after_step(objective)
        snapshots.append({n: v.clone() for n, v in objective.model.state_dict().items()})

    monkeypatch.setattr(TaskObjective, "after_step", recording)
    train(_config(tiny_shapes, "train.max_steps=5", "train.ema_decay=0.6"), tmp_path, quiet=True, run_eval=False)
    assert len(snapshots) == 5
    expected = _ema_by_hand(snapshots, 0.6)
    saved, raw = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "model_raw.safetensors")
    assert "mlm_head.embedding.weight" in saved  # the token embedding, tied: moved once per step, not twice
    for name, value in saved.items():
        assert torch.allclose(value, expected[name], atol=1e-6), name
        assert torch.equal(raw[name], snapshots[-1][name]), name
    assert any(not torch.allclose(saved[n], raw[n]) for n in saved), "the EMA must differ from the raw weights"


def test_killed_and_resumed_run_ends_with_the_same_ema(tiny_shapes, tmp_path, monkeypatch):
    # With the momentum encoder and its queue: a queue_size=0 run does not resume yet (its empty queue
    # tensors are dropped from the checkpoint as "shared" and then missing on load).
    cfg = _config(tiny_shapes, "train.max_steps=6", "train.save_every=3", "train.ema_decay=0.9",
                  "objective.momentum=0.995", "objective.queue_size=37")
    train(cfg, tmp_path / "reference", quiet=True, run_eval=False)
    after_step = TaskObjective.after_step

    def dies_at_step_5(objective):
        if int(objective.step) == 4:
            raise KeyboardInterrupt  # killed during step 5, after the step-3 checkpoint
        after_step(objective)

    with monkeypatch.context() as patch:
        patch.setattr(TaskObjective, "after_step", dies_at_step_5)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "killed", quiet=True, run_eval=False)
    checkpoints = sorted((tmp_path / "killed" / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step_00000003"] and (checkpoints[0] / EMA_FILE).is_file()
    train(cfg, tmp_path / "killed", resume="latest", quiet=True, run_eval=False)
    for name in ("model.safetensors", "model_raw.safetensors"):
        expected, got = load_file(tmp_path / "reference" / name), load_file(tmp_path / "killed" / name)
        assert expected.keys() == got.keys()
        worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
        assert worst <= 1e-5, f"{name}: resumed weights differ by {worst}"  # CPU float noise is ~1e-6


def test_resuming_a_checkpoint_without_ema_with_ema_on_says_what_to_do(tiny_shapes, tmp_path):
    cfg = _config(tiny_shapes, "train.max_steps=1")
    train(cfg, tmp_path, quiet=True, run_eval=False)
    with pytest.raises(ModelError, match="ema.safetensors is missing.*resume with train.ema_decay=0"):
        train(_config(tiny_shapes, "train.max_steps=2", "train.ema_decay=0.9"), tmp_path, resume="latest",
              quiet=True, run_eval=False)


def test_a_new_answer_list_keeps_the_rows_of_the_answers_the_init_model_knows(tmp_path):
    from mmfm.models.io import save_model
    from mmfm.run import initial_model

    cfg = load_config(None, [*TINY_MODEL, "model.answer_pair_features=true", "train.tasks={vqa: 1.0}"])
    old = initial_model(cfg, {"vqa": ["a", "b", "c"]})
    with torch.no_grad():
        for layer in (old.answer_heads["vqa"][-1], old.answer_pair_heads["vqa"]):
            layer.weight.normal_()
            layer.bias.normal_()
    save_model(old, tmp_path / "old.safetensors")
    cfg = load_config(None, [*TINY_MODEL, "model.answer_pair_features=true", "train.tasks={vqa: 1.0}",
                             f"train.init={tmp_path / 'old.safetensors'}"])
    new = initial_model(cfg, {"vqa": ["c", "x", "A"]})  # "A" normalises to "a"
    for head in (lambda m: m.answer_heads["vqa"][-1], lambda m: m.answer_pair_heads["vqa"]):
        before, after = head(old), head(new)
        assert torch.equal(after.weight[0], before.weight[2]) and torch.equal(after.bias[2], before.bias[0])
        assert not any(torch.equal(after.weight[1], before.weight[k]) for k in range(3))
    assert torch.equal(new.answer_heads["vqa"][0].weight, old.answer_heads["vqa"][0].weight)
