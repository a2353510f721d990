"""Shard writers: Fashion-MNIST-LT on the real IDX files, and test-written replicas of the other formats."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from data_fixtures import FMNIST_LT_IF1000_PROFILE, FMNIST_LT_IF1000_TRAIN, fmnist_lt  # noqa: F401
from omegaconf import OmegaConf
from PIL import Image

from ltdist.config.schema import DataConfig
from ltdist.data import ensure_shards, read_index, scan_split
from ltdist.data.build import build_shards
from ltdist.data.formats.fashion_mnist import read_idx
from ltdist.data.formats.longtail import profile_counts
from ltdist.data.index import file_sha256, keys_digest
from ltdist.data.shards import main as shards_main

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def read_back(index_path, split):
    """key -> sample of a split via webdataset's own tar reader (independent of ltdist's reader)."""
    urls = [str(p) for p in read_index(index_path).shard_paths(split)]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def test_fashion_mnist_lt_if1000_counts(fmnist_lt):  # noqa: F811
    index = read_index(fmnist_lt)
    assert index.train_counts == FMNIST_LT_IF1000_TRAIN
    assert index.counts["test"] == [1000] * 10
    # Val is reserved first, so it holds every class: class 0 trains on 5980 of its 6000 images.
    assert index.counts["val"] == [20] * 10 and index.build["val_every_class"] is True
    valid, skips = scan_split(index, "train", channels=1)
    assert [valid[j] for j in range(10)] == FMNIST_LT_IF1000_TRAIN and not skips
    train, val = read_back(fmnist_lt, "train"), read_back(fmnist_lt, "val")
    assert not set(train) & set(val)
    assert len(train) == sum(FMNIST_LT_IF1000_TRAIN) and len(val) == 200
    shard = index.split_shards("train")[3]
    assert file_sha256(index.root / shard.file) == shard.sha256
    shard_keys = [s["__key__"] for s in wds.WebDataset(str(index.root / shard.file), shardshuffle=False)]
    assert keys_digest(shard_keys) == shard.keys_sha256
    labels = read_idx(FMNIST / "train-labels-idx1-ubyte.gz")
    images = read_idx(FMNIST / "train-images-idx3-ubyte.gz")
    for key in list(train)[:50]:  # pixels and labels are the IDX ones (PNG is lossless)
        i = int(key.rsplit("_", 1)[1])
        assert int(train[key]["cls"]) == labels[i]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(train[key]["png"]))), images[i])


def test_profiles():
    assert profile_counts(6000, 10, 1000, "exp") == FMNIST_LT_IF1000_PROFILE
    assert profile_counts(500, 100, 100, "exp")[::33] == [int(500 * 100 ** (-i / 99)) for i in range(0, 100, 33)]
    pareto = profile_counts(5000, 10, 100, "pareto")
    assert pareto[0] == 5000 and pareto[-1] == 50 and pareto == sorted(pareto, reverse=True)
    with pytest.raises(ValueError, match="unknown long-tail profile"):
        profile_counts(10, 3, 2, "zipf")


def write_cifar10(root: Path, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), per_class)
    rng.shuffle(labels)
    data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
    root.mkdir(parents=True)
    for b, chunk in enumerate(np.array_split(np.arange(len(labels)), 5), 1):
        with open(root / f"data_batch_{b}", "wb") as f:
            pickle.dump({b"data": data[chunk], b"labels": labels[chunk].tolist()}, f)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": data[:30], b"labels": labels[:30].tolist()}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"name{j}".encode() for j in range(10)]}, f)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def test_cifar10_lt_via_cli(tmp_path, capsys):
    images, labels = write_cifar10(tmp_path / "cifar-10-batches-py", per_class=40)
    out = tmp_path / "shards"
    assert shards_main(["cifar", "--src", str(tmp_path / "cifar-10-batches-py"), "--out", str(out), "--imbalance",
                        "10", "--val-per-class", "3", "--shard-size", "16", "--seed", "5", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.json")
    index = read_index(out)
    assert index.classes == [f"name{j}" for j in range(10)]
    assert index.train_counts == [37] + [int(40 * 10 ** (-i / 9)) for i in range(1, 10)]  # class 0 gave 3 to val
    assert index.counts["val"] == [3] * 10 and sum(index.counts["test"]) == 30
    assert index.build["imbalance"] == 10.0 and index.build["seed"] == 5
    train = read_back(out, "train")
    for key, sample in train.items():
        i = int(key.rsplit("_", 1)[1])
        assert int(sample["cls"]) == labels[i]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), images[i])
    assert all(s.samples <= 16 for s in index.split_shards("train"))


def test_cifar100_layout(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(100), 5)
    for name, n in (("train", 500), ("test", 100)):
        with open(root / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": labels[:n].tolist() if name == "train" else list(range(100))}, f)
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{j}".encode() for j in range(100)]}, f)
    index = read_index(build_shards("cifar", str(root), tmp_path / "out", imbalance=5, val_per_class=0,
                                    progress=False))
    assert index.train_counts == [int(5 * 5 ** (-i / 99)) for i in range(100)]
    assert index.counts["test"] == [1] * 100 and index.classes[99] == "f99"


def jpeg_bytes(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_imagefolder_keeps_bytes_and_resize_short(tmp_path):
    files = {}
    for split in ("train", "val"):
        for c, cls in enumerate(["b_cat", "a_dog"]):
            for k in range(3):
                path = tmp_path / "root" / split / cls / f"img.{k}.{'jpg' if k else 'png'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                if k:
                    data = jpeg_bytes(60 + 40 * k, 50, seed=10 * c + k)
                else:
                    buf = io.BytesIO()
                    Image.new("RGB", (30, 20), (c, 2, 3)).save(buf, "PNG")
                    data = buf.getvalue()
                path.write_bytes(data)
                files[(split, cls, k)] = data
    out = build_shards("imagefolder", str(tmp_path / "root"), tmp_path / "s", shard_size=4, workers=2, progress=False)
    index = read_index(out)
    assert index.classes == ["a_dog", "b_cat"] and index.counts["train"] == [3, 3] and index.counts["val"] == [3, 3]
    train = read_back(out, "train")
    assert train["train/b_cat/img_1"]["jpg"] == files[("train", "b_cat", 1)]
    assert train["train/a_dog/img_0"]["png"] == files[("train", "a_dog", 0)]
    assert int(train["train/a_dog/img_2"]["cls"]) == 0 and int(train["train/b_cat/img_2"]["cls"]) == 1
    # Same input, one writer process: byte-identical shards (parallel writing changes nothing).
    serial = read_index(build_shards("imagefolder", str(tmp_path / "root"), tmp_path / "s1", shard_size=4,
                                     progress=False))
    assert [s.sha256 for s in serial.split_shards("train")] == [s.sha256 for s in index.split_shards("train")]
    # --resize-short: a short side above 30 px is shrunk to 30; smaller images keep their bytes.
    resized = read_back(build_shards("imagefolder", str(tmp_path / "root"), tmp_path / "s2", resize_short=30,
                                     progress=False), "train")
    assert min(Image.open(io.BytesIO(resized["train/b_cat/img_2"]["jpg"])).size) == 30
    assert resized["train/a_dog/img_0"]["png"] == files[("train", "a_dog", 0)]


def test_list_files_imagenet_lt_style(tmp_path):
    lines = {"train": [], "test": []}
    for split, n in (("train", 5), ("test", 2)):
        for k in range(n):
            label = k % 3
            rel = f"{split}/n0000{label}/n0000{label}_{k}.JPEG"
            (tmp_path / "img" / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "img" / rel).write_bytes(jpeg_bytes(16, 16, k))
            lines[split].append(f"{rel} {label}")
    for split in lines:
        (tmp_path / f"ImageNet_LT_{split}.txt").write_text("\n".join(lines[split]) + "\n")
    # --val-per-class 0: every train image stays in train (carving is tested in test_data_first_contact.py)
    args = ["list", "--src", str(tmp_path / "img"), "--out", str(tmp_path / "s"), "--no-progress",
            "--val-per-class", "0",
            "--split-file", f"train={tmp_path / 'ImageNet_LT_train.txt'}",
            "--split-file", f"test={tmp_path / 'ImageNet_LT_test.txt'}"]
    assert shards_main(args) == 0
    index = read_index(tmp_path / "s")
    assert index.classes == ["n00000", "n00001", "n00002"] and index.counts["train"] == [2, 2, 1]
    train = read_back(tmp_path / "s", "train")
    assert train["train/train/n00001/n00001_4"]["jpg"] == (tmp_path / "img/train/n00001/n00001_4.JPEG").read_bytes()
    (tmp_path / "img/train/n00001/n00001_4.JPEG").unlink()
    assert shards_main(args) == 1  # a missing image is a clear error, not a silent skip


def test_inat2018_json(tmp_path):
    images, annotations = [], []
    for k in range(6):
        rel = f"train_val2018/Plantae/{100 + k % 2}/{k}.jpg"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(jpeg_bytes(20, 12, k))
        images.append({"id": 1000 + k, "file_name": rel})
        annotations.append({"id": k, "image_id": 1000 + k, "category_id": [7, 3][k % 2]})
    doc = {"images": images, "annotations": annotations,
           "categories": [{"id": 7, "name": "Quercus"}, {"id": 3, "name": "Acer"}]}
    (tmp_path / "train2018.json").write_text(json.dumps(doc))
    out = build_shards("inat2018", str(tmp_path), tmp_path / "s",
                       split_files={"train": str(tmp_path / "train2018.json")}, val_per_class=0, progress=False)
    index = read_index(out)
    assert index.classes == ["Acer", "Quercus"] and index.counts["train"] == [3, 3]
    train = read_back(out, "train")
    assert int(train["train/train_val2018/Plantae/100/0"]["cls"]) == 1  # category 7 -> label 1 (sorted ids)
    assert train["train/train_val2018/Plantae/101/1"]["jpg"] == (tmp_path / images[1]["file_name"]).read_bytes()


def test_ensure_shards_builds_once_and_checks_the_build(tmp_path):
    write_cifar10(tmp_path / "c10", per_class=12)
    cfg = OmegaConf.structured(DataConfig(shards=str(tmp_path / "lt"), format="cifar", src=str(tmp_path / "c10"),
                                          imbalance=4.0, val_per_class=2))
    path = ensure_shards(cfg)
    assert read_index(path).train_counts == [10] + [min(10, int(12 * 4 ** (-i / 9))) for i in range(1, 10)]
    mtime = path.stat().st_mtime_ns
    assert ensure_shards(cfg) == path and path.stat().st_mtime_ns == mtime  # present and valid: no-op
    cfg.imbalance = 8.0
    with pytest.raises(ValueError, match="imbalance"):
        ensure_shards(cfg)
    cfg.imbalance = 4.0
    index = json.loads(path.read_text())
    del index["build"]["val_every_class"]  # shards of an earlier ltdist: val lacked the fullest classes
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"val split has no image of a class .*delete {path.parent} to rebuild"):
        ensure_shards(cfg)
    index["build"]["val_every_class"] = True
    path.write_text(json.dumps(index))
    next(path.parent.glob("train-*.tar")).unlink()
    with pytest.raises(FileNotFoundError, match="train-"):
        ensure_shards(cfg)


def test_cli_rejects_bad_input(tmp_path, capsys):
    assert shards_main(["fashion-mnist", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                        "--no-progress"]) == 1
    assert "not found" in capsys.readouterr().err
    assert shards_main(["list", "--src", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
