"""Augmentations without torchvision: geometry and normalisation checked against direct computations."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ltdist.data.transforms import (
    NORMALIZATION,
    EvalTransform,
    TrainTransform,
    _random_resized_box,
    to_normalized_tensor,
)


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("channels", [1, 3])
def test_normalisation_matches_the_formula(channels):
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 7, channels), dtype=np.uint8)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in NORMALIZATION[channels])
    expected = (torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255 - mean) / std
    got = to_normalized_tensor(images, channels)
    assert got.dtype == torch.float32 and got.shape == (3, channels, 5, 7)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)


def test_random_resized_box_respects_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(2000):
        x0, y0, x1, y1 = _random_resized_box(500, 375, rng)
        w, h = x1 - x0, y1 - y0
        assert 0 <= x0 < x1 <= 500 and 0 <= y0 < y1 <= 375
        if (w, h) != (500, 375):  # not the fallback
            assert 0.08 * 0.98 <= w * h / (500 * 375) <= 1.0
            assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03


def test_small_image_pad_crop_flip_is_a_shifted_copy():
    image = np.random.default_rng(1).integers(1, 256, (28, 28), dtype=np.uint8)
    out = TrainTransform(28, 1)(encode(image, "PNG"), random.Random(3))[:, :, 0]
    padded = np.zeros((36, 36), np.uint8)
    padded[4:32, 4:32] = image
    candidates = [padded[y:y + 28, x:x + 28] for y in range(9) for x in range(9)]
    assert any(np.array_equal(out, c) or np.array_equal(out, c[:, ::-1]) for c in candidates)


def test_large_image_transforms_shapes_determinism_and_centre_crop():
    yy, xx = np.mgrid[0:300, 0:400]
    image = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    data = encode(image, "PNG")
    train = TrainTransform(64 + 1, 3)  # > SMALL_IMAGE_MAX: the ImageNet-style path
    a, b = train(data, random.Random(5)), train(data, random.Random(5))
    assert a.shape == (65, 65, 3) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert not np.array_equal(a, train(data, random.Random(6)))
    out = EvalTransform(70, 3)(data)
    crop = 300 * 0.875
    ref = Image.fromarray(image).crop(((400 - crop) / 2, (300 - crop) / 2, (400 + crop) / 2, (300 + crop) / 2))
    ref = np.asarray(ref.resize((70, 70), Image.BILINEAR)).astype(int)
    assert out.shape == (70, 70, 3) and np.abs(out.astype(int) - ref).mean() < 3
    gray = EvalTransform(70, 1)(encode(image, "JPEG"))
    assert gray.shape == (70, 70, 1)


def test_corrupt_bytes_raise():
    with pytest.raises(Exception):  # noqa: B017  PIL raises several types; the stream counts any of them
        TrainTransform(28, 1)(b"\x89PNG\r\n\x1a\nnot really", random.Random(0))
