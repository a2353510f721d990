"""A user's own data, as a new user brings it: a small ImageFolder tree sharded with the CLI defaults and
trained with the default recipe on 2 ranks, and on 1 rank from a single train shard; webdataset shards
another tool wrote; list files checked against the published splits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from data_fixtures import write_imagefolder

from ltdist.data import read_index
from ltdist.data.shards import main as shards_main

# ~1 500 grayscale images in 10 classes, 400 … 8 per class, train/ and test/ only.
OWN_TRAIN = [400, 300, 220, 160, 120, 90, 60, 40, 20, 8]
OWN_TEST = [10] * 10


@pytest.fixture(scope="module")
def own_tree(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("own") / "tree", {"train": OWN_TRAIN, "test": OWN_TEST},
                             size=28)


def _launch(tmp_path, shards, ranks: int, run_id: str, *overrides: str) -> subprocess.CompletedProcess:
    """The default recipe (resnet32, 28 px, 2 loader workers per rank, cosine head, KT) for two steps."""
    args = ["--cluster", "local", f"data.shards={shards}", "data.format=imagefolder", f"output.root={tmp_path}",
            f"output.run_id={run_id}", "trainer.max_steps=2", "trainer.progress=false",
            f"launch.tasks_per_node={ranks}", *overrides]
    return subprocess.run([sys.executable, "-m", "ltdist.launch", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})


def test_a_small_imagefolder_set_trains_with_the_cli_defaults_on_two_ranks(own_tree, tmp_path):
    shards = tmp_path / "shards"
    assert shards_main(["imagefolder", "--src", str(own_tree), "--out", str(shards), "--no-progress"]) == 0
    index = read_index(shards)
    train = sum(index.train_counts)
    assert train + sum(index.counts["val"]) == sum(OWN_TRAIN)  # val carved from train (20 per class, ≤ half)
    assert len(index.manifest["train"]) >= 16 and index.build["shard_size"] == train // 16
    result = _launch(tmp_path, shards, 2, "r2")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "default" / "r2" / "report.json").read_text())
    assert report["groups"]["few"] == [8, 9] and "ensemble" in report["classifiers"]


def test_one_train_shard_for_one_rank_and_two_workers_is_read_as_sample_ranges(own_tree, tmp_path):
    """The layout that stopped the run before (``ValueError: 1 train shards ... ranks × workers = 1 × 2``)."""
    shards = tmp_path / "shards"
    assert shards_main(["imagefolder", "--src", str(own_tree), "--out", str(shards), "--no-progress",
                        "--shard-size", "2000", "--min-train-shards", "1"]) == 0
    assert len(read_index(shards).manifest["train"]) == 1
    result = _launch(tmp_path, shards, 1, "ranges", "stages=[train]")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    log = next((tmp_path / "default" / "ranges" / "logs").glob("*_0_log.out")).read_text()
    assert "1 train shards hold trained classes for ranks × workers = 1 × 2: each is read as up to 2 sample " \
           "ranges" in log
    assert (tmp_path / "default" / "ranges" / "weights" / "final.pt").is_file()


# ---- shards written by another tool --------------------------------------------------------------------------

def _jpeg(seed: int, fmt: str = "JPEG") -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _shard_writer(out, split: str, samples: list[dict], maxcount: int = 40) -> None:
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for s in samples:
            sink.write(s)


FOREIGN_TRAIN = [60, 30, 15, 8]


def test_shards_written_by_webdataset_are_indexed_and_stream_with_exact_frequencies(tmp_path):
    import numpy as np
    from scipy.stats import chisquare

    from ltdist.data import iterate_split
    from ltdist.data.stats import train_stats

    rng = np.random.default_rng(0)
    labels = rng.permutation([j for j, n in enumerate(FOREIGN_TRAIN) for _ in range(n)]).tolist()
    _shard_writer(tmp_path / "wds", "train", [{"__key__": f"img{k:05d}", "jpg": _jpeg(k), "cls": label}
                                              for k, label in enumerate(labels)])
    _shard_writer(tmp_path / "wds", "test", [{"__key__": f"t{k:03d}", "jpg": _jpeg(10_000 + k), "cls": k % 4}
                                             for k in range(12)])
    assert shards_main(["index", str(tmp_path / "wds")]) == 0
    index = read_index(tmp_path / "wds")
    assert index.train_counts == FOREIGN_TRAIN and index.counts["test"] == [3, 3, 3, 3]
    assert [s.samples for s in index.manifest["train"]] == [40, 40, 33] and index.build["format"] == "webdataset"
    # The eval loader reads every sample once with its label; the rebalancing stream's frequencies are exact.
    seen = [int(y) for b in iterate_split(index, "train", batch_size=16, rank=0, world_size=1, image_size=12,
                                          channels=3) for y in b.labels]
    assert np.bincount(seen, minlength=4).tolist() == FOREIGN_TRAIN
    stats = train_stats(tmp_path / "wds" / "index.json", sampling_power=0.5, epochs=30, ranks=2, workers=2,
                        batch_size=4, seed=1, shuffle_buffer=16, decode=True, image_size=12, channels=3, exclude=[])
    assert stats["skips"] == {} and sum(stats["emitted_counts"]) == 30 * 2 * (113 // 8) * 4
    assert chisquare(stats["emitted_counts"], stats["expected_counts"]).pvalue > 1e-3


def test_json_name_labels_are_indexed_by_name_and_what_cannot_be_indexed_is_refused(tmp_path, capsys):
    names = ["owl", "cat", "ant"]
    # TIFF: an extension ltdist's writer never uses, one webdataset's image decoder hands to PIL.
    samples = [{"__key__": f"k{k:03d}", "tif": _jpeg(k, "TIFF"), "json": {"species": names[k % 3], "w": 12}}
               for k in range(9)]
    _shard_writer(tmp_path / "named", "shard", samples)
    assert shards_main(["index", str(tmp_path / "named"), "--label-field", "species", "--split",
                        "train=shard-*.tar"]) == 0
    index = read_index(tmp_path / "named")
    assert index.classes == ["ant", "cat", "owl"] and index.train_counts == [3, 3, 3]
    from ltdist.data import iterate_split

    batch = next(iter(iterate_split(index, "train", batch_size=9, rank=0, world_size=1, image_size=12, channels=3)))
    assert batch.labels.tolist() == [2, 1, 0] * 3  # owl, cat, ant in key order
    # Refused, with the shard, the sample and what is wrong: no label, mixed label types, no split.
    _shard_writer(tmp_path / "nolabel", "train", [{"__key__": "a", "jpg": _jpeg(0), "cls": 1},
                                                  {"__key__": "b", "jpg": _jpeg(1), "txt": "x"}])
    _shard_writer(tmp_path / "mixed", "train", [{"__key__": "a", "jpg": _jpeg(0), "txt": "3"},
                                                {"__key__": "b", "jpg": _jpeg(1), "txt": "zebra"}])
    _shard_writer(tmp_path / "nosplit", "part", [{"__key__": "a", "jpg": _jpeg(0), "cls": 0}])
    for folder, words in (("nolabel", "train-000000.tar: sample 'b' has no label (.cls; members: jpg, txt)"),
                          ("mixed", "mixed label types: integer ids (e.g. 3) and names (e.g. 'zebra')"),
                          ("nosplit", "1 shards match no split pattern")):
        assert shards_main(["index", str(tmp_path / folder)]) == 1
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
        assert not (tmp_path / folder / "index.json").exists()


# ---- published splits ----------------------------------------------------------------------------------------

def _places_lists(tmp_path, drop_test_line: int | None = None, drop_train_class: int | None = None) -> list[str]:
    from ltdist.data.formats.longtail import counts_with_total

    train = counts_with_total(365, 62_500, 4980, 5)
    assert (sum(train), max(train), min(train)) == (62_500, 4980, 5)
    lists = {"train": [f"train/c{j}/{i}.jpg {j}" for j, n in enumerate(train) if j != drop_train_class
                       for i in range(n)],
             "val": [f"train/c{j}/v{i}.jpg {j}" for j in range(365) for i in range(20)],
             "test": [f"val/c{j}/{i}.jpg {j}" for j in range(365) for i in range(100)]}
    if drop_test_line is not None:
        del lists["test"][drop_test_line]
    args = []
    for split, lines in lists.items():
        path = tmp_path / f"Places_LT_{split}.txt"
        path.write_text("\n".join(lines) + "\n")
        args += ["--split-file", f"{split}={path}"]
    return args


def test_check_names_a_removed_line_and_a_missing_class_before_reading_any_image(tmp_path, capsys):
    # No image exists under --src: the check reads the list files only.
    assert shards_main(["list", "--src", str(tmp_path / "images"), "--check-only", *_places_lists(tmp_path)]) == 0
    assert "matches the published Places-LT" in capsys.readouterr().out
    args = _places_lists(tmp_path, drop_test_line=7 * 100 + 3, drop_train_class=42)
    assert shards_main(["list", "--src", str(tmp_path / "images"), "--out", str(tmp_path / "s"), "--check", *args]) == 1
    err = capsys.readouterr().err
    assert "test: 36,499 entries, published 36,500 (1 fewer)" in err
    assert "test: 100 entries per class published; class 7 has 99" in err
    assert "train: 1 of the 365 published classes have no entry: class 42" in err
    assert "differs from the published Places-LT in 4 ways" in err  # and the train total
    assert not (tmp_path / "s").exists()  # stopped before any image was read or shard written
