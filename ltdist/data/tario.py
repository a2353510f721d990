"""A fault-accounting tar shard reader.

Python's tarfile either raises or silently stops on damaged archives, which makes it impossible to
say how many samples were lost and why. This reader parses the 512-byte headers itself (ustar, pax
and GNU long names, as written by webdataset's TarWriter via tarfile), verifies each header checksum,
groups members into webdataset samples (``key.ext`` -> ``{ext: bytes}``) and, together with the
manifest's sample count, attributes every lost sample to exactly one reason.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BLOCK = 512
# Reasons a sample is skipped; the keys of every skip Counter.
CORRUPT_IMAGE = "corrupt_image"
MISSING_IMAGE = "missing_image"
MISSING_LABEL = "missing_label"
BAD_LABEL = "bad_label"
CORRUPT_HEADER = "corrupt_header"
TRUNCATED = "truncated"
SHORT_SHARD = "short_shard"  # a clean archive with fewer samples than the manifest says
SKIP_REASONS = (CORRUPT_IMAGE, MISSING_IMAGE, MISSING_LABEL, BAD_LABEL, CORRUPT_HEADER, TRUNCATED, SHORT_SHARD)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class _TarError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class RawSample:
    """An undecoded sample: image bytes with their extension, and the label (already validated)."""

    key: str
    label: int
    image: bytes
    ext: str
    shard: str


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    text = field.replace(b"\0", b" ").strip()
    return int(text, 8) if text else 0


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _TarError(TRUNCATED, f"file ends {n - len(data)} bytes early")
    return data


def iter_members(f) -> Iterator[tuple[str, bytes]]:
    """Yield (name, data) of the regular files of a tar stream; raise _TarError on damage."""
    long_name: str | None = None
    while True:
        header = f.read(BLOCK)
        if len(header) == 0:
            raise _TarError(TRUNCATED, "no end-of-archive marker")
        if len(header) < BLOCK:
            raise _TarError(TRUNCATED, "partial header block")
        if header == b"\0" * BLOCK:
            return
        try:
            stored = _octal(header[148:156])
            size = _octal(header[124:136])
        except ValueError as e:
            raise _TarError(CORRUPT_HEADER, f"unparsable header field: {e}") from None
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise _TarError(CORRUPT_HEADER, "header checksum mismatch")
        typeflag = header[156:157]
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        data = _read_exact(f, size)
        pad = (-size) % BLOCK
        if pad:
            f.read(pad)  # a short pad shows up as truncation at the next header
        if typeflag in (b"x", b"g"):
            for rec in data.decode("utf-8", "replace").splitlines():
                _, _, kv = rec.partition(" ")
                k, _, v = kv.partition("=")
                if k == "path" and typeflag == b"x":
                    long_name = v
            continue
        if typeflag == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if typeflag in (b"0", b"\0", b"7"):
            yield (long_name or name), data
        long_name = None


def read_shard(
    path: Path, expected: int, num_classes: int, skips: Counter, shard_skips: Counter | None = None,
) -> Iterator[RawSample]:
    """Yield the valid samples of one shard, counting every invalid or lost sample by reason.

    ``expected`` is the manifest's sample count: when the archive is damaged, the samples that were
    never reached (``expected - seen``) are counted under the damage's reason. ``skips`` is updated in
    place; ``shard_skips`` (optional) gets the same counts keyed by ``(shard file, reason)``.
    """

    def skip(reason: str, n: int = 1) -> None:
        if n > 0:
            skips[reason] += n
            if shard_skips is not None:
                shard_skips[(path.name, reason)] += n

    seen = 0
    key: str | None = None
    parts: dict[str, bytes] = {}

    def finish() -> RawSample | None:
        image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if image_ext is None:
            skip(MISSING_IMAGE)
            return None
        if "cls" not in parts:
            skip(MISSING_LABEL)
            return None
        try:
            label = int(parts["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            label = -1
        if not 0 <= label < num_classes:
            skip(BAD_LABEL)
            return None
        return RawSample(key, label, parts[image_ext], image_ext, path.name)

    damage: _TarError | None = None
    with open(path, "rb", buffering=1 << 20) as f:
        try:
            for name, data in iter_members(f):
                m = _KEY_EXT.match(name)
                if m is None:
                    continue
                k, ext = m.group(1), m.group(2).lower()
                if k != key:
                    if key is not None:
                        seen += 1
                        sample = finish()
                        if sample is not None:
                            yield sample
                    key, parts = k, {}
                parts[ext] = data
        except _TarError as err:
            damage = err
    # The sample being assembled when the damage hit is kept only if it already has an image and a
    # label; otherwise it is part of what the damage lost.
    if key is not None and (damage is None or ("cls" in parts and any(e in parts for e in IMAGE_EXTS))):
        seen += 1
        sample = finish()
        if sample is not None:
            yield sample
    skip(damage.reason if damage else SHORT_SHARD, expected - seen)
