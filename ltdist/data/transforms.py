"""Decode + augment without torchvision (it has no CPU wheel here).

Transforms run in the loader workers on PIL images and return uint8 arrays [H, W, C]; the float
conversion and normalisation happen once per batch (:func:`to_normalized_tensor`), still in the
worker. Randomness comes from a ``random.Random`` the caller seeds per sample, so augmentations are
reproducible from (seed, epoch, rank, worker, position).

Small images (side <= SMALL_IMAGE_MAX, e.g. 28/32 px): pad-crop + flip for training, plain resize for
eval. ImageNet-scale: random-resized-crop (scale 0.08–1, ratio 3/4–4/3) + flip + colour jitter 0.4 for
training, resize (short side = size / 0.875) + centre crop for eval. JPEGs are decoded in draft mode
(reduced DCT scale) whenever the crop is still at least the output size after reduction.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
from PIL import Image, ImageEnhance

SMALL_IMAGE_MAX = 64
# Per-channel mean / std in [0, 1] units: ImageNet for RGB, Fashion-MNIST for grayscale.
NORMALIZATION = {3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), 1: ((0.2860,), (0.3530,))}
EVAL_CROP_FRACTION = 0.875


def open_image(data: bytes, channels: int) -> Image.Image:
    """Open (lazily: header only) encoded bytes; raises on data PIL cannot identify."""
    img = Image.open(io.BytesIO(data))
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return img


def _mode(channels: int) -> str:
    return "L" if channels == 1 else "RGB"


def _as_array(img: Image.Image, channels: int) -> np.ndarray:
    arr = np.asarray(img.convert(_mode(channels)))
    return arr[:, :, None] if arr.ndim == 2 else arr


def _random_resized_box(w: int, h: int, rng: random.Random) -> tuple[float, float, float, float]:
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return x, y, x + cw, y + ch
    cw, ch = (w, round(w / (4 / 3))) if w / h > 4 / 3 else ((round(h * 3 / 4), h) if w / h < 3 / 4 else (w, h))
    x, y = (w - cw) // 2, (h - ch) // 2
    return x, y, x + cw, y + ch


def _resize_box(img: Image.Image, box: tuple[float, float, float, float], size: int) -> Image.Image:
    """Crop ``box`` (in the full-resolution frame) and resize it to size x size, via JPEG draft."""
    w0, h0 = img.size
    bw, bh = box[2] - box[0], box[3] - box[1]
    img.draft(img.mode, (math.ceil(w0 * size / bw), math.ceil(h0 * size / bh)))
    sx, sy = img.size[0] / w0, img.size[1] / h0
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return img.resize((size, size), Image.BILINEAR, box=box)


class TrainTransform:
    """bytes -> augmented uint8 [size, size, channels]."""

    def __init__(self, image_size: int, channels: int, jitter: float = 0.4):
        self.size, self.channels, self.jitter = image_size, channels, jitter

    def __call__(self, data: bytes, rng: random.Random) -> np.ndarray:
        img = open_image(data, self.channels)
        if self.size <= SMALL_IMAGE_MAX:
            return self._pad_crop_flip(img, rng)
        img = _resize_box(img, _random_resized_box(*img.size, rng), self.size)
        img = img.convert(_mode(self.channels))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.jitter > 0:
            ops = [ImageEnhance.Brightness, ImageEnhance.Contrast]
            if self.channels == 3:
                ops.append(ImageEnhance.Color)
            rng.shuffle(ops)
            for op in ops:
                img = op(img).enhance(rng.uniform(1 - self.jitter, 1 + self.jitter))
        return _as_array(img, self.channels)

    def _pad_crop_flip(self, img: Image.Image, rng: random.Random) -> np.ndarray:
        img = img.convert(_mode(self.channels))
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BILINEAR)
        arr = _as_array(img, self.channels)
        pad = max(1, self.size // 8)
        padded = np.zeros((self.size + 2 * pad, self.size + 2 * pad, self.channels), dtype=np.uint8)
        padded[pad:pad + self.size, pad:pad + self.size] = arr
        y, x = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
        out = padded[y:y + self.size, x:x + self.size]
        return np.ascontiguousarray(out[:, ::-1] if rng.random() < 0.5 else out)


class EvalTransform:
    """bytes -> deterministic uint8 [size, size, channels] (resize + centre crop)."""

    def __init__(self, image_size: int, channels: int):
        self.size, self.channels = image_size, channels

    def __call__(self, data: bytes, rng: random.Random | None = None) -> np.ndarray:
        img = open_image(data, self.channels)
        if self.size <= SMALL_IMAGE_MAX:
            img = img.convert(_mode(self.channels))
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), Image.BILINEAR)
            return _as_array(img, self.channels)
        w, h = img.size
        crop = min(w, h) * EVAL_CROP_FRACTION  # the centre crop of the short side / 0.875 resize
        box = ((w - crop) / 2, (h - crop) / 2, (w + crop) / 2, (h + crop) / 2)
        return _as_array(_resize_box(img, box, self.size), self.channels)


def _lookup_tables(channels: int) -> np.ndarray:
    """[C, 256] float32: the normalised value of every uint8 level, per channel."""
    mean, std = NORMALIZATION[channels]
    levels = np.arange(256, dtype=np.float64) / 255
    return np.stack([(levels - m) / s for m, s in zip(mean, std)]).astype(np.float32)


_LUTS = {c: _lookup_tables(c) for c in NORMALIZATION}


def to_normalized_tensor(images: np.ndarray, channels: int) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float32 [B, C, H, W], (x / 255 - mean) / std per channel.

    A 256-entry lookup per channel writes each output plane contiguously in one pass (2.5x faster
    than a strided astype + scale); numpy keeps it single-threaded, as loader workers should be.
    """
    out = np.empty((images.shape[0], channels, *images.shape[1:3]), dtype=np.float32)
    for c in range(channels):
        np.take(_LUTS[channels][c], images[..., c], out=out[:, c])
    return torch.from_numpy(out)
