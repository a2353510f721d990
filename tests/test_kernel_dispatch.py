"""Clear errors before any kernel runs: GPU generation, one device per call, label ranges, strides."""

import os
import warnings
from types import SimpleNamespace

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from ltdist.kernels import _dispatch, cosine_logits_triton  # noqa: E402
from ltdist.kernels.cosine_logits import cosine_cross_entropy, cosine_cross_entropy_reference, cosine_logits  # noqa: E402
from ltdist.kernels.kt_attention import kt_attention  # noqa: E402
from ltdist.kernels.prototype_ema import prototype_ema  # noqa: E402

# a stand-in for a CUDA tensor: the dispatch decision only looks at .device
CUDA0 = SimpleNamespace(device=torch.device("cuda", 0))


@pytest.fixture
def gpu(monkeypatch):
    """Pretend device 0 is a GPU whose capability the test sets; the per-device cache starts empty."""
    state = {"capability": (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    monkeypatch.delenv(_dispatch.REFERENCE_ENV, raising=False)
    _dispatch.capability_supported.cache_clear()
    yield state
    _dispatch.capability_supported.cache_clear()


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (9, 0), (10, 0)])
def test_sm80_and_newer_take_the_triton_path(gpu, capability):
    gpu["capability"] = capability
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.use_triton("op", x=CUDA0)


def test_older_gpu_falls_back_to_the_reference_with_one_warning(gpu):
    gpu["capability"] = (7, 5)
    with pytest.warns(RuntimeWarning, match=r"Tesla T4 is sm_75; the Triton kernels need sm_80") as caught:
        assert not _dispatch.use_triton("op", x=CUDA0)
        assert not _dispatch.use_triton("op", x=CUDA0, w=CUDA0)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1


def test_reference_override_wins_on_a_supported_gpu(gpu, monkeypatch):
    monkeypatch.setenv(_dispatch.REFERENCE_ENV, "reference")
    assert not _dispatch.use_triton("op", x=CUDA0)


def _cosine_args(B=6, N=5, F=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, F, generator=g), torch.randn(N, F, generator=g), torch.tensor(4.0)


def test_tensors_on_two_devices_are_named():
    x, w, s = _cosine_args()
    with pytest.raises(ValueError, match=r"cosine_logits: all tensors must be on one device, got x on cpu, "
                                         r"w on meta, scale on cpu"):
        cosine_logits(x, w.to("meta"), s)
    with pytest.raises(ValueError, match="labels on meta"):
        cosine_cross_entropy(x, w, s, torch.zeros(6, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match=r"prototype_ema: all tensors must be on one device.*feats on meta"):
        prototype_ema(w, torch.zeros(w.shape[0], dtype=torch.long), x[:, :8].to("meta"),
                      torch.zeros(6, dtype=torch.long), 0.9)


def test_kt_prototypes_and_weights_on_two_devices_are_named():
    g = torch.Generator().manual_seed(1)
    P, W = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    with pytest.raises(ValueError, match="prototypes on cpu, weights on meta"):
        kt_attention(P, W.to("meta"), torch.arange(1, 7), [0], 10.0)


@pytest.mark.parametrize(("labels", "message"), [
    (torch.tensor([0, 1, 2, 3, 4, 5]), r"labels must lie in \[0, 5\), got range \[0, 5\]"),
    (torch.tensor([0, 1, 2, -1, 4, 0]), r"labels must lie in \[0, 5\), got range \[-1, 4\]"),
    (torch.tensor([0, 1, 2, 3, 4, 0], dtype=torch.int32), "labels must be int64"),
], ids=["too-large", "negative", "int32"])
def test_cross_entropy_label_range(labels, message):
    with pytest.raises(ValueError, match=message):
        cosine_cross_entropy(*_cosine_args(), labels)


def test_fused_cross_entropy_reads_strided_labels_correctly():
    x, w, s = (t.to(DEVICE) for t in _cosine_args(B=7, N=9, F=12))
    every_other = torch.tensor([3, 0, 8, 1, 5, 5, 2, 7, 6, 0, 4, 1, 8, 3]).to(DEVICE)[::2]
    assert not every_other.is_contiguous()
    fast = cosine_logits_triton.CosineCrossEntropy.apply(x, w, s, every_other)
    torch.testing.assert_close(fast, cosine_cross_entropy_reference(x, w, s, every_other), atol=1e-5, rtol=1e-5)
