"""Stage-1 objectives: the logit-offset losses against their formulas, MPCL's pieces against references."""

import math
import multiprocessing as mp
import socket

import pytest
import torch
import torch.nn.functional as F

from ltdist.config import ConfigError, load_config, validate_config
from ltdist.methods.objectives.logit_adjusted import balanced_softmax, cross_entropy, log_prior, logit_adjusted
from ltdist.methods.objectives.meta_step import meta_gradient
from ltdist.methods.objectives.mpcl import MetaPrototypeNet, MPCLObjective, prototype_contrastive_loss
from ltdist.models import build_model

COUNTS = [90, 9, 1]


def _hand_ce(logits: list[float], label: int) -> float:
    return -logits[label] + math.log(sum(math.exp(v) for v in logits))


def test_logit_offset_losses_equal_their_formulas():
    logits, labels = torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([1])
    assert float(cross_entropy().loss(None, logits, labels, 0)) == pytest.approx(_hand_ce([2, 1, 0], 1))
    # balanced softmax: logits + log n_j = [2 + log 90, 1 + log 9, 0 + log 1]
    bs = [2 + math.log(90), 1 + math.log(9), 0.0]
    assert float(balanced_softmax(COUNTS).loss(None, logits, labels, 0)) == pytest.approx(_hand_ce(bs, 1), rel=1e-6)
    # logit adjusted, τ = 2: logits + 2·log(n_j / 100)
    la = [v + 2 * math.log(n / 100) for v, n in zip([2, 1, 0], COUNTS)]
    assert float(logit_adjusted(COUNTS, 2.0).loss(None, logits, labels, 0)) == pytest.approx(_hand_ce(la, 1), rel=1e-6)


def test_balanced_softmax_is_logit_adjustment_with_tau_one():
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(16, 3, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    torch.testing.assert_close(balanced_softmax(COUNTS).loss(None, logits, labels, 0),
                               logit_adjusted(COUNTS, 1.0).loss(None, logits, labels, 0))
    assert torch.isfinite(log_prior([5, 0, 3])).all()


def _validate(*overrides: str) -> None:
    validate_config(load_config(None, list(overrides)))


def test_zero_meta_gradient_configs_are_refused():
    with pytest.raises(ConfigError, match=r"method\.mpcl\.meta_inner: 'head': .*identically zero"):
        _validate("method.loss=mpcl", "method.mpcl.meta_inner=head")
    with pytest.raises(ConfigError, match=r"method\.mpcl\.lam: .*identically zero"):
        _validate("method.loss=mpcl", "method.mpcl.lam=0")
    with pytest.raises(ConfigError, match=r"method\.mpcl\.warmup_epochs: .*never be switched on"):
        _validate("method.loss=mpcl", "trainer.epochs=3", "method.mpcl.warmup_epochs=3")
    _validate("method.loss=mpcl", "method.mpcl.lam=0", "method.mpcl.meta_network=false")


def _objective(meta_network: bool, **kw) -> MPCLObjective:
    args = dict(num_classes=3, feature_dim=4, lam=0.5, tau=0.07, momentum=0.9, warmup_epochs=2,
                meta_network=meta_network, meta_inner="last_stage", meta_optimizer="sgd", meta_lr=1e-3, meta_hidden=8,
                meta_init_std=0.0,
                meta_interval=1, meta_set=None, meta_batch_size=0, seed=0, rank=0, image_size=8, channels=1,
                device=torch.device("cpu"), dtype=torch.float32)
    return MPCLObjective(**{**args, **kw})


def test_warmup_epochs_use_cross_entropy_only():
    objective = _objective(False)
    gen = torch.Generator().manual_seed(1)
    features, logits, labels = torch.randn(6, 4, generator=gen), torch.randn(6, 3, generator=gen), torch.arange(6) % 3
    objective.after_micro_step(features, labels)
    ce = F.cross_entropy(logits, labels)
    torch.testing.assert_close(objective.loss(features, logits, labels, epoch=1), ce)
    pc = prototype_contrastive_loss(features, labels, objective.unit_prototypes(), 0.07)
    assert float(pc) > 0
    torch.testing.assert_close(objective.loss(features, logits, labels, epoch=2), ce + 0.5 * pc)
    assert set(objective.metrics()) == {"loss_ce", "loss_pc", "meta_steps"}


def test_meta_network_starts_as_the_identity_and_keeps_unseen_classes_zero():
    net = MetaPrototypeNet(4, 8)
    protos = F.normalize(torch.randn(3, 4), dim=1)
    protos[2] = 0
    out = net(protos)
    torch.testing.assert_close(out[:2], protos[:2])
    assert torch.equal(out[2], torch.zeros(4))


@pytest.mark.parametrize("meta_inner", ["last_stage", "all"])
def test_meta_gradient_matches_finite_differences(meta_inner):
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=3, channels=1).double().train()
    net = MetaPrototypeNet(model.feature_dim, 8).double()
    torch.nn.init.normal_(net.decoder[-1].weight, std=0.3)  # away from the identity start: all of Θ matters
    protos = F.normalize(torch.randn(3, model.feature_dim, dtype=torch.float64), dim=1)
    gen = torch.Generator().manual_seed(2)
    train = (torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2]))
    meta = (torch.randn(6, 1, 8, 8, generator=gen, dtype=torch.float64), torch.tensor([2, 1, 0, 2, 1, 0]))
    theta = list(net.parameters())

    def train_loss(features, logits, labels):
        return F.cross_entropy(logits, labels) + 0.5 * prototype_contrastive_loss(features, labels, net(protos), 0.5)

    grads, _ = meta_gradient(model, meta_inner, train, meta, theta, train_loss, lr=0.5)
    flat = torch.cat([g.reshape(-1) for g in grads])
    assert flat.abs().max() > 1e-6  # the meta-gradient is not identically zero
    direction = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in theta]
    eps = 1e-5
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(theta, direction):
                p.add_(sign * eps * d)
        values.append(meta_gradient(model, meta_inner, train, meta, theta, train_loss, lr=0.5)[1])
        with torch.no_grad():
            for p, d in zip(theta, direction):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    analytic = float(sum((g * d).sum() for g, d in zip(grads, direction)))
    assert abs(numeric - analytic) <= 1e-3 * abs(analytic), (numeric, analytic)
    # the virtual step touches neither the parameters nor BatchNorm's running statistics
    assert all(torch.equal(b, torch.zeros_like(b)) for n, b in model.named_buffers() if n.endswith("running_mean"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ema_rank(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    objective = _objective(False)
    for step in range(3):
        gen = torch.Generator().manual_seed(100 * step + rank)
        objective.after_micro_step(torch.randn(5, 4, generator=gen), torch.randint(0, 3, (5,), generator=gen))
    # plain lists: a tensor crosses the queue as a shared file descriptor, which dies with this process
    queue.put((rank, objective.prototypes.tolist(), objective.updates.tolist()))
    dist.destroy_process_group()


def test_ema_prototypes_identical_on_two_ranks_and_equal_a_python_loop():
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_ema_rank, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    results = {rank: (torch.tensor(protos), torch.tensor(updates))
               for rank, protos, updates in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(60)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    # 30 samples over 3 classes with m = 0.9: the running mean up to a class's 10th update, eq. 1 after
    protos, seen = torch.zeros(3, 4, dtype=torch.float64), [0, 0, 0]
    for step in range(3):
        batch = [torch.Generator().manual_seed(100 * step + rank) for rank in range(2)]
        parts = [(torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)) for g in batch]
        z = F.normalize(torch.cat([f for f, _ in parts]).double(), dim=1)
        y = torch.cat([label for _, label in parts]).tolist()
        for i, k in enumerate(y):  # rank 0's samples first, then rank 1's, each in batch order
            seen[k] += 1
            if seen[k] <= 10:
                protos[k] = protos[k] * (seen[k] - 1) / seen[k] + z[i] / seen[k]
            else:
                protos[k] = 0.9 * protos[k] + 0.1 * z[i]
    assert max(seen) > 10  # both phases are exercised
    assert results[0][1].tolist() == seen
    torch.testing.assert_close(results[0][0].double(), protos, rtol=1e-5, atol=1e-6)


def _unit_sphere_eq1(first_and_rest: torch.Tensor, m: float) -> torch.Tensor:
    """Eq. 1 as MoPro applies it (and ltdist did before): c starts at the first sample, then
    c ← normalise(m c + (1−m) z) per sample."""
    c = F.normalize(first_and_rest[0], dim=0)
    for z in first_and_rest[1:]:
        c = F.normalize(m * c + (1 - m) * z, dim=0)
    return c


def test_tail_prototype_tracks_its_class_after_one_epoch():
    """One epoch of instance sampling (every image once, shuffled) training a tiny ResNet with MPCL (CE only,
    the warm-up): class 9 has 6 images. Its prototype points along the mean of the 6 features it was updated
    with; eq. 1 on the unit sphere from the first sample does not."""
    torch.manual_seed(0)
    counts = [200, 120, 70, 40, 25, 16, 12, 9, 7, 6]
    gen = torch.Generator().manual_seed(3)
    templates = torch.randn(10, 1, 8, 8, generator=gen)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    images = templates[labels] + 0.8 * torch.randn(len(labels), 1, 8, 8, generator=gen)
    model = build_model("resnet8", num_classes=10, channels=1).train()
    objective = _objective(False, num_classes=10, feature_dim=model.feature_dim, momentum=0.999, warmup_epochs=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen = []
    for batch in torch.randperm(len(labels), generator=gen).split(32):
        logits, features = model(images[batch], return_features=True)
        loss = objective.loss(features, logits, labels[batch], epoch=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        objective.after_micro_step(features.detach(), labels[batch])
        seen.append(F.normalize(features.detach()[labels[batch] == 9], dim=1))
    seen = torch.cat(seen)
    assert len(seen) == 6 and int(objective.updates[9]) == 6
    assert objective.updates.tolist() == counts
    mean = seen.mean(0)
    assert float(F.cosine_similarity(objective.unit_prototypes()[9], mean, dim=0)) >= 0.999
    assert float(F.cosine_similarity(_unit_sphere_eq1(seen, 0.999), mean, dim=0)) < 0.99
