"""``python -m ltdist.data.stats --index DIR/index.json ...``: what the model will see, before any GPU.

For the train split it runs the real stream of every rank (workers in-process, same sequence as
with processes) for ``--epochs`` epochs and reports per-class emitted counts next to the expected
counts q_j · total, batches per rank per epoch and skip counts. Other splits are scanned once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from ltdist.count_bins import PER_CLASS_ROWS_MAX, count_bins, format_range
from ltdist.data.evaluation import scan_split
from ltdist.data.index import read_index
from ltdist.data.sampling import class_probabilities
from ltdist.data.stream import build_train_stream


def train_stats(index_path: Path, *, sampling_power: float, epochs: int, ranks: int, workers: int,
                batch_size: int, seed: int, shuffle_buffer: int, decode: bool, image_size: int, channels: int,
                exclude: list[int]) -> dict:
    """Emitted vs expected class counts of the train stream over ``epochs`` epochs on ``ranks`` ranks."""
    index = read_index(index_path)
    emitted: Counter = Counter()
    skips: Counter = Counter()
    batches: list[list[int]] = []
    for rank in range(ranks):
        stream = build_train_stream(index, batch_size=batch_size, rank=rank, world_size=ranks, num_workers=workers,
                                    sampling_power=sampling_power, seed=seed, image_size=image_size,
                                    channels=channels, shuffle_buffer=shuffle_buffer, max_skip_fraction=1.0,
                                    exclude_classes=exclude)
        per_epoch = []
        for epoch in range(epochs):
            stream.set_epoch(epoch)
            n = 0
            for payload in stream.payloads(decode=decode):
                emitted.update(payload["labels"].tolist())
                n += 1
            per_epoch.append(n)
        batches.append(per_epoch)
        skips.update(stream.skip_counts)
    q = class_probabilities(index.train_counts, sampling_power, exclude)
    total = sum(emitted.values())
    return {
        "index": str(index_path), "split": "train", "classes": index.classes, "train_counts": index.train_counts,
        "sampling_power": sampling_power, "epochs": epochs, "ranks": ranks, "workers": workers,
        "batch_size": batch_size, "target_probability": q.tolist(),
        "emitted_counts": [emitted[j] for j in range(index.num_classes)],
        "expected_counts": (q * total).tolist(), "emitted_total": total,
        "batches_per_rank_per_epoch": batches[0][0] if batches and batches[0] else 0,
        "batches_by_rank": batches, "skips": dict(skips),
    }


def emission_check(emitted: list[int], expected: list[float]) -> tuple[int, float]:
    """(classes expected but never emitted, worst |emitted − expected| / √expected: about a Poisson z-score)
    over the classes given; classes expected 0 times are left out."""
    pairs = [(e, x) for e, x in zip(emitted, expected) if x > 0]
    return (sum(1 for e, _ in pairs if e == 0), max((abs(e - x) / x ** 0.5 for e, x in pairs), default=0.0))


def print_binned(emitted: list[int], expected: list[float], train_counts: list[int]) -> None:
    """Emitted vs expected totals per power-of-2 bin of the training count, with each bin's classes never
    emitted and its worst class (:func:`emission_check`)."""
    print(f"{'train count':>11} {'classes':>8} {'emitted':>10} {'expected':>12} {'worst |z|':>9} {'never emitted':>13}")
    for b in count_bins(train_counts):
        e = [emitted[j] for j in b.classes]
        x = [expected[j] for j in b.classes]
        never, worst = emission_check(e, x)
        print(f"{format_range(b.lo, b.hi):>11} {len(b.classes):>8} {sum(e):>10} {sum(x):>12.1f} {worst:>9.2f} "
              f"{never:>13}")
    print("(--per-class for one row per class, --json for everything)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltdist stats", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, type=Path, help="index.json (or its directory)")
    p.add_argument("--split", default="train", choices=("train", "val", "test"))
    p.add_argument("--sampling-power", type=float, default=0.5, help="p in q_j ∝ n_j^p")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="loader workers per rank")
    p.add_argument("--batch-size", type=int, default=128, help="per-rank micro-batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle-buffer", type=int, default=2000)
    p.add_argument("--exclude", type=int, nargs="*", default=[], help="class ids withheld from training")
    p.add_argument("--no-decode", action="store_true",
                   help="skip image decoding (faster; undecodable images then count as emitted)")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1, choices=(1, 3))
    p.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    p.add_argument("--per-class", action="store_true",
                   help=f"one table row per class even above {PER_CLASS_ROWS_MAX} classes (default there: classes "
                   "binned by training count)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.split == "train":
            out = train_stats(args.index, sampling_power=args.sampling_power, epochs=args.epochs, ranks=args.ranks,
                              workers=args.workers, batch_size=args.batch_size, seed=args.seed,
                              shuffle_buffer=args.shuffle_buffer, decode=not args.no_decode,
                              image_size=args.image_size, channels=args.channels, exclude=args.exclude)
        else:
            index = read_index(args.index)
            valid, skips = scan_split(index, args.split, args.channels)
            out = {"index": str(args.index), "split": args.split, "classes": index.classes,
                   "train_counts": index.train_counts, "counts": index.counts[args.split],
                   "emitted_counts": [valid[j] for j in range(index.num_classes)],
                   "skips": dict(skips)}
    except (FileNotFoundError, ValueError) as e:
        print(f"ltdist stats: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    expected = out.get("expected_counts", out.get("counts"))
    if len(out["classes"]) > PER_CLASS_ROWS_MAX and not args.per_class:
        print_binned(out["emitted_counts"], expected, out["train_counts"])
    else:
        print(f"{'class':>5} {'name':<24} {'emitted':>10} {'expected':>12}")
        for j, name in enumerate(out["classes"]):
            print(f"{j:>5} {name[:24]:<24} {out['emitted_counts'][j]:>10} {expected[j]:>12.1f}")
    if "batches_per_rank_per_epoch" in out:
        print(f"batches per rank per epoch: {out['batches_per_rank_per_epoch']}")
    print(f"skips: {out['skips']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
