"""``semmim config show``: the resolved config of a file and overrides, every key with its help."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the fully resolved config (the method's default parts filled in), each key with its help."""
    from semmim.config import explain, load_config, to_yaml

    cfg = load_config(args.config, args.overrides)
    print(to_yaml(cfg) if args.plain else explain(cfg), end="")
    return 0


def add_config_parser(sub: Any) -> None:
    """Add ``config`` (with ``show``) to an ``argparse`` subparsers object."""
    p = sub.add_parser(
        "config",
        help="show a resolved config",
        description="Inspect configs: `semmim config show --config demo/milan method.masker=random`.",
    )
    inner = p.add_subparsers(dest="config_command", metavar="subcommand")
    show = inner.add_parser(
        "show",
        help="print the resolved config with every key's help",
        description="Resolve a config file (with its base: files) and key=value overrides exactly as "
        "`semmim pretrain` would, and print every key, its value and its help. The checks are those of "
        "pretrain: a wrong key fails here with the same message.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    show.add_argument("--config", default=None, help="YAML config (a path or a shipped name such as demo/mae)")
    show.add_argument("--plain", action="store_true", help="plain YAML (what a run's config.yaml holds), no help")
    show.add_argument("overrides", nargs="*", help="key=value overrides (e.g. method.masker.mask_ratio=0.6)")
    show.set_defaults(func=cmd_config_show)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
