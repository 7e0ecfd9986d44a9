"""``semmim report``: compare pretraining runs in a Markdown and a self-contained HTML report.

For every run directory (``config.yaml``, ``metrics.jsonl``, ``checkpoints/last.ckpt`` and
evaluations in ``eval/<protocol>/metrics.json``, as ``semmim eval <protocol> --encoder RUN`` writes
them) the report shows a config summary, a metrics table, training curves and, for masked image
modeling runs, pictures of what the model does (see :mod:`semmim.viz`).

Examples:
    >>> write_report(["runs/mae", "runs/milan"], "reports/cmp")  # doctest: +SKIP
    PosixPath('reports/cmp/report.md')
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semmim import run as rundir
from semmim.config import ConfigError, read_yaml_file
from semmim.viz import Picture, plot_curves, run_pictures

PathLike = str | os.PathLike[str]
MISSING = "–"

EVAL_COLUMNS: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (("knn",), "top1", "kNN top-1"),
    (("knn",), "top1_cls", "kNN top-1 (CLS)"),
    (("knn",), "top1_mean", "kNN top-1 (mean)"),
    (("linear",), "top1", "linear top-1"),
    (("finetune", "fine_tune"), "top1", "fine-tune top-1"),
    (("zeroshot", "zero_shot"), "top1", "zero-shot top-1"),
    (("lowshot", "low_shot"), "top1_1pct", "1% low-shot top-1"),
    (("lowshot", "low_shot"), "top1_10pct", "10% low-shot top-1"),
    (("seg", "segmentation"), "miou", "seg mIoU"),
)
"""(protocol folder names, metrics key, column header); a ``<key>_std`` value is shown as ``± std``."""

RECIPE_PROTOCOLS = ("finetune", "linear")
"""Protocols whose ``metrics.json`` names the recipe that produced it (``settings.recipe``): their columns
are split by recipe and say which (``linear top-1 (milan recipe)``)."""


@dataclass
class RunInfo:
    """What the report knows about one run directory."""

    name: str
    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    evals: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    pictures: list[Picture] = field(default_factory=list)


def _get(d: dict[str, Any], key: str, default: Any = None) -> Any:
    node: Any = d
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def load_run(path: PathLike, name: str | None = None) -> RunInfo:
    """Read a run directory's config, metrics and evaluations (no model is built).

    Raises:
        FileNotFoundError: the directory or its ``config.yaml`` does not exist.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"run directory not found: {p}")
    if not (p / rundir.CONFIG).is_file():
        raise FileNotFoundError(f"{p} is not a semmim run directory: it has no {rundir.CONFIG}")
    notes: list[str] = []
    try:  # the raw document, not validated: a report shows whatever a run left (semmim.run.load_run validates)
        config = read_yaml_file(p / rundir.CONFIG) or {}
    except ConfigError as e:  # too large, not YAML, or a billion-laughs document: report the rest of the run
        notes.append(f"{rundir.CONFIG} could not be read ({e})")
        config = {}
    if not isinstance(config, dict):
        config = {}
    rows: list[dict[str, Any]] = []
    if (p / rundir.METRICS_JSONL).is_file():
        from semmim.engine.metrics import read_metrics

        try:
            rows = sorted(read_metrics(p), key=lambda r: r.get("step") or 0)
        except ValueError as e:
            notes.append(f"metrics.jsonl could not be read ({e})")
    else:
        notes.append("no metrics.jsonl")
    evals: dict[str, dict[str, Any]] = {}
    for f in sorted((p / rundir.EVAL_DIR).glob("*/metrics.json")):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            notes.append(f"{f.relative_to(p)} could not be read ({e})")
            continue
        if isinstance(data, dict):
            evals[f.parent.name] = data
    return RunInfo(name or p.resolve().name, p, config, rows, evals, notes)


# ------------------------------------------------------------------ table
def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    for r in reversed(rows):
        if (v := _num(r.get(key))) is not None:
            return v
    return None


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [v for r in rows if (v := _num(r.get(key))) is not None]
    return sum(vals) / len(vals) if vals else None


def _duration(s: float | None) -> str:
    if s is None:
        return MISSING
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def teacher_of(config: dict[str, Any]) -> str:
    """A short description of a run's teacher ("–" when it has none)."""
    name = _get(config, "teacher.name")
    target = _get(config, "method.target")
    if not name or name == "none" or (isinstance(target, dict) and target.get("name") == "pixels"):
        return MISSING  # config validation refuses a teacher section that no part reads
    src = _get(config, "teacher.model") or _get(config, "teacher.path") or _get(config, "teacher.pretrained")
    return f"{name}: {Path(str(src)).name}" if src else str(name)


def recipe_of(data: dict[str, Any]) -> str | None:
    """The recipe an evaluation's ``metrics.json`` records (``settings.recipe``), or None (a protocol without
    recipes, or a file written before recipes existed)."""
    name = _get(data, "settings.recipe", data.get("recipe"))
    return str(name) if isinstance(name, str) and name else None


def eval_entries(info: RunInfo) -> dict[tuple[str, str | None], dict[str, Any]]:
    """A run's evaluations by (protocol folder, recipe).

    ``semmim eval`` saves a recipe other than ``default`` in ``eval/<protocol>_<recipe>`` (and a random
    baseline in ``..._random``); such a folder is filed under ``<protocol>`` (``<protocol>_random``) with its
    recipe, so the columns of one protocol are split by recipe rather than by folder name.
    """
    out: dict[tuple[str, str | None], dict[str, Any]] = {}
    for folder, data in info.evals.items():
        recipe = recipe_of(data)
        protocol = str(data.get("protocol", ""))
        name = folder
        if recipe is not None and protocol in RECIPE_PROTOCOLS and folder.startswith(f"{protocol}_{recipe}"):
            name = protocol + folder.removeprefix(f"{protocol}_{recipe}")
        out[(name, recipe)] = data
    return out


def _eval_value(
    info: RunInfo, protocols: tuple[str, ...], key: str, recipe: str | None = None
) -> tuple[float | None, float | None]:
    entries = eval_entries(info)
    for proto in protocols:
        data = entries.get((proto, recipe))
        if data is not None and _num(data.get(key)) is not None:
            return _num(data.get(key)), _num(data.get(f"{key}_std"))
    return None, None


def _with_recipe(label: str, recipe: str | None) -> str:
    return label if recipe is None else f"{label} ({recipe} recipe)"


def _recipes(runs: Sequence[RunInfo], protocols: tuple[str, ...]) -> list[str | None]:
    """The recipes some run has an evaluation of ``protocols`` with: None (not recorded), default, then A-Z."""
    seen = {rec for r in runs for (proto, rec) in eval_entries(r) if proto in protocols}
    return sorted(seen, key=lambda rec: (rec is not None, rec != "default", rec or ""))


def recipe_notes(info: RunInfo) -> list[str]:
    """One line per evaluation that records a recipe: its folder, recipe and the settings that depart from it."""
    notes = []
    for folder, data in sorted(info.evals.items()):
        recipe = recipe_of(data)
        if recipe is None:
            continue
        overrides = data.get("recipe_overrides")
        line = f"eval/{folder}: {data.get('protocol', folder)}, {recipe} recipe"
        if isinstance(overrides, dict) and overrides:
            line += "; overridden: " + ", ".join(f"{k}={v}" for k, v in sorted(overrides.items()))
        notes.append(line)
    return notes


def metrics_table(runs: Sequence[RunInfo]) -> tuple[list[str], list[list[str]]]:
    """Header and one row of strings per run (evaluation columns only where some run has a value)."""
    header = ["run", "method", "teacher", "steps", "final loss", "images/s", "data wait", "wall time"]
    lowshot = ("lowshot", "low_shot")
    fixed = {c[1] for c in EVAL_COLUMNS if c[0] == lowshot}
    extra = {  # low-shot fractions other than 1% and 10%
        key
        for r in runs
        for proto in lowshot
        for key in r.evals.get(proto, {})
        if re.fullmatch(r"top1_\d+(\.\d+)?pct", key) and key not in fixed
    }
    at = min(i for i, c in enumerate(EVAL_COLUMNS) if c[0] == lowshot)
    fractions = sorted(fixed | extra, key=lambda k: float(k[5:-3]))
    candidates = [c for c in EVAL_COLUMNS if c[0] != lowshot]
    candidates[at:at] = [(lowshot, k, f"{k[5:-3]}% low-shot top-1") for k in fractions]
    cols: list[tuple[tuple[str, ...], str, str, str | None]] = [
        (protos, key, _with_recipe(label, rec), rec)
        for protos, key, label in candidates
        for rec in _recipes(runs, protos)
        if any(_eval_value(r, protos, key, rec)[0] is not None for r in runs)
    ]
    known = {p for c in EVAL_COLUMNS for p in c[0]}
    others = sorted({e for r in runs for e in eval_entries(r) if e[0] not in known}, key=lambda e: (e[0], e[1] or ""))
    for proto, rec in others:  # other protocols: their headline number
        for key in ("top1", "miou"):
            if any(_eval_value(r, (proto,), key, rec)[0] is not None for r in runs):
                label = f"{proto} {'top-1' if key == 'top1' else 'mIoU'}"
                cols.append(((proto,), key, _with_recipe(label, rec), rec))
    header += [c[2] for c in cols]
    # training-time diagnostics, where some run logged them (feature targets; the online kNN monitor)
    logged = [
        (k, label)
        for k, label in (("target_explained", "target explained"), ("knn_top1", "online kNN top-1"))
        if any(_last(r.rows, k) is not None for r in runs)
    ]
    header += [label for _, label in logged]
    table = []
    for r in runs:
        steps, loss = _last(r.rows, "step"), _last(r.rows, "loss")
        ips, wait = _mean(r.rows, "images_per_s"), _mean(r.rows, "data_wait_frac")
        row = [
            r.name,
            str(_get(r.config, "method.name", MISSING)),
            teacher_of(r.config),
            str(int(steps)) if steps is not None else MISSING,
            f"{loss:.4g}" if loss is not None else MISSING,
            f"{ips:.1f}" if ips is not None else MISSING,
            f"{wait:.0%}" if wait is not None else MISSING,
            _duration(_last(r.rows, "elapsed_s")),
        ]
        for protos, key, _, rec in cols:
            v, std = _eval_value(r, protos, key, rec)
            row.append(MISSING if v is None else f"{v:.1f}" + (f" ± {std:.1f}" if std is not None else ""))
        for key, _ in logged:
            v = _last(r.rows, key)
            row.append(MISSING if v is None else (f"{v:.3f}" if key == "target_explained" else f"{v:.1f}"))
        table.append(row)
    return header, table


def config_summary(config: dict[str, Any]) -> str:
    """One line describing a run's method, model, data and schedule."""

    def g(key: str) -> Any:
        return _get(config, key)

    parts = [f"method {g('method.name')}"]
    masker = g("method.masker")
    if isinstance(masker, dict) and masker.get("name"):
        parts.append(f"masking {masker['name']} {masker.get('mask_ratio') or ''}".rstrip())
    parts.append(
        f"ViT {g('model.embed_dim')}d x {g('model.depth')} blocks, patch {g('model.patch_size')}, "
        f"{g('model.img_size')} px, {g('model.in_chans')} ch"
    )
    if (t := teacher_of(config)) != MISSING:
        parts.append(f"teacher {t}")
    data = f"data {g('data.name')}" + (f" ({g('data.root')})" if g("data.root") else "")
    parts.append(data + (f", limit {g('data.limit')}" if g("data.limit") else ""))
    lr = g("optim.lr")
    parts.append(
        f"batch {g('data.batch_size')}, " + (f"lr {lr:g}" if lr is not None else f"base_lr {g('optim.base_lr')}")
    )
    steps = g("trainer.max_steps")
    parts.append(f"{steps} steps" if steps is not None else f"{g('trainer.max_epochs')} epochs")
    return "; ".join(parts)


# ------------------------------------------------------------------ writing
def _stem(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"
    stem, i = base, 2
    while stem in taken:
        stem, i = f"{base}-{i}", i + 1
    taken.add(stem)
    return stem


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|")


def _markdown(title: str, runs: list[RunInfo], header: list[str], table: list[list[str]], curves: Path | None) -> str:
    out = [f"# {title}", "", "## Runs", ""]
    out += [f"- **{r.name}** (`{r.path}`): {config_summary(r.config)}" for r in runs]
    out += ["", "## Metrics", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table]
    out += [
        "",
        "Final loss = last logged training loss; images/s and data wait (share of step time spent waiting for "
        "data) are means over the logged steps; evaluation numbers are percentages from `eval/<protocol>/"
        f"metrics.json`; fine-tune and linear columns name the evaluation recipe that produced them (`semmim eval "
        f"--recipe`; no name: not recorded); {MISSING} = not available.",
        "",
    ]
    if curves is not None:
        out += ["## Training curves", "", f"![training curves]({curves.name})", ""]
        out += ["Training loss (log scale when positive), learning rate and throughput against the optimizer step.", ""]
    for r in runs:
        out += [f"## {r.name}", ""]
        out += [f"*{note}*" for note in r.notes] + ([""] if r.notes else [])
        recipes = recipe_notes(r)
        out += [f"- {line}" for line in recipes] + ([""] if recipes else [])
        for pic in r.pictures:
            out += [f"### {pic.title}", "", f"![{pic.title}]({pic.path.name})", "", pic.caption, ""]
    return "\n".join(out)


CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "th{background:#f3f3f3}td:first-child,th:first-child,td:nth-child(2),td:nth-child(3){text-align:left}"
    "img{max-width:100%}.note{color:#a33;font-style:italic}.caption{color:#444;max-width:60em}code{font-size:90%}"
)


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _html(title: str, runs: list[RunInfo], header: list[str], table: list[list[str]], curves: Path | None) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        f'<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{CSS}</style></head><body>',
        f"<h1>{e(title)}</h1>",
        "<h2>Runs</h2><ul>",
    ]
    out += [f"<li><b>{e(r.name)}</b> (<code>{e(str(r.path))}</code>): {e(config_summary(r.config))}</li>" for r in runs]
    out += ["</ul>", "<h2>Metrics</h2>", "<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header)]
    out += ["</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in table]
    out += [
        "</tbody></table>",
        "<p class='caption'>Final loss = last logged training loss; images/s and data wait (share of step time spent "
        "waiting for data) are means over the logged steps; evaluation numbers are percentages from "
        "<code>eval/&lt;protocol&gt;/metrics.json</code>; fine-tune and linear columns name the evaluation recipe "
        f"that produced them (<code>semmim eval --recipe</code>; no name: not recorded); {MISSING} = not "
        "available.</p>",
    ]
    if curves is not None:
        out += ["<h2>Training curves</h2>", _img_tag(curves, "training curves")]
        out += ["<p class='caption'>Training loss (log scale when positive), learning rate and throughput against "
                "the optimizer step.</p>"]  # fmt: skip
    for r in runs:
        out += [f"<h2>{e(r.name)}</h2>"] + [f"<p class='note'>{e(n)}</p>" for n in r.notes]
        recipes = recipe_notes(r)
        if recipes:
            out += ["<ul>", *[f"<li>{e(line)}</li>" for line in recipes], "</ul>"]
        for pic in r.pictures:
            out += [
                f"<h3>{e(pic.title)}</h3>",
                _img_tag(pic.path, pic.title),
                f"<p class='caption'>{e(pic.caption)}</p>",
            ]
    out += ["</body></html>", ""]
    return "\n".join(out)


def write_report(
    run_dirs: Sequence[PathLike],
    out: PathLike,
    title: str = "semmim report",
    num_images: int = 8,
    seed: int = 0,
    device: str | None = None,
    teachers: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``OUT/report.md`` and ``OUT/report.html`` (images embedded) comparing pretraining runs.

    ``teachers`` maps a run directory (as given in ``run_dirs``) to the Python teacher it was trained with
    (``semmim.pretrain(..., teacher=...)``), which the config alone cannot rebuild.

    ``OUT`` also receives the PNGs: ``curves.png`` and, per MIM run, ``<run>_reconstruction.png``
    (pixel targets), ``<run>_pca.png`` (feature targets) and ``<run>_semantic_mask.png`` (maskers
    driven by teacher attention). A run whose model cannot be rebuilt (missing checkpoint or teacher)
    gets a note instead of pictures.

    Args:
        run_dirs: run directories written by ``semmim pretrain``.
        out: output folder (created).
        title: report title.
        num_images: images per picture.
        seed: seed of the masks drawn for the pictures.
        device: torch device for the pictures; None = CUDA when available, else CPU.

    Returns:
        The path of ``report.md``.

    Raises:
        FileNotFoundError: a run directory or its ``config.yaml`` does not exist.
        ValueError: no run directory was given.
    """
    if not run_dirs:
        raise ValueError("give at least one run directory")
    runs = [load_run(p) for p in run_dirs]  # all checked before any work
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = {"curves", "report"}
    names = [r.name for r in runs]
    for r in runs:
        stem = _stem(r.name, taken)  # file prefix of the run's pictures
        if names.count(r.name) > 1:  # same folder name in different places: tell them apart
            r.name = stem
        teacher = None
        for key, value in (teachers or {}).items():
            if Path(key).resolve() == Path(r.path).resolve():
                teacher = value
        pictures, notes = run_pictures(
            r.path, out_dir, stem, num_images=num_images, seed=seed, device=device, teacher=teacher
        )
        r.pictures, r.notes = pictures, r.notes + notes
    curves = plot_curves({r.name: r.rows for r in runs}, out_dir / "curves.png")
    header, table = metrics_table(runs)
    md = out_dir / "report.md"
    md.write_text(_markdown(title, runs, header, table, curves))
    (out_dir / "report.html").write_text(_html(title, runs, header, table, curves))
    return md
