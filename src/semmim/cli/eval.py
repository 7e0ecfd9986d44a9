"""``semmim eval <protocol>``: kNN, linear probe, fine-tuning, low-shot, segmentation, classifier and
zero-shot evaluation.

Every ``metrics.json`` records what it was measured on (``measured_on``: the encoder, the dataset, its
root and the split limits) and how (``settings``: every command-line option that can change the result).
A run directory's results go to ``RUN/eval/<protocol>/``; a ``random:RUN`` baseline's to
``RUN/eval/<protocol>_random/``, where ``semmim report`` finds both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from semmim.run import EVAL_DIR

RANDOM_PREFIX = "random:"
RANDOM_SUFFIX = "_random"
"""``random:RUN`` results are saved in ``RUN/eval/<protocol>_random``."""

DEFAULT_DATA = "fashion_mnist"
CLASSIFICATION_DATA = "imagefolder | fashion_mnist"
SEGMENTATION_DATA = "ade20k | fashion_mnist"

# options that only say where results go or how fast they come, never what they are
PLUMBING = frozenset({"func", "command", "protocol", "out", "num_workers", "cache_dir", "data_choices"})
# options recorded under "measured_on" rather than "settings"
MEASURED_ON = ("encoder", "model", "data", "root", "train_limit", "test_limit", "split", "limit")


def default_eval_out(encoder: str, protocol: str) -> str | None:
    """Where ``semmim eval`` saves results by default (where ``semmim report`` looks), else None.

    ``RUN/eval/<protocol>`` for a run directory, ``RUN/eval/<protocol>_random`` for ``random:RUN``;
    None for an encoder file.
    """
    random_init = encoder.startswith(RANDOM_PREFIX)
    path = Path(encoder.removeprefix(RANDOM_PREFIX))
    if not path.is_dir():
        return None
    return str(path / EVAL_DIR / (protocol + (RANDOM_SUFFIX if random_init else "")))


def check_data(args: argparse.Namespace) -> None:
    """Fill in the default dataset, refusing ``--root`` without ``--data`` (a root alone names no dataset)."""
    if args.data is not None:
        return
    if args.root is not None:
        raise ValueError(
            f"--root needs --data {args.data_choices.replace(' ', '')}: say which dataset {args.root} holds "
            f"(without --data the evaluation would run on {DEFAULT_DATA})"
        )
    args.data = DEFAULT_DATA


def _absolute(spec: str | None) -> str | None:
    if spec is None:
        return None
    random_init = spec.startswith(RANDOM_PREFIX)
    path = os.path.abspath(spec.removeprefix(RANDOM_PREFIX))
    return (RANDOM_PREFIX if random_init else "") + path


def provenance(args: argparse.Namespace) -> dict[str, Any]:
    """What an evaluation was measured on and with which settings, from its parsed command line.

    Returns:
        {"measured_on": {"encoder" or "model" (as given), "encoder_path" / "model_path" (absolute),
        "data", "root" (absolute or None), "train_limit", "test_limit" or "split", "limit"},
        "settings": {option: value} for every other option that can change the result}.
    """
    given = vars(args)
    measured: dict[str, Any] = {}
    for key in MEASURED_ON:
        if key not in given:
            continue
        value = given[key]
        measured[key] = value
        if key in ("encoder", "model"):
            measured[f"{key}_path"] = _absolute(value)
        elif key == "root":
            measured[key] = os.path.abspath(value) if value is not None else None
    settings = {k: v for k, v in sorted(given.items()) if k not in PLUMBING and k not in MEASURED_ON}
    return {"measured_on": measured, "settings": settings}


def emit_metrics(metrics: dict[str, Any], out: str | None, args: argparse.Namespace | None = None) -> int:
    """Print an evaluation's metrics (with its :func:`provenance`) and write them to OUT/metrics.json."""
    if args is not None:
        metrics = {**metrics, **provenance(args)}
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
    """``semmim eval knn``."""
    check_data(args)
    from semmim.eval.knn import knn_eval

    metrics = knn_eval(args.encoder, k=args.k, temperature=args.temperature, pool=args.pool, **_frozen_kwargs(args))
    return emit_metrics(metrics, _out(args, "knn"), args)


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
    """``semmim eval linear``."""
    check_data(args)
    from semmim.eval.linear import linear_eval

    metrics = linear_eval(args.encoder, seed=args.seed, **_probe_kwargs(args), **_frozen_kwargs(args))
    return emit_metrics(metrics, _out(args, "linear"), args)


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
    """``semmim eval finetune``."""
    check_data(args)
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
    return emit_metrics(metrics, out, args)


def cmd_eval_lowshot(args: argparse.Namespace) -> int:
    """``semmim eval lowshot``."""
    check_data(args)
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
    return emit_metrics(metrics, _out(args, "lowshot"), args)


def cmd_eval_seg(args: argparse.Namespace) -> int:
    """``semmim eval seg``."""
    check_data(args)
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
    return emit_metrics(metrics, _out(args, f"seg_{args.head}"), args)


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
    return emit_metrics(metrics, args.out, args)


def cmd_eval_classify(args: argparse.Namespace) -> int:
    """``semmim eval classify``."""
    check_data(args)
    from semmim.eval.classify import classify_eval

    return _eval_on_split(args, classify_eval)


def cmd_eval_zeroshot(args: argparse.Namespace) -> int:
    """``semmim eval zeroshot``."""
    check_data(args)
    from semmim.eval.zeroshot import zeroshot_eval

    return _eval_on_split(args, zeroshot_eval)


def _add_data_args(p: argparse.ArgumentParser, choices: str, data_help: str, root_help: str) -> None:
    p.add_argument("--data", default=None, help=f"{data_help} (default {DEFAULT_DATA})")
    p.add_argument("--root", default=None, help=f"{root_help}; needs --data")
    p.set_defaults(data_choices=choices)


def _add_encoder_args(
    p: argparse.ArgumentParser, batch_size: int, data_help: str | None = None, choices: str = CLASSIFICATION_DATA
) -> None:
    p.add_argument("--encoder", required=True, help="run directory or encoder.safetensors ('random:RUN' = random init)")
    _add_data_args(
        p,
        choices,
        data_help or f"dataset name ({choices})",
        "dataset root (imagefolder: a folder holding train/ and val/)",
    )
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="use the first N test images")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="feature cache (default ~/.cache/semmim/features; '' = off)")
    p.add_argument(
        "--out",
        default=None,
        help="write metrics.json here (default: RUN/eval/<protocol> for a run dir, RUN/eval/<protocol>_random "
        "for random:RUN)",
    )


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
    _add_data_args(
        p,
        CLASSIFICATION_DATA,
        f"labelled dataset ({CLASSIFICATION_DATA})",
        "dataset root (imagefolder: the evaluation folder)",
    )
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="use the first N images")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--out", default=None, help="write metrics.json here")


def add_eval_parser(sub: Any) -> None:
    """Add ``eval`` with its protocols to an ``argparse`` subparsers object."""
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
    _add_encoder_args(
        sg,
        batch_size=16,
        data_help="fashion_mnist (derived pixel classes) | ade20k",
        choices=SEGMENTATION_DATA,
    )
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
