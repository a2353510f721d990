"""The training speed options (trainer.memory_format, cudnn_benchmark, tf32, compile) reach the model, the
batches and torch's flags, and change no result beyond floating-point tolerance (one CPU rank, DeepSpeed)."""

import pytest
import torch
from test_engine_epochs import COUNTS, MemoryStream, plan_and_objective

from ltdist.config import ConfigError, load_config, validate_config
from ltdist.engine import speed
from ltdist.engine.trainer import Trainer


def _fit(run_dir, env, *extra: str) -> tuple[Trainer, list[dict], list[torch.Tensor]]:
    """Four steps of resnet8 on the in-memory stream; the training records and the backbone's inputs."""
    cfg = load_config(None, ["model.arch=resnet8", "trainer.batch_size=16", "trainer.epochs=1", "trainer.max_steps=4",
                             "trainer.log_every=1", "trainer.checkpoint_every=1000", "optim.warmup_epochs=0",
                             "data.channels=1", "trainer.progress=false", *extra])
    records: list[dict] = []
    trainer = Trainer(cfg, run_dir, env, MemoryStream(), len(COUNTS), COUNTS, None, records.append,
                      **plan_and_objective(cfg, env))
    inputs: list[torch.Tensor] = []  # the backbone's input and its first convolution's output, per step
    trainer.model.backbone.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    trainer.model.backbone.conv1.register_forward_hook(lambda module, args, out: inputs.append(out))
    trainer.fit()
    return trainer, [r for r in records if "loss" in r and "event" not in r], inputs


def _losses(records: list[dict]) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in records], dtype=torch.float64)


def test_memory_format_auto_is_channels_last_on_cuda_only():
    assert speed.memory_format("auto", torch.device("cuda")) == torch.channels_last
    assert speed.memory_format("auto", torch.device("cpu")) == torch.contiguous_format
    assert speed.memory_format("channels_last", torch.device("cpu")) == torch.channels_last
    with pytest.raises(ValueError, match=r"trainer\.memory_format"):
        speed.memory_format("nhwc", torch.device("cpu"))


def test_channels_last_reaches_weights_and_batches_and_keeps_the_losses(env, tmp_path):
    plain, plain_records, plain_inputs = _fit(tmp_path / "a", env, "trainer.memory_format=contiguous")
    nhwc, nhwc_records, nhwc_inputs = _fit(tmp_path / "b", env, "trainer.memory_format=channels_last")
    # batches and activations are NHWC (channels > 1, so the two layouts differ); weights keep DeepSpeed's layout
    assert all(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() for x in nhwc_inputs[1::2])
    assert nhwc_inputs[0].is_contiguous(memory_format=torch.channels_last)
    assert all(x.is_contiguous() for x in plain_inputs) and len(nhwc_inputs) == len(plain_inputs) == 8
    assert nhwc.model.backbone.conv1.weight.is_contiguous() and plain is not nhwc
    torch.testing.assert_close(_losses(nhwc_records), _losses(plain_records), rtol=1e-4, atol=1e-5)
    assert len(plain_records) == 4


def test_channels_last_trains_under_bf16_zero1(env, tmp_path):
    """The GPU configuration's path: DeepSpeed's bf16 ZeRO-1 optimizer and its initial parameter broadcast
    (which views every bf16 weight as bytes, so a channels-last weight would stop it)."""
    _, records, inputs = _fit(tmp_path, env, "trainer.memory_format=channels_last", "trainer.precision=bf16",
                              "deepspeed.zero_stage=1")
    assert len(records) == 4 and all(torch.isfinite(_losses(records)))
    assert inputs[1].dtype == torch.bfloat16 and inputs[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("on", [False, True])
def test_cudnn_benchmark_and_tf32_flags_are_set(env, tmp_path, on):
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    try:
        _fit(tmp_path, env, f"trainer.cudnn_benchmark={on}", f"trainer.tf32={on}", "trainer.max_steps=1")
        assert torch.backends.cudnn.benchmark is on and torch.backends.cudnn.allow_tf32 is on
        assert torch.get_float32_matmul_precision() == ("high" if on else "highest")
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def test_compile_wraps_the_backbone_under_deepspeed_and_keeps_the_losses(env, tmp_path, monkeypatch):
    # aot_eager runs Dynamo and AOTAutograd (what inductor receives) without inductor's C++ compile: seconds on
    # a CPU; the GPU check times the default backend.
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="aot_eager", **kw))
    torch._dynamo.reset()
    _, eager_records, _ = _fit(tmp_path / "eager", env)
    compiled, compiled_records, _ = _fit(tmp_path / "compiled", env, "trainer.compile=true")
    assert compiled.model.backbone._compiled_call_impl is not None
    assert not hasattr(compiled.model, "_orig_mod")  # compiled in place: state-dict keys unchanged
    assert all(k.startswith(("backbone.", "classifier.")) for k in compiled.model.state_dict())
    torch.testing.assert_close(_losses(compiled_records), _losses(eager_records), rtol=1e-4, atol=1e-5)
    assert (tmp_path / "compiled" / "weights" / "final.pt").is_file()


def test_compile_with_the_mpcl_meta_step_is_refused_by_name():
    mpcl = ["trainer.compile=true", "method.loss=mpcl", "method.mpcl.warmup_epochs=0"]
    with pytest.raises(ConfigError, match=r"trainer\.compile: .*meta step"):
        validate_config(load_config(None, [*mpcl, "method.mpcl.meta_network=true"]))
    validate_config(load_config(None, [*mpcl, "method.mpcl.meta_network=false"]))  # one backward: allowed
    with pytest.raises(ConfigError, match=r"trainer\.memory_format"):
        validate_config(load_config(None, ["trainer.memory_format=nhwc"]))
