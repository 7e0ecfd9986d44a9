"""``semmim report``: a Markdown + HTML report comparing runs."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_report(args: argparse.Namespace) -> int:
    """``semmim report``: write report.md / report.html for the given runs."""
    from semmim.report import write_report

    path = write_report(args.runs, args.out, title=args.title, num_images=args.num_images, seed=args.seed)
    print(f"report: {path} and {path.with_suffix('.html')}")
    return 0


def add_report_parser(sub: Any) -> None:
    """Add ``report`` to an ``argparse`` subparsers object."""
    r = sub.add_parser(
        "report",
        help="a Markdown + HTML report comparing runs: metrics, curves, reconstructions, PCA, semantic masks",
    )
    r.add_argument("runs", nargs="+", help="run directories")
    r.add_argument("--out", required=True, help="report folder (report.md, report.html, PNGs)")
    r.add_argument("--title", default="semmim report")
    r.add_argument("--num-images", type=int, default=8, help="images per picture")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=cmd_report)
