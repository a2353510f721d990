"""The engine benchmark's arithmetic, and the single-rank all-reduce the trainer skips changing nothing."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ltdist.engine.bench import ds_step, make_sgd, summarise, timed_rounds
from ltdist.engine.ds_config import build_deepspeed_config, plan_batches, skip_single_rank_allreduce


def test_rounds_rotate_and_ratios_are_paired_per_round():
    order: list[str] = []
    loops = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    times = timed_rounds(loops, steps=3, warmup=1)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert all(len(t["wall"]) == 3 and len(t["cpu"]) == 3 for t in times.values())
    synthetic = {"plain": {"wall": [1.0, 2.0, 4.0], "cpu": [1.0, 1.0, 1.0]},
                 "ds": {"wall": [1.5, 2.2, 4.8], "cpu": [1.1, 1.3, 1.2]}}
    s = summarise(synthetic, "plain")
    assert s["ds"]["paired_wall"] == pytest.approx(1.2) and s["ds"]["paired_cpu"] == pytest.approx(1.2)
    assert s["ds"]["wall_s"] == 2.2 and s["plain"]["paired_wall"] == 1.0


def test_skipping_the_single_rank_allreduce_trains_the_same_weights(env):
    import deepspeed

    from ltdist.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=4, channels=1)
    config = build_deepspeed_config(plan_batches(8, 1, 1), "fp32", 0, grad_clip=0.0)
    engines = []
    for _ in range(2):
        replica = copy.deepcopy(model)
        engines.append(deepspeed.initialize(model=replica, optimizer=make_sgd(replica), config=config,
                                            dist_init_required=False)[0])
    assert skip_single_rank_allreduce(engines[1]) and not engines[1].enable_backward_allreduce
    assert engines[0].enable_backward_allreduce
    images, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    for _ in range(3):
        for engine in engines:
            ds_step(engine, images, labels)
    for (name, a), (_, b) in zip(engines[0].module.named_parameters(), engines[1].module.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not torch.equal(next(model.parameters()), next(engines[0].module.parameters()))  # it did train

    zero1 = copy.deepcopy(model)
    config1 = build_deepspeed_config(plan_batches(8, 1, 1), "fp32", 1, grad_clip=0.0)
    engine1 = deepspeed.initialize(model=zero1, optimizer=make_sgd(zero1), config=config1, dist_init_required=False)[0]
    assert not skip_single_rank_allreduce(engine1) and engine1.enable_backward_allreduce  # ZeRO keeps its reduction


def test_distributed_benchmark_times_every_mode_and_a_variant_on_two_ranks(tmp_path, capsys):
    from ltdist.engine import bench_dist

    out = tmp_path / "dist.json"
    variant = 'zero2-overlap:2:{"zero_optimization": {"overlap_comm": true, "reduce_bucket_size": 100000}}'
    assert bench_dist.main(["--cases", "resnet8:8:8", "--channels", "1", "--steps", "2", "--warmup", "0",
                            "--variant", variant, "--profile", "1", "--out", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert list(row["modes"]) == ["ddp", "zero0", "zero1", "zero2", "zero2-overlap"]
    assert row["modes"]["ddp"]["paired_wall"] == 1.0 and all(m["wall_s"] > 0 for m in row["modes"].values())
    assert row["variants"]["zero2-overlap"]["zero_optimization"]["overlap_comm"] is True
    assert row["micro_batch"] == 4 and row["params"] > 0 and "zero2-overlap - ddp" in row["profile"]
    printed = capsys.readouterr().out
    assert "zero2-overlap" in printed and "grew most" in printed
    with pytest.raises(SystemExit):
        bench_dist.main(["--variant", "zero1:1:{}"])  # a name the built-in modes use
