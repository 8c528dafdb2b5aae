"""VQA accuracy as the official VQAv2 evaluator computes it, with a per-question-type breakdown."""

from collections import defaultdict

import torch

from mmfm.data.formats import normalize_answer, strip_punctuation
from mmfm.inference.encode import predict_answers


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQAv2 accuracy (a fraction) of `prediction` against the annotators' raw `answers`.

    As vqaEval.py: the prediction is fully normalised (`normalize_answer`), the ground truths only
    punctuation-processed and only when they disagree; then each answer is left out in turn and
    min(1, #other answers equal to the prediction / 3) is averaged. A single answer (e.g. MSRVTT-QA),
    where leaving one out leaves nothing, scores exact match; the official code would give 0.
    """
    pred = normalize_answer(prediction)
    truths = _ground_truths(answers)
    if len(truths) < 2:
        return float(truths == [pred])
    matches = truths.count(pred)
    return sum(min(1.0, (matches - (truth == pred)) / 3) for truth in truths) / len(truths)


def _ground_truths(answers: list[str]) -> list[str]:
    """The evaluator's ground truths: unanimous answers as they are, otherwise punctuation-processed."""
    return [strip_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)


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
