"""Index webdataset shards that another tool wrote (``ltdist shards index DIR``).

webdataset's ``ShardWriter``, img2dataset-style pipelines and other projects write ``key.<image ext>`` +
label members; ltdist streams any tar shards once it has their ``index.json`` (class counts and the
per-shard manifest the stream deals and accounts by). This module reads every sample of every shard once,
with the same reader the stream uses, and writes that index next to the shards. It refuses, naming the shard
and sample, what it cannot index: a damaged archive, a sample without an image or without a label, labels of
mixed types (integer ids and names), and shards it cannot assign to exactly one split.

Labels: ``.cls`` (the webdataset convention) or ``.txt`` text, or a field of the ``.json`` member. Integer
labels are the class ids (classes 0 … max); string labels are class names, ids in sorted order of the train
split's names. The index records where the label is (``build["label"]``); the stream reads it from there.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from pathlib import Path

from ltdist.data.index import SPLITS, ShardInfo, file_sha256, keys_digest, write_index
from ltdist.data.tario import LabelSpec, TarDamage, image_member, iter_samples

log = logging.getLogger(__name__)

# A shard belongs to the split whose name its file name contains, unless patterns are given.
DEFAULT_PATTERNS = {split: f"*{split}*.tar" for split in SPLITS}


class ShardIndexError(ValueError):
    """Shards that cannot be indexed; the message names the shard and what is wrong."""


def assign_splits(files: list[str], patterns: dict[str, str]) -> dict[str, list[str]]:
    """File names per split by glob ``patterns`` (split -> pattern); every file must match exactly one."""
    owners: dict[str, list[str]] = {f: [s for s, pat in patterns.items() if fnmatch.fnmatch(f, pat)] for f in files}
    none = [f for f, s in owners.items() if not s]
    several = {f: s for f, s in owners.items() if len(s) > 1}
    if none or several:
        lines = []
        if none:
            lines.append(f"{len(none)} shards match no split pattern ({patterns}): {', '.join(none[:5])}")
        if several:
            lines.append("shards matching several splits: "
                         + ", ".join(f"{f} ({'/'.join(s)})" for f, s in list(several.items())[:5]))
        raise ShardIndexError("; ".join(lines) + "; name the splits with --split SPLIT=GLOB (e.g. --split "
                          "'train=shard-*.tar')")
    splits = {s: sorted(f for f, o in owners.items() if o == [s]) for s in patterns}
    if not splits.get("train"):
        raise ShardIndexError(f"no train shards: no file matches {patterns.get('train')!r}; use --split train=GLOB")
    return {s: f for s, f in splits.items() if f}


def _scan_shard(path: Path, labels: LabelSpec) -> tuple[list[str], list[int | str]]:
    """(keys, raw labels) of every sample of one shard; refuses a damaged one or a sample lacking a part."""
    keys, values = [], []
    with open(path, "rb", buffering=1 << 20) as f:
        try:
            for key, parts in iter_samples(f):
                if image_member(parts) is None:
                    raise ShardIndexError(f"{path.name}: sample {key!r} has no image member (members: "
                                      f"{', '.join(sorted(parts))})")
                where = f".{labels.ext}" + (f" field {labels.field!r}" if labels.field else "")
                try:
                    value = labels.raw(parts)
                except ValueError as e:
                    raise ShardIndexError(f"{path.name}: sample {key!r}: unreadable label in {where}: {e}") from None
                if value is None:
                    raise ShardIndexError(f"{path.name}: sample {key!r} has no label ({where}; members: "
                                      f"{', '.join(sorted(parts))}); choose the label with --label / --label-field")
                keys.append(key)
                values.append(value)
        except TarDamage as e:
            raise ShardIndexError(f"{path.name}: damaged archive ({e.reason}: {e}); it cannot be indexed") from None
    return keys, values


def _label_ids(values: dict[str, list[int | str]]) -> tuple[list[str], dict[str, list[int]], bool]:
    """(class names, per-split class ids, whether labels are names) from the raw labels per split."""
    kinds = {type(v) for vs in values.values() for v in vs}
    if kinds == {int, str}:
        ints = next(v for vs in values.values() for v in vs if isinstance(v, int))
        strs = next(v for vs in values.values() for v in vs if isinstance(v, str))
        raise ShardIndexError(f"mixed label types: integer ids (e.g. {ints}) and names (e.g. {strs!r}); a data set "
                          "needs one kind")
    if kinds == {int}:
        low = min(v for vs in values.values() for v in vs)
        if low < 0:
            raise ShardIndexError(f"negative class id {low}: integer labels must be ids 0, 1, …")
        num = 1 + max(v for vs in values.values() for v in vs)
        return [str(j) for j in range(num)], {s: list(vs) for s, vs in values.items()}, False
    names = sorted(set(values["train"]))
    unknown = sorted({v for vs in values.values() for v in vs} - set(names))
    if unknown:
        raise ShardIndexError(f"class names outside the train split: {unknown[:5]}")
    ids = {n: j for j, n in enumerate(names)}
    return names, {s: [ids[v] for v in vs] for s, vs in values.items()}, True


def index_shards(root: Path, *, label: str = "", label_field: str = "", patterns: dict[str, str] | None = None,
                 force: bool = False) -> Path:
    """Scan ``root/*.tar`` and write ``root/index.json``; return its path.

    ``label``: ``cls`` | ``txt`` | ``json`` (empty: ``json`` with ``label_field``, else ``cls`` when the first
    sample has a ``.cls`` member, else ``txt``). ``patterns``: split -> glob over file names (default: the
    split's name anywhere in it). ``force``: replace an existing index.json.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ltdist shards index: {root} is not a directory")
    target = root / "index.json"
    if target.exists() and not force:
        raise ShardIndexError(f"{target} exists already; pass --force to replace it")
    files = sorted(p.name for p in root.glob("*.tar"))
    if not files:
        raise ShardIndexError(f"no .tar shards in {root}")
    splits = assign_splits(files, patterns or DEFAULT_PATTERNS)
    spec = LabelSpec(label or ("json" if label_field else _guess_label(root / splits["train"][0])), label_field)
    if spec.ext == "json" and not spec.field:
        raise ShardIndexError("labels from .json need --label-field NAME")
    keys: dict[str, list[list[str]]] = {}
    values: dict[str, list[int | str]] = {}
    sizes: dict[str, list[int]] = {}
    for split, names in splits.items():
        keys[split], values[split], sizes[split] = [], [], []
        for name in names:
            k, v = _scan_shard(root / name, spec)
            keys[split].append(k)
            values[split] += v
            sizes[split].append(len(v))
        every = [k for ks in keys[split] for k in ks]
        if len(set(every)) != len(every):
            dup = next(k for k, n in Counter(every).items() if n > 1)
            raise ShardIndexError(f"split {split}: sample key {dup!r} appears more than once")
    classes, ids, by_name = _label_ids(values)
    manifest, counts = {}, {}
    for split, names in splits.items():
        infos, start = [], 0
        for name, shard_keys, n in zip(names, keys[split], sizes[split]):
            shard_counts = Counter(ids[split][start:start + n])
            start += n
            path = root / name
            infos.append(ShardInfo(name, n, path.stat().st_size, file_sha256(path), keys_digest(shard_keys),
                                   {str(j): c for j, c in sorted(shard_counts.items())}))
        manifest[split] = infos
        per_class = Counter(ids[split])
        counts[split] = [per_class.get(j, 0) for j in range(len(classes))]
    build = {"format": "webdataset", "src": str(root),
             "label": {"ext": spec.ext, "field": spec.field, "names": by_name}}
    path = write_index(root, classes, manifest, counts, build)
    log.info("indexed %s: %s", root, ", ".join(f"{s} {sum(c)} samples in {len(manifest[s])} shards"
                                                for s, c in counts.items()))
    return path


def _guess_label(path: Path) -> str:
    with open(path, "rb") as f:
        try:
            _, parts = next(iter_samples(f))
        except (StopIteration, TarDamage):
            return "cls"  # the scan names the problem
    return "cls" if "cls" in parts or "txt" not in parts else "txt"
