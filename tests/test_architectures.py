"""Architectures are data: presets in mmfm/architectures, built by name, overridden by a run config."""

import pytest
import torch

import mmfm
from mmfm.config import load_config
from mmfm.errors import ConfigError, ModelError
from mmfm.models.io import load_model, save_model


def test_every_preset_is_listed_and_builds():
    names = mmfm.list_models(pretrained=False)
    assert {"mmfm-demo", "mmfm-small", "mmfm-vit-s16", "p2at-small-seg", "mmfm-small-biformer-tiny"} <= set(names)
    for name in names:
        model = mmfm.create_model(name)
        assert model.arch_dict()["family"] in ("mmfm", "segmentation", "tokenizer"), name


def test_a_run_config_names_a_preset_and_overrides_its_fields():
    cfg = load_config("configs/demo_shapes.yaml", ["model.depth=4", "model.fusion_layer=4"])
    assert (cfg.model.arch, cfg.model.width, cfg.model.depth) == ("mmfm-demo", 96, 4)
    assert not cfg.model.fuses
    with pytest.raises(ConfigError, match="model.arch='mmfm-dmeo'.*did you mean 'mmfm-demo'"):
        load_config(None, ["model.arch=mmfm-dmeo"])
    with pytest.raises(ModelError, match="no such file"):
        mmfm.create_model("nowhere/model.safetensors")


def test_a_checkpoint_stores_architecture_preprocessing_and_answers_not_training_knobs(tmp_path):
    model = mmfm.create_model("mmfm-demo", depth=2, fusion_layer=1).eval()
    model.answers = {}
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    from mmfm.models.io import read_info

    info = read_info(path)
    assert info.arch["arch"] == "mmfm-demo" and info.arch["depth"] == 2
    assert set(info.preprocess) == {"image_size", "mean", "std", "num_frames"}
    assert not {"momentum", "queue_size", "alpha", "mlm_prob", "temp", "init", "attention_backend"} & set(info.arch)
    again = load_model(path)
    pixels = torch.randn(2, 3, 64, 64)
    assert torch.allclose(again.encode_vision(pixels).feat, model.encode_vision(pixels).feat, atol=1e-6)
