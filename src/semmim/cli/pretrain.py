"""``semmim pretrain`` and ``semmim list``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from semmim.config import ConfigError, configs_dir, find_config, shipped_configs
from semmim.run import CONFIG


def cmd_list(args: argparse.Namespace) -> int:
    """``semmim list``: the registered parts and the shipped configs."""
    from semmim.registry import ALL_REGISTRIES, load_builtins

    load_builtins()
    for kind, reg in ALL_REGISTRIES.items():
        print(f"{kind}:")
        for name in reg.names():
            print(f"  {name:<18} {reg.describe(name)}")
    print(f"configs ({configs_dir()}):")
    for c in shipped_configs():
        print(f"  {c}")
    from semmim.eval.recipes import RECIPE_PROTOCOLS, recipe_names

    print("evaluation recipes (semmim eval <protocol> --recipe NAME):")
    for protocol in RECIPE_PROTOCOLS:
        print(f"  {protocol:<18} {', '.join(recipe_names(protocol))}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    """``semmim pretrain``: train from a config (or resume a run); prints a JSON summary."""
    from semmim.config import load_config, load_saved_config
    from semmim.engine import pretrain

    out = Path(args.out)
    if args.config is None:
        if not args.resume:
            raise ConfigError(f"--config is required (unless --resume reads DIR/{CONFIG})")
        config_path = out / CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"--resume without --config: {config_path} does not exist")
    else:
        config_path = find_config(args.config)
    load = load_saved_config if args.config is None else load_config
    cfg = load(config_path, args.overrides)
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


def add_pretrain_parser(sub: Any) -> None:
    """Add ``pretrain`` to an ``argparse`` subparsers object."""
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


def add_list_parser(sub: Any) -> None:
    """Add ``list`` to an ``argparse`` subparsers object."""
    p = sub.add_parser("list", help="list registered methods, maskers, teachers, ... and shipped configs")
    p.set_defaults(func=cmd_list)
