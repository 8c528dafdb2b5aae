"""VQA accuracy as the official VQAv2 evaluator computes it, with a per-question-type breakdown."""

from collections import defaultdict
from itertools import combinations

import torch

from mmfm.data.formats import normalize_answer


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """min(#annotators agreeing / 3, 1), averaged over the 10-choose-9 annotator subsets (fraction)."""
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) < 2:
        return float(bool(gts) and gts[0] == pred)
    subsets = list(combinations(range(len(gts)), len(gts) - 1))
    return sum(min(1.0, sum(gts[i] == pred for i in subset) / 3.0) for subset in subsets) / len(subsets)


def summarize(records: list[tuple[str, float]], prefix: str) -> dict:
    """``records`` of (question_type, accuracy) -> {prefix_acc, prefix_acc/<type>} in percent."""
    by_type: dict[str, list[float]] = defaultdict(list)
    for qtype, acc in records:
        by_type[qtype or "other"].append(acc)
    overall = [acc for _, acc in records]
    out = {f"{prefix}_acc": round(100.0 * sum(overall) / max(len(overall), 1), 2)}
    for qtype, accs in sorted(by_type.items()):
        out[f"{prefix}_acc/{qtype}"] = round(100.0 * sum(accs) / len(accs), 2)
    return out


@torch.no_grad()
def predict_answers(model, head: str, vision_pixels, questions: list[str], topk: int = 1):
    """(B, topk) answers and probabilities for a batch of images/videos and questions."""
    device = next(model.parameters()).device
    vision = model.encode_vision(vision_pixels.to(device)).tokens
    ids, mask = model.tokenizer(questions)
    text = model.encode_text(ids.to(device), mask.to(device)).tokens
    probs = model.answer_logits(head, text, vision).float().sigmoid()
    top = probs.topk(min(topk, probs.shape[1]), dim=1)
    answers = model.cfg.answers[head]
    return [[(answers[j], float(p)) for p, j in zip(row_p, row_j)]
            for row_p, row_j in zip(top.values.tolist(), top.indices.tolist())]


@torch.no_grad()
def evaluate_vqa(model, loader, head: str = "vqa", prefix: str = "vqa") -> dict:
    key = "video" if head == "video_qa" else "image"
    records = []
    for batch in loader:
        if key not in batch:
            continue
        predictions = predict_answers(model, head, batch[key], batch["question"])
        for (answer, _), answers, qtype in zip((p[0] for p in predictions), batch["answers"],
                                               batch["question_type"]):
            records.append((qtype, vqa_accuracy(answer, answers)))
    return summarize(records, prefix)
