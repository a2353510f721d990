"""The single-rank all-reduce the trainer skips (the engine benchmark's ``ltdist`` loop) changes nothing."""

from __future__ import annotations

import copy

import torch

from ltdist.bench.steps import ds_step, make_sgd
from ltdist.engine.ds_config import build_deepspeed_config, plan_batches, skip_single_rank_allreduce


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
