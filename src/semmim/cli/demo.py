"""``semmim demo``: the offline demo (:func:`semmim.demo.run_demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_demo(args: argparse.Namespace) -> int:
    """``semmim demo``: run the demo into ``--out``."""
    from semmim.demo import run_demo

    run_demo(Path(args.out), quick=args.quick)
    return 0


def add_demo_parser(sub: Any) -> None:
    """Add ``demo`` to an ``argparse`` subparsers object."""
    p = sub.add_parser(
        "demo",
        help="the offline demo: a language-aligned teacher, MAE, MILAN and RILS on Fashion-MNIST",
        description="Trains a small language-aligned teacher (clip with a locked MiniLM text tower), then MAE, "
        "MILAN and RILS on Fashion-MNIST (offline); compares kNN top-1 against a random encoder and zero-shot "
        "top-1, and writes DIR/report.md.",
    )
    p.add_argument("--out", default="runs/demo", help="demo folder")
    p.add_argument("--quick", action="store_true", help="a few steps of each stage (a smoke test)")
    p.set_defaults(func=cmd_demo)
