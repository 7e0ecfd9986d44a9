"""The ``semmim`` command line: a thin layer over the Python API.

semmim pretrain --config configs/demo/mae.yaml --out runs/mae trainer.max_steps=100
semmim pretrain --out runs/mae --resume
semmim eval knn --encoder runs/mae --data fashion_mnist      (also: linear, finetune, lowshot, seg, zeroshot)
semmim report runs/mae runs/milan --out runs/report
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
    if cfg.teacher.name == "module":
        raise ConfigError(
            "teacher.name=module is a teacher passed from Python (semmim.pretrain(cfg, out, "
            "teacher=ModuleTeacher(...))) and cannot be given on the command line: use teacher.name=timm, "
            "open_clip or hf_clip"
        )
    result = pretrain(cfg, out, resume=args.resume, overwrite=args.overwrite)
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


def default_eval_out(encoder: str, protocol: str) -> str | None:
    """``RUN/eval/<protocol>`` when the encoder is a run directory (where ``semmim report`` looks), else None."""
    path = Path(encoder.removeprefix("random:"))
    if encoder.startswith("random:") or not path.is_dir():
        return None
    return str(path / "eval" / protocol)


def _emit_metrics(metrics: dict[str, object], out: str | None) -> int:
    """Print an evaluation's metrics and write them to OUT/metrics.json when asked."""
    text = json.dumps(metrics, indent=2)
    print(text)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(text + "\n")
        print(f"wrote {Path(out) / 'metrics.json'}", file=sys.stderr)
    return 0


def _out(args: argparse.Namespace, protocol: str) -> str | None:
    return args.out or default_eval_out(args.encoder, protocol)


def _frozen_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "data": args.data,
        "root": args.root,
        "train_limit": args.train_limit,
        "test_limit": args.test_limit,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "cache_dir": args.cache_dir,
    }


def cmd_eval_knn(args: argparse.Namespace) -> int:
    from semmim.eval.protocols import knn_eval

    metrics = knn_eval(args.encoder, k=args.k, temperature=args.temperature, pool=args.pool, **_frozen_kwargs(args))
    return _emit_metrics(metrics, _out(args, "knn"))


def _probe_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "pool": args.pool,
        "epochs": args.epochs,
        "optimizer": args.optimizer,
        "base_lr": args.base_lr,
        "weight_decay": args.weight_decay,
        "warmup_epochs": args.warmup_epochs,
    }


def cmd_eval_linear(args: argparse.Namespace) -> int:
    from semmim.eval.linear import linear_eval

    metrics = linear_eval(args.encoder, seed=args.seed, **_probe_kwargs(args), **_frozen_kwargs(args))
    return _emit_metrics(metrics, _out(args, "linear"))


def _finetune_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "base_lr": args.base_lr,
        "weight_decay": args.weight_decay,
        "layer_decay": args.layer_decay,
        "drop_path": args.drop_path,
        "warmup_epochs": args.warmup_epochs,
        "mixup": args.mixup,
        "cutmix": args.cutmix,
        "label_smoothing": args.label_smoothing,
        "rand_augment": None if args.rand_augment in ("", "none") else args.rand_augment,
        "global_pool": args.global_pool,
        "ema": args.ema,
        "max_steps": args.max_steps,
    }


def cmd_eval_finetune(args: argparse.Namespace) -> int:
    from semmim.eval.finetune import finetune_eval

    out = _out(args, "finetune")
    metrics = finetune_eval(
        args.encoder,
        data=args.data,
        root=args.root,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        seed=args.seed,
        out=out,
        **_finetune_kwargs(args),
    )
    return _emit_metrics(metrics, out)


def cmd_eval_lowshot(args: argparse.Namespace) -> int:
    from semmim.eval.lowshot import lowshot_eval

    kw = _frozen_kwargs(args)
    if args.mode == "finetune":  # batch size and workers go to the fine-tuning runs
        metrics = lowshot_eval(
            args.encoder,
            fractions=args.fractions,
            seeds=args.seeds,
            mode="finetune",
            finetune_kwargs=_finetune_kwargs(args),
            **kw,
        )
    else:
        metrics = lowshot_eval(
            args.encoder, fractions=args.fractions, seeds=args.seeds, mode="linear", **_probe_kwargs(args), **kw
        )
    return _emit_metrics(metrics, _out(args, "lowshot"))


def cmd_eval_seg(args: argparse.Namespace) -> int:
    from semmim.eval.seg import seg_eval

    metrics = seg_eval(
        args.encoder,
        data=args.data,
        root=args.root,
        head=args.head,
        finetune=args.finetune,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        layer_decay=args.layer_decay,
        img_size=args.img_size,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        num_workers=args.num_workers,
        seed=args.seed,
        channels=args.channels,
        max_steps=args.max_steps,
    )
    return _emit_metrics(metrics, _out(args, f"seg_{args.head}"))


def cmd_report(args: argparse.Namespace) -> int:
    from semmim.report import write_report

    path = write_report(args.runs, args.out, title=args.title, num_images=args.num_images, seed=args.seed)
    print(f"report: {path} and {path.with_suffix('.html')}")
    return 0


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


def _add_encoder_args(p: argparse.ArgumentParser, batch_size: int, data_help: str | None = None) -> None:
    p.add_argument("--encoder", required=True, help="run directory or encoder.safetensors ('random:RUN' = random init)")
    p.add_argument("--data", default="fashion_mnist", help=data_help or "dataset name (fashion_mnist | imagefolder)")
    p.add_argument("--root", default=None, help="dataset root (imagefolder: a folder holding train/ and val/)")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="feature cache (default ~/.cache/semmim/features; '' = off)")
    p.add_argument("--out", default=None, help="write metrics.json here (default: RUN/eval/<protocol> for a run dir)")


def _add_schedule_args(
    p: argparse.ArgumentParser, epochs: int, base_lr: float, weight_decay: float, warmup: int
) -> None:
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--base-lr", type=float, default=base_lr, help="lr = base_lr x batch / 256")
    p.add_argument("--weight-decay", type=float, default=weight_decay)
    p.add_argument("--warmup-epochs", type=int, default=warmup)


def _add_finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer-decay", type=float, default=0.65, help="layer-wise lr decay (0.65 for ViT-B)")
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--mixup", type=float, default=0.8)
    p.add_argument("--cutmix", type=float, default=1.0)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--rand-augment", default="rand-m9-mstd0.5-inc1", help="timm RandAugment spec ('none' = off)")
    p.add_argument("--global-pool", choices=["avg", "token"], default="avg")
    p.add_argument("--ema", action="store_true", help="also evaluate an EMA of the weights")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (smoke tests)")


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
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from DIR/checkpoints/last.ckpt; overrides may change only how long the run goes on and how "
        "it is logged and fed (trainer.max_steps, trainer.max_epochs, trainer.log_every_n_steps, "
        "trainer.ckpt_every_n_steps, trainer.progress_bar, trainer.max_nonfinite_steps, data.num_workers, "
        "data.pin_memory, data.max_bad_fraction)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous run in DIR (its checkpoints, metrics, TensorBoard logs, eval results and export "
        "are deleted); without it a folder that holds a run is refused",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=100 data.root=PATH")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("list", help="list registered methods, maskers, teachers, ... and shipped configs")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("eval", help="evaluate an encoder", description="Evaluation protocols.")
    esub = p.add_subparsers(dest="protocol", metavar="protocol")
    k = esub.add_parser("knn", help="weighted kNN top-1 on frozen features (DINO protocol)")
    _add_encoder_args(k, batch_size=256)
    k.add_argument("--k", type=int, default=20)
    k.add_argument("--temperature", type=float, default=0.07)
    k.add_argument("--pool", choices=["cls", "mean", "both"], default="cls", help="CLS token, mean of patches, or both")
    k.set_defaults(func=cmd_eval_knn)

    lin = esub.add_parser("linear", help="linear probe on frozen features (MAE protocol: BatchNorm + linear, LARS)")
    _add_encoder_args(lin, batch_size=256)
    lin.add_argument("--pool", choices=["cls", "mean", "both"], default="cls")
    lin.add_argument("--optimizer", choices=["lars", "sgd"], default="lars")
    _add_schedule_args(lin, epochs=90, base_lr=0.1, weight_decay=0.0, warmup=10)
    lin.set_defaults(func=cmd_eval_linear)

    ft = esub.add_parser("finetune", help="end-to-end fine-tuning (layer decay, drop path, mixup/cutmix, RandAugment)")
    _add_encoder_args(ft, batch_size=64)
    _add_schedule_args(ft, epochs=100, base_lr=5e-4, weight_decay=0.05, warmup=5)
    _add_finetune_args(ft)
    ft.set_defaults(func=cmd_eval_finetune)

    ls = esub.add_parser("lowshot", help="linear probe or fine-tuning on 1%% / 10%% of the labels, several seeds")
    _add_encoder_args(ls, batch_size=256)
    ls.add_argument("--mode", choices=["linear", "finetune"], default="linear")
    ls.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1], help="label fractions per class")
    ls.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ls.add_argument("--pool", choices=["cls", "mean"], default="cls")
    ls.add_argument("--optimizer", choices=["lars", "sgd"], default="sgd")
    _add_schedule_args(ls, epochs=90, base_lr=0.1, weight_decay=0.0, warmup=10)
    _add_finetune_args(ls)
    ls.set_defaults(func=cmd_eval_lowshot)

    sg = esub.add_parser("seg", help="semantic segmentation (linear or UPerNet-lite head), mIoU")
    _add_encoder_args(sg, batch_size=16, data_help="fashion_mnist (derived pixel classes) | ade20k")
    sg.add_argument("--head", choices=["linear", "upernet"], default="linear")
    sg.add_argument("--finetune", action="store_true", help="train the encoder too (layer-wise lr decay)")
    sg.add_argument("--epochs", type=int, default=10)
    sg.add_argument("--lr", type=float, default=None, help="default 1e-3 frozen, 1e-4 fine-tuned")
    sg.add_argument("--weight-decay", type=float, default=0.05)
    sg.add_argument("--layer-decay", type=float, default=0.65)
    sg.add_argument("--img-size", type=int, default=None, help="default: the encoder's (ADE20K: e.g. 512)")
    sg.add_argument("--channels", type=int, default=256, help="UPerNet channels")
    sg.add_argument("--max-steps", type=int, default=None)
    sg.set_defaults(func=cmd_eval_seg)
    c = esub.add_parser("classify", help="top-1/top-5 of an exported classifier (supmim's classifier.safetensors)")
    _add_split_eval_args(c, "run directory or classifier.safetensors")
    c.set_defaults(func=cmd_eval_classify)
    z = esub.add_parser("zeroshot", help="zero-shot top-1 of a language-aligned run (clip, rils) with class prompts")
    _add_split_eval_args(z, "run directory of a clip or rils run")
    z.set_defaults(func=cmd_eval_zeroshot)

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
