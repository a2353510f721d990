"""index.json: class names, per-split per-class counts and the manifest of every shard.

Written by :mod:`ltdist.data.shards`, read by the stream, the eval loader and the stats CLI. The
manifest (shard file, sample count, sha256 of the sorted sample keys, sha256 of the file) is what
makes fault accounting exact: a reader that stops early knows how many samples it lost.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ltdist.data.tario import LabelSpec

INDEX_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: ``file`` is relative to the index directory; ``class_counts`` maps a class id
    (as a string, JSON keys) to its samples in this shard (classes absent from the shard omitted)."""

    file: str
    samples: int
    bytes: int
    sha256: str
    keys_sha256: str
    class_counts: dict[str, int]


@dataclass
class LongTailIndex:
    """Parsed index.json. ``counts[split][j]`` = samples of class j; ``manifest[split]`` = its shards."""

    root: Path
    classes: list[str]
    counts: dict[str, list[int]]
    manifest: dict[str, list[ShardInfo]]
    build: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_counts(self) -> list[int]:
        """Per-class training sample counts n_j (what sampling and the many/medium/few groups use)."""
        return self.counts["train"]

    @property
    def label_spec(self) -> LabelSpec:
        """Where the shards keep each sample's label: ltdist's own shards ``.cls`` ids; shards indexed by
        ``ltdist shards index`` what ``build["label"]`` records (``ext``, JSON ``field``, ``names``: whether
        labels are the class names of ``classes``)."""
        label = self.build.get("label")
        if not label:
            return LabelSpec()
        return LabelSpec(label["ext"], label.get("field", ""), tuple(self.classes) if label.get("names") else ())

    def shard_paths(self, split: str) -> list[Path]:
        return [self.root / s.file for s in self.split_shards(split)]

    def split_shards(self, split: str) -> list[ShardInfo]:
        if split not in self.manifest:
            raise KeyError(f"split {split!r} not in {self.root / 'index.json'} (has {sorted(self.manifest)})")
        return self.manifest[split]

    def missing_files(self, split: str | None = None) -> list[Path]:
        """Shard files of ``split`` (default: all) named in the manifest that do not exist."""
        return [p for p in self._files(split) if not p.is_file()]

    def resized_files(self, split: str | None = None) -> list[Path]:
        """Existing shard files whose size differs from the manifest (truncated or rewritten). They are
        still read: the reader counts what they lost."""
        sizes = {self.root / s.file: s.bytes for shards in self.manifest.values() for s in shards}
        return [p for p in self._files(split) if p.is_file() and p.stat().st_size != sizes[p]]

    def _files(self, split: str | None) -> list[Path]:
        splits = [split] if split is not None else list(self.manifest)
        return [self.root / s.file for sp in splits for s in self.split_shards(sp)]


def keys_digest(keys: list[str]) -> str:
    """sha256 of the sorted sample keys, newline-joined (order-independent shard fingerprint)."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_index(
    out_dir: Path, classes: list[str], manifest: dict[str, list[ShardInfo]], counts: dict[str, list[int]],
    build: dict,
) -> Path:
    """Write ``out_dir/index.json`` atomically and return its path."""
    doc = {
        "version": INDEX_VERSION,
        "classes": classes,
        "splits": {
            split: {"counts": counts[split], "shards": [asdict(s) for s in manifest[split]]}
            for split in manifest
        },
        "build": build,
    }
    path = out_dir / "index.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
    return path


def read_index(path: str | Path) -> LongTailIndex:
    """Read index.json (``path`` may be the file or its directory) and check it is self-consistent."""
    path = Path(path)
    if path.is_dir():
        path = path / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"no shard index at {path}; build one with `ltdist shards FORMAT --out DIR`")
    doc = json.loads(path.read_text())
    if doc.get("version") != INDEX_VERSION:
        raise ValueError(f"{path}: index version {doc.get('version')!r}, expected {INDEX_VERSION}")
    classes = list(doc["classes"])
    counts, manifest = {}, {}
    for split, entry in doc["splits"].items():
        counts[split] = [int(c) for c in entry["counts"]]
        manifest[split] = [ShardInfo(**s) for s in entry["shards"]]
        if len(counts[split]) != len(classes):
            raise ValueError(f"{path}: split {split} has {len(counts[split])} class counts for {len(classes)} classes")
        if sum(counts[split]) != sum(s.samples for s in manifest[split]):
            raise ValueError(f"{path}: split {split} class counts and shard sample counts disagree")
    return LongTailIndex(root=path.parent, classes=classes, counts=counts, manifest=manifest,
                         build=doc.get("build", {}))
