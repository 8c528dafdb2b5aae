"""Annotation formats: every dataset round-trips, VQAv2 / MSRVTT conversion, answer normalisation."""

import numpy as np
import pytest
import torch

from mmfm.data import (
    BindingDataset,
    ImageTextDataset,
    QuestionBank,
    RetrievalEvalDataset,
    SegmentationDataset,
    VQADataset,
    eval_transform,
    load_msrvtt,
    load_vqav2,
    normalize_answer,
    train_transform,
    vqa_soft_scores,
)
from mmfm.data.formats import strip_punctuation
from mmfm.errors import DataError

SIZE = 16


@pytest.fixture
def images(tmp_path, write_png):
    (tmp_path / "img").mkdir()
    return [write_png(tmp_path / "img" / f"{i}.png", color=(40 * i, 0, 0)) for i in range(3)]


def test_normalize_answer_matches_official_rules():
    assert normalize_answer("Two") == "2"
    assert normalize_answer("the dog.") == "dog"
    assert normalize_answer("a red, blue") == "red blue"
    assert normalize_answer("dont know") == "don't know"
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer(" yes\n") == "yes"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("T-Shirt") == "t shirt"
    assert normalize_answer("none of them") == "0 of them"


def test_strip_punctuation_is_the_official_process_punctuation():
    assert strip_punctuation("t-shirt") == "t shirt", "a mark touching no space becomes a space"
    assert strip_punctuation("red , blue") == "red  blue", "a mark next to a space is deleted"
    assert strip_punctuation("red, blue-green") == "red blue green", "each mark decides for itself"
    assert strip_punctuation("a-b - c-d") == "ab  cd", "one spaced occurrence deletes them all"
    assert strip_punctuation("1,000 (approx)") == "1000 approx", "a digit comma deletes every mark"
    assert strip_punctuation("Dr. No.") == "Dr No", "periods go unless a digit follows; case is kept"
    assert strip_punctuation("3.5 m.") == "3.5 m"


def test_soft_score_is_the_official_accuracy_per_annotator_count():
    scores = vqa_soft_scores(["two"] * 2 + ["2"] * 2 + ["three"] + ["a cat"] * 5)
    assert scores == {"2": 1.0, "3": 0.3, "cat": 1.0}, "normalised answers pool their votes"
    assert vqa_soft_scores(["no"] * 2 + ["yes"] * 3 + ["Yes."] * 5) == {"no": 0.6, "yes": 1.0}
    assert vqa_soft_scores(["red"] * 3 + ["blue"] * 4 + ["green"] * 3) == {"red": 0.9, "blue": 1.0, "green": 0.9}


def test_image_text_dataset_round_trip(tmp_path, images, write_json):
    ann = write_json(tmp_path / "pretrain.json", [
        {"image": "img/0.png", "caption": "a red square", "image_id": "coco_5"},
        {"image": images[1], "caption": "an absolute path", "image_id": "coco_9"},
        {"image": "img/0.png", "caption": "same image again", "image_id": "coco_5"}])
    ds = ImageTextDataset(ann, root=tmp_path, transform=eval_transform(SIZE))
    first, second, third = ds[0], ds[1], ds[5]
    assert first["image"].shape == (3, SIZE, SIZE) and first["image"].dtype == torch.float32
    assert (first["text"], first["image_id"], first["index"]) == ("a red square", 0, 0)
    assert (second["text"], second["image_id"]) == ("an absolute path", 1)
    assert (third["index"], third["image_id"], third["text"]) == (2, 0, "same image again")  # g % len
    red = (40 * 0 / 255 - 0.485) / 0.229
    assert first["image"][0].mean().item() == pytest.approx(red, abs=1e-3)


def test_retrieval_eval_dataset_maps_texts_and_images(tmp_path, images, write_json):
    ann = write_json(tmp_path / "test.json", [
        {"image": "img/0.png", "caption": ["a", "b"], "image_id": 0},
        {"image": "img/1.png", "caption": ["c", "d", "e"], "image_id": 1}])
    ds = RetrievalEvalDataset(ann, root=tmp_path, transform=eval_transform(SIZE))
    assert ds.texts == ["a", "b", "c", "d", "e"]
    assert ds.txt2img == [0, 0, 1, 1, 1]
    assert ds.img2txt == [[0, 1], [2, 3, 4]]
    item = ds[1]
    assert set(item) == {"image", "image_id", "index"} and item["index"] == 1


def test_vqa_dataset_target_and_fields(tmp_path, images, write_json):
    answer_list = write_json(tmp_path / "answer_list.json", ["2", "yes", "red"])
    ann = write_json(tmp_path / "vqa.json", [
        {"question_id": 7, "question": "how many?", "answer": ["two", "2", "Two", "3"], "image": "img/0.png",
         "dataset": "vqa", "question_type": "how many"},
        {"question_id": 8, "question": "color?", "answer": ["blue", "red"], "image": "img/1.png", "dataset": "vqa"}])
    ds = VQADataset(ann, root=tmp_path, transform=eval_transform(SIZE), answer_list=answer_list)
    first, second = ds[0], ds[1]
    assert first["target"].tolist() == pytest.approx([0.9, 0.0, 0.0])  # "two", "2", "Two": 3 annotators
    assert second["target"].tolist() == pytest.approx([0, 0, 0.3])  # "blue" is outside the list
    assert (first["question"], first["question_id"], first["question_type"]) == ("how many?", 7, "how many")
    assert first["answers"] == ["two", "2", "Two", "3"] and second["question_type"] == ""


def test_image_text_samples_carry_a_question_of_their_own_image(tmp_path, write_png, write_json):
    (tmp_path / "img").mkdir()
    left_red = np.zeros((SIZE, SIZE, 3), np.uint8)
    left_red[:, : SIZE // 2, 0] = 255
    write_png(tmp_path / "img" / "0.png", left_red)
    write_png(tmp_path / "img" / "1.png", color=(0, 0, 255))
    answer_list = ["yes", "no", "left", "right", "blue"]
    vqa = VQADataset(write_json(tmp_path / "vqa.json", [
        {"question_id": 1, "question": "is the red half on the left?", "answer": ["yes"] * 3, "image": "img/0.png"},
        {"question_id": 2, "question": "which side is red?", "answer": ["left"] * 3, "image": "img/0.png"},
        {"question_id": 3, "question": "what color?", "answer": ["blue"] * 3, "image": "img/1.png"}]),
        root=tmp_path, answer_list=answer_list)
    pairs = write_json(tmp_path / "pairs.json", [
        {"image": "img/0.png", "caption": "red on the left", "image_id": 0},
        {"image": "img/1.png", "caption": "all blue", "image_id": 1},
        {"image": "img/2.png", "caption": "no questions", "image_id": 2}])
    write_png(tmp_path / "img" / "2.png", color=(0, 255, 0))
    ds = ImageTextDataset(pairs, root=tmp_path, transform=train_transform(SIZE, scale=(1, 1), flip=True),
                          questions=QuestionBank(vqa))
    asked = set()
    for g in range(0, 60, 3):
        sample = ds[g]
        side = "right" if sample["image"][0, :, -1].mean() > sample["image"][0, :, 0].mean() else "left"
        expected = {f"is the red half on the {side}?": "yes", "which side is red?": side}
        assert sample["has_question"] and sample["text"] == f"red on the {side}"
        assert sample["target"].max() == pytest.approx(0.9)  # 3 annotators
        assert answer_list[int(sample["target"].argmax())] == expected[sample["question"]]
        asked.add((sample["question"], side))
    assert len(asked) == 4, "both questions, flipped and not, are drawn"
    assert ds[1]["question"] == "what color?" and answer_list[int(ds[1]["target"].argmax())] == "blue"
    lonely = ds[2]
    assert (lonely["question"], lonely["has_question"], float(lonely["target"].sum())) == ("", False, 0.0)


def test_segmentation_dataset_same_geometry_on_image_and_mask(tmp_path, write_png, write_json):
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, 20:] = 255
    mask = np.zeros((20, 40), np.uint8)
    mask[:, 20:] = 3
    mask[0, 0] = 255
    write_png(tmp_path / "im.png", rgb)
    write_png(tmp_path / "m.png", mask)
    ann = write_json(tmp_path / "seg.json", [{"image": "im.png", "mask": "m.png"}])
    ds = SegmentationDataset(ann, root=tmp_path, transform=train_transform(SIZE, scale=(0.9, 1.0)))
    for g in range(6):
        item = ds[g]
        assert item["mask"].dtype == torch.long and item["mask"].shape == (SIZE, SIZE)
        bright = item["image"].mean(0) > 0
        assert torch.equal(bright, item["mask"] == 3)  # mask follows the image through crop and flip
    eval_item = SegmentationDataset(ann, root=tmp_path, transform=eval_transform(SIZE))[0]
    assert set(eval_item["mask"].unique().tolist()) <= {0, 3, 255}


def test_binding_dataset_fields(tmp_path, images, write_json):
    ann = write_json(tmp_path / "binding.json", [
        {"image": "img/2.png", "caption": "a red circle", "swapped": "a blue circle", "image_id": 4}])
    item = BindingDataset(ann, root=tmp_path, transform=eval_transform(SIZE))[0]
    assert (item["caption"], item["swapped"], item["image_id"]) == ("a red circle", "a blue circle", 4)
    assert item["image"].shape == (3, SIZE, SIZE)


def test_missing_annotation_file_and_key_raise_data_error(tmp_path, write_json):
    with pytest.raises(DataError, match="nope.json"):
        ImageTextDataset(tmp_path / "nope.json")
    with pytest.raises(DataError, match="empty.json: no entries"):
        ImageTextDataset(write_json(tmp_path / "empty.json", []))
    bad = write_json(tmp_path / "bad.json", [{"image": "x.png"}])
    with pytest.raises(DataError, match=r"bad.json: entry 0 lacks key\(s\) \['caption'\]"):
        ImageTextDataset(bad)


def test_load_vqav2_converts_official_files(tmp_path, write_json):
    questions = write_json(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [
        {"question_id": 10, "image_id": 42, "question": "What is it?"}]})
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
               for i, a in enumerate(["cat"] * 7 + ["dog"] * 3)]
    annotations = write_json(tmp_path / "a.json", {"annotations": [
        {"question_id": 10, "image_id": 42, "question_type": "what is", "answer_type": "other",
         "multiple_choice_answer": "cat", "answers": answers}]})
    (entry,) = load_vqav2(questions, annotations, "/coco/val2014")
    assert entry["image"] == "/coco/val2014/COCO_val2014_000000000042.jpg"
    assert entry["answer"] == ["cat"] * 7 + ["dog"] * 3
    assert (entry["question_id"], entry["question"], entry["question_type"]) == (10, "What is it?", "what is")
    ds = VQADataset([entry], answer_list=["dog", "cat"])
    assert ds.target(entry["answer"]).tolist() == pytest.approx([0.9, 1.0])
    with pytest.raises(DataError, match="q.json"):
        load_vqav2(questions, questions, "/coco")


def test_load_msrvtt_all_shapes(tmp_path, write_json):
    flat = write_json(tmp_path / "flat.json", [
        {"video_id": "video7", "caption": "a man sings"}, {"video_id": "video8", "caption": ["x", "y"]},
        {"video_id": "video7", "caption": "a man dances"}])
    named = write_json(tmp_path / "named.json", [{"video": "clip.avi", "caption": "z"}])
    data = write_json(tmp_path / "MSRVTT_data.json", {
        "videos": [{"video_id": "video1"}],
        "sentences": [{"video_id": "video1", "caption": "one", "sen_id": 0},
                      {"video_id": "video1", "caption": "two", "sen_id": 1}]})
    assert load_msrvtt(flat, "/v") == [
        {"video": "/v/video7.mp4", "caption": ["a man sings", "a man dances"], "video_id": "video7"},
        {"video": "/v/video8.mp4", "caption": ["x", "y"], "video_id": "video8"}]
    assert load_msrvtt(named, "/v") == [{"video": "/v/clip.avi", "caption": ["z"], "video_id": "clip"}]
    assert load_msrvtt(data, "/v") == [{"video": "/v/video1.mp4", "caption": ["one", "two"], "video_id": "video1"}]
