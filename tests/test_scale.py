"""The iNaturalist-2018 rehearsal at a reduced scale: the synthetic source, the stream, kt and evaluate
with thousands of classes (the full-scale figures come from ``ltdist bench scale``)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from stage_fixtures import make_run_dir, stage_context

from ltdist.config.schema import DataConfig
from ltdist.data import ensure_shards, read_index
from ltdist.data.build import build_shards
from ltdist.data.formats import synthetic
from ltdist.data.formats.longtail import counts_with_total
from ltdist.data.stats import main as stats_main
from ltdist.data.stats import train_stats
from ltdist.stages import evaluate as evaluate_stage
from ltdist.stages import kt as kt_stage
from ltdist.stages.kt import load_kt_classifiers

CLASSES = 2000


def test_synthetic_profile_is_inaturalist_shaped():
    full = synthetic.train_counts(synthetic.INAT_CLASSES, 500)
    assert sum(full) == synthetic.INAT_TRAIN_IMAGES and full[0] == 1000 and full[-1] == 2
    assert full == sorted(full, reverse=True)
    small = synthetic.train_counts(1000, 500)
    # Fewer classes keep the end points and the mean count: the two scales differ only in size.
    assert small[0] == 1000 and small[-1] == 2
    assert sum(small) / 1000 == pytest.approx(synthetic.INAT_TRAIN_IMAGES / synthetic.INAT_CLASSES, rel=1e-3)
    assert sum(synthetic.train_counts(CLASSES, 500, train_images=6000)) == 6000
    with pytest.raises(ValueError, match="cannot total"):
        counts_with_total(10, 5, 1000, 2)


def test_synthetic_images_are_class_patterns():
    def pixels(label, index):
        return synthetic.SyntheticImage(label, index, "train", 0, 32).pixels().astype(float)

    # Learnable: the mean of 8 images per class classifies new images of 20 classes by nearest mean.
    means = np.stack([np.mean([pixels(j, i) for i in range(8)], axis=0) for j in range(20)])
    hits = [np.argmin(((means - pixels(j, i)) ** 2).sum(axis=(1, 2, 3))) == j for j in range(20) for i in range(8, 12)]
    assert np.mean(hits) > 0.9
    data, ext = synthetic.SyntheticImage(7, 3, "test", 0, 32).encode()
    assert ext == "jpg" and Image.open(io.BytesIO(data)).size == (32, 32)
    assert data == synthetic.SyntheticImage(7, 3, "test", 0, 32).encode()[0]  # deterministic
    assert data != synthetic.SyntheticImage(7, 3, "train", 0, 32).encode()[0]  # splits never share an image


@pytest.fixture(scope="module")
def shards_2000(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_2000")
    return build_shards("synthetic", "", out, imbalance=500, val_per_class=0, synthetic_classes=CLASSES,
                        test_per_class=1, image_size=8, train_images=6000, shard_size=250, progress=False)


def test_missing_synthetic_shards_name_the_command(tmp_path):
    cfg = OmegaConf.structured(DataConfig(format="synthetic", shards=str(tmp_path / "none")))
    with pytest.raises(FileNotFoundError, match="ltdist shards synthetic --classes N"):
        ensure_shards(cfg)


def test_synthetic_shards_have_the_profile(shards_2000):
    index = read_index(shards_2000)
    assert index.num_classes == CLASSES and sorted(index.manifest) == ["test", "train"]
    assert index.train_counts == synthetic.train_counts(CLASSES, 500, train_images=6000)
    assert index.counts["test"] == [1] * CLASSES
    assert sum(s.samples for s in index.split_shards("train")) == 6000
    assert index.build["format"] == "synthetic" and index.build["classes"] == CLASSES


def test_stream_emits_every_class_with_its_frequency(shards_2000):
    stats = train_stats(shards_2000, sampling_power=0.5, epochs=4, ranks=2, workers=1, batch_size=64, seed=0,
                        shuffle_buffer=500, decode=False, image_size=8, channels=3, exclude=[])
    emitted = np.array(stats["emitted_counts"], dtype=float)
    expected = np.array(stats["expected_counts"])
    counts = np.array(stats["train_counts"], dtype=float)
    assert (emitted > 0).all()  # every one of the 2000 classes, the 2-image tail included
    assert np.allclose(expected / expected.sum(), np.sqrt(counts) / np.sqrt(counts).sum())
    assert emitted.sum() == stats["batches_per_rank_per_epoch"] * 64 * 2 * 4
    # Repeats are floor(r) + Bernoulli: less spread than Poisson. A class under-emitted by a bias (a dropped
    # shard, a truncated slot) would push its term far above 1.
    assert np.mean((emitted - expected) ** 2 / expected) < 1.0


def test_stats_table_bins_thousands_of_classes(shards_2000, capsys):
    assert stats_main(["--index", str(shards_2000), "--no-decode", "--ranks", "2", "--batch-size", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) < 20 and "never emitted" in lines[0]
    rows = [line.split() for line in lines[1:] if line.split() and line.split()[0][0].isdigit()]
    assert sum(int(r[1]) for r in rows) == CLASSES  # every class in one bin
    assert all(r[-1] == "0" for r in rows)  # none never emitted


def test_kt_and_evaluate_with_2000_classes(tmp_path, capsys):
    counts = synthetic.train_counts(CLASSES, 500, train_images=6000)
    run_dir = make_run_dir(tmp_path, splits={"train": counts, "test": [2] * CLASSES})
    ctx = stage_context(run_dir, "stages=[kt,evaluate]")
    kt_stage.run(ctx)
    kt = load_kt_classifiers(run_dir)
    assert kt.w_h.shape == (3, CLASSES, 64) and kt.train_counts.tolist() == counts
    evaluate_stage.run(ctx)
    capsys.readouterr()
    report = json.loads((run_dir / "report.json").read_text())
    assert sum(len(v) for v in report["groups"].values()) == CLASSES
    test = torch.load(run_dir / "features" / "test.pt")
    direct = (torch.nn.functional.normalize(test["features"], dim=1) @ kt.prototypes.T).argmax(dim=1)
    accuracy = (direct == test["labels"]).double().mean().item()
    assert report["classifiers"]["prototypes"]["all"] == pytest.approx(accuracy)
    assert accuracy > 0.3  # clustered features, 2000 classes: far above chance (0.05 %)
    # The report reads at thousands of classes: bins, not 2000 rows; every class's numbers in the JSON / CSV.
    assert sum(b["classes"] for b in report["count_bins"]) == CLASSES
    assert len((run_dir / "report.md").read_text().splitlines()) < 200
    assert len((run_dir / "per_class_accuracy.csv").read_text().splitlines()) == CLASSES + 1
    per_class = json.loads((run_dir / "per_class_accuracy.json").read_text())
    assert len(per_class["classifiers"]["ensemble"]) == CLASSES
    assert torch.tensor(per_class["train_counts"]).tolist() == counts
