"""The rebalancing training stream on real Fashion-MNIST-LT shards and on uneven hand-made shards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import fmnist_lt, labelled_samples, write_custom_shards  # noqa: F401
from scipy.stats import chisquare

from ltdist.data import build_train_stream, iterate_split, read_index
from ltdist.data.plan import split_into_pieces
from ltdist.data.sampling import class_probabilities, repeat_factors
from ltdist.data.stats import main as stats_main
from ltdist.data.stats import train_stats
from ltdist.data.tario import read_shard

STREAM = dict(image_size=28, channels=1, shuffle_buffer=500, max_skip_fraction=0.01)


def test_repeat_factors_give_q_in_expectation():
    counts = [6000, 2784, 1292, 600, 278, 129, 60, 27, 12, 6]
    for power in (1.0, 0.5, 0.0):
        q = class_probabilities(counts, power)
        np.testing.assert_allclose(q, np.asarray(counts, float) ** power / np.sum(np.asarray(counts, float) ** power))
        emitted = np.asarray(counts) * repeat_factors(counts, power)
        np.testing.assert_allclose(emitted / emitted.sum(), q, rtol=1e-12)
        np.testing.assert_allclose(emitted.sum(), sum(counts))


@pytest.mark.parametrize("power", [1.0, 0.5, 0.0])
def test_emitted_class_frequencies_pass_chi_square(fmnist_lt, power):  # noqa: F811
    out = train_stats(fmnist_lt, sampling_power=power, epochs=4, ranks=2, workers=2, batch_size=64, seed=1,
                      shuffle_buffer=1000, decode=False, image_size=28, channels=1, exclude=[])
    observed = np.asarray(out["emitted_counts"])
    assert observed.sum() == 4 * 2 * out["batches_per_rank_per_epoch"] * 64
    expected = np.asarray(out["expected_counts"])
    assert chisquare(observed, expected).pvalue > 1e-3
    # The test has power: the frequencies of another sampling power are rejected.
    other = class_probabilities(read_index(fmnist_lt).train_counts, 0.25 if power != 0.25 else 0.75)
    assert chisquare(observed, other * observed.sum()).pvalue < 1e-6


def test_stats_cli_json(fmnist_lt, capsys):  # noqa: F811
    assert stats_main(["--index", str(fmnist_lt), "--sampling-power", "0", "--epochs", "1", "--ranks", "2",
                       "--workers", "2", "--batch-size", "128", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["batches_by_rank"] == [[11188 // 256], [11188 // 256]]
    np.testing.assert_allclose(out["target_probability"], [0.1] * 10)
    assert sum(out["emitted_counts"]) == 2 * (11188 // 256) * 128
    assert out["skips"] == {}


def uneven_index(tmp_path, sizes=(3, 41, 9, 77, 5, 60, 17), num_classes=4, labels_below=None):
    rng = np.random.default_rng(0)
    shards = [labelled_samples(f"s{i}", rng.integers(0, labels_below or num_classes, n).tolist(), seed=i)
              for i, n in enumerate(sizes)]
    return write_custom_shards(tmp_path / "uneven", shards, num_classes)


def run_epoch(stream, epoch):
    stream.set_epoch(epoch)
    return [(b.keys, b.labels.clone(), b.images.clone()) for b in stream]


def test_equal_batches_on_every_rank_with_uneven_shards(tmp_path):
    index = uneven_index(tmp_path)
    per_rank = []
    for rank in range(2):
        stream = build_train_stream(index, batch_size=8, rank=rank, world_size=2, num_workers=2, sampling_power=0.5,
                                    seed=3, **{**STREAM, "image_size": 8})
        counts = [len(run_epoch(stream, epoch)) for epoch in range(3)]
        assert all(len(k) == 8 for k, _, _ in run_epoch(stream, 3))
        per_rank.append(counts)
    assert per_rank[0] == per_rank[1] == [212 // 16] * 3


def test_worker_processes_match_in_process_order(tmp_path):
    index = uneven_index(tmp_path)
    kw = dict(batch_size=8, rank=1, world_size=2, sampling_power=0.0, seed=5, **{**STREAM, "image_size": 8})
    with_processes = build_train_stream(index, num_workers=2, **kw)
    in_process = build_train_stream(index, num_workers=2, **kw)
    in_process.use_processes = False
    a, b = run_epoch(with_processes, 2), run_epoch(in_process, 2)
    assert [k for k, _, _ in a] == [k for k, _, _ in b]
    assert all(torch.equal(x, y) for (_, _, x), (_, _, y) in zip(a, b))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_yields_the_identical_remaining_sequence(fmnist_lt, num_workers):  # noqa: F811
    kw = dict(batch_size=96, rank=1, world_size=2, num_workers=num_workers, sampling_power=0.5, seed=7, **STREAM)
    full = build_train_stream(fmnist_lt, **kw)
    reference = run_epoch(full, 1)
    interrupted = build_train_stream(fmnist_lt, **kw)
    interrupted.set_epoch(1)
    stop = 23  # odd: the resumed round robin must start at worker 1
    consumed = []
    for batch in interrupted:
        consumed.append(batch.keys)
        if len(consumed) == stop:
            break
    assert consumed == [k for k, _, _ in reference[:stop]]
    state = json.loads(json.dumps(interrupted.state_dict()))
    resumed = build_train_stream(fmnist_lt, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    rest = [(b.keys, b.labels, b.images) for b in resumed]
    assert len(rest) == len(reference) - stop
    for (keys, labels, images), (rk, rl, ri) in zip(rest, reference[stop:]):
        assert keys == rk and torch.equal(labels, rl) and torch.equal(images, ri)
    # And the next epoch after a resumed one is the uninterrupted run's next epoch.
    assert [k for k, _, _ in run_epoch(resumed, 2)][:3] == [k for k, _, _ in run_epoch(full, 2)][:3]


def test_streams_are_deterministic_and_epochs_differ(tmp_path):
    index = uneven_index(tmp_path)
    kw = dict(batch_size=8, rank=0, world_size=1, num_workers=0, sampling_power=1.0, seed=11,
              **{**STREAM, "image_size": 8})
    a, b = build_train_stream(index, **kw), build_train_stream(index, **kw)
    keys_a0 = [k for k, _, _ in run_epoch(a, 0)]
    assert keys_a0 == [k for k, _, _ in run_epoch(b, 0)]
    assert keys_a0 != [k for k, _, _ in run_epoch(a, 1)]
    images = torch.cat([x for _, _, x in run_epoch(b, 0)])
    assert images.shape[1:] == (1, 8, 8) and images.dtype == torch.float32
    assert abs(images.mean().item()) < 3 and images.std().item() > 0.1  # normalised, not raw bytes


def test_excluded_classes_are_never_emitted(fmnist_lt):  # noqa: F811
    stream = build_train_stream(fmnist_lt, batch_size=128, rank=0, world_size=1, num_workers=0, sampling_power=0.0,
                                seed=0, exclude_classes=[7, 8, 9], **STREAM)
    assert stream.batches_per_epoch == (11188 - 27 - 12 - 6) // 128
    stream.set_epoch(0)
    labels = torch.cat([p["labels"] for p in stream.payloads(decode=False)])
    assert not torch.isin(labels, torch.tensor([7, 8, 9])).any()
    assert set(labels.tolist()) == set(range(7))


def test_stream_errors_name_the_problem(tmp_path, caplog):
    index = uneven_index(tmp_path, sizes=(10, 10, 10), num_classes=5, labels_below=4)
    kw = dict(batch_size=4, rank=0, sampling_power=0.5, seed=0, **{**STREAM, "image_size": 8})
    with pytest.raises(ValueError, match=r"hold 30 samples of the trained classes, fewer than ranks × workers = 32"):
        build_train_stream(index, world_size=8, num_workers=4, **{**kw, "batch_size": 1})
    caplog.set_level("WARNING")
    stream = build_train_stream(index, world_size=1, num_workers=0, **kw)  # class 4 has no samples
    assert "zero training samples" in caplog.text and "4 (c4)" in caplog.text
    assert stream.batches_per_epoch == 30 // 4
    (index.parent / "train-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-000001\.tar"):
        build_train_stream(index, world_size=1, num_workers=0, **kw)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterate_split_covers_every_sample_once(fmnist_lt, num_workers):  # noqa: F811
    index = read_index(fmnist_lt)
    seen, labels = [], []
    for rank in range(3):
        rank_keys = []
        for batch in iterate_split(index, "val", batch_size=16, rank=rank, world_size=3, image_size=28, channels=1,
                                   num_workers=num_workers):
            assert batch.images.shape[1:] == (1, 28, 28)
            rank_keys += batch.keys
            labels += batch.labels.tolist()
        again = [k for b in iterate_split(index, "val", batch_size=16, rank=rank, world_size=3, image_size=28,
                                          channels=1, num_workers=num_workers) for k in b.keys]
        assert again == rank_keys
        seen += rank_keys
    assert len(seen) == len(set(seen)) == sum(index.counts["val"])
    assert np.bincount(labels, minlength=10).tolist() == index.counts["val"]


def test_state_saved_after_the_last_batch_resumes_into_the_next_epoch(tmp_path):
    index = uneven_index(tmp_path)
    kw = dict(batch_size=8, rank=0, world_size=2, num_workers=2, sampling_power=0.5, seed=2,
              **{**STREAM, "image_size": 8})
    first = build_train_stream(index, **kw)
    run_epoch(first, 4)
    state = first.state_dict()
    resumed = build_train_stream(index, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)
    assert list(resumed) == []  # epoch 4 was complete
    assert [k for k, _, _ in run_epoch(resumed, 5)] == [k for k, _, _ in run_epoch(first, 5)]
    with pytest.raises(ValueError, match="num_workers"):
        build_train_stream(index, **{**kw, "num_workers": 1}).load_state_dict(state)


def _gloo_rank(rank: int, world_size: int, workers: int, init_file: str, index: str, out: str) -> None:
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    stream = build_train_stream(index, batch_size=8, rank=rank, world_size=world_size, num_workers=workers,
                                sampling_power=0.0, seed=4, image_size=8, channels=1, shuffle_buffer=32,
                                max_skip_fraction=0.01)
    keys = []
    for epoch in range(2):
        stream.set_epoch(epoch)
        for batch in stream:  # one collective per batch, as the engine's gradient all-reduce
            total = torch.tensor([len(batch.keys)])
            dist.all_reduce(total)
            assert total.item() == 8 * world_size
            keys += batch.keys
    gathered = [None] * world_size
    dist.all_gather_object(gathered, len(keys))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


def test_ranks_in_a_real_process_group_finish_epochs_together(tmp_path):
    index = uneven_index(tmp_path)
    out = tmp_path / "counts.json"
    torch.multiprocessing.spawn(_gloo_rank, args=(2, 0, str(tmp_path / "pg"), str(index), str(out)), nprocs=2)
    assert json.loads(out.read_text()) == [2 * (212 // 16) * 8] * 2


def test_shards_with_only_excluded_classes_get_no_slot_of_their_own(tmp_path):
    shards = [labelled_samples("a", [0, 1] * 5), labelled_samples("b", [1, 2] * 5), labelled_samples("c", [3] * 10)]
    index = write_custom_shards(tmp_path / "x", shards, 4)
    kw = dict(batch_size=4, rank=0, world_size=1, sampling_power=0.5, seed=0, **{**STREAM, "image_size": 8})
    for workers in (2, 3):  # 3 slots for the 2 shards that hold trained classes: each is read as 2 ranges
        stream = build_train_stream(index, num_workers=workers, exclude_classes=[3], **kw)
        stream.set_epoch(0)
        labels = torch.cat([b.labels for b in stream])
        assert len(labels) == 20 // 4 * 4 and 3 not in labels.tolist()
        assert len(stream.plan.shard_paths) == {2: 3, 3: 5}[workers]


def test_split_into_pieces_covers_every_sample_once_and_fills_every_slot():
    assert split_into_pieces([10, 7], [5.0, 2.0], 2) == [(0, 0, 10), (1, 0, 7)]  # enough shards: whole
    pieces = split_into_pieces([10, 7, 4], [5.0, 2.0, 0.0], 5)  # shard 2 holds no trained class: stays whole
    assert pieces == [(0, 0, 3), (0, 3, 7), (0, 7, 10), (1, 0, 2), (1, 2, 5), (1, 5, 7), (2, 0, 4)]
    assert split_into_pieces([1, 9], [1.0, 1.0], 4) == [(0, 0, 1), (1, 0, 3), (1, 3, 6), (1, 6, 9)]
    with pytest.raises(ValueError, match="hold 3 samples of the trained classes, fewer than ranks × workers = 4"):
        split_into_pieces([2, 1], [1.0, 1.0], 4)


def test_one_shard_for_two_ranks_and_two_workers_streams_exact_frequencies_and_resumes(tmp_path):
    """One train shard, 2 ranks × 2 workers: it is read as 4 sample ranges. Every sample is read once per
    pass (instance sampling emits each exactly once in a pass), the class frequencies pass the χ² test at
    square-root sampling, and a resumed stream continues with the identical batches."""
    rng = np.random.default_rng(1)
    labels = rng.permutation([j for j, n in enumerate([60, 30, 15, 8]) for _ in range(n)]).tolist()
    index = write_custom_shards(tmp_path / "one", [labelled_samples("a", labels)], 4)
    kw = dict(batch_size=4, world_size=2, num_workers=2, seed=3, **{**STREAM, "image_size": 8, "shuffle_buffer": 16})
    streams = [build_train_stream(index, rank=r, sampling_power=1.0, **kw) for r in range(2)]
    assert len(streams[0].plan.shard_paths) == 4 and streams[0].plan.shard_ranges[-1] == (85, 113)
    first_pass = []
    for stream in streams:
        plan = stream.plan
        for w in range(2):
            (piece,) = plan.slot_shards(0, w)  # every slot reads one of the 4 ranges
            first_pass += [s.key for s in read_shard(Path(plan.shard_paths[piece]), plan.shard_samples[piece], 4,
                                                     Counter(), None, *plan.shard_ranges[piece])]
    assert sorted(first_pass) == sorted(f"a_{k:05d}" for k in range(113))  # each sample once, nothing lost
    stats = train_stats(index, sampling_power=0.5, epochs=30, ranks=2, workers=2, batch_size=4, seed=3,
                        shuffle_buffer=16, decode=False, image_size=8, channels=1, exclude=[])
    assert stats["batches_by_rank"] == [[113 // 8] * 30] * 2
    assert chisquare(stats["emitted_counts"], stats["expected_counts"]).pvalue > 1e-3
    full = build_train_stream(index, rank=1, sampling_power=0.5, **kw)
    reference = [k for k, _, _ in run_epoch(full, 2)]
    interrupted = build_train_stream(index, rank=1, sampling_power=0.5, **kw)
    interrupted.set_epoch(2)
    consumed = [b.keys for _, b in zip(range(5), interrupted)]
    resumed = build_train_stream(index, rank=1, sampling_power=0.5, **kw)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    resumed.set_epoch(2)
    assert consumed + [b.keys for b in resumed] == reference
