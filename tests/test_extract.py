"""The extract stage: per-rank feature shards merged into one file per split."""

from collections import namedtuple

import pytest
import torch

from ltdist.models import build_model
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
    single = embed_split(model, _batches(images, labels, keys, 4), torch.device("cpu"))
    assert single["features"].shape == (10, model.feature_dim)
    with torch.no_grad():
        torch.testing.assert_close(single["features"], model.forward_features(images))
    # Two ranks each see a strided half of the split, in their own batch size.
    shards = [embed_split(model, _batches(images[r::2], labels[r::2], keys[r::2], 3), torch.device("cpu"))
              for r in range(2)]
    merged = merge_feature_shards(shards)
    assert merged["keys"] == sorted(keys)
    order = [keys.index(k) for k in merged["keys"]]
    torch.testing.assert_close(merged["features"], single["features"][order], atol=1e-5, rtol=1e-5)
    assert torch.equal(merged["labels"], labels[order])
    with pytest.raises(ValueError, match="more than one rank"):
        merge_feature_shards([shards[0], shards[0]])
