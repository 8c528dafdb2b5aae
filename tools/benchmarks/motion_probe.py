"""Where each ShapesWorld object moves, read by a linear probe from frozen video inputs: a C-ViViT's tokens
against the demo's two frames of pixels.

`python tools/bench.py motion_probe --json F [--tokenizer mmfm-cvivit-shapes] [--data data/shapes]
[--train-videos 4000] [--probe-steps 300]`

A diagnostic, not a product feature: does the tokenizer hand the trunk motion in a form one linear layer can
read? Per object of ``video_scenes_train.json`` (the first ``--train-videos``) and ``video_scenes_test.json``,
the label is its motion (none, left, right, up, down); the features are those of the 3 x 3 grid cells around the
cell of its starting centre (clamped at the borders), so the object starts inside the window and a move of
~19 px over the clip leaves it:

* ``cvivit``: the quantised latents of the clip's 16 frames (padded with the last to 17 = 1 + 4 * 4, as
  ``mmfm reconstruct`` does) at those cells in all 5 token-frames;
* ``patches``: the normalised pixels of the same cells in the two frames the demo samples (``num_frames: 2``,
  the centres of two halves of the clip), what the trunk's linear patch embedding starts from.

Probes are vision_probe's (AdamW, batch 256, standardised features); ``*_majority`` is always answering the train
split's most common motion. JSON: ``{"cvivit": acc, "patches": acc, "majority": acc, "test_objects", ...}``.
"""

import importlib.util
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MOTIONS = ("none", "left", "right", "up", "down")
CLIP_FRAMES, DEMO_FRAMES = 17, 2


def add_arguments(parser):
    parser.add_argument("--tokenizer", default="mmfm-cvivit-shapes", help="zoo name, run directory or file")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--train-videos", type=int, default=4000)
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--probe-lr", type=float, default=1e-2)


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def windows(scenes: list[dict], grid: int, image_size: int):
    """Per object: the flat indices of the 3 x 3 cells around its starting cell, and its motion label."""
    import torch

    cells, labels, owners = [], [], []
    for v, scene in enumerate(scenes):
        scale = image_size / scene["size"]
        for obj in scene["objects"]:
            row, col = (min(grid - 2, max(1, int(c * scale) * grid // image_size)) for c in obj["start"][::-1])
            cells.append([(row + dr) * grid + col + dc for dr in (-1, 0, 1) for dc in (-1, 0, 1)])
            labels.append(MOTIONS.index(obj["motion"]))
            owners.append(v)
    return torch.tensor(cells), torch.tensor(labels), torch.tensor(owners)


def features(tokenizer, root: Path, scenes: list[dict]):
    """(cvivit, patches) features of every object of ``scenes`` and their motion labels."""
    import torch

    from mmfm.data.transforms import eval_transform
    from mmfm.data.video import frame_indices, load_clip

    size, patch = tokenizer.cfg.img_size, tokenizer.cfg.patch_size
    grid = size // patch
    transform = eval_transform(size)
    cells, labels, owners = windows(scenes, grid, size)
    cvivit, pixels = [], []
    for start in range(0, len(scenes), 32):
        clips = []
        for scene in scenes[start:start + 32]:
            frames = load_clip(str(root / scene["video"]), scene["frames"])
            clips.append(transform.frames(frames, transform.sample(frames.shape[2], frames.shape[1], None)))
        clips = torch.stack(clips)  # every frame of each video
        padded = torch.cat([clips, clips[:, -1:].expand(-1, CLIP_FRAMES - clips.shape[1], -1, -1, -1)], dim=1)
        with torch.no_grad():
            cvivit.append(tokenizer.encode(padded).quantized)  # (B, 5, h*w, D)
        demo = clips[:, torch.from_numpy(frame_indices(clips.shape[1], DEMO_FRAMES))]  # uniform: the demo's frames
        batch, frames = demo.shape[:2]
        per_cell = demo.view(batch, frames, 3, grid, patch, grid, patch).permute(0, 1, 3, 5, 2, 4, 6)
        pixels.append(per_cell.reshape(batch, frames, grid * grid, -1))
    cvivit, pixels = torch.cat(cvivit), torch.cat(pixels)
    cvivit_x = torch.stack([cvivit[v][:, cell] for v, cell in zip(owners, cells)]).flatten(1)
    pixel_x = torch.stack([pixels[v][:, cell] for v, cell in zip(owners, cells)]).flatten(1)
    return cvivit_x, pixel_x, labels


def run(args) -> dict:
    import torch
    import torch.nn.functional as F

    from mmfm.factory import create_model

    began = time.time()
    torch.manual_seed(0)
    tokenizer = create_model(args.tokenizer, pretrained=True).eval()
    annotations = args.data / "annotations"
    train_scenes = json.loads((annotations / "video_scenes_train.json").read_text())[:args.train_videos]
    test_scenes = json.loads((annotations / "video_scenes_test.json").read_text())
    train_cvivit, train_pixels, train_y = features(tokenizer, args.data, train_scenes)
    test_cvivit, test_pixels, test_y = features(tokenizer, args.data, test_scenes)
    train_linear = _sibling("vision_probe").train_linear
    result = {}
    for name, train_x, test_x in (("cvivit", train_cvivit, test_cvivit), ("patches", train_pixels, test_pixels)):
        predict = train_linear(train_x, lambda logits, rows: F.cross_entropy(logits, train_y[rows]), len(MOTIONS),
                               args.probe_steps, args.probe_lr)
        result[name] = round(100 * (predict(test_x).argmax(1) == test_y).float().mean().item(), 2)
        result[f"{name}_dims"] = train_x.shape[1]
    majority = torch.bincount(train_y, minlength=len(MOTIONS)).argmax()
    result["majority"] = round(100 * (test_y == majority).float().mean().item(), 2)
    result.update(tokenizer=args.tokenizer, train_objects=len(train_y), test_objects=len(test_y),
                  seconds=round(time.time() - began, 1))
    return result
