"""Inference API: mmfm.load, Index build / search / re-rank / save-load, VQA, and bad inputs (InputError)."""

import random

import pytest
import torch
from inference_fixtures import *
from inference_fixtures import GALLERY_SIZE

import mmfm
from mmfm.errors import InputError, ModelError, ZooError
from mmfm.inference.index import Index


def _hit_rate(results, expected, k):
    return sum(want in [hit.id for hit in hits[:k]] for hits, want in zip(results, expected)) / len(expected)


def test_import_mmfm_is_light():
    import subprocess
    import sys

    code = "import sys, mmfm; assert 'torch' not in sys.modules; print(sorted(mmfm.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Index" in out and "load" in out


def test_load_puts_model_in_eval_with_checkpoint_preprocessing(tiny_pipe):
    assert not tiny_pipe.model.training
    assert tiny_pipe.image_size == 64 and tiny_pipe.num_frames == 4
    assert tiny_pipe.device.type == "cpu" and next(tiny_pipe.model.parameters()).device.type == "cpu"


def test_exact_caption_retrieves_its_image_far_above_chance(tiny_pipe, image_index, gallery):
    paths, captions = gallery
    itc = image_index.search_texts(captions, k=5)
    reranked = image_index.search_texts(captions, k=5, rerank=8)
    shuffled = paths[:]
    random.Random(0).shuffle(shuffled)
    chance = 5 / GALLERY_SIZE
    assert _hit_rate(itc, paths, 5) >= 0.75 > chance + 0.3
    assert _hit_rate(reranked, paths, 5) >= 0.75
    assert _hit_rate(reranked, shuffled, 5) < 0.75  # a broken id <-> row mapping would fail the rows above
    assert all(hit.itm is not None for hit in reranked[0])


def test_single_and_batched_search_agree(image_index, gallery):
    captions = gallery[1]
    batched = image_index.search_texts(captions[:3], k=4, rerank=4)
    for caption, hits in zip(captions[:3], batched):
        single = image_index.search(text=caption, k=4, rerank=4)
        assert [h.id for h in single] == [h.id for h in hits]
        assert [h.score for h in single] == pytest.approx([h.score for h in hits], abs=1e-4)


def test_reranked_scores_equal_manual_fusion(tiny_pipe, image_index, gallery):
    captions = gallery[1]
    hits = image_index.search(text=captions[2], k=3, rerank=6)
    model = tiny_pipe.model
    ids, mask = model.tokenizer([captions[2]])
    with torch.inference_mode():
        text = model.encode_text(ids, mask)
        for hit in hits:
            vision = model.encode_vision(tiny_pipe.read_image(hit.id)[None])
            itm = float(model.itm_logits(text.tokens, vision.tokens)[0, 1])
            itc = float(text.feat[0] @ vision.feat[0])
            assert hit.itm == pytest.approx(itm, abs=1e-4)
            assert hit.itc == pytest.approx(itc, abs=1e-5)
            assert hit.score == pytest.approx(itm + itc, abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_k_larger_than_rerank_appends_itc_hits(image_index, gallery):
    hits = image_index.search(text=gallery[1][0], k=6, rerank=2)
    assert len(hits) == 6 and len({h.id for h in hits}) == 6
    assert [h.itm is not None for h in hits] == [True, True, False, False, False, False]


def test_save_load_round_trip_gives_same_results(tiny_pipe, image_index, gallery, tmp_path):
    image_index.save(tmp_path / "idx")
    assert not list((tmp_path / "idx").glob(".*.tmp"))
    loaded = Index.load(tmp_path / "idx", pipeline=tiny_pipe)
    assert loaded.ids == image_index.ids
    torch.testing.assert_close(loaded.tokens.x, image_index.tokens.x)
    for caption in gallery[1][:3]:
        before = image_index.search(text=caption, k=5, rerank=5)
        after = tiny_pipe.search(Index.load(tmp_path / "idx"), text=caption, k=5, rerank=5)
        assert [h.id for h in before] == [h.id for h in after]
        # equal up to float rounding: a BLAS call on other memory may differ in the last bit
        assert [h.score for h in before] == pytest.approx([h.score for h in after], abs=1e-6)


def test_index_bound_to_another_model_is_refused(image_index, tmp_path):
    from mmfm.inference.pipeline import Pipeline
    from mmfm.models.model import MMFM

    other = Pipeline(MMFM(image_index.pipeline.model.cfg), "cpu")
    image_index.save(tmp_path / "idx")
    with pytest.raises(ModelError, match="another model"):
        Index.load(tmp_path / "idx", pipeline=other)
    with pytest.raises(InputError, match="not bound"):
        Index.load(tmp_path / "idx").search(text="a red circle")


def test_image_query_over_text_index_and_image_index(tiny_pipe, gallery):
    paths, captions = gallery
    text_index = tiny_pipe.index(texts=captions, ids=[f"cap{i}" for i in range(len(captions))])
    hits = text_index.search_pixels(torch.stack([tiny_pipe.read_image(p) for p in paths]), k=5, rerank=5)
    assert _hit_rate(hits, [f"cap{i}" for i in range(len(paths))], 5) >= 0.75
    image_index = tiny_pipe.index(images=paths[:4], progress=False)
    assert image_index.search(image=paths[3], k=1)[0].id == paths[3]


def test_video_index_and_video_search(tiny_pipe, videos):
    index = tiny_pipe.index(videos=videos[:3], progress=False)
    assert index.tokens.roll is not None and index.tokens.x.shape[0] == 3
    hits = index.search(text="a red circle moves left", k=3, rerank=3)
    assert sorted(h.id for h in hits) == sorted(videos[:3])
    assert index.search(video=videos[1], k=1)[0].id == videos[1]


def test_answer_image_and_video(tiny_pipe, gallery, videos):
    answers = tiny_pipe.answer(gallery[0][0], "is there a red circle?", topk=5)
    assert len(answers) == 5 and all(a in tiny_pipe.model.answers["vqa"] for a, _ in answers)
    probs = [p for _, p in answers]
    assert probs == sorted(probs, reverse=True) and all(0.0 <= p <= 1.0 for p in probs)
    video_answers = tiny_pipe.answer(videos[0], "in which direction does it move?", topk=3)
    assert all(a in tiny_pipe.model.answers["video_qa"] for a, _ in video_answers)


def test_answer_batch_matches_single_answers(tiny_pipe, gallery, videos):
    paths = [gallery[0][0], videos[0], gallery[0][1]]
    questions = ["is there a red circle?", "where does it move?", "how many shapes are there?"]
    batched = tiny_pipe.answer_batch(paths, questions, topk=3)
    for path, question, answers in zip(paths, questions, batched):
        single = tiny_pipe.answer(path, question, topk=3)
        assert [a for a, _ in single] == [a for a, _ in answers]
        assert [p for _, p in single] == pytest.approx([p for _, p in answers], abs=1e-5)


@pytest.mark.parametrize("name,call,match", [
    ("not_image", lambda p, f: p.answer(f["not_image"], "what?"), "not_image.png: cannot decode"),
    ("bad_video", lambda p, f: p.answer(f["bad_video"], "what?"), "broken.mp4"),
    ("bomb", lambda p, f: p.answer(f["bomb"], "what?"), "decompression bomb"),
    ("index_bomb", lambda p, f: p.index(images=[f["bomb"]], progress=False), "decompression bomb"),
    ("empty_question", lambda p, f: p.answer(f["not_image"], "  "), "question is empty"),
])
def test_bad_inputs_raise_input_error(tiny_pipe, bad_inputs, name, call, match):
    with pytest.raises(InputError, match=match):
        call(tiny_pipe, bad_inputs)


def test_search_argument_errors(image_index):
    with pytest.raises(InputError, match="exactly one"):
        image_index.search(text="a", image="b.png")
    with pytest.raises(InputError, match="k=0"):
        image_index.search(text="a red circle", k=0)
    with pytest.raises(InputError, match="text is empty"):
        image_index.search(text="")


def test_unknown_names_suggest_close_matches(tmp_path, monkeypatch):
    manifest = tmp_path / "models.yaml"
    manifest.write_text("[]\n")
    monkeypatch.setenv("MMFM_ZOO_MANIFEST", str(manifest))
    with pytest.raises(ZooError, match="unknown model 'nope'"):
        mmfm.load("nope")
    with pytest.raises(ModelError, match="no such file"):
        mmfm.create_model("runs/missing/model.safetensors")
    assert mmfm.list_models() == []
