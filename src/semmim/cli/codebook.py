"""``semmim codebook``: k-means over a teacher's patch tokens, written as a codebook file for the ``codebook`` target.

Argument parsing only; the teacher, the data and k-means load when the command runs (:mod:`semmim.tokenizers`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def codebook_out(args: argparse.Namespace, target: dict[str, Any] | None) -> str:
    """Where the codebook goes: ``--out``, else the config's ``method.target.path`` (a ``codebook`` target).

    Raises:
        ConfigError: neither is given, or both and they differ.
    """
    from pathlib import Path

    from semmim.config import ConfigError

    configured = target.get("path") if target is not None and target.get("name") == "codebook" else None
    if args.out is None and configured is None:
        raise ConfigError(
            "--out is required (or a config whose method.target is a codebook: method.target.path is then the file)"
        )
    if args.out is not None and configured is not None and Path(args.out).resolve() != Path(configured).resolve():
        raise ConfigError(
            f"--out {args.out} and method.target.path={configured} name two files: drop --out (the run reads "
            "method.target.path) or set method.target.path to it"
        )
    return str(args.out if args.out is not None else configured)


def cmd_codebook(args: argparse.Namespace) -> int:
    """Build the codebook; prints a JSON summary (file, size, code usage, perplexity, tokens, images)."""
    from semmim.config import ConfigError, find_config, load_config
    from semmim.tokenizers.build import build_codebook, check_options

    check_options(args.k, args.iters, args.metric, args.norm, args.init, args.max_tokens)
    cfg = load_config(find_config(args.config) if args.config is not None else None, args.overrides)
    if cfg.teacher.name in (None, "none"):
        raise ConfigError(
            "semmim codebook clusters a teacher's tokens: set teacher.name (and teacher.model / teacher.path / "
            "teacher.pretrained) with a target that takes a teacher (method.target=codebook, or teacher_features)"
        )
    out = codebook_out(args, cfg.method.target)
    device = default_device(args.device)
    report = build_codebook(
        cfg,
        out,
        args.k,
        iters=args.iters,
        metric=args.metric,
        norm=args.norm,
        init=args.init,
        max_tokens=args.max_tokens,
        seed=args.seed,
        device=device,
    )
    print(json.dumps(report.as_dict()))
    return 0


def default_device(requested: str | None) -> str:
    """``--device`` as given, else ``cuda`` when a GPU is visible, else ``cpu`` (the teacher-tool commands)."""
    if requested:
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_codebook_parser(sub: Any) -> None:
    """Add ``codebook`` to an ``argparse`` subparsers object.

    Examples:
        >>> parser = argparse.ArgumentParser(prog="semmim")
        >>> add_codebook_parser(parser.add_subparsers(dest="command"))
        >>> args = parser.parse_args(["codebook", "--config", "run.yaml", "--k", "64"])
        >>> args.metric, args.iters, args.init
        ('cosine', 20, 'kmeans++')
    """
    p = sub.add_parser(
        "codebook",
        help="k-means codebook over a teacher's patch tokens (for method.target=codebook)",
        description="Stream the config's data (data.*, no augmentation) through its teacher (teacher.*), keep a seeded "
        "uniform sample of the patch tokens on the student's grid (model.img_size / model.patch_size), run k-means and "
        "write the centroids with the teacher's identity into a safetensors file. Give it the config you pretrain "
        "with (method.target=codebook: the file is method.target.path), or any config with a teacher and --out.",
    )
    p.add_argument("--config", default=None, help="YAML config (a path, or a shipped name); unset = overrides only")
    p.add_argument("--out", default=None, help="codebook file to write; unset = the config's method.target.path")
    p.add_argument("--k", type=int, required=True, help="number of codes (the vocabulary size)")
    p.add_argument("--iters", type=int, default=20, help="k-means iterations (stops earlier once nothing moves)")
    p.add_argument("--metric", choices=["cosine", "l2"], default="cosine", help="distance of tokens to codes")
    p.add_argument("--norm", default="none", help="conditioning of the teacher tokens: none | ln (LayerNorm)")
    p.add_argument("--init", choices=["kmeans++", "random"], default="kmeans++", help="k-means seeding")
    p.add_argument("--max-tokens", type=int, default=200_000, help="most tokens k-means sees (a uniform sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of the token sample and of the seeding")
    p.add_argument("--device", default=None, help="where the teacher runs; unset = cuda if available, else cpu")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.limit=5000 teacher.path=RUN_DIR")
    p.set_defaults(func=cmd_codebook)
