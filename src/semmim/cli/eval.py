"""``semmim eval <protocol>``: kNN, linear probe, fine-tuning, low-shot, segmentation, classifier and
zero-shot evaluation.

``semmim eval <protocol> --encoder X [--config eval.yaml] [key=value ...]``: each protocol's settings are
its typed config (:mod:`semmim.eval.config`), read like a pretraining config: the YAML file (with its
``base:`` files), then the flags (``--train-limit 64`` is shorthand for ``train_limit=64``; every key has
one), then ``key=value`` overrides. ``--show`` prints the resolved config with every key's help.

Every ``metrics.json`` records what it was measured on (``measured_on``: the encoder, the dataset, its
root and the split limits) and how (``settings``: every other config key, all but the plumbing ones
``num_workers``, ``cache_dir``, ``device`` and ``encoder_batch_size``) and, for ``finetune`` and ``linear``, the
settings that depart from the recipe (``recipe_overrides``). A run directory's results go to
``RUN/eval/<protocol>/`` (``RUN/eval/<protocol>_<recipe>/`` for a recipe other than ``default``, so several
recipes sit side by side); a ``random:RUN`` baseline's to ``RUN/eval/<protocol>_random/``
(``<protocol>_<recipe>_random``), where ``semmim report`` finds them all.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from semmim.eval.config import (
    DEFAULT_DATA,
    EVAL_CONFIGS,
    RANDOM_PREFIX,
    EvalDataConfig,
    choices_of,
    data_choices,
    explain_eval_config,
    load_eval_config,
    provenance,
)
from semmim.eval.recipes import DEFAULT_RECIPE, RECIPE_KEY, recipe_names
from semmim.run import EVAL_DIR

__all__ = [
    "DEFAULT_DATA",
    "add_eval_parser",
    "default_eval_out",
    "emit_metrics",
    "eval_config_from_args",
    "eval_folder",
    "provenance",
]

RANDOM_SUFFIX = "_random"
"""``random:RUN`` results are saved in ``RUN/eval/<protocol>_random``."""

KEY_PREFIX = "key_"
"""Namespace prefix of the flags that set config keys (``--train-limit`` -> ``key_train_limit``)."""

PROTOCOLS: dict[str, tuple[str, str, str]] = {
    "knn": ("weighted kNN top-1 on frozen features (DINO protocol)", "encoder", ""),
    "linear": ("linear probe on frozen features (MAE protocol: BatchNorm + linear, LARS)", "encoder", ""),
    "finetune": ("end-to-end fine-tuning (layer decay, drop path, mixup/cutmix, RandAugment)", "encoder", ""),
    "lowshot": ("linear probe or fine-tuning on 1%% / 10%% of the labels, several seeds", "encoder", ""),
    "seg": ("semantic segmentation (frozen quick protocol or fine-tuned UperNet), mIoU", "encoder", ""),
    "classify": (
        "top-1/top-5 of an exported classifier (supmim's classifier.safetensors)",
        "model",
        "run directory or classifier.safetensors",
    ),
    "zeroshot": (
        "zero-shot top-1 of a language-aligned run (clip, rils) with class prompts",
        "model",
        "run directory of a clip or rils run",
    ),
}
"""Each protocol: its one-line help, what it evaluates (``--encoder`` or ``--model``) and that flag's help."""

ENCODER_HELP = "run directory or encoder.safetensors ('random:RUN' = random init)"

LEGACY_FLAGS: dict[str, tuple[str, ...]] = {
    "knn": ("seed",),
    "lowshot": ("seed",),
    "finetune": ("cache_dir",),
    "seg": ("cache_dir",),
}
"""Flags older command lines passed that set nothing in the protocol's config: accepted with a note."""


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


def eval_folder(protocol: str, cfg: Any) -> str:
    """The name of a protocol's results folder in ``RUN/eval``: ``seg_<head>[_finetune]`` for segmentation,
    ``<protocol>_<recipe>`` for a recipe other than ``default``, else the protocol."""
    if protocol == "seg":
        from semmim.eval.seg import seg_result_name

        return seg_result_name(cfg)
    recipe = getattr(cfg, RECIPE_KEY, DEFAULT_RECIPE)
    return protocol if recipe == DEFAULT_RECIPE else f"{protocol}_{recipe}"


def emit_metrics(metrics: dict[str, Any], out: str | None, record: dict[str, Any] | None = None) -> int:
    """Print an evaluation's metrics (with ``record``, its :func:`provenance`) and write them to OUT/metrics.json."""
    if record is not None:
        metrics = {**metrics, **record}
    text = json.dumps(metrics, indent=2)
    print(text)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.json").write_text(text + "\n")
        print(f"wrote {Path(out) / 'metrics.json'}", file=sys.stderr)
    return 0


def eval_config_from_args(args: argparse.Namespace) -> EvalDataConfig:
    """The protocol's config from a parsed ``semmim eval <protocol>`` command line: ``--config``, then the
    key flags, then the ``key=value`` overrides.

    Raises:
        ConfigError: one line naming the wrong key (``--root`` without ``--data`` included).
    """
    flags = {k.removeprefix(KEY_PREFIX): v for k, v in vars(args).items() if k.startswith(KEY_PREFIX)}
    for name in LEGACY_FLAGS.get(args.protocol, ()):
        if getattr(args, f"legacy_{name}", None) is not None:
            print(
                f"semmim eval {args.protocol}: note: --{name.replace('_', '-')} has no effect here",
                file=sys.stderr,
            )
    overrides = [*(args.overrides or ()), *(getattr(args, "trailing_overrides", None) or ())]
    return load_eval_config(args.protocol, args.config, overrides, extra=flags)


def _run(protocol: str, target: str, cfg: Any, out: str | None) -> dict[str, Any]:
    """Run ``protocol`` on ``target`` (its encoder or model) with ``cfg``."""
    if protocol == "knn":
        from semmim.eval.knn import knn_eval

        return knn_eval(target, cfg)
    if protocol == "linear":
        from semmim.eval.linear import linear_eval

        return linear_eval(target, cfg)
    if protocol == "finetune":
        from semmim.eval.finetune import finetune_eval

        return finetune_eval(target, cfg, out=out)
    if protocol == "lowshot":
        from semmim.eval.lowshot import lowshot_eval

        return lowshot_eval(target, cfg)
    if protocol == "seg":
        from semmim.eval.seg import seg_eval

        return seg_eval(target, cfg)
    if protocol == "classify":
        from semmim.eval.classify import classify_eval

        return classify_eval(target, cfg)
    from semmim.eval.zeroshot import zeroshot_eval

    return zeroshot_eval(target, cfg)


def cmd_eval(args: argparse.Namespace) -> int:
    """``semmim eval <protocol>``: resolve the config (all checks before any work), run, record."""
    protocol = args.protocol
    cfg = eval_config_from_args(args)
    if args.show:
        print(explain_eval_config(cfg), end="")
        return 0
    key = PROTOCOLS[protocol][1]
    target = getattr(args, key)
    if target is None:
        raise ValueError(f"--{key} is required (or --show to print the resolved config)")
    out = args.out
    if out is None and key == "encoder":
        out = default_eval_out(target, eval_folder(protocol, cfg))
    metrics = _run(protocol, target, cfg, out)
    return emit_metrics(metrics, out, provenance(cfg, target, key))


# ------------------------------------------------------------------ the parser
def _flag_kind(tp: Any) -> tuple[str, Any]:
    """``("bool" | "list" | "scalar", element type)`` of a config annotation (``None`` stripped)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        tp = args[0]
    if tp is bool:
        return "bool", bool
    if typing.get_origin(tp) is list:
        return "list", (typing.get_args(tp) or (str,))[0]
    return "scalar", tp if tp in (int, float, str) else str


def _fmt_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value) if value != "" else "''"


class _ProtocolParser(argparse.ArgumentParser):
    """A protocol's parser: ``key=value`` words anywhere on the line are overrides (argparse alone takes
    positionals only in one run, so ``k=3 --pool both train_limit=5`` would leave the last unrecognised)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Any = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = super().parse_known_args(args, namespace)
        overrides = [a for a in extras if "=" in a and not a.startswith("-")]
        if overrides:
            ns.trailing_overrides = [*(getattr(ns, "trailing_overrides", None) or []), *overrides]
            extras = [a for a in extras if a not in overrides]
        return ns, extras


class _ListFlag(argparse.Action):
    """A flag taking several values (``--fractions 0.01 0.1``); trailing ``key=value`` words it swallowed
    are handed on as overrides."""

    def __init__(self, *args: Any, elem_type: Any = str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.elem_type = elem_type

    def __call__(
        self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        items = list(values)
        trailing: list[str] = []
        while items and "=" in items[-1]:
            trailing.insert(0, items.pop())
        if not items:
            parser.error(f"argument {option}: expected at least one value before {trailing[0]}")
        try:
            setattr(ns, self.dest, [self.elem_type(v) for v in items])
        except ValueError as e:
            parser.error(f"argument {option}: {e}")
        ns.trailing_overrides = [*(getattr(ns, "trailing_overrides", None) or []), *trailing]


def _add_key_flags(p: argparse.ArgumentParser, cls: type[EvalDataConfig], protocol: str) -> None:
    """One flag per config key: ``--train-limit N`` sets ``train_limit`` (help = the key's docstring + default;
    ``--recipe`` also lists the protocol's recipes, which are checked with the config, not by argparse)."""
    from semmim.config import field_docs

    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    defaults = cls()
    group = p.add_argument_group("config keys (each flag is shorthand for key=value)")
    for f in fields(cls):
        default = getattr(defaults, f.name)
        doc = docs.get(f.name, "")
        if f.name == RECIPE_KEY:
            doc = f"Paper preset under every other setting: one of {', '.join(recipe_names(protocol))}."
        help_text = f"{doc} (default: {_fmt_default(default)})".replace("%", "%%").strip()
        kind, elem = _flag_kind(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": KEY_PREFIX + f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        allowed = choices_of(cls, f.name)
        if allowed is not None:
            kw["choices"] = list(allowed)
        else:
            kw["metavar"] = f.name.upper()
        if kind == "list":  # a key=value after the list's values is an override, not an element
            group.add_argument(flag, nargs="+", action=_ListFlag, elem_type=elem, **kw)
            continue
        group.add_argument(flag, type=elem, **kw)


def add_eval_parser(sub: Any) -> None:
    """Add ``eval`` with its protocols to an ``argparse`` subparsers object."""
    p = sub.add_parser(
        "eval",
        help="evaluate an encoder",
        description="Evaluation protocols. `semmim eval <protocol> --help` lists every config key with its "
        "default; `--show` prints the resolved config.",
    )
    esub = p.add_subparsers(dest="protocol", metavar="protocol", parser_class=_ProtocolParser)
    for protocol, (help_text, key, key_help) in PROTOCOLS.items():
        cls = EVAL_CONFIGS[protocol]
        names = "|".join(data_choices(cls))
        recipes = recipe_names(protocol)
        layers = f"the recipe's values (--recipe {'|'.join(recipes)}), then " if recipes else ""
        sp = esub.add_parser(
            protocol,
            help=help_text,
            description=f"{help_text.replace('%%', '%')}.\n\nSettings: {layers}a YAML file (--config, with base: "
            "files), then the flags below, then key=value overrides. "
            f"--root needs --data ({names}).",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sp.add_argument(f"--{key}", default=None, help=key_help or ENCODER_HELP)
        sp.add_argument(
            "--config",
            default=None,
            help="YAML eval config: the protocol's keys at the top level, `base:` files allowed (a path or a "
            "shipped name)",
        )
        out_help = "write metrics.json here"
        if key == "encoder":
            suffix = "[_<recipe>]" if recipes else ""
            out_help += (
                f" (default: RUN/eval/<protocol>{suffix} for a run dir, RUN/eval/<protocol>{suffix}_random for "
                "random:RUN" + ("; the recipe is named unless it is default)" if recipes else ")")
            )
        sp.add_argument("--out", default=None, help=out_help)
        sp.add_argument("--show", action="store_true", help="print the resolved config with every key's help and exit")
        sp.add_argument(
            "overrides", nargs="*", metavar="key=value", help="config overrides (e.g. k=10 train_limit=1000)"
        )
        _add_key_flags(sp, cls, protocol)
        if protocol == "seg":  # the old switch, refused with the way to the recipe (resolve_eval_config)
            sp.add_argument(
                "--finetune",
                dest=KEY_PREFIX + "finetune",
                action="store_true",
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
        for name in LEGACY_FLAGS.get(protocol, ()):
            sp.add_argument(
                "--" + name.replace("_", "-"),
                dest=f"legacy_{name}",
                metavar=name.upper(),
                default=None,
                help=f"accepted for older command lines; {protocol} does not use it",
            )
        sp.set_defaults(func=cmd_eval)
