"""``python -m ltdist.data.shards FORMAT --src ... --out DIR``: raw dataset -> webdataset shards + index.json.

Formats: fashion-mnist, imagefolder, list (ImageNet-LT / Places-LT), inat2018, cifar, and synthetic (an
iNaturalist-2018-shaped set of generated images, :mod:`ltdist.data.formats.synthetic`). See
``--help`` for the options; README.md, "How it works: Data flow", for where the shards go next.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ltdist.data.build import FORMATS, build_shards
from ltdist.data.formats import fashion_mnist, synthetic


def _split_file(text: str) -> tuple[str, str]:
    split, sep, path = text.partition("=")
    if not sep or split not in ("train", "val", "test"):
        raise argparse.ArgumentTypeError(f"expected SPLIT=PATH with SPLIT in train|val|test, got {text!r}")
    return split, path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltdist shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=FORMATS)
    p.add_argument("--src", default="", help="raw data directory / image root (fashion-mnist: the Debian "
                   f"package's {fashion_mnist.DEFAULT_SRC})")
    p.add_argument("--out", required=True, type=Path, help="output directory for shards and index.json")
    p.add_argument("--split-file", action="append", type=_split_file, default=[], metavar="SPLIT=PATH",
                   help="list / inat2018: the list file or json of a split (repeat for train, val, test)")
    p.add_argument("--profile", default="exp", choices=("exp", "pareto"),
                   help="long-tail profile (fashion-mnist, cifar)")
    p.add_argument("--imbalance", type=float, default=None,
                   help="imbalance factor n_max/n_min (default 1000 for fashion-mnist, 100 for cifar, 500 for "
                   "synthetic: 1000 down to 2 as in iNaturalist-2018)")
    p.add_argument("--val-per-class", type=int, default=None,
                   help="val images per class (default 20; 3 for synthetic): fashion-mnist/cifar hold them out of "
                   "the long-tail cut, synthetic generates them; a source without a val split has them carved "
                   "from train (at most half a class; 0 = no val)")
    p.add_argument("--classes", type=int, default=synthetic.INAT_CLASSES,
                   help="synthetic: number of classes (the profile keeps its end points and mean count)")
    p.add_argument("--test-per-class", type=int, default=3,
                   help="synthetic: test images per class (iNaturalist-2018's val2018, its test split, has 3)")
    p.add_argument("--image-size", type=int, default=32, help="synthetic: side of the generated JPEGs, px")
    p.add_argument("--train-images", type=int, default=0,
                   help="synthetic: train images in all (0: iNaturalist-2018's mean count per class × --classes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the long-tail choice and the shard shuffle")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=1, help="parallel shard-writer processes")
    p.add_argument("--resize-short", type=int, default=0,
                   help="pre-resize so the short side is this many px (0 = keep); smaller images keep their bytes")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    default_imbalance = {"cifar": 100.0, "synthetic": synthetic.N_MAX / 2}.get(args.format, 1000.0)
    imbalance = args.imbalance if args.imbalance is not None else default_imbalance
    val_per_class = args.val_per_class if args.val_per_class is not None else (
        3 if args.format == "synthetic" else 20)
    if args.format in ("list", "inat2018") and not args.split_file:
        print(f"ltdist shards {args.format}: needs --split-file train=PATH", file=sys.stderr)
        return 2
    try:
        path = build_shards(args.format, args.src, args.out, profile=args.profile, imbalance=imbalance,
                            val_per_class=val_per_class, seed=args.seed, split_files=dict(args.split_file),
                            shard_size=args.shard_size, workers=args.workers, resize_short=args.resize_short,
                            progress=not args.no_progress, synthetic_classes=args.classes,
                            test_per_class=args.test_per_class, image_size=args.image_size,
                            train_images=args.train_images)
    except (FileNotFoundError, ValueError) as e:
        print(f"ltdist shards: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
