"""iNaturalist-2018 json files (``images``, ``annotations``, ``categories``) plus an image root."""

from __future__ import annotations

import json
from pathlib import Path

from ltdist.data.formats.imagefolder import sample_key
from ltdist.data.writer import SourceSample


def read_annotations(split_files: dict[str, str]) -> tuple[list[dict], dict[str, list[tuple[str, int]]]]:
    """(train categories in sorted id order, per split its (file name, label) pairs) from the json files alone.
    Category ids are mapped to contiguous labels in sorted id order."""
    if "train" not in split_files:
        raise ValueError("inat2018 format needs --split-file train=train2018.json")
    docs = {split: json.loads(Path(f).read_text()) for split, f in split_files.items()}
    categories = sorted(docs["train"]["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: j for j, c in enumerate(categories)}
    entries: dict[str, list[tuple[str, int]]] = {}
    for split, doc in docs.items():
        file_of = {im["id"]: im["file_name"] for im in doc["images"]}
        pairs = []
        for ann in doc["annotations"]:
            if ann["category_id"] not in label_of:
                raise ValueError(f"{split_files[split]}: category {ann['category_id']} not in train categories")
            if ann["image_id"] not in file_of:
                raise ValueError(f"{split_files[split]}: annotation for unknown image {ann['image_id']}")
            pairs.append((file_of[ann["image_id"]], label_of[ann["category_id"]]))
        entries[split] = pairs
    return categories, entries


def load(src: str, split_files: dict[str, str]) -> tuple[list[str], dict[str, list[SourceSample]]]:
    """``split_files`` maps split -> json (the LT literature uses val2018.json as its test split)."""
    root = Path(src)
    categories, entries = read_annotations(split_files)
    splits: dict[str, list[SourceSample]] = {}
    for split, pairs in entries.items():
        samples = []
        for rel, label in pairs:
            if not (root / rel).is_file():
                raise FileNotFoundError(f"{split}: image {root / rel} missing")
            samples.append(SourceSample(sample_key(f"{split}/", rel), label, str(root / rel)))
        splits[split] = samples
    return [c.get("name", str(c["id"])) for c in categories], splits
