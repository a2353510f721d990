"""A fault-accounting tar shard reader.

Python's tarfile either raises or silently stops on damaged archives, which makes it impossible to
say how many samples were lost and why. This reader parses the 512-byte headers itself (ustar, pax
and GNU long names, as written by webdataset's TarWriter via tarfile), verifies each header checksum,
groups members into webdataset samples (``key.ext`` -> ``{ext: bytes}``) and, together with the
manifest's sample count, attributes every lost sample to exactly one reason.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from webdataset.autodecode import IMAGE_EXTENSIONS as WDS_IMAGE_EXTENSIONS

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
# The image member of a sample: these first (in this order), then any other extension webdataset's image
# decoder hands to PIL (shards written by other tools).
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
_MORE_IMAGE_EXTS = tuple(e for e in WDS_IMAGE_EXTENSIONS if e not in IMAGE_EXTS)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_INT = re.compile(r"^-?\d+$")


class TarDamage(Exception):
    """A damaged archive: ``reason`` is one of the skip reasons (CORRUPT_HEADER, TRUNCATED)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.partial: tuple[str, dict[str, bytes]] | None = None  # set by iter_samples


def image_member(parts: dict[str, bytes]) -> str | None:
    """The extension of a sample's image member, or None when it has none."""
    return next((e for e in (*IMAGE_EXTS, *_MORE_IMAGE_EXTS) if e in parts), None)


@dataclass(frozen=True)
class LabelSpec:
    """Where a sample's label is: the member with extension ``ext`` (``cls`` or ``txt``: the label as text;
    ``json``: the value of its ``field``). ``names`` non-empty: labels are class names and a name's position is
    its id; else labels are the integer ids themselves. ltdist's own shards use the default (``.cls`` ids)."""

    ext: str = "cls"
    field: str = ""
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ids", {n: j for j, n in enumerate(self.names)})

    def raw(self, parts: dict[str, bytes]) -> int | str | None:
        """The stored label: an int, a str, or None when the sample has no such member or field.
        Raises ValueError when the member is not text / JSON, or the JSON value is neither int nor str."""
        data = parts.get(self.ext)
        if data is None:
            return None
        text = data.decode("utf-8")
        if self.ext != "json":
            text = text.strip()
            return int(text) if _INT.match(text) else text
        doc = json.loads(text)
        value = doc.get(self.field) if isinstance(doc, dict) else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | str)):
            raise ValueError(f"JSON field {self.field!r} is {value!r}, neither an integer nor a string")
        return value

    def label(self, parts: dict[str, bytes]) -> int | None:
        """The class id (None: no label member; -1: one that cannot be read)."""
        try:
            value = self.raw(parts)
        except ValueError:  # includes UnicodeDecodeError and json.JSONDecodeError
            return -1
        if value is None:
            return None
        if self.names:
            return self._ids.get(str(value), -1)
        return value if isinstance(value, int) else -1


def iter_samples(f) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of the consecutive members of a tar stream sharing a key. On damage raises
    TarDamage whose ``partial`` holds the (key, parts) assembled so far (None when between samples)."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        for name, data in iter_members(f):
            m = _KEY_EXT.match(name)
            if m is None:
                continue
            k, ext = m.group(1), m.group(2).lower()
            if k != key:
                if key is not None:
                    yield key, parts
                key, parts = k, {}
            parts[ext] = data
    except TarDamage as err:
        err.partial = (key, parts) if key is not None else None
        raise
    if key is not None:
        yield key, parts


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
        raise TarDamage(TRUNCATED, f"file ends {n - len(data)} bytes early")
    return data


def iter_members(f) -> Iterator[tuple[str, bytes]]:
    """Yield (name, data) of the regular files of a tar stream; raise TarDamage on damage."""
    long_name: str | None = None
    while True:
        header = f.read(BLOCK)
        if len(header) == 0:
            raise TarDamage(TRUNCATED, "no end-of-archive marker")
        if len(header) < BLOCK:
            raise TarDamage(TRUNCATED, "partial header block")
        if header == b"\0" * BLOCK:
            return
        try:
            stored = _octal(header[148:156])
            size = _octal(header[124:136])
        except ValueError as e:
            raise TarDamage(CORRUPT_HEADER, f"unparsable header field: {e}") from None
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise TarDamage(CORRUPT_HEADER, "header checksum mismatch")
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
    start: int = 0, stop: int | None = None, labels: LabelSpec = LabelSpec(),
) -> Iterator[RawSample]:
    """Yield the valid samples of one shard, counting every invalid or lost sample by reason.

    ``expected`` is the manifest's sample count: when the archive is damaged, the samples that were
    never reached (``expected - seen``) are counted under the damage's reason. ``skips`` is updated in
    place; ``shard_skips`` (optional) gets the same counts keyed by ``(shard file, reason)``.
    ``start`` / ``stop``: only the samples of ordinals [start, stop) in the archive are yielded and
    accounted (a piece of a shard the stream split, :mod:`ltdist.data.plan`); reading stops at ``stop``.
    ``labels``: where the label is (``index.label_spec``; default ``.cls`` integer ids).
    """
    last = expected if stop is None else min(stop, expected)

    def mine(ordinal: int) -> bool:
        return start <= ordinal and (stop is None or ordinal < stop)

    def skip(reason: str, n: int = 1) -> None:
        if n > 0:
            skips[reason] += n
            if shard_skips is not None:
                shard_skips[(path.name, reason)] += n

    def finish(key: str, parts: dict[str, bytes]) -> RawSample | None:
        image_ext = image_member(parts)
        if image_ext is None:
            skip(MISSING_IMAGE)
            return None
        label = labels.label(parts)
        if label is None:
            skip(MISSING_LABEL)
            return None
        if not 0 <= label < num_classes:
            skip(BAD_LABEL)
            return None
        return RawSample(key, label, parts[image_ext], image_ext, path.name)

    seen = 0
    damage: TarDamage | None = None
    with open(path, "rb", buffering=1 << 20) as f:
        try:
            for key, parts in iter_samples(f):
                seen += 1
                sample = finish(key, parts) if mine(seen - 1) else None
                if sample is not None:
                    yield sample
                if stop is not None and seen >= stop:
                    break  # the range is read: what follows belongs to other pieces
        except TarDamage as err:
            damage = err
            # The sample being assembled when the damage hit is kept only if it already has an image and a
            # label; otherwise it is part of what the damage lost.
            if err.partial is not None and labels.ext in err.partial[1] and image_member(err.partial[1]):
                seen += 1
                sample = finish(*err.partial) if mine(seen - 1) else None
                if sample is not None:
                    yield sample
    skip(damage.reason if damage else SHORT_SHARD, last - max(start, seen))
