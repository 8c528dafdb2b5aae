"""Retrieval recall against a brute-force reference; VQA accuracy on hand-made cases."""

import numpy as np

from mmfm.evaluation.retrieval import recall_metrics
from mmfm.evaluation.vqa import summarize, vqa_accuracy


def _brute_force(v2t, t2v, txt2img, img2txt, k):
    hits_v2t = [any(t in np.argsort(-row)[:k] for t in img2txt[i]) for i, row in enumerate(v2t)]
    hits_t2v = [txt2img[t] in np.argsort(-row)[:k] for t, row in enumerate(t2v)]
    return 100 * np.mean(hits_v2t), 100 * np.mean(hits_t2v)


def test_recall_matches_brute_force_on_random_scores():
    rng = np.random.default_rng(0)
    n_img, per = 30, 5
    img2txt = [list(range(i * per, (i + 1) * per)) for i in range(n_img)]
    txt2img = [i for i in range(n_img) for _ in range(per)]
    scores = rng.normal(size=(n_img, n_img * per))
    for i, texts in enumerate(img2txt):
        scores[i, texts] += rng.uniform(0, 3)
    metrics = recall_metrics(scores, scores.T.copy(), txt2img, img2txt)
    for k in (1, 5, 10):
        v2t, t2v = _brute_force(scores, scores.T, txt2img, img2txt, k)
        assert abs(metrics[f"txt_r{k}"] - round(v2t, 2)) < 1e-6
        assert abs(metrics[f"img_r{k}"] - round(t2v, 2)) < 1e-6
    assert metrics["txt_r1"] <= metrics["txt_r5"] <= metrics["txt_r10"]


def test_perfect_scores_give_full_recall_and_video_prefix():
    img2txt = [[0, 1], [2, 3]]
    txt2img = [0, 0, 1, 1]
    v2t = np.array([[1.0, 0.9, 0.1, 0.0], [0.0, 0.1, 0.9, 1.0]])
    metrics = recall_metrics(v2t, v2t.T.copy(), txt2img, img2txt, vision_prefix="vid")
    assert metrics["txt_r1"] == 100.0 and metrics["vid_r1"] == 100.0 and metrics["r_mean"] == 100.0


def test_vqa_accuracy_official_cases():
    assert vqa_accuracy("red", ["red"] * 10) == 1.0
    assert vqa_accuracy("blue", ["red"] * 10) == 0.0
    two = ["red"] * 2 + ["blue"] * 8
    assert abs(vqa_accuracy("red", two) - (8 * (2 / 3) + 2 * (1 / 3)) / 10) < 1e-9
    three = ["red"] * 3 + ["blue"] * 7
    assert abs(vqa_accuracy("red", three) - (7 * 1.0 + 3 * (2 / 3)) / 10) < 1e-9
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0, "number words normalise to digits"
    assert vqa_accuracy("a dog.", ["dog"] * 10) == 1.0, "articles and punctuation are stripped"


def test_summarize_breaks_down_by_question_type():
    out = summarize([("count", 1.0), ("count", 0.0), ("color", 1.0)], "vqa")
    assert out["vqa_acc"] == round(100 * 2 / 3, 2)
    assert out["vqa_acc/count"] == 50.0 and out["vqa_acc/color"] == 100.0


def test_video_retrieval_keys_never_overwrite_image_keys():
    from mmfm.factory import _video_key

    renamed = {k: _video_key(k) for k in ("txt_r1", "vid_r1", "r_mean", "itc_txt_r1", "itc_vid_r1", "itc_r_mean")}
    assert renamed == {"txt_r1": "vid_txt_r1", "vid_r1": "vid_r1", "r_mean": "vid_r_mean",
                       "itc_txt_r1": "itc_vid_txt_r1", "itc_vid_r1": "itc_vid_r1", "itc_r_mean": "itc_vid_r_mean"}


def test_binding_uses_itm_with_fusion_layers_and_reports_itc_beside_it():
    from types import SimpleNamespace

    import torch

    from mmfm.evaluation.retrieval import evaluate_binding

    class ColourWordModel:
        """ITC prefers captions that start with "red"; ITM prefers captions that mention "true"."""

        def __init__(self, fusion_layer):
            self.cfg = SimpleNamespace(fusion_layer=fusion_layer, depth=2)
            self.weight = torch.zeros(1)

        def parameters(self):
            return iter([self.weight])

        def tokenizer(self, texts):
            ids = torch.tensor([[t.startswith("red"), "true" in t] for t in texts], dtype=torch.float)
            return ids, ids.bool()

        def encode_vision(self, pixels):
            return SimpleNamespace(feat=torch.ones(len(pixels), 1), tokens=None)

        def encode_text(self, ids, mask):
            return SimpleNamespace(feat=ids[:, :1], tokens=ids[:, 1:])

        def itm_logits(self, text_tokens, vision_tokens):
            return torch.cat([torch.zeros_like(text_tokens), text_tokens], 1)

    batch = {"image": torch.zeros(4, 3, 2, 2), "caption": ["red true", "red true", "blue true", "blue x"],
             "swapped": ["blue x", "red x", "red x", "red true"]}
    fused = evaluate_binding(ColourWordModel(fusion_layer=1), [batch])
    assert fused == {"binding_acc": 75.0, "itc_binding_acc": 25.0}
    assert evaluate_binding(ColourWordModel(fusion_layer=2), [batch]) == {"binding_acc": 25.0}
