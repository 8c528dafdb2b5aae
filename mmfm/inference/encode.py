"""Batched encoding and scoring on a model: the one code path that evaluation and inference share.

Texts and images/videos go through the unimodal layers once (`encode_texts`, `encode_media`); the
fusion layers then score chosen (text, vision) pairs on those cached tokens (`itm_scores`) or answer
questions (`predict_answers`); `zeroshot_classifier` turns class names into ITC class features.
Metrics live in `mmfm.evaluation`; this module only encodes and scores.
"""

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mmfm.models.trunk import FusionContext, TokenBatch


@torch.no_grad()
def encode_texts(model, texts: list[str], batch_size: int = 256) -> tuple[TokenBatch, torch.Tensor]:
    """All texts through the unimodal layers, padded to one length: (tokens, features)."""
    ids, mask = model.tokenizer(texts)
    device = next(model.parameters()).device
    xs, feats = [], []
    for start in range(0, len(texts), batch_size):
        enc = model.encode_text(ids[start:start + batch_size].to(device), mask[start:start + batch_size].to(device))
        xs.append(enc.tokens.x)
        feats.append(enc.feat)
    return TokenBatch(torch.cat(xs), mask.to(device)), torch.cat(feats)


# Generic enough for any photo-like class names, and the phrasings ShapesWorld captions use
# ("a picture of a red circle"); on mmfm-shapes-s they beat "{}" alone (docs/inference.md).
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


@torch.no_grad()
def zeroshot_classifier(model, labels: list[str], templates, batch_size: int = 256) -> torch.Tensor:
    """(C, E) class features by CLIP's prompt ensemble: each label in every template ("{}" marks where it
    goes) through the text side, L2-normalised, averaged over the templates and L2-normalised again."""
    prompts = [template.replace("{}", label) for label in labels for template in templates]
    ids, mask = model.tokenizer(prompts)
    device = next(model.parameters()).device
    feats = torch.cat([model.encode_text(ids[start:start + batch_size].to(device),
                                         mask[start:start + batch_size].to(device)).feat.float()
                       for start in range(0, len(prompts), batch_size)])
    feats = F.normalize(feats, dim=-1).view(len(labels), len(templates), -1).mean(dim=1)
    return F.normalize(feats, dim=-1)


@torch.no_grad()
def encode_media(model, loader, key: str, quiet: bool = True) -> tuple[TokenBatch, torch.Tensor, list[int]]:
    """Every image/video of a loader: (cached unimodal tokens, features, dataset indices)."""
    device = next(model.parameters()).device
    xs, feats, indices, roll = [], [], [], None
    for batch in tqdm(loader, desc=f"encode {key}s", disable=quiet):
        if key not in batch:
            continue
        enc = model.encode_vision(batch[key].to(device))
        xs.append(enc.tokens.x)
        feats.append(enc.feat)
        indices.extend(batch["index"].tolist())
        roll = enc.tokens.roll
    return TokenBatch(torch.cat(xs), roll=roll), torch.cat(feats), indices


@torch.no_grad()
def itm_scores(model, text: TokenBatch, vision: FusionContext, text_idx, vision_idx, batch_size: int = 256):
    """Positive-class ITM logits of the (text_idx[i], vision_idx[i]) pairs; ``vision`` is a fusion context."""
    out = []
    for start in range(0, len(text_idx), batch_size):
        t = text.select(text_idx[start:start + batch_size])
        v = vision.select(vision_idx[start:start + batch_size])
        out.append(model.itm_logits(t, v)[:, 1].float())
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def predict_answers(model, head: str, vision_pixels, questions: list[str], topk: int = 1):
    """(B, topk) answers and probabilities for a batch of images/videos and questions."""
    device = next(model.parameters()).device
    vision = model.encode_vision(vision_pixels.to(device)).tokens
    ids, mask = model.tokenizer(questions)
    text = model.encode_text(ids.to(device), mask.to(device)).tokens
    probs = model.answer_logits(head, text, vision).float().sigmoid()
    top = probs.topk(min(topk, probs.shape[1]), dim=1)
    answers = model.answers[head]
    return [[(answers[j], float(p)) for p, j in zip(row_p, row_j)]
            for row_p, row_j in zip(top.values.tolist(), top.indices.tolist())]
