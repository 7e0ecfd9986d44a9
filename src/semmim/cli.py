"""The ``semmim`` command line: a thin layer over the Python API.

semmim pretrain --config configs/demo/mae.yaml --out runs/mae trainer.max_steps=100
semmim pretrain --out runs/mae --resume
semmim eval knn --encoder runs/mae --data fashion_mnist
semmim list
semmim demo --out runs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from semmim.config import ConfigError


def configs_dir() -> Path:
    """The shipped ``configs/`` folder (next to ``src/`` in a checkout)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "configs").is_dir() and (parent / "pyproject.toml").is_file():
            return parent / "configs"
    return Path.cwd() / "configs"


def resolve_config(name: str) -> Path:
    """A path, or a shipped config name such as ``demo/mae`` / ``mae/vit_base_p16_in1k.yaml``."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (configs_dir() / name, configs_dir() / f"{name}.yaml"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"config file not found: {name} (also looked in {configs_dir()}; see `semmim list`)")


def shipped_configs() -> list[str]:
    root = configs_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml")) if root.is_dir() else []


def cmd_list(args: argparse.Namespace) -> int:
    from semmim.registry import ALL_REGISTRIES, load_builtins

    load_builtins()
    for kind, reg in ALL_REGISTRIES.items():
        print(f"{kind}:")
        for name in reg.names():
            print(f"  {name:<18} {reg.describe(name)}")
    print(f"configs ({configs_dir()}):")
    for c in shipped_configs():
        print(f"  {c}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from semmim.config import load_config
    from semmim.engine import pretrain

    out = Path(args.out)
    if args.config is None:
        if not args.resume:
            raise ConfigError("--config is required (unless --resume reads DIR/config.yaml)")
        config_path = out / "config.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"--resume without --config: {config_path} does not exist")
    else:
        config_path = resolve_config(args.config)
    cfg = load_config(config_path, args.overrides)
    result = pretrain(cfg, out, resume=args.resume)
    print(
        json.dumps(
            {
                "out_dir": str(result.out_dir),
                "steps": result.steps,
                "final_loss": result.final_loss,
                "encoder": str(result.encoder_path) if result.encoder_path else None,
                "images_per_s": round(result.images_per_s, 1),
                "elapsed_s": round(result.elapsed_s, 1),
            }
        )
    )
    return 0


def _emit_metrics(metrics: dict[str, object], out: str | None) -> int:
    """Print an evaluation's metrics and write them to OUT/metrics.json when asked."""
    text = json.dumps(metrics, indent=2)
    print(text)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(text + "\n")
    return 0


def cmd_eval_knn(args: argparse.Namespace) -> int:
    from semmim.eval.protocols import knn_eval

    metrics = knn_eval(
        args.encoder,
        data=args.data,
        root=args.root,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        k=args.k,
        temperature=args.temperature,
        pool=args.pool,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    return _emit_metrics(metrics, args.out)


def _eval_on_split(args: argparse.Namespace, evaluate: Any) -> int:
    """Run a protocol taking (model, data, root, split, limit, batch_size, num_workers) and report it."""
    metrics = evaluate(
        args.model,
        data=args.data,
        root=args.root,
        split=args.split,
        limit=args.limit,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    return _emit_metrics(metrics, args.out)


def cmd_eval_classify(args: argparse.Namespace) -> int:
    from semmim.eval.classify import classify_eval

    return _eval_on_split(args, classify_eval)


def cmd_eval_zeroshot(args: argparse.Namespace) -> int:
    from semmim.eval.zeroshot import zeroshot_eval

    return _eval_on_split(args, zeroshot_eval)


def _add_split_eval_args(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--data", default="fashion_mnist", help="labelled dataset (fashion_mnist | imagefolder)")
    p.add_argument("--root", default=None, help="dataset root (imagefolder: the evaluation folder)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="use the first N images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--out", default=None, help="write metrics.json here")


def cmd_demo(args: argparse.Namespace) -> int:
    from semmim.demo import run_demo

    run_demo(Path(args.out), quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semmim",
        description="Masked image pretraining with semantic targets (MAE, MILAN, ...).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `semmim <command> --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version="semmim 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="command")

    p = sub.add_parser(
        "pretrain",
        help="pretrain an encoder from a config",
        description="Pretrain an encoder. Writes DIR/config.yaml, DIR/checkpoints/last.ckpt, DIR/metrics.jsonl, "
        "DIR/metrics.csv, DIR/tensorboard/ and DIR/encoder.safetensors (timm-compatible).",
    )
    p.add_argument("--config", help="YAML config (a path, or a shipped name such as demo/mae)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoints/last.ckpt")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=100 data.root=PATH")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("list", help="list registered methods, maskers, teachers, ... and shipped configs")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("eval", help="evaluate an encoder", description="Evaluation protocols.")
    esub = p.add_subparsers(dest="protocol", metavar="protocol")
    k = esub.add_parser("knn", help="weighted kNN top-1 on frozen features (DINO protocol)")
    k.add_argument("--encoder", required=True, help="run directory or encoder.safetensors ('random:RUN' = random init)")
    k.add_argument("--data", default="fashion_mnist", help="dataset name (fashion_mnist | imagefolder)")
    k.add_argument("--root", default=None, help="dataset root (imagefolder: a folder holding train/ and val/)")
    k.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    k.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
    k.add_argument("--k", type=int, default=20)
    k.add_argument("--temperature", type=float, default=0.07)
    k.add_argument("--pool", choices=["cls", "mean", "both"], default="cls", help="CLS token, mean of patches, or both")
    k.add_argument("--batch-size", type=int, default=256)
    k.add_argument("--num-workers", type=int, default=2)
    k.add_argument("--out", default=None, help="write metrics.json here")
    k.set_defaults(func=cmd_eval_knn)
    c = esub.add_parser("classify", help="top-1/top-5 of an exported classifier (supmim's classifier.safetensors)")
    _add_split_eval_args(c, "run directory or classifier.safetensors")
    c.set_defaults(func=cmd_eval_classify)
    z = esub.add_parser("zeroshot", help="zero-shot top-1 of a language-aligned run (clip, rils) with class prompts")
    _add_split_eval_args(z, "run directory of a clip or rils run")
    z.set_defaults(func=cmd_eval_zeroshot)

    from semmim.data_cli import add_data_parser

    add_data_parser(sub)

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args))
    except (ConfigError, FileNotFoundError, ValueError, OSError, KeyError, RuntimeError) as e:
        if os.environ.get("SEMMIM_DEBUG"):
            raise
        if isinstance(e, KeyError) and e.args:
            e = type(e)(e.args[0])
        print(f"semmim {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
