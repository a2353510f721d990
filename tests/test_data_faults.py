"""Injected faults of every kind are skipped and counted exactly, per reason, with the manifest."""

from __future__ import annotations

import os

import pytest
from data_fixtures import labelled_samples, member_offsets, write_custom_shards

from ltdist.data import DataSkipError, build_train_stream, iterate_split, scan_split
from ltdist.data.tario import (
    BAD_LABEL,
    CORRUPT_HEADER,
    CORRUPT_IMAGE,
    MISSING_IMAGE,
    MISSING_LABEL,
    TRUNCATED,
)

NUM_CLASSES = 4


def damaged_split(root):
    """Four shards, one fault family each; returns (index path, keys that must survive, expected skips)."""
    s0 = labelled_samples("a", [k % NUM_CLASSES for k in range(20)], seed=1)
    s0[3]["png"] = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10  # corrupt image bytes
    del s0[5]["cls"]  # missing label
    s0[7]["cls"] = b"12"  # out of range
    s0[9]["cls"] = b"abc"  # not a number
    del s0[11]["png"]  # no image at all
    s1 = labelled_samples("b", [k % NUM_CLASSES for k in range(30)], seed=2)
    s2 = labelled_samples("c", [k % NUM_CLASSES for k in range(25)], seed=3)
    s3 = labelled_samples("d", [k % NUM_CLASSES for k in range(10)], seed=4)
    index = write_custom_shards(root, [s0, s1, s2, s3], NUM_CLASSES)

    offsets = {name: (header, data) for name, header, data in member_offsets(root / "train-000001.tar")}
    header, _ = offsets[f"{s1[12]['__key__']}.cls"]
    with open(root / "train-000001.tar", "r+b") as f:  # damage the name field: checksum mismatch
        f.seek(header)
        f.write(b"Z")
    _, data = {n: (h, d) for n, h, d in member_offsets(root / "train-000002.tar")}[f"{s2[17]['__key__']}.png"]
    os.truncate(root / "train-000002.tar", data + 10)  # ends inside sample 17's image
    header, _ = {n: (h, d) for n, h, d in member_offsets(root / "train-000003.tar")}[f"{s3[7]['__key__']}.cls"]
    os.truncate(root / "train-000003.tar", header)  # ends exactly between samples 6 and 7: 6 is intact
    survivors = ({s["__key__"] for k, s in enumerate(s0) if k not in (3, 5, 7, 9, 11)}
                 | {s["__key__"] for s in s1[:12]} | {s["__key__"] for s in s2[:17]} | {s["__key__"] for s in s3[:7]})
    expected = {CORRUPT_IMAGE: 1, MISSING_LABEL: 1, BAD_LABEL: 2, MISSING_IMAGE: 1, CORRUPT_HEADER: 30 - 12,
                TRUNCATED: (25 - 17) + (10 - 7)}
    return index, survivors, expected


def test_scan_counts_every_fault_exactly(tmp_path):
    index, survivors, expected = damaged_split(tmp_path / "d")
    valid, skips = scan_split(index, "train", channels=1)
    assert dict(skips) == expected
    assert sum(valid.values()) == len(survivors) == 85 - sum(expected.values())


def test_eval_loader_yields_exactly_the_intact_samples(tmp_path):
    index, survivors, _ = damaged_split(tmp_path / "d")
    keys = [k for rank in range(2) for b in iterate_split(index, "train", batch_size=7, rank=rank, world_size=2,
                                                            image_size=8, channels=1) for k in b.keys]
    assert len(keys) == len(set(keys)) and set(keys) == survivors


def test_stream_skips_faults_and_stops_above_the_skip_fraction(tmp_path):
    index, survivors, expected = damaged_split(tmp_path / "d")
    kw = dict(batch_size=5, rank=0, world_size=1, num_workers=2, sampling_power=1.0, seed=0, image_size=8, channels=1,
              shuffle_buffer=16)
    stream = build_train_stream(index, max_skip_fraction=1.0, **kw)
    for epoch in range(2):
        stream.set_epoch(epoch)
        batches = list(stream)
        assert len(batches) == 85 // 5 and all(len(b.keys) == 5 for b in batches)
        assert {k for b in batches for k in b.keys} <= survivors
    assert set(stream.skip_counts) == set(expected)
    by_shard = stream.skips_by_shard()
    assert by_shard[("train-000001.tar", CORRUPT_HEADER)] % 18 == 0 and by_shard[("train-000001.tar", CORRUPT_HEADER)]

    strict = build_train_stream(index, max_skip_fraction=0.05, **kw)
    strict.set_epoch(0)
    with pytest.raises(DataSkipError, match=r"max_skip_fraction=0\.05.*train-00000[0-3]\.tar"):
        list(strict)
