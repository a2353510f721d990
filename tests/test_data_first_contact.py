"""What a new user's own data ran into: sources without a val split, pre-built shards used under another
``data.format``, and config values only the data can check (each must name its key)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from data_fixtures import png_bytes, write_imagefolder

from ltdist.config.load import load_config
from ltdist.data import ensure_shards, read_index
from ltdist.data.build import build_shards, carve_val
from ltdist.data.classes import DataConfigError, check_against_data
from ltdist.data.writer import SourceSample
from ltdist.stages.kt import val_split_needs

TRAIN = [40, 20, 10, 6]


@pytest.fixture(scope="module")
def folder_shards(tmp_path_factory) -> Path:
    """ImageFolder shards of a train/ + test/ tree (no val/), with 4 val images per class carved from train."""
    tmp = tmp_path_factory.mktemp("folder")
    src = write_imagefolder(tmp / "tree", {"train": TRAIN, "test": [3, 3, 3, 3]})
    return build_shards("imagefolder", str(src), tmp / "shards", val_per_class=4, shard_size=32, progress=False)


def _cfg(shards: Path, *overrides: str):
    return load_config(None, [f"data.shards={shards.parent if shards.is_file() else shards}",
                              "data.format=imagefolder", "evaluate.many_threshold=30", "evaluate.few_threshold=8",
                              *overrides])


def test_carve_val_takes_at_most_half_of_each_class_and_removes_it_from_train():
    samples = [SourceSample(f"k{j}_{i}", j, "x") for j, n in enumerate([10, 3, 1]) for i in range(n)]
    train, val = carve_val(samples, 4, seed=0)
    per_class = lambda s: [sum(x.label == j for x in s) for j in range(3)]
    assert per_class(val) == [4, 1, 0] and per_class(train) == [6, 2, 1]
    assert not {s.key for s in train} & {s.key for s in val}
    assert carve_val(samples, 4, seed=0) == (train, val)  # seeded
    assert carve_val(samples, 4, seed=1)[1] != val


def test_imagefolder_without_val_gets_a_carved_val_split(folder_shards):
    index = read_index(folder_shards)
    assert index.counts["val"] == [4, 4, 4, 3]
    assert index.counts["train"] == [36, 16, 6, 3]
    assert index.build["val_carved_from_train"] is True and index.build["val_per_class"] == 4
    assert sorted(index.manifest) == ["test", "train", "val"]


def test_list_files_for_train_and_test_only_get_a_carved_val_split(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    lines = {"train": [], "test": []}
    for split, per_class in (("train", [8, 4]), ("test", [2, 2])):
        for j, n in enumerate(per_class):
            for i in range(n):
                (images / f"{split}_{j}_{i}.png").write_bytes(png_bytes(i + 10 * j))
                lines[split].append(f"{split}_{j}_{i}.png {j}")
    files = {}
    for split, entries in lines.items():
        files[split] = str(tmp_path / f"{split}.txt")
        Path(files[split]).write_text("\n".join(entries) + "\n")
    index = read_index(build_shards("list", str(images), tmp_path / "shards", val_per_class=3, split_files=files,
                                    progress=False))
    assert index.counts["val"] == [3, 2] and index.counts["train"] == [5, 2]


def test_val_per_class_zero_builds_no_val_and_training_warns_once(tmp_path, caplog):
    src = write_imagefolder(tmp_path / "tree", {"train": TRAIN})
    path = build_shards("imagefolder", str(src), tmp_path / "shards", val_per_class=0, progress=False)
    index = read_index(path)
    assert "val" not in index.manifest
    with caplog.at_level(logging.WARNING, logger="ltdist.data.classes"):
        assert check_against_data(_cfg(path, "data.val_per_class=0"), index) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no val split" in warnings[0] and "without per-epoch validation" in warnings[0]
    with pytest.raises(DataConfigError, match=r"method\.kt\.prototypes_from=val"):
        cfg = _cfg(path, "method.kt.prototypes_from=val")
        check_against_data(cfg, index, val_split_needs(cfg))


def test_prebuilt_shards_are_used_under_another_data_format(folder_shards, caplog):
    cfg = load_config(None, [f"data.shards={folder_shards.parent}", "data.format=fashion-mnist",
                             "data.imbalance=10"])  # settings of the fashion-mnist reader mean nothing here
    with caplog.at_level(logging.WARNING, logger="ltdist.data.ensure"):
        assert ensure_shards(cfg.data) == folder_shards
    assert any("only matters for building" in r.getMessage() for r in caplog.records)
    assert json.loads(folder_shards.read_text())["build"]["format"] == "imagefolder"  # not rebuilt


@pytest.mark.parametrize(("overrides", "key"), [
    (["data.exclude_from_training=[1,7]"], "data.exclude_from_training"),
    (["data.exclude_from_training=[0,1,2,3]"], "data.exclude_from_training"),
    (["evaluate.many_threshold=100"], "evaluate.many_threshold"),
    (["evaluate.few_threshold=2"], "evaluate.few_threshold"),
])
def test_values_that_do_not_fit_the_data_name_their_key(folder_shards, overrides, key):
    with pytest.raises(DataConfigError, match=key.replace(".", r"\.")) as err:
        check_against_data(_cfg(folder_shards, *overrides), read_index(folder_shards))
    assert "Traceback" not in str(err.value)


def test_a_class_without_training_samples_names_the_shards_and_the_exclusion_key(tmp_path):
    src = write_imagefolder(tmp_path / "tree", {"train": [40, 20, 10, 6]})
    (src / "train" / "c4").mkdir()  # a class folder with no image
    path = build_shards("imagefolder", str(src), tmp_path / "shards", val_per_class=2, progress=False)
    index = read_index(path)
    assert index.train_counts[4] == 0
    with pytest.raises(DataConfigError, match=r"classes 4 \('c4'\) have 0 training samples.*data\.exclude_from"):
        check_against_data(_cfg(path), index)
    assert check_against_data(_cfg(path, "data.exclude_from_training=[4]"), index) == [4]


def test_good_values_pass_and_return_the_excluded_classes(folder_shards):
    assert check_against_data(_cfg(folder_shards, "data.exclude_from_training=few"), read_index(folder_shards)) \
        == [2, 3]


def test_the_launcher_names_the_key_before_submitting_when_the_shards_exist(folder_shards, tmp_path, capsys):
    from ltdist.launch import main as launch_main

    code = launch_main(["--cluster", "local", f"data.shards={folder_shards.parent}", "data.format=imagefolder",
                        "data.exclude_from_training=[9]", f"output.root={tmp_path / 'runs'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "data.exclude_from_training: class ids [9] outside [0, 4)" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing submitted


def test_a_small_data_set_gets_enough_train_shards_for_ranks_and_workers(tmp_path):
    src = write_imagefolder(tmp_path / "tree", {"train": [30, 20, 10], "test": [2, 2, 2]})
    cfg = load_config(None, [f"data.shards={tmp_path / 'shards'}", "data.format=imagefolder", f"data.src={src}",
                             "data.val_per_class=2"])
    index = read_index(ensure_shards(cfg.data))
    assert sum(index.train_counts) == 54 and len(index.manifest["train"]) >= 16  # 256 per shard would give 1
    assert index.build["shard_size"] == 54 // 16
