"""``semmim data``: data preparation (``semmim data shards`` writes WebDataset shards).

Argument parsing only; the datasets and :func:`semmim.data.shards.write_shards` load when a command runs,
so ``semmim --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def source_dataset(args: argparse.Namespace) -> Any:
    """The dataset ``semmim data shards --src ...`` names (an image folder, a manifest or Fashion-MNIST)."""
    from semmim.data.captions import MANIFEST_SUFFIXES, ClassCaptions, ManifestDataset, subset_keeping_captions
    from semmim.data.datasets import ImageFolderDataset
    from semmim.data.fashion_mnist import FashionMNIST

    src = str(args.src)
    ds: Any
    if src in ("fashion_mnist", "fashion-mnist", "fashionmnist"):
        ds = FashionMNIST(root=args.root, split=args.split, in_chans=1)
    else:
        path = Path(src).expanduser()
        if path.is_dir():
            ds = ImageFolderDataset(path)
        elif path.is_file():
            if path.suffix.lower() not in MANIFEST_SUFFIXES:
                raise ValueError(
                    f"--src {src}: a file must be a manifest ({', '.join(sorted(MANIFEST_SUFFIXES))}), "
                    f"got suffix {path.suffix!r}"
                )
            ds = ManifestDataset(path, root=args.root, image_key=args.image_key, caption_key=args.caption_key)
        else:
            raise FileNotFoundError(
                f"--src {src}: not an image folder, a manifest file (.csv/.tsv/.jsonl) or 'fashion_mnist'"
            )
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        if args.limit < len(ds):
            ds = subset_keeping_captions(ds, range(args.limit))
    if args.captions == "templates":
        ds = ClassCaptions(ds, seed=args.seed)
    return ds


def cmd_data_shards(args: argparse.Namespace) -> int:
    """``semmim data shards``: write a dataset as WebDataset shards; prints the shard and sample counts."""
    from semmim.data.shards import SHARD_MANIFEST, write_shards

    ds = source_dataset(args)
    paths = write_shards(
        ds,
        args.out,
        shard_size=args.shard_size,
        prefix=args.prefix,
        image_format=args.image_format,
        quality=args.quality,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    out = Path(args.out)
    meta = json.loads((out / SHARD_MANIFEST).read_text(encoding="utf-8"))
    left_out = f", left out {len(meta['skipped'])} unreadable image(s)" if meta.get("skipped") else ""
    print(
        f"wrote {len(paths)} shards, {meta['num_samples']} samples to {out}{left_out} (index: {out / SHARD_MANIFEST})"
    )
    return 0


def add_data_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``data`` (with ``data shards``) to an ``argparse`` subparsers object; returns the ``data`` parser.

    Examples:
        >>> parser = argparse.ArgumentParser(prog="semmim")
        >>> _ = add_data_parser(parser.add_subparsers(dest="command"))
        >>> args = parser.parse_args(["data", "shards", "--src", "fashion_mnist", "--out", "shards"])
        >>> args.shard_size
        1000
    """
    p = subparsers.add_parser("data", help="prepare data (WebDataset shards)", description="Data preparation.")
    p.set_defaults(func=lambda _args: _print_help(p))
    dsub = p.add_subparsers(dest="data_command", metavar="command")
    s = dsub.add_parser(
        "shards",
        help="write a dataset as WebDataset shards (img2dataset layout)",
        description="Write an image folder, a manifest (.csv/.tsv/.jsonl) or Fashion-MNIST as WebDataset tar shards "
        "(KEY.jpg + KEY.txt [+ KEY.cls]) with a manifest.json; read them with data.name=webdataset data.root=DIR.",
    )
    s.add_argument("--src", required=True, help="an image folder, a manifest file, or fashion_mnist")
    s.add_argument("--out", required=True, help="output folder for the shards")
    s.add_argument(
        "--captions", choices=["templates"], default=None, help="caption labelled data with class-name templates"
    )
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    s.add_argument("--limit", type=int, default=None, help="write only the first N samples")
    s.add_argument("--split", default="train", help="fashion_mnist split: train | test (default train)")
    s.add_argument(
        "--root", default=None, help="fashion_mnist: folder of the idx files; manifest: base of relative image paths"
    )
    s.add_argument("--image-key", default="image", help="manifest column holding the image path")
    s.add_argument("--caption-key", default="caption", help="manifest column holding the caption")
    s.add_argument("--prefix", default="shard", help="shard file prefix (default shard)")
    s.add_argument("--image-format", choices=["jpg", "png", "webp"], default="jpg")
    s.add_argument("--quality", type=int, default=95, help="JPEG / WebP quality (default 95)")
    s.add_argument("--seed", type=int, default=0, help="seed of the caption template choice")
    s.add_argument("--overwrite", action="store_true", help="replace existing shards with the same prefix")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_data_shards)
    return p


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
