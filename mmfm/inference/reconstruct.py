"""Videos through a trained video tokenizer and back (``mmfm reconstruct``).

Every video that an ALBEF annotation file names is encoded to codes and decoded again; the reconstructions are
written under OUT at the same relative paths, and each annotation file is copied to OUT at its own relative path.
``data.root=OUT`` then evaluates any model on what the tokenizer keeps, with the unchanged config:

    mmfm reconstruct --model mmfm-cvivit-shapes --root data/shapes --out runs/recon \\
        --annotations annotations/video_test.json annotations/videoqa_test.json
    mmfm eval --checkpoint mmfm-shapes-s --config configs/demo_shapes.yaml --output runs/recon_eval \\
        data.root=runs/recon 'eval.metrics=[video_retrieval,video_qa]'

A video of T frames is decoded whole, resized and centre-cropped to the tokenizer's image size, padded with
copies of its last frame to the tokenizer's 1 + k*t and cut back to T after decoding (the codes are causal:
padding changes no earlier frame). Reconstructions are written
as lossless H.264 (yuv444p, qp 0), so the only loss is the tokenizer's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mmfm.data.formats import resolve
from mmfm.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from mmfm.data.video import load_clip, probe_video, write_mp4
from mmfm.errors import InputError
from mmfm.evaluation.reconstruction import psnr
from mmfm.fileio import atomic_path, atomic_write_bytes


def reconstruct_annotations(model, root: str | Path, annotation_files: list[str], out: str | Path,
                            batch_size: int = 8, quiet: bool = False) -> dict:
    """Reconstruct the videos of ``annotation_files`` (paths relative to ``root``) into ``out``; returns the
    number of videos, how many this call reconstructed and their mean PSNR (dB). Videos already reconstructed
    in ``out`` are kept (an interrupted run continues)."""
    root, out = Path(root), Path(out)
    if out.resolve() == root.resolve():
        raise InputError(f"--out {out}: is the data root itself; reconstructions go beside the originals, in "
                         "another folder")
    videos = _videos_of(root, annotation_files)
    todo = [video for video in videos if not (out / video).is_file()]
    scores = []
    for batch in tqdm(_batches(root, todo, batch_size), total=-(-len(todo) // batch_size), disable=quiet,
                      desc="reconstruct"):
        scores += _reconstruct_batch(model, out, batch)
    for name in annotation_files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / name, (root / name).read_bytes())
    return {"videos": len(videos), "reconstructed": len(todo),
            "psnr": round(float(np.mean(scores)), 3) if scores else None}


def _preprocess(model) -> dict:
    """The tokenizer's training size and normalisation (ImageNet's when its checkpoint does not say)."""
    return {"image_size": model.cfg.img_size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, **model.preprocess}


def _pixels(transform, frames: torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> normalised (T, 3, S, S) by the tokenizer's eval transform (short side resized to
    its image size, centre crop)."""
    height, width = frames.shape[1:3]
    return transform.frames(frames, transform.sample(width, height, None))


def _videos_of(root: Path, annotation_files: list[str]) -> list[str]:
    """The distinct relative video paths of the annotation files, in order of first mention."""
    seen: dict[str, None] = {}
    for name in annotation_files:
        path = root / name
        try:
            entries = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"--annotations {name}: cannot read {path} as JSON ({err})") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "video" in e for e in entries):
            raise InputError(f"--annotations {name}: {path} is not an ALBEF video annotation list (entries with "
                             "a 'video' path)")
        for entry in entries:
            if Path(entry["video"]).is_absolute():
                raise InputError(f"--annotations {name}: video {entry['video']!r} is absolute; reconstructions "
                                 "mirror paths relative to --root, so annotations must name relative paths")
            seen.setdefault(entry["video"], None)
    return list(seen)


def _batches(root: Path, videos: list[str], batch_size: int):
    """Lists of (relative path, all frames as a uint8 (T, H, W, 3) tensor, fps), same-shaped within a list."""
    batch = []
    for video in videos:
        path = resolve(str(root), video)
        info = probe_video(path)
        frames = load_clip(path, info.frames)
        if batch and frames.shape != batch[0][1].shape:
            yield batch
            batch = []
        batch.append((video, frames, info.fps))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def _reconstruct_batch(model, out: Path, batch: list[tuple[str, torch.Tensor, float]]) -> list[float]:
    settings = _preprocess(model)
    transform = eval_transform(settings["image_size"], mean=tuple(settings["mean"]), std=tuple(settings["std"]))
    pixels = torch.stack([_pixels(transform, clip) for _, clip, _ in batch])  # (B, T, 3, S, S) normalised
    count, tubelet = pixels.shape[1], model.cfg.tubelet_size
    pixels = torch.cat([pixels, pixels[:, -1:].expand(-1, (-(count - 1)) % tubelet, -1, -1, -1)], dim=1)
    mean, std = (torch.tensor(settings[key]).view(3, 1, 1) for key in ("mean", "std"))
    recon = model(pixels.to(next(model.parameters()).device))[0][:, :count].cpu()
    scores = psnr(recon, pixels[:, :count], settings["mean"], settings["std"]).tolist()
    uint8 = ((recon * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
    for (video, _, fps), clip in zip(batch, uint8):
        target = out / video
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            write_mp4(tmp, list(clip), fps, lossless=True)
    return scores
