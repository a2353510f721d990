"""ltdist._C: group_by_class against a PyTorch reference; importing ltdist without the extension."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ltdist.extension import extension_available, group_by_class

pytestmark = pytest.mark.skipif(not extension_available(), reason="ltdist._C not built (run: make install)")


def reference_group_by_class(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.sort(labels, stable=True).indices
    offsets = torch.zeros(num_classes + 1, dtype=torch.long)
    offsets[1:] = torch.bincount(labels, minlength=num_classes).cumsum(0)
    return order, offsets


@pytest.mark.parametrize(("n", "c", "seed"), [(1, 1, 0), (17, 5, 1), (1000, 37, 2), (4096, 1000, 3)])
def test_group_by_class_matches_reference(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    # Skewed labels: some classes absent, one dominant, like a long-tailed batch.
    labels = (torch.rand(n, generator=g) ** 3 * c).long().clamp_max(c - 1)
    order, offsets = group_by_class(labels, c)
    ref_order, ref_offsets = reference_group_by_class(labels, c)
    assert torch.equal(order, ref_order)
    assert torch.equal(offsets, ref_offsets)


def test_group_by_class_all_equal_and_empty():
    order, offsets = group_by_class(torch.full((6,), 2, dtype=torch.long), 4)
    assert order.tolist() == list(range(6))
    assert offsets.tolist() == [0, 0, 0, 6, 6]
    order, offsets = group_by_class(torch.empty(0, dtype=torch.long), 3)
    assert order.numel() == 0 and offsets.tolist() == [0, 0, 0, 0]


def test_group_by_class_rejects_bad_labels():
    with pytest.raises(RuntimeError, match=r"label 5 at position 1 is outside \[0, 4\)"):
        group_by_class(torch.tensor([0, 5, 1]), 4)
    with pytest.raises(RuntimeError, match="must be int64"):
        group_by_class(torch.tensor([0, 1], dtype=torch.int32), 4)


def test_group_by_class_meta_shapes():
    order, offsets = torch.ops.ltdist.group_by_class(torch.empty(9, dtype=torch.long, device="meta"), 4)
    assert order.shape == (9,) and offsets.shape == (5,) and order.device.type == "meta"


def test_import_without_extension_gives_build_instructions():
    code = (
        "import sys; sys.modules['ltdist._C'] = None\n"  # makes `from ltdist import _C` fail as if unbuilt
        "import ltdist, ltdist.config, ltdist.launch\n"
        "from ltdist.extension import ExtensionNotBuiltError, load_extension\n"
        "try:\n    load_extension()\nexcept ExtensionNotBuiltError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("ERR ltdist._C (the C++/CUDA extension) is not built")
    assert "make install" in out
