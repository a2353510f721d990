"""Custom ops of ltdist: each has a PyTorch reference (the oracle) and a fast path chosen by device
(Triton on CUDA, C++/CUDA for the sampler); ``LTDIST_KERNELS=reference`` forces the references."""

from ltdist.kernels.calibrated_sampler import calibrated_sample, group_bank
from ltdist.kernels.cosine_logits import cosine_cross_entropy, cosine_logits
from ltdist.kernels.kt_attention import kt_attention, kt_attention_reference
from ltdist.kernels.prototype_ema import prototype_ema

__all__ = [
    "calibrated_sample",
    "cosine_cross_entropy",
    "cosine_logits",
    "group_bank",
    "kt_attention",
    "kt_attention_reference",
    "prototype_ema",
]
