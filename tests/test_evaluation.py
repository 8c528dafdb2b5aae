"""Retrieval recall against a brute-force reference, re-ranking scores and official VQA accuracy on
hand-made cases."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmfm.evaluation.retrieval import evaluate_retrieval, recall_metrics, rerank_scores
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


def _answers(*groups: tuple[str, int]) -> list[str]:
    """Ten raw annotator answers from (answer, how many) groups."""
    answers = [answer for answer, count in groups for _ in range(count)]
    assert len(answers) == 10
    return answers


def test_vqa_accuracy_reference_cases():
    assert vqa_accuracy("yes", _answers(("Yes", 10))) == 0.0
    assert vqa_accuracy("two", _answers(("2", 10))) == 1.0
    assert vqa_accuracy("t-shirt", _answers(("t-shirt", 10))) == 0.0
    assert vqa_accuracy("2", _answers(("2", 3), ("3", 7))) == pytest.approx(0.9)


def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets():
    for count, expected in ((1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (9, 1.0)):
        assert vqa_accuracy("red", _answers(("red", count), ("blue", 10 - count))) == pytest.approx(expected)


def test_vqa_prediction_gets_punctuation_then_digit_article_processing():
    assert vqa_accuracy("\tYes \n", _answers(("yes", 10))) == 1.0, "whitespace, then lower-case"
    assert vqa_accuracy("The Three!", _answers(("3", 10))) == 1.0, "punctuation, article, number word"
    assert vqa_accuracy("dont know", _answers(("don't know", 10))) == 1.0, "contraction restored"
    assert vqa_accuracy("1,000", _answers(("1000", 6), ("100", 4))) == 1.0, "comma between digits"
    assert vqa_accuracy("3.5", _answers(("3.5", 6), ("3", 4))) == 1.0, "a period before a digit stays"


def test_unanimous_ground_truths_are_compared_unprocessed():
    assert vqa_accuracy("2.", _answers(("2.", 10))) == 0.0, "the prediction loses its period, the truth not"
    assert vqa_accuracy("2.", _answers(("2", 10))) == 1.0
    assert vqa_accuracy("dog", _answers(("a dog", 10))) == 0.0


def test_disagreeing_ground_truths_get_punctuation_processing_only():
    assert vqa_accuracy("t-shirt", _answers(("t-shirt", 5), ("shirt", 5))) == 1.0, "both become 't shirt'"
    assert vqa_accuracy("red,blue", _answers(("red,blue", 4), ("red", 6))) == 1.0, "',' → ' ' on both"
    assert vqa_accuracy("yes", _answers(("Yes", 5), ("no", 5))) == 0.0, "no lower-casing"
    assert vqa_accuracy("two", _answers(("two", 4), ("3", 6))) == 0.0, "no number words → digits"
    assert vqa_accuracy("two", _answers(("two", 4), ("2", 6))) == 1.0
    assert vqa_accuracy("dog", _answers(("a dog", 4), ("cat", 6))) == 0.0, "articles kept"
    assert vqa_accuracy("dont", _answers(("dont", 4), ("no", 6))) == 0.0, "no contractions restored"
    assert vqa_accuracy("red blue", _answers(("red , blue", 4), ("red", 6))) == 0.0, "spaces not collapsed"


def test_vqa_accuracy_with_fewer_than_two_answers_is_exact_match():
    assert vqa_accuracy("a Cat.", ["cat"]) == 1.0
    assert vqa_accuracy("cat", ["Cat"]) == 0.0
    assert vqa_accuracy("cat", []) == 0.0


def test_summarize_breaks_down_by_question_type():
    out = summarize([("count", 1.0), ("count", 0.0), ("color", 1.0)], "vqa")
    assert out["vqa_acc"] == round(100 * 2 / 3, 2)
    assert out["vqa_acc/count"] == 50.0 and out["vqa_acc/color"] == 100.0


def test_video_retrieval_keys_never_overwrite_image_keys():
    from mmfm.tasks.align import video_key

    renamed = {k: video_key(k) for k in ("txt_r1", "vid_r1", "r_mean", "itc_txt_r1", "itc_vid_r1", "itc_r_mean")}
    assert renamed == {"txt_r1": "vid_txt_r1", "vid_r1": "vid_r1", "r_mean": "vid_r_mean",
                       "itc_txt_r1": "itc_vid_txt_r1", "itc_vid_r1": "itc_vid_r1", "itc_r_mean": "itc_vid_r_mean"}


def test_binding_uses_itm_with_fusion_layers_and_reports_itc_beside_it():

    import torch

    from mmfm.evaluation.retrieval import evaluate_binding

    class ColourWordModel:
        """ITC prefers captions that start with "red"; ITM prefers captions that mention "true"."""

        def __init__(self, fusion_layer):
            self.fuses = fusion_layer < 2
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


class _Rows:
    """Stands in for cached tokens (and their fusion context): which gallery rows they hold."""

    def __init__(self, index: torch.Tensor):
        self.index = index

    def select(self, idx):
        return _Rows(self.index[torch.as_tensor(idx)])


class _HandMadeITM:
    """ITM positive logit of (vision v, text t) = itm[v, t]."""

    def __init__(self, itm: torch.Tensor, fusion_layer: int = 1):
        self.fuses = fusion_layer < 2
        self.itm = itm

    def fusion_context(self, vision):
        return vision

    def itm_logits(self, text, vision):
        positive = self.itm[vision.index, text.index]
        return torch.stack([torch.zeros_like(positive), positive], 1)


# ITC similarities of 2 images x 3 texts (vision features = identity, so sim = text_feat.t())
SIM = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
ITM = torch.tensor([[1.0, 3.0, 1.2], [2.0, -1.0, 4.0]])


def _rerank(score: str, k_test: int = 2, fusion_layer: int = 1):
    model = _HandMadeITM(ITM, fusion_layer)
    return rerank_scores(model, _Rows(torch.arange(2)), torch.eye(2), _Rows(torch.arange(3)), SIM.t().clone(),
                         k_test, score=score)


def test_rerank_itm_plus_itc_adds_the_similarity_on_the_top_k():
    v2t, t2v = _rerank("itm+itc")
    assert v2t == pytest.approx(np.array([[1.9, -100, 1.7], [-100, -0.2, 4.3]]))
    assert t2v == pytest.approx((ITM + SIM).t().numpy()), "k_test=2 covers both images"
    assert v2t[0].argmax() == 0


def test_rerank_itm_alone_is_albefs_score():
    v2t, t2v = _rerank("itm")
    assert v2t == pytest.approx(np.array([[1.0, -100, 1.2], [-100, -1.0, 4.0]]))
    assert t2v == pytest.approx(ITM.t().numpy())
    assert v2t[0].argmax() == 2, "without the similarity, image 0 ranks text 2 first"
    v2t, t2v = _rerank("itm", k_test=1)
    assert v2t == pytest.approx(np.array([[1.0, -100, -100], [-100, -1.0, -100]]))
    assert t2v == pytest.approx(np.array([[1.0, -100], [-100, -1.0], [1.2, -100]]))


def test_rerank_without_fusion_layers_is_the_similarity_whatever_the_score():
    for score in ("itm", "itm+itc"):
        v2t, t2v = _rerank(score, fusion_layer=2)
        assert v2t == pytest.approx(SIM.numpy()) and t2v == pytest.approx(SIM.t().numpy())


def test_unknown_rerank_score_is_a_value_error_before_any_encoding():
    with pytest.raises(ValueError, match="itm\\+itc"):
        _rerank("itc+itm")
    with pytest.raises(ValueError, match="'sum'"):
        evaluate_retrieval(_HandMadeITM(ITM), loader=None, dataset=None, score="sum")
