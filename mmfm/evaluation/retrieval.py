"""Retrieval evaluation exactly as ALBEF / LAVIS: ITC similarities -> top-k -> ITM re-rank on cached tokens.

Each image (or video) and each text is encoded ONCE through the unimodal layers; the fusion layers then
score only the top-``k_test`` candidates of every query, reusing the cached tokens. Final scores of the
candidates are ``itm_logit + itc_sim`` (LAVIS, ``score="itm+itc"``) or ``itm_logit`` alone (ALBEF's
Retrieval.py, ``score="itm"``); the rest stay at -100.
"""

import numpy as np
import torch

from mmfm.inference.encode import encode_media, encode_texts, itm_scores
from mmfm.models.trunk import TokenBatch

RERANK_SCORES = ("itm", "itm+itc")


def _check_score(score: str) -> None:
    if score not in RERANK_SCORES:
        raise ValueError(f"rerank score must be one of {RERANK_SCORES}, got {score!r}")


@torch.no_grad()
def rerank_scores(model, vision: TokenBatch, vision_feat, text: TokenBatch, text_feat, k_test: int,
                  quiet: bool = True, score: str = "itm+itc") -> tuple[np.ndarray, np.ndarray]:
    """(vision->text, text->vision) score matrices: ITC everywhere, ``score`` on each query's top-k.

    ``score`` is "itm+itc" (ITM logit + ITC similarity, LAVIS) or "itm" (the ITM logit, ALBEF).
    """
    _check_score(score)
    sim = (vision_feat @ text_feat.t()).float()
    if not model.fuses or k_test <= 0:
        return sim.cpu().numpy(), sim.t().cpu().numpy()
    context = model.fusion_context(vision)
    v2t = _rerank(sim, k_test, score, lambda rows, cols: itm_scores(model, text, context, cols, rows))
    t2v = _rerank(sim.t(), k_test, score, lambda rows, cols: itm_scores(model, text, context, rows, cols))
    return v2t.cpu().numpy(), t2v.cpu().numpy()


def _rerank(sim: torch.Tensor, k_test: int, score: str, itm) -> torch.Tensor:
    """-100 except each row's top-k ITC columns, which get ``itm(rows, cols)`` (+ their ITC similarity)."""
    out = torch.full_like(sim, -100.0)
    top_sim, top_idx = sim.topk(min(k_test, sim.shape[1]), dim=1)
    rows = torch.arange(sim.shape[0], device=sim.device).repeat_interleave(top_idx.shape[1])
    cols = top_idx.reshape(-1)
    itm_logits = itm(rows, cols)
    out[rows, cols] = itm_logits + top_sim.reshape(-1) if score == "itm+itc" else itm_logits
    return out


def recall_metrics(v2t: np.ndarray, t2v: np.ndarray, txt2img: list[int], img2txt: list[list[int]],
                   vision_prefix: str = "img") -> dict:
    """ALBEF's itm_eval: R@1/5/10 both ways (percent) and their mean.

    ``txt_r*`` is vision->text, ``{vision_prefix}_r*`` is text->vision.
    """
    ranks = np.zeros(v2t.shape[0])
    for i, scores in enumerate(v2t):
        order = np.argsort(scores)[::-1]
        ranks[i] = min(np.where(order == t)[0][0] for t in img2txt[i])
    text_ranks = np.zeros(t2v.shape[0])
    for t, scores in enumerate(t2v):
        order = np.argsort(scores)[::-1]
        text_ranks[t] = np.where(order == txt2img[t])[0][0]
    out = {}
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100.0 * float(np.mean(ranks < k))
    for k in (1, 5, 10):
        out[f"{vision_prefix}_r{k}"] = 100.0 * float(np.mean(text_ranks < k))
    out["r_mean"] = float(np.mean([out[k] for k in list(out)]))
    return {k: round(v, 2) for k, v in out.items()}


@torch.no_grad()
def evaluate_retrieval(model, loader, dataset, key: str = "image", k_test: int = 16, quiet: bool = True,
                       score: str = "itm+itc") -> dict:
    """Full retrieval evaluation of a RetrievalEvalDataset (or its video twin) through ``loader``.

    ``score`` is the re-ranking score of the top-``k_test`` candidates (see `rerank_scores`).
    """
    _check_score(score)  # before the gallery is encoded
    vision, vision_feat, indices = encode_media(model, loader, key, quiet)
    order = np.argsort(indices)
    vision = vision.select(order)
    vision_feat = vision_feat[torch.as_tensor(order, device=vision_feat.device)]
    text, text_feat = encode_texts(model, dataset.texts)
    v2t, t2v = rerank_scores(model, vision, vision_feat, text, text_feat, k_test, quiet, score)
    prefix = "vid" if key == "video" else "img"
    metrics = recall_metrics(v2t, t2v, dataset.txt2img, dataset.img2txt, prefix)
    if model.fuses:
        sim = (vision_feat @ text_feat.t()).float().cpu().numpy()
        itc = recall_metrics(sim, sim.T, dataset.txt2img, dataset.img2txt, prefix)
        metrics.update({f"itc_{name}": itc[name] for name in (f"{prefix}_r1", "txt_r1", "r_mean")})
    return metrics


def _pair_scores(model, vision, text) -> dict[str, torch.Tensor]:
    """Match scores of aligned (text_i, vision_i) pairs: ``itc`` similarity, and the ITM margin as ``itm``
    when the model has fusion layers."""
    scores = {"itc": (text.feat * vision.feat).sum(-1)}
    if model.fuses:
        logits = model.itm_logits(text.tokens, vision.tokens)
        scores["itm"] = logits[:, 1] - logits[:, 0]
    return scores


@torch.no_grad()
def evaluate_binding(model, loader) -> dict:
    """Share of probes whose true caption outscores its colour-swapped twin.

    ``binding_acc`` uses ITM (ITC for dual encoders); models with fusion layers also report the ITC
    similarity's share as ``itc_binding_acc``, which shows what fusion adds.
    """
    device = next(model.parameters()).device
    wins: dict[str, int] = {}
    total = 0
    for batch in loader:
        if "image" not in batch:
            continue
        vision = model.encode_vision(batch["image"].to(device))
        scores = []
        for key in ("caption", "swapped"):
            ids, mask = model.tokenizer(batch[key])
            scores.append(_pair_scores(model, vision, model.encode_text(ids.to(device), mask.to(device))))
        for kind in scores[0]:
            wins[kind] = wins.get(kind, 0) + int((scores[0][kind] > scores[1][kind]).sum())
        total += len(batch["caption"])
    final = "itm" if "itm" in wins else "itc"
    metrics = {"binding_acc": round(100.0 * wins.get(final, 0) / max(total, 1), 2)}
    if final == "itm":
        metrics["itc_binding_acc"] = round(100.0 * wins["itc"] / max(total, 1), 2)
    return metrics
