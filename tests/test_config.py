"""Typed configs: YAML + dotted overrides, unknown keys named with the closest valid one."""

from pathlib import Path

import pytest

from mmfm.config import load_config
from mmfm.errors import ConfigError


def test_demo_config_loads_with_overrides():
    cfg = load_config("configs/demo_shapes.yaml", ["train.max_steps=50", "data.root=/x", "train.seed=3"])
    assert cfg.train.max_steps == 50 and cfg.data.root == "/x" and cfg.train.seed == 3
    assert cfg.model.fusion_layer < cfg.model.depth


def test_unknown_key_names_the_key_and_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.max_step'.*did you mean 'max_steps'"):
        load_config("configs/demo_shapes.yaml", ["train.max_step=5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widht: 8\n")
    with pytest.raises(ConfigError, match=r"model\.widht.*'width'"):
        load_config(bad)


def test_wrong_types_and_values_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="train.fusion_lr_scale"):
        load_config(None, ["train.fusion_lr_scale=0"])
    with pytest.raises(ConfigError, match="objective.queue_size=256 needs objective.momentum > 0"):
        load_config(None, ["objective.momentum=0", "objective.queue_size=256"])
    assert load_config(None, ["objective.momentum=0", "objective.queue_size=0"]).objective.queue_size == 0
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown config key 'task'"):
        load_config(None, ["task=pretrain"])
    with pytest.raises(ConfigError, match=r"loss_weights.itcc: not a loss term.*'itc'"):
        load_config(None, ["objective.loss_weights={itcc: 1.0}"])
    with pytest.raises(ConfigError, match=r"loss_weights.itm=-1"):
        load_config(None, ["objective.loss_weights={itm: -1}"])
    with pytest.raises(ConfigError, match="needs model.word_head=true"):
        load_config(None, ["objective.loss_weights={words: 0.5}"])
    assert load_config(None, ["objective.loss_weights={words: 0.5}", "model.word_head=true"]).model.word_head


def _negatives(cfg_overrides):
    from mmfm.tasks.align import caption_negatives

    return caption_negatives(load_config(None, cfg_overrides))


def test_bad_crop_scale_and_negative_words_name_their_key():
    from mmfm.tasks.base import transform

    with pytest.raises(ConfigError, match=r"data\.crop_scale"):
        transform(load_config(None, ["data.crop_scale=[0.9, 0.5]"]), train=True)
    with pytest.raises(ConfigError, match=r"data\.negative_words"):
        _negatives(["data.negative_words=[red, green]"])
    with pytest.raises(ConfigError, match=r"data\.negative_words.*two words"):
        _negatives(["data.negative_words=[[red]]"])
    with pytest.raises(ConfigError, match=r"data\.negative_replace_prob"):
        _negatives(["data.negative_words=[[red, green]]", "data.negative_replace_prob=1.5"])


@pytest.mark.parametrize("override,match", [
    ("model.width=!!python/object/apply:os.system [echo hi]", r"model\.width=.*YAML tags"),
    ("x=!!binary aGVsbG8=", r"override x=.*YAML tags"),
    ("data.root=!!python/name:os.system", r"data\.root=.*YAML tags"),
    ("model.width=[1", r"override model\.width='\[1' is not a valid YAML value \(.* at line 1"),
])
def test_override_with_a_yaml_tag_or_bad_yaml_is_a_config_error_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_config_file_with_bad_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  width: [8\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml' is not valid YAML: .* at line \d+, column \d+") as info:
        load_config(bad)
    assert "\n" not in str(info.value)


def test_cli_override_with_a_yaml_tag_prints_one_line_and_exits_2(tmp_path):
    import subprocess
    import sys

    marker = tmp_path / "ran"
    result = subprocess.run([sys.executable, "-m", "mmfm.cli", "train", "--config", "configs/demo_shapes.yaml",
                             f"model.width=!!python/object/apply:os.system [touch {marker}]"],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr and not marker.exists()
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("mmfm train: error: override model.width=") and "YAML tags" in lines[-1]


@pytest.mark.parametrize("path", sorted(str(p) for p in Path(__file__).resolve().parent.parent.glob("configs/**/*.yaml")))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.train.tasks and cfg.model.arch
