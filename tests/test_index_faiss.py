"""Large indexes: approximate faiss search above the switch point, exact below; incremental add; save/load
of the faiss structure without retraining; format and model checks; a resumed `mmfm index build`."""

import dataclasses
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from mmfm.errors import InputError, ModelError
from mmfm.inference.index import ApproxSearch, Index
from mmfm.models.trunk import TokenBatch

faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed: pip install 'mmfm[faiss]' (in the dev extra)")

ZOO_MODEL = "mmfm-shapes-s"


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """OpenMP threads spin-wait: on the shared 2-core CI machine one thread is several times faster."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def unit_vectors(count: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(count, dim, generator=generator), dim=1)


def features_index(features: torch.Tensor, prefix: str = "item", **approx) -> Index:
    """An index of features only (tokens are a placeholder: ITC search never reads them)."""
    ids = [f"{prefix}{i}" for i in range(len(features))]
    return Index("image", ids, features, TokenBatch(torch.zeros(len(features), 1, 1)),
                 approx=ApproxSearch(**approx))


def exact_ids(index: Index, queries: torch.Tensor, k: int) -> list[list[str]]:
    rows = (queries @ index.features.t()).topk(k, dim=1).indices.tolist()
    return [[index.ids[j] for j in row] for row in rows]


def recall(results, truth) -> float:
    return sum(len({hit.id for hit in hits} & set(want)) for hits, want in zip(results, truth)) / sum(
        len(want) for want in truth)


@pytest.fixture(scope="module")
def large():
    """20k random unit vectors of dim 64, searched approximately from 1,000 items on (the default kind)."""
    index = features_index(unit_vectors(20_000, 64, seed=0), min_items=1_000).prepare()
    assert type(index._ann).__name__ == "IndexRefineFlat"  # the approximate path is really taken
    return index


def test_approximate_recall_at_10_against_exact(large):
    queries = unit_vectors(200, 64, seed=1)
    assert recall(large.search_features(queries, k=10), exact_ids(large, queries, 10)) >= 0.95


@pytest.mark.parametrize("kind,settings", [("ivf", {"nprobe": 40}), ("hnsw", {"ef_search": 64})])
def test_ivf_and_hnsw_find_the_exact_neighbours(kind, settings):
    index = features_index(unit_vectors(2_000, 32, seed=2), min_items=1_000, kind=kind, **settings)
    queries = unit_vectors(50, 32, seed=3)
    assert recall(index.search_features(queries, k=10), exact_ids(index, queries, 10)) >= 0.9
    assert index._ann is not None


def test_below_the_switch_point_search_is_exact():
    index = features_index(unit_vectors(1_500, 32, seed=4), min_items=2_000)
    queries = unit_vectors(20, 32, seed=5)
    hits = index.search_features(queries, k=10)
    scores, rows = (queries @ index.features.t()).topk(10, dim=1)
    assert [[h.id for h in row] for row in hits] == [[index.ids[j] for j in row] for row in rows.tolist()]
    assert [[h.score for h in row] for row in hits] == scores.tolist()
    assert index._ann is None


def test_without_faiss_large_search_is_exact_with_a_warning(monkeypatch):
    import mmfm.inference.index as index_module

    monkeypatch.setattr(index_module, "_import_faiss", lambda: None)
    index = features_index(unit_vectors(1_500, 16, seed=13), min_items=1_000)
    queries = unit_vectors(5, 16, seed=14)
    with pytest.warns(UserWarning, match=r"faiss is not installed.*mmfm\[faiss\]"):
        hits = index.search_features(queries, k=5)
    assert [[h.id for h in row] for row in hits] == exact_ids(index, queries, 5)


def test_bad_settings_are_clear_errors():
    with pytest.raises(InputError, match="kind 'lsh'"):
        ApproxSearch(kind="lsh")
    with pytest.raises(InputError, match="nprobe=0"):
        ApproxSearch(nprobe=0)
    with pytest.raises(InputError, match="min_items=10"):
        ApproxSearch(min_items=10)


def test_add_extends_the_faiss_structure_and_finds_new_items():
    index = features_index(unit_vectors(5_000, 32, seed=6), min_items=1_000).prepare()
    trained = index._ann
    new = features_index(unit_vectors(40, 32, seed=7), prefix="new")
    index.add(new)
    assert len(index) == 5_040 and index._ann is trained and trained.ntotal == 5_040  # added, not rebuilt
    hits = index.search_features(new.features, k=3)
    assert [row[0].id for row in hits] == new.ids
    assert [row[0].score for row in hits] == pytest.approx([1.0] * 40, abs=1e-5)
    with pytest.raises(InputError, match="already holds"):
        index.add(features_index(new.features[:2], prefix="new"))


def test_changing_the_kind_rebuilds_the_structure():
    index = features_index(unit_vectors(2_000, 32, seed=8), min_items=1_000).prepare()
    index.approx = dataclasses.replace(index.approx, k_factor=8)  # a search setting: the structure stays
    assert index._ann is not None
    index.approx = dataclasses.replace(index.approx, kind="hnsw")
    assert index._ann is None and type(index.prepare()._ann).__name__ == "IndexHNSWFlat"


def test_save_load_round_trip_keeps_the_faiss_structure(large, tmp_path, monkeypatch):
    queries = unit_vectors(30, 64, seed=9)
    before = large.search_features(queries, k=10)
    large.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["format"] == 2 and set(meta["files"]) == {"tensors", "ann"}
    import mmfm.inference.index as index_module

    monkeypatch.setattr(index_module, "_build_ann", lambda *a: pytest.fail("the loaded index was retrained"))
    loaded = Index.load(tmp_path / "idx")
    after = loaded.search_features(queries, k=10)
    assert [[h.id for h in row] for row in after] == [[h.id for h in row] for row in before]
    assert [[h.score for h in row] for row in after] == [[h.score for h in row] for row in before]
    assert loaded.approx == large.approx and loaded.ids == large.ids
    # a second save replaces the files of the first: one commit, nothing left over
    loaded.save(tmp_path / "idx")
    names = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert len(names) == 3 and names[-1] == "index.json" and not any(n.endswith(".tmp") for n in names)


def test_newer_format_is_a_clear_error(tmp_path):
    features_index(unit_vectors(10, 8, seed=10), min_items=1_000).save(tmp_path / "idx")
    meta_path = tmp_path / "idx" / "index.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "format": 99}))
    with pytest.raises(InputError, match="index format 99 is not one this mmfm reads.*upgrade mmfm"):
        Index.load(tmp_path / "idx")


def test_format_1_index_still_loads(tmp_path):
    from safetensors.torch import save_file

    features = unit_vectors(4, 8, seed=11)
    (tmp_path / "old").mkdir()
    save_file({"features": features, "tokens": torch.zeros(4, 1, 1)}, str(tmp_path / "old" / "index.safetensors"))
    (tmp_path / "old" / "index.json").write_text(json.dumps(
        {"format": "1", "modality": "image", "ids": list("abcd"), "fingerprint": "", "metadata": {}}))
    assert Index.load(tmp_path / "old").search_features(features[2:3], k=1)[0][0].id == "c"


# ---- with the zoo model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo_pipe():
    import mmfm

    return mmfm.load(ZOO_MODEL, device="cpu")


@pytest.fixture(scope="module")
def shape_images(tiny_shapes):
    return sorted(str(p) for p in (tiny_shapes / "images").rglob("*.png"))[:24]


def test_rerank_runs_on_approximate_candidates(zoo_pipe, shape_images):
    index = zoo_pipe.index(images=shape_images, progress=False, approx=ApproxSearch(min_items=1_000))
    # filler items far from any caption, sharing real tokens, take the index past the switch point
    count = 1_000 - len(index)
    filler = Index("image", [f"filler{i}" for i in range(count)], unit_vectors(count, index.features.shape[1], 12),
                   TokenBatch(index.tokens.x[:1].expand(count, -1, -1)), zoo_pipe.fingerprint)
    index.add(filler)
    captions = ["a red circle", "a blue square left of a green triangle", "two yellow stars"]
    approximate = index.search_texts(captions, k=5, rerank=8)
    assert type(index._ann).__name__ == "IndexRefineFlat"
    index.approx = dataclasses.replace(index.approx, min_items=len(index) + 1)
    exact = index.search_texts(captions, k=5, rerank=8)
    for got, want in zip(approximate, exact):
        assert all(hit.itm is not None for hit in got)
        assert [h.id for h in got] == [h.id for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-4)


def test_index_of_another_model_names_both(zoo_pipe, shape_images, tmp_path):
    from mmfm.inference.pipeline import Pipeline
    from mmfm.models.model import MMFM

    zoo_pipe.index(images=shape_images[:3], progress=False).save(tmp_path / "idx")
    other = Pipeline(MMFM(zoo_pipe.model.cfg), "cpu", name="untrained-demo")
    with pytest.raises(ModelError) as error:
        Index.load(tmp_path / "idx", pipeline=other)
    message = str(error.value)
    assert ZOO_MODEL in message and "untrained-demo" in message
    assert zoo_pipe.fingerprint[:12] in message and other.fingerprint[:12] in message


SLOW_BUILD = """
import sys, time
from mmfm.inference.pipeline import Pipeline
encode = Pipeline.encode_pixels
Pipeline.encode_pixels = lambda self, pixels: (time.sleep(0.4), encode(self, pixels))[1]
from mmfm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_interrupted_build_resumes_after_the_last_chunk(shape_images, tmp_path, monkeypatch):
    from mmfm.cli import main
    from mmfm.inference.pipeline import Pipeline

    (tmp_path / "images").mkdir()
    for number, path in enumerate(shape_images):
        (tmp_path / "images" / f"{number:03d}.png").symlink_to(path)
    args = ["--quiet", "index", "build", "--model", ZOO_MODEL, "--images", str(tmp_path / "images"),
            "--chunk-size", "4", "--batch-size", "2", "--out"]
    partial = tmp_path / "resumed" / "build.partial"
    build = subprocess.Popen([sys.executable, "-c", SLOW_BUILD, *args, str(tmp_path / "resumed")])
    deadline = time.monotonic() + 120
    while len(list(partial.glob("chunk-*.safetensors"))) < 2 and build.poll() is None:
        assert time.monotonic() < deadline, "the build wrote no chunk in 120 s"
        time.sleep(0.05)
    build.send_signal(signal.SIGKILL)
    assert build.wait() == -signal.SIGKILL
    finished = len(list(partial.glob("chunk-*.safetensors"))) * 4
    assert 8 <= finished < len(shape_images) and not (tmp_path / "resumed" / "index.json").exists()

    encoded = []
    encode = Pipeline.encode_pixels
    monkeypatch.setattr(Pipeline, "encode_pixels", lambda self, pixels: encoded.append(len(pixels))
                        or encode(self, pixels))
    assert main([*args, str(tmp_path / "resumed")]) == 0
    assert sum(encoded) == len(shape_images) - finished  # only the unfinished chunks were encoded
    assert not partial.exists()
    assert main([*args, str(tmp_path / "whole")]) == 0
    resumed, whole = Index.load(tmp_path / "resumed"), Index.load(tmp_path / "whole")
    assert resumed.ids == whole.ids and len(resumed) == len(shape_images)
    # equal up to float rounding: the killed process ran with other thread counts (reduction order)
    torch.testing.assert_close(resumed.features, whole.features, rtol=0, atol=1e-5)
    torch.testing.assert_close(resumed.tokens.x, whole.tokens.x, rtol=1e-4, atol=1e-4)
