"""The video tokenizer (``family: tokenizer`` models: C-ViViT): reconstruct clips and images through discrete codes.

Every training sample is a clip of ``data.num_frames`` frames from ``data.video_text`` together with an image from
``data.image_text``, which goes through the tokenizer as a one-frame clip; the reconstruction losses weigh every
frame alike. ShapesWorld videos have 16 frames: a 17-frame clip (1 + 4*4, the tokenizer's frame count with
tubelets of 4) repeats one of them (``frame_indices``' rule for more frames than the video has);
``data.num_frames: 13`` (1 + 4*3) takes 13 distinct frames instead.

Loss (``objective.loss_weights``): ``recon_l1`` + ``recon_l2`` on normalised pixels, ``perceptual`` (fixed conv
features, mmfm/objectives/reconstruction.py) and, for LFQ, ``lfq_entropy`` + ``lfq_commit`` (FSQ has none).
Evaluation (``eval.metrics: [reconstruction]``) on the test videos (``eval.video_retrieval``) and images
(``eval.retrieval``): ``recon_psnr`` (videos, mean PSNR per clip in dB), ``recon_psnr_image`` and ``code_usage``
(the fraction of the codebook that the test tokens use); OUTPUT/reconstructions.png shows test clips over their
reconstructions.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from mmfm.config import LOSS_WEIGHTS
from mmfm.data import ImageTextDataset, RetrievalEvalDataset, VideoRetrievalEvalDataset, VideoTextDataset
from mmfm.evaluation.reconstruction import CodeUsage, psnr
from mmfm.objectives.reconstruction import ConvFeatures, perceptual_loss, reconstruction_losses
from mmfm.tasks.base import (
    Task,
    TaskLoss,
    data_path,
    dataset_kwargs,
    eval_loader,
    optional_path,
    register_task,
    transform,
)

TERMS = ("recon_l1", "recon_l2", "perceptual", "lfq_entropy", "lfq_commit")
STRIP_CLIPS = 4  # test clips in reconstructions.png


class ClipsWithImages(Dataset):
    """Sample ``g``: the clip of ``videos[g]`` and the image of ``images[g]`` (each maps g to its own entry, so
    every epoch of the clips meets other images); a sample with an unreadable file is dropped as a whole."""

    def __init__(self, videos: Dataset, images: Dataset):
        self.videos, self.images = videos, images

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, g: int):
        clip, image = self.videos[g], self.images[g]
        if not clip:
            return clip
        if not image:
            return image
        return {"video": clip["video"], "image": image["image"], "index": clip["index"]}


@register_task
class Tokenizer(Task):
    name = "tokenizer"
    family = "tokenizer"
    modality = "video"
    metrics = ("reconstruction",)

    def build_dataset(self, cfg, answers):
        kwargs, pixels = dataset_kwargs(cfg), transform(cfg, train=True)
        videos = VideoTextDataset(data_path(cfg, cfg.data.video_text), num_frames=cfg.data.num_frames,
                                  transform=pixels, sampling="random", **kwargs)
        return ClipsWithImages(videos, ImageTextDataset(data_path(cfg, cfg.data.image_text), transform=pixels,
                                                        **kwargs))

    def build_loss(self, settings, model):
        return TokenizerLoss({**LOSS_WEIGHTS, **settings.loss_weights}, model.preprocess)

    @torch.no_grad()
    def evaluate(self, model, cfg, wanted, quiet=True):
        if "reconstruction" not in wanted:
            return {}
        model.eval()
        usage, metrics = CodeUsage(model.codebook_size), {}
        if videos := self._test_videos(cfg):
            metrics["recon_psnr"] = _mean_psnr(model, cfg, videos, "video", usage, quiet)
        if path := optional_path(cfg, cfg.eval.retrieval):
            images = RetrievalEvalDataset(path, transform=transform(cfg, train=False), **dataset_kwargs(cfg))
            metrics["recon_psnr_image"] = _mean_psnr(model, cfg, images, "image", usage, quiet)
        if metrics:
            metrics["code_usage"] = round(usage.fraction(), 4)
        return metrics

    @torch.no_grad()
    def write_figures(self, model, cfg, output):
        """OUTPUT/reconstructions.png: the first test clips, each over its reconstruction, one frame a column."""
        from torchvision.utils import make_grid, save_image

        from mmfm.fileio import atomic_path

        if not (videos := self._test_videos(cfg)):
            return
        model.eval()
        clips = next(iter(eval_loader(torch.utils.data.Subset(videos, range(min(STRIP_CLIPS, len(videos)))),
                                      cfg)))["video"].to(next(model.parameters()).device)
        recon, _ = model(clips)
        mean, std = (torch.tensor(values, device=clips.device).view(3, 1, 1) for values in (cfg.data.mean, cfg.data.std))
        rows = torch.stack([clips, recon], dim=1).flatten(0, 2) * std + mean  # clip 0, its recon, clip 1, ...
        with atomic_path(output / "reconstructions.png") as tmp:
            save_image(make_grid(rows.clamp(0, 1), nrow=clips.shape[1], padding=1), tmp, format="png")

    def _test_videos(self, cfg) -> VideoRetrievalEvalDataset | None:
        path = optional_path(cfg, cfg.eval.video_retrieval)
        return path and VideoRetrievalEvalDataset(path, num_frames=cfg.data.num_frames,
                                                  transform=transform(cfg, train=False), **dataset_kwargs(cfg))


def _mean_psnr(model, cfg, dataset, key: str, usage: CodeUsage, quiet: bool) -> float:
    """Mean PSNR (dB) of the dataset's clips (or images, as one-frame clips); their codes go into ``usage``."""
    device, total = next(model.parameters()).device, []
    for batch in tqdm(eval_loader(dataset, cfg), desc=f"reconstruction ({key})", disable=quiet):
        pixels = batch[key].to(device)
        clips = pixels if key == "video" else pixels[:, None]
        recon, encoding = model(clips)
        usage.update(encoding.codes)
        total.append(psnr(recon, clips, cfg.data.mean, cfg.data.std))
    return round(torch.cat(total).mean().item(), 3)


class TokenizerLoss(TaskLoss):
    """The weighted reconstruction and quantiser losses of a clip batch and its image batch."""

    def __init__(self, weights: dict, preprocess: dict):
        super().__init__()
        self.weights = {term: float(weights[term]) for term in TERMS}
        self.mean, self.std = preprocess["mean"], preprocess["std"]
        self.perceptual = ConvFeatures() if self.weights["perceptual"] > 0 else None

    def forward(self, batch: dict, run) -> dict:
        clips, images = batch["video"], batch["image"][:, None]
        recon_clips, clip_codes = run.model(clips)
        recon_images, image_codes = run.model(images)
        recon = torch.cat([recon_clips.flatten(0, 1), recon_images.flatten(0, 1)])
        target = torch.cat([clips.flatten(0, 1), images.flatten(0, 1)])
        terms = reconstruction_losses(recon, target)
        if self.perceptual is not None:
            terms["perceptual"] = perceptual_loss(self.perceptual, recon, target)
        for term, value in clip_codes.losses.items():
            terms[term] = (value + image_codes.losses[term]) / 2
        loss = sum(self.weights[term] * value for term, value in terms.items())
        logged = {term: value.detach() for term, value in terms.items()}
        logged["psnr"] = psnr(recon.detach(), target, self.mean, self.std).mean()
        return {"loss": loss, **logged}
