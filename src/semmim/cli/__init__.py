"""The ``semmim`` command line: a thin layer over the Python API.

semmim pretrain --config configs/demo/mae.yaml --out runs/mae trainer.max_steps=100
semmim pretrain --out runs/mae --resume
semmim eval knn --encoder runs/mae --data fashion_mnist      (also: linear, finetune, lowshot, seg, zeroshot)
semmim report runs/mae runs/milan --out runs/report
semmim list
semmim data shards --src fashion_mnist --out shards
semmim codebook --config run.yaml --k 512          (k-means codes over a teacher's tokens)
semmim teacher cache --config run.yaml --out DIR   (the teacher's token maps, for teacher.cache=DIR)
semmim demo --out runs/demo

One module per command group: :mod:`semmim.cli.pretrain` (``pretrain``, ``list``), :mod:`semmim.cli.eval`,
:mod:`semmim.cli.report`, :mod:`semmim.cli.data`, :mod:`semmim.cli.codebook` and :mod:`semmim.cli.demo`. Each adds
its parser and imports the library only when its command runs, so ``semmim --help`` is quick.
"""

from __future__ import annotations

import argparse
import os
import sys

from semmim.cli.codebook import add_codebook_parser
from semmim.cli.config import add_config_parser
from semmim.cli.data import add_data_parser
from semmim.cli.demo import add_demo_parser
from semmim.cli.eval import add_eval_parser, default_eval_out
from semmim.cli.pretrain import add_list_parser, add_pretrain_parser
from semmim.cli.report import add_report_parser
from semmim.cli.teacher import add_teacher_parser
from semmim.config import ConfigError, configs_dir, shipped_configs
from semmim.config import find_config as resolve_config

__all__ = ["build_parser", "configs_dir", "default_eval_out", "main", "resolve_config", "shipped_configs"]


def build_parser() -> argparse.ArgumentParser:
    """The ``semmim`` argument parser with every command."""
    parser = argparse.ArgumentParser(
        prog="semmim",
        description="Masked image pretraining with semantic targets (MAE, MILAN, ...).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `semmim <command> --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version="semmim 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="command")
    add_pretrain_parser(sub)
    add_list_parser(sub)
    add_eval_parser(sub)
    add_report_parser(sub)
    add_data_parser(sub)
    add_codebook_parser(sub)
    add_teacher_parser(sub)
    add_demo_parser(sub)
    add_config_parser(sub)
    for name in ("pretrain", "codebook"):
        add_import_argument(sub.choices[name])
    show = sub.choices["config"]._subparsers._group_actions[0].choices["show"]  # type: ignore[union-attr,index]
    add_import_argument(show)
    cache = sub.choices["teacher"]._subparsers._group_actions[0].choices["cache"]  # type: ignore[union-attr,index]
    add_import_argument(cache)
    for choice in sub.choices.values():  # every --help page shows the defaults
        if choice.formatter_class is argparse.HelpFormatter:
            choice.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    return parser


def import_user_modules(names: list[str]) -> None:
    """Import the modules named by ``--import`` (from the current directory first), so the parts they register
    (``@MASKERS.register(...)``, ...) can be named in configs.

    Raises:
        ConfigError: a module cannot be imported (names it and why).
    """
    import importlib

    if names and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"--import {name}: {e}") from None


def add_import_argument(p: argparse.ArgumentParser) -> None:
    """``--import MODULE`` (repeatable) on a command that reads configs."""
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE",
        help="import this Python module first (from the current directory or the path), so the parts it "
        "registers can be named in the config; repeatable",
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``semmim ARGV``; returns the exit status (2 with a one-line message on a usage or data error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        import_user_modules(getattr(args, "imports", None) or [])
        return int(args.func(args))
    except (ConfigError, FileNotFoundError, ValueError, OSError, KeyError, RuntimeError) as e:
        if os.environ.get("SEMMIM_DEBUG"):
            raise
        if isinstance(e, KeyError) and e.args:
            e = type(e)(e.args[0])
        print(f"semmim {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    """The error as one line; one re-raised from a DataLoader worker keeps only its original last line."""
    from semmim.data.badfiles import one_line_error

    return one_line_error(err)


if __name__ == "__main__":
    sys.exit(main())
