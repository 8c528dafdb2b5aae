"""Zero-shot classification accuracy as CLIP reports it: top-1 / top-5 of an image's ITC feature against
the prompt-ensembled class features (`mmfm.inference.encode.zeroshot_classifier`), in percent.

Several class sets may label the same images (ShapesWorld: shape and colour); the images are encoded
once for all of them. ``zeroshot_top1`` / ``zeroshot_top5`` are the mean over the sets evaluated, as
CLIP_benchmark averages over datasets.
"""

import torch
from tqdm import tqdm

from mmfm.errors import DataError
from mmfm.inference.encode import zeroshot_classifier

TOP_K = (1, 5)


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks=TOP_K) -> dict[int, float]:
    """k -> percent of rows whose target is among their k highest logits (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == targets[:, None]
    return {k: 100.0 * hits[:, :k].any(dim=1).double().mean().item() for k in ks}


@torch.no_grad()
def zeroshot_accuracy(model, loader, class_sets: dict[str, tuple], quiet: bool = True) -> dict:
    """set name -> {k: top-k accuracy} over the loader's images (unreadable ones skipped).

    ``class_sets`` maps a set name to (class names, each dataset item's class index, prompt templates).
    """
    device = next(model.parameters()).device
    feats, indices = [], []
    for batch in tqdm(loader, desc="zero-shot", disable=quiet):
        if "image" in batch:
            feats.append(model.encode_vision(batch["image"].to(device)).feat.float())
            indices.extend(batch["index"].tolist())
    if not feats:
        raise DataError("zero-shot evaluation: none of its images could be read; fix the files or the path")
    feats = torch.cat(feats)
    accuracies = {}
    for name, (classnames, targets, templates) in class_sets.items():
        classes = zeroshot_classifier(model, list(classnames), templates)
        targets = torch.as_tensor(targets, device=device)[torch.as_tensor(indices, device=device)]
        accuracies[name] = topk_accuracy(feats @ classes.t(), targets)
    return accuracies


def zeroshot_metrics(accuracies: dict[str, dict[int, float]]) -> dict[str, float]:
    """metrics.json keys: ``zeroshot_<set>_top<k>`` per set and ``zeroshot_top<k>``, the mean over sets."""
    metrics = {f"zeroshot_{name}_top{k}": acc for name, by_k in accuracies.items() for k, acc in by_k.items()}
    if accuracies:
        for k in TOP_K:
            metrics[f"zeroshot_top{k}"] = sum(by_k[k] for by_k in accuracies.values()) / len(accuracies)
    return metrics
