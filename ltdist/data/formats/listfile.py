"""ImageNet-LT / Places-LT list files: one ``relative/path.jpg label`` per line, plus an image root."""

from __future__ import annotations

from pathlib import Path

from ltdist.data.formats.imagefolder import sample_key
from ltdist.data.writer import SourceSample


def read_list(path: Path) -> list[tuple[str, int]]:
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{lineno}: expected 'path label', got {line!r}")
        entries.append((parts[0], int(parts[1])))
    return entries


def load(src: str, split_files: dict[str, str]) -> tuple[list[str], dict[str, list[SourceSample]]]:
    """``split_files`` maps split name -> list file; class names are the image's parent directory
    (``train/n01440764/x.JPEG`` -> n01440764), taken from the first image of each label."""
    root = Path(src)
    if "train" not in split_files:
        raise ValueError("list format needs --split-file train=LIST (and optionally val=, test=)")
    lists = {split: read_list(Path(f)) for split, f in split_files.items()}
    num_classes = 1 + max(label for entries in lists.values() for _, label in entries)
    names: dict[int, str] = {}
    splits: dict[str, list[SourceSample]] = {}
    for split, entries in lists.items():
        missing = [p for p, _ in entries if not (root / p.lstrip("/")).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images of {split} missing under {root}: {missing[:5]}")
        bad = sorted({label for _, label in entries if label < 0})
        if bad:
            raise ValueError(f"{split_files[split]}: negative labels {bad[:5]}")
        splits[split] = [SourceSample(sample_key(f"{split}/", p.lstrip("/")), label, str(root / p.lstrip("/")))
                         for p, label in entries]
        for p, label in entries:
            names.setdefault(label, Path(p).parent.name or str(label))
    return [names.get(j, str(j)) for j in range(num_classes)], splits
