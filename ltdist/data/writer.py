"""Write samples into webdataset tar shards (in parallel) and the index.json that describes them.

A format module turns its source into ``SourceSample`` lists per split; this module shuffles them
(so every shard mixes classes, which the stream's shard-level shuffling relies on), cuts them into
shards of ``shard_size`` samples, writes each shard with webdataset's TarWriter in a process pool and
records the manifest.
"""

from __future__ import annotations

import io
import logging
import math
import multiprocessing as mp
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ltdist.data.index import ShardInfo, file_sha256, keys_digest, write_index
from ltdist.heartbeat import Heartbeat

log = logging.getLogger(__name__)


class RenderedImage(Protocol):
    """A payload that makes its own image bytes in the writer process (a synthetic source)."""

    def encode(self) -> tuple[bytes, str]:
        """(image bytes, extension "jpg" | "png")."""
        ...


@dataclass(frozen=True)
class SourceSample:
    """One sample to write: ``payload`` is a file path (bytes kept as they are), a uint8 array
    [H, W] / [H, W, 3] (encoded losslessly as PNG) or a :class:`RenderedImage` (its bytes as they
    are). Keys must be unique and contain no dots."""

    key: str
    label: int
    payload: str | np.ndarray | RenderedImage


def _image_ext(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def _encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _resized(data: bytes, ext: str | None, resize_short: int) -> tuple[bytes, str]:
    """Shrink so the short side is ``resize_short`` px; images already that small keep their bytes."""
    with Image.open(io.BytesIO(data)) as img:
        if ext is not None and min(img.size) <= resize_short:
            return data, ext
        scale = resize_short / min(img.size)
        # JPEG draft mode decodes at a reduced DCT scale that is still at least the target size.
        img.draft(img.mode, (math.ceil(img.width * scale), math.ceil(img.height * scale)))
        scale = resize_short / min(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.BICUBIC)
        buf = io.BytesIO()
        if ext == "jpg" or img.mode not in ("L", "RGB", "RGBA", "P"):
            img.convert("RGB").save(buf, format="JPEG", quality=90)
            return buf.getvalue(), "jpg"
        img.save(buf, format="PNG")
        return buf.getvalue(), "png"


def _load(sample: SourceSample, resize_short: int) -> tuple[bytes, str]:
    if isinstance(sample.payload, np.ndarray):
        return _encode_png(sample.payload), "png"
    if not isinstance(sample.payload, str):
        return sample.payload.encode()
    data = Path(sample.payload).read_bytes()
    ext = _image_ext(data)
    if resize_short or ext is None:  # other formats (webp, bmp, ...) are stored as PNG
        return _resized(data, ext, resize_short or 1 << 30)
    return data, ext


def _write_shard(args: tuple[Path, list[SourceSample], int]) -> ShardInfo:
    path, samples, resize_short = args
    with wds.TarWriter(str(path), mtime=0) as sink:
        for s in samples:
            data, ext = _load(s, resize_short)
            sink.write({"__key__": s.key, ext: data, "cls": str(s.label).encode()})
    labels, counts = np.unique([s.label for s in samples], return_counts=True)
    return ShardInfo(path.name, len(samples), path.stat().st_size, file_sha256(path),
                     keys_digest([s.key for s in samples]), {str(j): int(n) for j, n in zip(labels, counts)})


def write_shards(
    out_dir: Path, classes: list[str], splits: dict[str, list[SourceSample]], *, shard_size: int = 1000,
    workers: int = 1, resize_short: int = 0, seed: int = 0, build: dict | None = None, progress: bool = True,
) -> Path:
    """Write ``{split}-{i:06d}.tar`` shards for every split plus index.json; return the index path."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, samples in splits.items():
        keys = [s.key for s in samples]
        if len(set(keys)) != len(keys):
            raise ValueError(f"split {split}: duplicate sample keys")
        bad = [s.key for s in samples if "." in s.key]
        if bad:
            raise ValueError(f"split {split}: sample keys may not contain dots: {bad[:5]}")
    jobs, owners = [], []
    counts: dict[str, list[int]] = {}
    for split, samples in splits.items():
        samples = list(samples)
        random.Random(f"{seed}-{split}").shuffle(samples)
        counts[split] = np.bincount([s.label for s in samples], minlength=len(classes)).tolist()
        for i, start in enumerate(range(0, len(samples), shard_size)):
            jobs.append((out_dir / f"{split}-{i:06d}.tar", samples[start:start + shard_size], resize_short))
            owners.append(split)
    manifest: dict[str, list[ShardInfo]] = {split: [] for split in splits}
    total = sum(len(j[1]) for j in jobs)
    bar = tqdm(total=total, unit="img", desc=f"shards -> {out_dir}", disable=not progress)
    # Without the bar (under the launcher, whose stdout is a log file) a line every 30 s says where it is.
    heartbeat = Heartbeat(f"shards -> {out_dir}", total, enabled=not progress)
    written = 0
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            results = []
            for job, info in zip(jobs, pool.imap(_write_shard, jobs)):
                bar.update(len(job[1]))
                written += len(job[1])
                heartbeat.tick(written, "images")
                results.append(info)
    else:
        results = []
        for job in jobs:
            results.append(_write_shard(job))
            bar.update(len(job[1]))
            written += len(job[1])
            heartbeat.tick(written, "images")
    bar.close()
    for split, info in zip(owners, results):
        manifest[split].append(info)
    path = write_index(out_dir, classes, manifest, counts, build or {})
    log.info("wrote %d shards and %s", len(jobs), path)
    return path
