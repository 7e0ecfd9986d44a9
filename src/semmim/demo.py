"""``make demo``: the whole pipeline offline on Fashion-MNIST, on a CPU, in about a quarter hour.

1. teacher: a ``clip`` run aligns a small ViT with captions made from class-name templates, encoded
   by the offline all-MiniLM-L6-v2 text tower (locked) - a language-aligned teacher, as CLIP is for
   MILAN, trained here because no CLIP weights ship offline;
2. MAE, 3. MILAN (semantic-aware masking from the teacher's CLS attention, prompting decoder,
   cosine loss on the teacher's projected tokens) and 4. RILS (masked reconstruction in language
   space) pretrain the same student architecture for the same number of steps;
5. weighted kNN top-1 (DINO protocol), linear probe and linear-head segmentation mIoU of every encoder
   against the same architecture at random init, and zero-shot top-1 of the language-aligned runs;
6. ``report.md`` and ``results.json`` in the demo folder, and ``report/`` (``semmim report``: metrics,
   curves, reconstructions, feature PCA, semantic masks).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from semmim.config import find_config, load_config
from semmim.engine import pretrain
from semmim.eval.config import EvalDataConfig, KnnConfig, LinearConfig, SegConfig, ZeroshotConfig, provenance
from semmim.eval.knn import knn_eval
from semmim.eval.linear import linear_eval
from semmim.eval.seg import seg_eval
from semmim.eval.zeroshot import zeroshot_eval
from semmim.report import write_report
from semmim.run import EVAL_DIR

# full demo: stages sized for ~2 CPU cores (about 13 minutes); quick: a smoke test of every stage
BUDGET = {
    "full": {
        "teacher_steps": 250,
        "steps": 160,
        "knn_train": 10000,
        "knn_test": 2000,
        "zs_test": 2000,
        "linear_epochs": 30,
        "seg_train": 2000,
        "seg_test": 500,
        "seg_epochs": 3,
    },
    "quick": {
        "teacher_steps": 5,
        "steps": 5,
        "knn_train": 500,
        "knn_test": 200,
        "zs_test": 200,
        "linear_epochs": 2,
        "seg_train": 64,
        "seg_test": 32,
        "seg_epochs": 1,
    },
}


def _save_eval(
    run: Path, protocol: str, metrics: dict[str, Any], encoder: str | Path, cfg: EvalDataConfig
) -> dict[str, Any]:
    """Keep an evaluation where ``semmim report`` finds it: RUN/eval/<protocol>/metrics.json, with what it
    was measured on and its settings, as ``semmim eval`` records them."""
    folder = run / EVAL_DIR / protocol
    folder.mkdir(parents=True, exist_ok=True)
    key = "model" if isinstance(cfg, ZeroshotConfig) else "encoder"
    record = {**metrics, **provenance(cfg, encoder, key)}
    (folder / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    return metrics


def _fmt_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| encoder | kNN top-1, CLS (%) | kNN top-1, mean-pool (%) | linear top-1 (%) | seg mIoU (%) | "
        "zero-shot top-1 (%) | steps | final loss | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        loss = f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "-"
        zs = f"{r['zeroshot_top1']:.2f}" if r.get("zeroshot_top1") is not None else "-"
        lines.append(
            f"| {r['name']} | {r['top1_cls']:.2f} | {r['top1_mean']:.2f} | {r['linear_top1']:.2f} | "
            f"{r['seg_miou']:.2f} | {zs} | {r.get('steps', '-')} | {loss} | "
            f"{r.get('seconds', 0):.0f} |"
        )
    return "\n".join(lines)


def run_demo(out: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the demo into ``out`` and return the results (also written to results.json / report.md)."""
    budget = BUDGET["quick" if quick else "full"]
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    common = [f"trainer.seed={seed}"]
    if quick:
        common += ["data.limit=2048", "data.batch_size=64", "trainer.log_every_n_steps=1"]
    teacher_dir = out / "teacher"
    stages = [
        ("teacher", "clip", budget["teacher_steps"], []),
        ("mae", "mae", budget["steps"], []),
        ("milan", "milan", budget["steps"], [f"teacher.path={teacher_dir}"]),
        ("rils", "rils", budget["steps"], []),
    ]
    runs: dict[str, Any] = {}
    for i, (name, config, steps, extra) in enumerate(stages, start=1):
        what = "language-aligned teacher (clip, locked MiniLM text tower)" if name == "teacher" else name
        print(f"== {i}/{len(stages) + 1} {what}: {steps} steps", flush=True)
        cfg = load_config(find_config(f"demo/{config}"), [*common, f"trainer.max_steps={steps}", *extra])
        t0 = time.perf_counter()
        # the demo owns its folder: running it again replaces its runs
        runs[name] = (pretrain(cfg, out / name, overwrite=True), time.perf_counter() - t0)

    n_eval = len(stages) + 1
    print(f"== {n_eval}/{n_eval} evaluation: kNN (k=20, T=0.07; CLS and mean-pooled tokens), zero-shot", flush=True)
    knn_cfg = KnnConfig(train_limit=budget["knn_train"], test_limit=budget["knn_test"], num_workers=2, pool="both")
    lin_cfg = LinearConfig(
        train_limit=budget["knn_train"],
        test_limit=budget["knn_test"],
        num_workers=2,
        epochs=budget["linear_epochs"],
        optimizer="sgd",  # LARS is tuned for batch 16384 on ImageNet; SGD converges on 10k samples
    )
    seg_cfg = SegConfig(
        train_limit=budget["seg_train"],
        test_limit=budget["seg_test"],
        epochs=budget["seg_epochs"],
        batch_size=64,
        num_workers=2,
    )
    random_spec = f"random:{out / 'mae'}"
    base = out / "mae"  # the random-init baseline is saved next to MAE's results, as `semmim eval` saves it
    rows: list[dict[str, Any]] = [
        {
            "name": "random init",
            **_save_eval(base, "knn_random", knn_eval(random_spec, knn_cfg), random_spec, knn_cfg),
            "linear_top1": _save_eval(base, "linear_random", linear_eval(random_spec, lin_cfg), random_spec, lin_cfg)[
                "top1"
            ],
            "seg_miou": _save_eval(base, "seg_linear_random", seg_eval(random_spec, seg_cfg), random_spec, seg_cfg)[
                "miou"
            ],
        }
    ]
    for name in ("mae", "milan", "rils", "teacher"):
        result, seconds = runs[name]
        run = out / name
        row = {
            "name": "clip teacher" if name == "teacher" else name,
            **_save_eval(run, "knn", knn_eval(run, knn_cfg), run, knn_cfg),
            "linear_top1": _save_eval(run, "linear", linear_eval(run, lin_cfg), run, lin_cfg)["top1"],
            "seg_miou": _save_eval(run, "seg_linear", seg_eval(run, seg_cfg), run, seg_cfg)["miou"],
            "steps": result.steps,
            "final_loss": result.final_loss,
            "seconds": seconds,
            "images_per_s": result.images_per_s,
        }
        if name in ("rils", "teacher"):
            zs_cfg = ZeroshotConfig(limit=budget["zs_test"], num_workers=2)
            row["zeroshot_top1"] = _save_eval(run, "zeroshot", zeroshot_eval(run, zs_cfg), run, zs_cfg)["top1"]
        rows.append(row)
    print("== report: metrics, training curves, reconstructions, PCA of features, semantic masks", flush=True)
    report_path = write_report([out / n for n in ("mae", "milan", "rils", "teacher")], out / "report", seed=seed)
    total = time.perf_counter() - t_all
    results = {"rows": rows, "total_seconds": total, "budget": budget, "quick": quick}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = _fmt_table(rows)
    report = f"""# semmim demo report

Fashion-MNIST (offline, Debian package `dataset-fashion-mnist`), 28x28 grey images; captions from
class-name templates ("a photo of a sneaker.", ...), encoded by the offline all-MiniLM-L6-v2 (locked).

- teacher: `clip` run, ViT 4 blocks x 128 wide with 7x7 patches, {budget["teacher_steps"]} steps of batch 256;
- students: ViT 4 blocks x 128 wide, 4 heads, 4x4 patches (7x7 grid), {budget["steps"]} steps of batch 256
  each, same data order and seed: MAE (pixels), MILAN (the teacher's projected tokens as targets, its CLS
  attention for semantic-aware masking, tokens resampled from its 4x4 grid to the student's 7x7 grid),
  RILS (masked reconstruction in language space);
- kNN: weighted 20-NN (cosine, T=0.07) on the CLS token and on the mean of the patch tokens; memory
  bank = first {budget["knn_train"]} training images, first {budget["knn_test"]} test images;
- linear probe: BatchNorm + linear head on the frozen CLS token (MAE protocol, SGD), {budget["linear_epochs"]}
  epochs on the kNN memory bank;
- segmentation: Fashion-MNIST pixels labelled background / item class (11 classes), linear head on the
  frozen patch tokens, {budget["seg_epochs"]} epochs on {budget["seg_train"]} images, mIoU on {budget["seg_test"]};
- zero-shot: class prompts from the same templates, first {budget["zs_test"]} test images.

The full report with training curves, MAE reconstructions, PCA pictures of MILAN's predicted vs teacher
features and its semantic-aware masks is {report_path.name} / report.html in `report/`.

{table}

Total time: {total / 60:.1f} min on {os.cpu_count()} CPU core(s). Each run folder holds config.yaml,
metrics.jsonl, checkpoints/ and encoder.safetensors.
"""
    (out / "report.md").write_text(report)
    print()
    print(table)
    print(f"\nreport: {out / 'report.md'} and {report_path} (+ .html)  (total {total / 60:.1f} min)")
    return results
