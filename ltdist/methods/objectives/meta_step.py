"""The bi-level online approximation of MPCL (paper 2, §3.2, eqs. 6–7): the meta-gradient of Θ.

One meta step, for the parameters W_in that ``method.mpcl.meta_inner`` names:

    Ŵ_in(Θ) = W_in − α ∇_{W_in} L_train(W; Θ)              (eq. 6, a *virtual* step: no parameter changes)
    g_Θ     = ∇_Θ  L_CE(meta batch; Ŵ_in(Θ))                (eq. 7, second order through the virtual step)

Θ enters L_train only through λ·L_PC(z, ĉ(Θ)), and L_PC involves the backbone features z but not the
classifier weights. A virtual step over the classifier alone therefore leaves the meta batch's logits
independent of Θ and g_Θ = 0 exactly; W_in must contain feature-producing parameters:

- ``last_stage``: the backbone's last residual stage + the classifier. The activations entering that
  stage are computed once, without gradient (cheap: the second-order graph covers one stage);
- ``all``: every parameter of the model (the full second-order graph; ZeRO ≤ 2 only, where every rank
  holds full parameters).

Both forwards run through :func:`torch.func.functional_call` with cloned buffers, so BatchNorm's
running statistics of the real model are untouched, and under :func:`reference_kernels`, because the
Triton ops have no double backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ltdist.kernels._dispatch import reference_kernels
from ltdist.models import LongTailModel

META_INNER = ("last_stage", "all")
# Choices that cannot work, with the reason the config check gives.
_HEAD_ONLY = ("a virtual step over the classifier alone leaves the meta batch's logits independent of Θ (L_PC "
              "does not involve the classifier weights): the meta-gradient is identically zero; use last_stage or all")
META_INNER_ZERO_GRADIENT = {"head": _HEAD_ONLY, "classifier": _HEAD_ONLY}


class _FeaturesAndLogits(nn.Module):
    """``forward(h) -> (logits, features)`` of ``stage`` (features from h) followed by ``classifier``."""

    def __init__(self, stage: nn.Module, classifier: nn.Module):
        super().__init__()
        self.stage, self.classifier = stage, classifier

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.stage(h)
        return self.classifier(features), features


def split_for_meta(model: LongTailModel, meta_inner: str) -> tuple[nn.Module | None, nn.Module]:
    """(prefix, inner): ``prefix(x)`` gives the activations entering the inner part (None: the input itself);
    ``inner(h) -> (logits, features)`` holds the parameters of the virtual step. Both share the model's
    parameter tensors."""
    if meta_inner == "all":
        return None, _FeaturesAndLogits(model.backbone, model.classifier)
    if meta_inner != "last_stage":
        raise ValueError(f"method.mpcl.meta_inner must be one of {META_INNER}, got {meta_inner!r}")
    split = getattr(model.backbone, "split_last_stage", None)
    if split is None:
        raise ValueError(f"method.mpcl.meta_inner=last_stage needs a backbone with split_last_stage() "
                         f"({type(model.backbone).__name__} has none): use meta_inner=all")
    prefix, last = split()
    return prefix, _FeaturesAndLogits(last, model.classifier)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """float64 stays float64 (the finite-difference checks); bf16/fp16/fp32 compute in fp32."""
    return x if x.dtype == torch.float64 else x.float()


def _call(module: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor):
    buffers = {name: b.clone() for name, b in module.named_buffers()}  # BN statistics stay untouched
    return functional_call(module, {**params, **buffers}, (x,))


def meta_gradient(model: LongTailModel, meta_inner: str, train_batch: tuple[torch.Tensor, torch.Tensor],
                  meta_batch: tuple[torch.Tensor, torch.Tensor], theta: list[torch.Tensor],
                  train_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                  lr: float) -> tuple[list[torch.Tensor], float]:
    """∇_Θ of the meta loss through one virtual SGD step of size ``lr`` (eqs. 6–7).

    Args:
        train_batch / meta_batch: (images [B, C, H, W], labels [B]) in the model's dtype / int64.
        theta: the meta-network parameters Θ (requires_grad).
        train_loss: (features [B, F], logits [B, C], labels [B]) → scalar L_train, differentiable in Θ.
    Returns:
        (gradients like ``theta``, meta loss value).
    """
    prefix, inner = split_for_meta(model, meta_inner)
    params = dict(inner.named_parameters())
    with reference_kernels():
        inputs = []
        for images, _ in (train_batch, meta_batch):
            if prefix is None:
                inputs.append(images)
            else:
                with torch.no_grad():
                    inputs.append(_call(prefix, dict(prefix.named_parameters()), images))
        logits, features = _call(inner, params, inputs[0])
        loss = train_loss(at_least_fp32(features), at_least_fp32(logits), train_batch[1])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
        fast = {name: p if g is None else p - lr * g for (name, p), g in zip(params.items(), grads)}
        meta_logits, _ = _call(inner, fast, inputs[1])
        meta_loss = F.cross_entropy(at_least_fp32(meta_logits), meta_batch[1])
        theta_grads = torch.autograd.grad(meta_loss, theta, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(theta, theta_grads)], float(meta_loss.detach())
