"""Engine pieces without processes: DeepSpeed config, LR rule and schedule, commit markers, numerics guard."""

import hashlib
import json
import math

import pytest
import torch

from ltdist.engine import checkpoint as ckpt
from ltdist.engine.ds_config import build_deepspeed_config, effective_lr, plan_batches
from ltdist.engine.numerics import NonFiniteGuard, NonFiniteLossError, nonfinite_parameters
from ltdist.engine.schedule import lr_at


def test_batch_plan_and_deepspeed_config():
    plan = plan_batches(256, world_size=4, grad_accum=2)
    assert plan.micro_batch == 32 and plan.micro_batch * 4 * 2 == plan.global_batch
    config = build_deepspeed_config(plan, "bf16", 1, grad_clip=1.0,
                                    extra={"zero_optimization": {"overlap_comm": True}, "steps_per_print": 5})
    # DeepSpeed checks train_batch = micro · accum · world itself; ours must agree with it
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (256, 32, 2)
    assert config["zero_optimization"] == {"stage": 1, "overlap_comm": True} and config["steps_per_print"] == 5
    assert config["bf16"]["enabled"] and not config["fp16"]["enabled"] and config["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match="not divisible"):
        plan_batches(100, world_size=3, grad_accum=1)
    with pytest.raises(ValueError, match="zero_stage"):
        build_deepspeed_config(plan, "fp32", 3, 0.0)
    with pytest.raises(ValueError, match="precision"):
        build_deepspeed_config(plan, "fp8", 0, 0.0)


def test_lr_scaling_rules():
    assert effective_lr(0.1, 1024, 256, "linear") == pytest.approx(0.4)
    assert effective_lr(0.1, 1024, 256, "sqrt") == pytest.approx(0.2)
    assert effective_lr(0.1, 1024, 256, "none") == 0.1
    with pytest.raises(ValueError, match="lr_scaling"):
        effective_lr(0.1, 1024, 256, "cubic")


def test_warmup_then_cosine():
    peak, total, warm = 0.4, 110, 10
    lrs = [lr_at(s, peak, total, warm) for s in range(total)]
    assert lrs[:warm] == pytest.approx([peak * (s + 1) / warm for s in range(warm)])
    assert lrs[warm] == pytest.approx(peak)
    # cosine: halfway through the decay the LR is half the peak, and it decreases monotonically
    assert lrs[warm + 50] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:])) and lrs[-1] < 1e-3 * peak
    assert lr_at(5, peak, total, 0, "constant") == peak


def _fake_checkpoint(root, step, commit=True, damage=None):
    d = root / ckpt.tag_for(step)
    d.mkdir(parents=True)
    contents = {"mp_rank_00_model_states.pt": b"x" * 100, "ltdist_rank0.pt": b"y" * 10}
    for name, data in contents.items():
        (d / name).write_bytes(data)
    if commit:
        files = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                 for name, data in contents.items()}
        (d / ckpt.COMMIT_FILE).write_text(json.dumps({"step": step, "world_size": 1, "files": files}))
    if damage == "truncate":
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x" * 50)
    elif damage == "same-size":
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x" * 40 + b"z" * 20 + b"x" * 40)
    return d


def test_resume_walks_back_past_damaged_checkpoints_and_says_why(tmp_path, caplog):
    assert ckpt.find_resumable(tmp_path / "none") == (None, [])
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 20)
    _fake_checkpoint(tmp_path, 30, damage="same-size")  # marker written, content changed afterwards
    _fake_checkpoint(tmp_path, 40, damage="truncate")
    _fake_checkpoint(tmp_path, 50, commit=False)  # killed before the commit
    with caplog.at_level("WARNING", logger="ltdist.engine.checkpoint"):
        (directory, marker), rejected = ckpt.find_resumable(tmp_path)
    assert directory.name == ckpt.tag_for(20) and marker["step"] == 20
    assert [d.name for d in rejected] == [ckpt.tag_for(s) for s in (50, 40, 30)]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and all(m.startswith("rejected checkpoint step_") for m in messages)
    assert "commit.json is missing" in messages[0]
    assert "mp_rank_00_model_states.pt has 50 bytes, 100 recorded" in messages[1]
    assert "mp_rank_00_model_states.pt: SHA-256 differs" in messages[2]
    # the job's walk sets them aside: committed ones kept under rejected/, the uncommitted one deleted
    assert ckpt.select_checkpoint(tmp_path, allow_restart=False)[0].name == ckpt.tag_for(20)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [ckpt.tag_for(s) for s in (10, 20)]
    assert sorted(p.name[:14] for p in (tmp_path / "rejected").iterdir()) == [ckpt.tag_for(s) for s in (30, 40)]
    _fake_checkpoint(tmp_path, 60)  # the next save
    ckpt._prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [ckpt.tag_for(s) for s in (20, 60)]


def test_all_checkpoints_damaged_refuses_to_restart_and_names_the_key(tmp_path):
    _fake_checkpoint(tmp_path, 10, damage="truncate")
    _fake_checkpoint(tmp_path, 20, commit=False)
    with pytest.raises(ckpt.CheckpointError, match=r"trainer\.allow_restart_from_scratch=true") as refused:
        ckpt.find_resumable(tmp_path)
    assert "step_000000010" in str(refused.value) and "step_000000020" in str(refused.value)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.select_checkpoint(tmp_path, allow_restart=False)
    assert ckpt.select_checkpoint(tmp_path, allow_restart=True) is None
    assert not list(tmp_path.glob("step_*")) and len(list((tmp_path / "rejected").iterdir())) == 1


def test_rng_state_roundtrip():
    state = ckpt.rng_state()
    a = torch.rand(3)
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


def test_nonfinite_guard_counts_and_stops():
    guard = NonFiniteGuard(max_consecutive=2)
    for finite in (True, False, True, False):
        guard.record(finite, step=0)
    assert guard.skipped == 2 and guard.consecutive == 1
    restored = NonFiniteGuard(2)
    restored.load_state_dict(guard.state_dict())
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_steps=2"):
        restored.record(False, step=9)
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        NonFiniteGuard(0)


def test_nonfinite_parameters_named():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert nonfinite_parameters(model) == []
    with torch.no_grad():
        model[0].bias[1] = float("nan")
    model[1].running_var[0] = float("inf")
    assert nonfinite_parameters(model) == ["0.bias", "1.running_var"]


@pytest.mark.parametrize("preset,stage,precision", [("zero0_fp32", 0, "fp32"), ("zero1_bf16", 1, "bf16"),
                                                    ("zero2_bf16", 2, "bf16")])
def test_deepspeed_presets_build_configs(preset, stage, precision):
    from pathlib import Path

    from omegaconf import OmegaConf

    from ltdist.config.load import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / f"{preset}.yaml"
    cfg = load_config(path)
    extra = OmegaConf.to_container(cfg.deepspeed.extra, resolve=True)  # as the Trainer passes it
    config = build_deepspeed_config(plan_batches(cfg.trainer.batch_size, 8, 1), cfg.trainer.precision,
                                    cfg.deepspeed.zero_stage, 0.0, extra)
    assert config["zero_optimization"]["stage"] == stage
    assert config["bf16"]["enabled"] is (precision == "bf16")
    if stage == 2:
        assert config["zero_optimization"]["overlap_comm"] is True


def test_the_nonfinite_message_says_whether_a_checkpoint_exists():
    from ltdist.engine.numerics import NonFiniteGuard, NonFiniteLossError

    guard = NonFiniteGuard(1)
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet, so a relaunch starts from step 0"):
        guard.record(False, 3)
    guard.last_checkpoint = "runs/x/checkpoints/step_000000005 (step 5)"
    with pytest.raises(NonFiniteLossError, match=r"the last checkpoint, runs/x/checkpoints/step_000000005 \(step 5\)"):
        guard.record(False, 7)
