"""Throughput of the training stream vs a map-style DataLoader over the same JPEGs.

Both sides run the same decode + augment (ltdist.data.transforms.TrainTransform: random-resized-crop,
flip, colour jitter, normalise) at 224 px; the stream reads webdataset shards (with resampling and a
shuffle buffer), the baseline reads one JPEG file per sample with PIL through torch's DataLoader
with shuffling. Runs alternate in rounds, each round starting with the other side
(:func:`ltdist.bench.harness.timed_rounds`), so both see the same machine load.

    ltdist bench data --images 768 --workers 0 1 2 --repeats 3 --out runs/bench/data

Reports wall-clock images/s and images per CPU-second (user + system time of the main process and
its loader processes): the per-core figure, which stays meaningful on a machine shared with others.
"""

from __future__ import annotations

import argparse
import itertools
import random
import resource
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ltdist.bench.harness import add_out_argument, timed_rounds, write_results
from ltdist.data import build_train_stream
from ltdist.data.build import build_shards
from ltdist.data.transforms import TrainTransform, to_normalized_tensor


def synthetic_jpegs(root: Path, n: int, classes: int, size: tuple[int, int], seed: int = 0) -> list[tuple[Path, int]]:
    """Natural-looking JPEGs (smooth colour fields + texture noise, quality 90) in root/<class>/."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    files = []
    for k in range(n):
        label = k % classes
        phase = rng.uniform(0, 6.28, 3)
        freq = rng.uniform(0.005, 0.03, 3)
        rgb = [127 + 100 * np.sin(freq[c] * (xx + 0.7 * yy) + phase[c]) for c in range(3)]
        img = np.stack(rgb, -1) + rng.normal(0, 18, (h, w, 3))
        path = root / f"class{label:03d}" / f"img{k:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        files.append((path, label))
    return files


class JpegFiles(Dataset):
    """Map-style baseline: one file read + PIL decode + the same TrainTransform per sample."""

    def __init__(self, files: list[tuple[Path, int]], image_size: int):
        self.files, self.transform = files, TrainTransform(image_size, 3)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.files[i]
        return self.transform(path.read_bytes(), random.Random(i)), label


def collate(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = to_normalized_tensor(np.stack([s[0] for s in samples]), 3)
    return images, torch.tensor([s[1] for s in samples])


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the loader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_stream(index: Path, workers: int, batch_size: int, image_size: int, epoch: int) -> int:
    stream = build_train_stream(index, batch_size=batch_size, rank=0, world_size=1, num_workers=workers,
                                sampling_power=1.0, seed=0, image_size=image_size, channels=3, shuffle_buffer=256,
                                max_skip_fraction=0.0)
    stream.set_epoch(epoch)
    return sum(batch.images.shape[0] for batch in stream)


def time_map(files: list[tuple[Path, int]], workers: int, batch_size: int, image_size: int) -> int:
    loader = DataLoader(JpegFiles(files, image_size), batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=collate, drop_last=True)
    return sum(images.shape[0] for images, _ in loader)


def compare(index: Path, files: list[tuple[Path, int]], workers: int, batch_size: int, image_size: int,
            repeats: int) -> dict:
    """``repeats`` rounds of stream vs map with ``workers`` loader processes: per run (images per wall second,
    images per CPU second of this process and its loader processes), the medians and their ratios."""
    images: dict[str, list[int]] = {"stream": [], "map": []}  # per run, as each side counted them
    epochs = itertools.count()  # the stream's epoch: its run index
    loops = {"stream": lambda: images["stream"].append(time_stream(index, workers, batch_size, image_size,
                                                                   next(epochs))),
             "map": lambda: images["map"].append(time_map(files, workers, batch_size, image_size))}
    times = timed_rounds(loops, repeats, cpu_clock=cpu_seconds)
    runs = {k: [(n / wall, n / cpu) for n, wall, cpu in zip(images[k], t["wall"], t["cpu"])] for k, t in times.items()}
    med = {k: [statistics.median(x[i] for x in v) for i in range(2)] for k, v in runs.items()}
    return {"workers": workers, "stream_images_per_s": med["stream"][0], "map_images_per_s": med["map"][0],
            "stream_per_cpu_s": med["stream"][1], "map_per_cpu_s": med["map"][1],
            "ratio_wall": med["stream"][0] / med["map"][0], "ratio_cpu": med["stream"][1] / med["map"][1],
            "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=768)
    p.add_argument("--source-size", type=int, nargs=2, default=(427, 320), help="JPEG width height")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeats", type=int, default=3)
    add_out_argument(p, "data")
    p.add_argument("--json", type=Path, help=argparse.SUPPRESS)  # the old flag, refused with the new one named
    p.add_argument("--workdir", type=Path, default=None, help="keep the JPEGs and shards here")
    args = p.parse_args(argv)
    if args.json is not None:
        p.error(f"--json FILE is now --out DIR (it receives results.json and table.txt), e.g. --out {args.json.parent}")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        files = synthetic_jpegs(work / "jpeg" / "train", args.images, 8, tuple(args.source_size))
        index = build_shards("imagefolder", str(work / "jpeg"), work / "shards", shard_size=64, progress=False)
        rows = [compare(index, files, workers, args.batch_size, args.image_size, args.repeats)
                for workers in args.workers]
    lines = [f"{args.images} JPEGs {args.source_size[0]}x{args.source_size[1]} -> {args.image_size} px, "
             f"batch {args.batch_size}, median of {args.repeats}",
             f"{'workers':>7} {'stream img/s':>13} {'map img/s':>10} {'ratio':>6} {'stream img/cpu-s':>17} "
             f"{'map img/cpu-s':>14} {'ratio':>6}"]
    for row in rows:
        lines.append(f"{row['workers']:>7} {row['stream_images_per_s']:>13.1f} {row['map_images_per_s']:>10.1f} "
                     f"{row['ratio_wall']:>6.2f} {row['stream_per_cpu_s']:>17.1f} {row['map_per_cpu_s']:>14.1f} "
                     f"{row['ratio_cpu']:>6.2f}")
    table = "\n".join(lines)
    print(table)
    del args.json
    print(f"wrote {write_results(args.out, 'data', args, table, results=rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
