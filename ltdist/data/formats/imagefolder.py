"""ImageFolder trees: ``root/<class>/<image>`` (one train split) or ``root/{train,val,test}/<class>/<image>``."""

from __future__ import annotations

from pathlib import Path

from ltdist.data.writer import SourceSample

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm"}


def sample_key(prefix: str, rel: str) -> str:
    """A dot-free webdataset key from a relative image path."""
    stem = rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel
    return f"{prefix}{stem}".replace(".", "_").replace(" ", "_")


def load(src: str) -> tuple[list[str], dict[str, list[SourceSample]]]:
    root = Path(src)
    if not root.is_dir():
        raise FileNotFoundError(f"imagefolder: {root} is not a directory")
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if "train" not in split_dirs:
        split_dirs = {"train": root}
    classes = sorted(p.name for p in split_dirs["train"].iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"imagefolder: no class directories under {split_dirs['train']}")
    label_of = {c: i for i, c in enumerate(classes)}
    splits: dict[str, list[SourceSample]] = {}
    for split, base in split_dirs.items():
        samples = []
        for cdir in sorted(p for p in base.iterdir() if p.is_dir()):
            if cdir.name not in label_of:
                raise ValueError(f"imagefolder: class {cdir.name!r} of {split} is not a train class")
            for f in sorted(cdir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    rel = f.relative_to(base).as_posix()
                    samples.append(SourceSample(sample_key(f"{split}/", rel), label_of[cdir.name], str(f)))
        splits[split] = samples
    return classes, splits
