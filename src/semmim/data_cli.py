"""The ``semmim data`` subcommands' argument parsing, kept free of heavy imports so ``semmim --help``
stays fast; the work is in :func:`semmim.data.shards.cmd_data_shards`."""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_data_shards(args: argparse.Namespace) -> int:
    from semmim.data.shards import cmd_data_shards

    return cmd_data_shards(args)


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
    s.set_defaults(func=_cmd_data_shards)
    return p


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
