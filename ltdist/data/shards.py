"""``python -m ltdist.data.shards FORMAT --src ... --out DIR``: raw dataset -> webdataset shards + index.json.

Formats: fashion-mnist, imagefolder, list (ImageNet-LT / Places-LT), inat2018, cifar, and synthetic (an
iNaturalist-2018-shaped set of generated images, :mod:`ltdist.data.formats.synthetic`). See
``--help`` for the options; README.md, "How it works: Data flow", for where the shards go next.

``ltdist shards index DIR``: index.json for webdataset shards another tool wrote (:mod:`ltdist.data.foreign`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ltdist.data import foreign
from ltdist.data.build import DEFAULT_SHARD_SIZE, FORMATS, MIN_TRAIN_SHARDS, build_shards, check_source
from ltdist.data.formats import fashion_mnist, synthetic
from ltdist.data.index import SPLITS
from ltdist.data.published import PUBLISHED


def _split_file(text: str) -> tuple[str, str]:
    split, sep, path = text.partition("=")
    if not sep or split not in ("train", "val", "test"):
        raise argparse.ArgumentTypeError(f"expected SPLIT=PATH with SPLIT in train|val|test, got {text!r}")
    return split, path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltdist shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="existing webdataset shards: ltdist shards index DIR (--help there)")
    p.add_argument("format", choices=FORMATS)
    p.add_argument("--src", default="", help="raw data directory / image root (fashion-mnist: the Debian "
                   f"package's {fashion_mnist.DEFAULT_SRC})")
    p.add_argument("--out", type=Path, help="output directory for shards and index.json (required unless --check-only)")
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
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="most samples per shard; fewer when train would get fewer than --min-train-shards shards")
    p.add_argument("--min-train-shards", type=int, default=MIN_TRAIN_SHARDS,
                   help="train shards to write at least (the ranks × data.num_workers the shards are for; more "
                   "slots still work, reading shards as sample ranges)")
    p.add_argument("--workers", type=int, default=1, help="parallel shard-writer processes")
    p.add_argument("--resize-short", type=int, default=0,
                   help="pre-resize so the short side is this many px (0 = keep); smaller images keep their bytes")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--check", action="store_true",
                   help="list / inat2018 / cifar: first compare the entries with the published split (totals, "
                   "classes, per-class counts) and stop, naming every difference, before any image is read")
    p.add_argument("--check-only", action="store_true", help="only the --check comparison; write nothing")
    p.add_argument("--published", default="", choices=("", *PUBLISHED),
                   help="the published split --check compares with (default: from the format, the list file "
                   "names, the class count)")
    return p


def _split_pattern(text: str) -> tuple[str, str]:
    split, sep, pattern = text.partition("=")
    if not sep or split not in SPLITS or not pattern:
        raise argparse.ArgumentTypeError(f"expected SPLIT=GLOB with SPLIT in train|val|test, got {text!r}")
    return split, pattern


def index_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltdist shards index", description=foreign.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, help="directory of the .tar shards; index.json is written there")
    p.add_argument("--label", choices=("cls", "txt", "json"), default="",
                   help="member holding the label (default: json with --label-field, else cls, else txt)")
    p.add_argument("--label-field", default="", help="the label's field in each sample's .json member")
    p.add_argument("--split", action="append", type=_split_pattern, default=[], metavar="SPLIT=GLOB",
                   help="shard file names of a split (repeat; default: the split's name in the file name, "
                   "e.g. train-000000.tar)")
    p.add_argument("--force", action="store_true", help="replace an existing index.json")
    return p


def _index_main(argv: list[str]) -> int:
    args = index_parser().parse_args(argv)
    try:
        path = foreign.index_shards(args.dir, label=args.label, label_field=args.label_field,
                                    patterns=dict(args.split) or None, force=args.force)
    except (FileNotFoundError, ValueError) as e:
        print(f"ltdist shards index: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["index"]:
        return _index_main(argv[1:])
    args = parser().parse_args(argv)
    default_imbalance = {"cifar": 100.0, "synthetic": synthetic.N_MAX / 2}.get(args.format, 1000.0)
    imbalance = args.imbalance if args.imbalance is not None else default_imbalance
    val_per_class = args.val_per_class if args.val_per_class is not None else (
        3 if args.format == "synthetic" else 20)
    if args.out is None and not args.check_only:
        print("ltdist shards: --out DIR is required (only --check-only writes nothing)", file=sys.stderr)
        return 2
    if args.format in ("list", "inat2018") and not args.split_file:
        print(f"ltdist shards {args.format}: needs --split-file train=PATH", file=sys.stderr)
        return 2
    try:
        if args.check or args.check_only:
            name, found = check_source(args.format, args.src, split_files=dict(args.split_file),
                                       published=args.published, profile=args.profile, imbalance=imbalance,
                                       seed=args.seed)
            if found:
                print(f"ltdist shards: the source differs from the published {name} in {len(found)} ways:\n  "
                      + "\n  ".join(found), file=sys.stderr)
                return 1
            print(f"the source matches the published {name} split sizes")
            if args.check_only:
                return 0
        path = build_shards(args.format, args.src, args.out, profile=args.profile, imbalance=imbalance,
                            val_per_class=val_per_class, seed=args.seed, split_files=dict(args.split_file),
                            shard_size=args.shard_size, min_train_shards=args.min_train_shards, workers=args.workers,
                            resize_short=args.resize_short,
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
