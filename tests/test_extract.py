"""The extract stage: per-rank feature shards merged into one file per split."""

import os
import socket
import subprocess
import sys
from collections import namedtuple

import pytest
import torch

from ltdist.config import load_config
from ltdist.data import ensure_shards, iterate_split, read_index
from ltdist.models import build_model, export_model, load_exported_model
from ltdist.rundir import load_features
from ltdist.stages.extract import embed_split, merge_feature_shards

FakeBatch = namedtuple("FakeBatch", "images labels keys")


def _batches(images, labels, keys, size):
    for start in range(0, len(keys), size):
        yield FakeBatch(images[start:start + size], labels[start:start + size], keys[start:start + size])


def test_rank_shards_merge_to_the_single_rank_result():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=4, channels=1).eval()
    images = torch.randn(10, 1, 28, 28)
    labels = torch.arange(10) % 4
    keys = [f"img{i:03d}" for i in (7, 2, 9, 0, 4, 1, 8, 3, 6, 5)]  # stream order is not key order
    single = embed_split(model, _batches(images, labels, keys, 4), torch.device("cpu"), capacity=12)
    assert single["features"].shape == (10, model.feature_dim)
    with torch.no_grad():
        torch.testing.assert_close(single["features"], model.forward_features(images))
    # Two ranks each see a strided half of the split, in their own batch size.
    shards = [embed_split(model, _batches(images[r::2], labels[r::2], keys[r::2], 3), torch.device("cpu"), capacity=5)
              for r in range(2)]
    merged = merge_feature_shards(shards)
    assert merged["keys"] == sorted(keys)
    order = [keys.index(k) for k in merged["keys"]]
    torch.testing.assert_close(merged["features"], single["features"][order], atol=1e-5, rtol=1e-5)
    assert torch.equal(merged["labels"], labels[order])
    with pytest.raises(ValueError, match="more than one rank"):
        merge_feature_shards([shards[0], shards[0]])
    with pytest.raises(ValueError, match="more than the expected 9 samples"):
        embed_split(model, _batches(images, labels, keys, 4), torch.device("cpu"), capacity=9)


_RANK_MAIN = """
import sys
from pathlib import Path
from ltdist.config import load_config
from ltdist.distributed import init_distributed, shutdown_distributed
from ltdist.stages import StageContext, extract
env = init_distributed("cpu")
extract.run(StageContext(cfg=load_config(overrides=sys.argv[2:]), run_dir=Path(sys.argv[1]), dist=env))
shutdown_distributed()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_extract_stage_two_ranks_on_real_shards(tmp_path):
    """Two gloo ranks embed real Fashion-MNIST-LT shards; the merged files hold every sample once."""
    overrides = [f"data.shards={tmp_path / 'shards'}", "data.image_size=8", "data.num_workers=0",
                 "trainer.batch_size=512"]
    cfg = load_config(overrides=overrides)
    index = read_index(ensure_shards(cfg.data))
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=index.num_classes, channels=1)
    export_model(model, tmp_path / "run" / "weights" / "final.pt")
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_MAIN, str(tmp_path / "run"), *overrides],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]

    model = load_exported_model(tmp_path / "run" / "weights" / "final.pt")
    for split in ("train", "val", "test"):
        saved = load_features(tmp_path / "run", split)
        assert len(saved["keys"]) == len(set(saved["keys"])) == sum(index.counts[split])
        assert saved["keys"] == sorted(saved["keys"])
        assert torch.bincount(saved["labels"], minlength=index.num_classes).tolist() == index.counts[split]
        assert saved["features"].shape == (len(saved["keys"]), model.feature_dim)
    assert not list((tmp_path / "run" / "features").glob("*.rank*"))  # rank files merged and removed
    # The saved features are the backbone's output for the sample with that key.
    batch = next(iter(iterate_split(index, "test", batch_size=64, rank=1, world_size=2, image_size=8, channels=1)))
    saved = load_features(tmp_path / "run", "test")
    rows = [saved["keys"].index(k) for k in batch.keys]
    with torch.no_grad():
        torch.testing.assert_close(saved["features"][rows], model.forward_features(batch.images),
                                   atol=1e-4, rtol=1e-4)
    assert torch.equal(saved["labels"][rows], batch.labels)
