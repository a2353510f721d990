"""Training speed options a GPU user expects (``trainer.memory_format``, ``cudnn_benchmark``, ``tf32``, ``compile``).

- channels-last memory format (NHWC): convolutions on tensor cores run without layout transposes; ``auto``
  is channels-last on CUDA and contiguous (NCHW) on the CPU. Every training batch takes the format, and with
  it every activation (a convolution's output follows its input). The weights stay in the layout DeepSpeed
  gives them: its bf16/ZeRO optimizers keep parameters as views of one flat contiguous buffer, and its
  initial broadcast cannot view a channels-last bf16 weight as bytes; cuDNN converts a weight per call,
  which costs far less than the activations' transposes it saves. Results are the same up to floating-point
  summation order.
- ``torch.backends.cudnn.benchmark``: cuDNN times its convolution algorithms once per input shape and keeps
  the fastest (the training stream's shapes are fixed).
- TF32 for fp32 matrix products and convolutions (Ampere and later): 10-bit mantissa products with fp32
  accumulation. Only fp32 runs are affected; bf16/fp16 runs compute in their own precision.
- ``compile``: ``torch.compile`` of the backbone in place (``nn.Module.compile``: parameter names, hence
  checkpoints and exports, are unchanged), under the DeepSpeed engine. MPCL's meta step differentiates the
  loss twice (the virtual step's gradient is itself differentiated), which compiled graphs do not support:
  :mod:`ltdist.config.validate` refuses that combination by name.
"""

from __future__ import annotations

import torch

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def memory_format(option: str, device: torch.device) -> torch.memory_format:
    """The memory format ``trainer.memory_format`` means on ``device``."""
    if option not in MEMORY_FORMATS:
        raise ValueError(f"trainer.memory_format must be one of {MEMORY_FORMATS}, got {option!r}")
    if option == "auto":
        option = "channels_last" if device.type == "cuda" else "contiguous"
    return torch.channels_last if option == "channels_last" else torch.contiguous_format


def set_backend_flags(cudnn_benchmark: bool, tf32: bool) -> None:
    """Process-wide cuDNN autotuning and TF32 flags (they act on CUDA only)."""
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def compile_backbone(model: torch.nn.Module) -> torch.nn.Module:
    """Compile ``model.backbone`` (a :class:`ltdist.models.LongTailModel`'s) in place; returns ``model``."""
    model.backbone.compile()
    return model
