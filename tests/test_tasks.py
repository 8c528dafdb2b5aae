"""Tasks are the unit of change: the registry, and a task added from this file alone, trained and evaluated
through `mmfm train` (the CLI's entry point, in this process so that it sees the registration)."""

import json

import pytest
import torch
import torch.nn.functional as F

import mmfm
from mmfm.cli import main as mmfm_main
from mmfm.config import load_config
from mmfm.data import ImageTextDataset
from mmfm.errors import ConfigError
from mmfm.tasks import Task, TaskLoss, get_task, list_tasks, register_task, unregister_task
from mmfm.tasks.base import data_path, dataset_kwargs, eval_loader, transform


class CaptionMatchLoss(TaskLoss):
    """CLIP's InfoNCE on the model's ITC features, with the diagonal of the batch as the positives."""

    def forward(self, batch, run):
        model = run.model
        image = model.encode_vision(batch["image"]).feat
        text = model.encode_text(batch["text_ids"], batch["text_mask"]).feat
        logits = image @ text.t() / model.temp
        labels = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        return {"loss": loss, "caption_match": loss.detach()}


class CaptionMatch(Task):
    name = "caption_match"
    metrics = ("caption_match_acc",)
    text_keys = ("text",)

    def build_dataset(self, cfg, answers):
        return ImageTextDataset(data_path(cfg, cfg.data.image_text), transform=transform(cfg, train=True),
                                **dataset_kwargs(cfg))

    def build_loss(self, settings, model):
        return CaptionMatchLoss()

    @torch.no_grad()
    def evaluate(self, model, cfg, wanted, quiet=True):
        dataset = ImageTextDataset(data_path(cfg, cfg.data.image_text), transform=transform(cfg, train=False),
                                   **dataset_kwargs(cfg))
        batch = next(iter(eval_loader(torch.utils.data.Subset(dataset, range(32)), cfg)))
        ids, mask = model.tokenizer(batch["text"])
        scores = model.encode_vision(batch["image"]).feat @ model.encode_text(ids, mask).feat.t()
        return {"caption_match_acc": 100.0 * (scores.argmax(1) == torch.arange(len(scores))).float().mean().item()}


@pytest.fixture
def caption_match_task():
    register_task(CaptionMatch)
    yield get_task("caption_match")
    unregister_task("caption_match")


def test_the_registry_lists_every_built_in_task():
    assert {"image_text", "video_text", "vqa", "video_qa", "segmentation"} <= set(list_tasks())
    assert mmfm.list_tasks() == list_tasks()
    assert get_task("segmentation").family == "segmentation" and get_task("video_qa").modality == "video"
    with pytest.raises(ConfigError, match="caption_match"):
        get_task("caption_match")


def test_config_validation_reads_the_registry(caption_match_task):
    cfg = load_config(None, ["train.tasks={caption_match: 1.0}", "eval.metrics=[caption_match_acc]"])
    assert cfg.train.tasks == {"caption_match": 1.0}
    unregister_task("caption_match")
    with pytest.raises(ConfigError, match="train.tasks.caption_match is not a task"):
        load_config(None, ["train.tasks={caption_match: 1.0}"])


def test_a_task_from_one_file_trains_and_evaluates_through_mmfm_train(caption_match_task, tmp_path,
                                                                       tiny_overrides):
    out = tmp_path / "toy"
    code = mmfm_main(["--quiet", "train", "--config", "configs/demo_shapes.yaml", "--output", str(out),
                      *tiny_overrides, "train.max_steps=12", "train.lr=1e-3", "train.save_every=0",
                      "train.tasks=[caption_match]", "eval.metrics=[caption_match_acc]"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["caption_match_acc"] <= 100.0 and metrics["steps"] == 12
    assert "img_r1" not in metrics, "only the evaluations named in eval.metrics run"
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    losses = [r["loss/caption_match"] for r in history]
    assert len(losses) == 12 and sum(losses[-4:]) < sum(losses[:4]), "the toy task's loss went down"
    reloaded = mmfm.create_model(out)
    assert type(reloaded).__name__ == "MMFM" and not reloaded.answers
