"""Supervised-only vs supervised + MIM (arXiv:2312.00950) on Fashion-MNIST, same budget, several seeds.

Both arms run the same `supmim` code path and config (configs/demo/supmim.yaml); the baseline sets
method.mim_weight=0. Each run is scored by the test top-1 of its classifier and by the weighted kNN
top-1 (k=20, T=0.07, CLS token) of its encoder. Writes results.json and results.md into --out.

    python benchmarks/supmim_fashion_mnist.py --out benchmarks/results/supmim_fmnist --steps 300 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/supmim_fmnist")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mim-weight", type=float, default=1.0)
    parser.add_argument("--knn-train", type=int, default=10000)
    parser.add_argument("--knn-test", type=int, default=2000)
    args = parser.parse_args()

    from semmim.config import find_config, load_config
    from semmim.engine import pretrain
    from semmim.eval.classify import classify_eval
    from semmim.eval.config import ClassifyConfig, KnnConfig
    from semmim.eval.knn import knn_eval

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for weight in (0.0, args.mim_weight):
            name = f"{'supmim' if weight else 'supervised'}_seed{seed}"
            done = out / name / "run.json"
            if done.is_file():  # finished earlier: reuse (delete the folder to run it again)
                runs.append(json.loads(done.read_text()))
                print(json.dumps(runs[-1]), flush=True)
                continue
            cfg = load_config(
                find_config("demo/supmim"),
                [
                    f"method.mim_weight={weight}",
                    f"trainer.seed={seed}",
                    f"trainer.max_steps={args.steps}",
                    "trainer.progress_bar=false",
                ],
            )
            t0 = time.perf_counter()
            result = pretrain(cfg, out / name, overwrite=True)  # an unfinished earlier try is replaced
            seconds = time.perf_counter() - t0
            top1 = classify_eval(out / name, ClassifyConfig(data="fashion_mnist", split="test"))["top1"]
            knn = knn_eval(out / name, KnnConfig(train_limit=args.knn_train, test_limit=args.knn_test))["top1"]
            runs.append(
                {
                    "name": name,
                    "seed": seed,
                    "mim_weight": weight,
                    "top1": top1,
                    "knn_top1": knn,
                    "final_loss": result.final_loss,
                    "seconds": seconds,
                    "images_per_s": result.images_per_s,
                }
            )
            done.write_text(json.dumps(runs[-1]))
            print(json.dumps(runs[-1]), flush=True)

    def summary(weight: float, key: str) -> tuple[float, float]:
        vals = [r[key] for r in runs if r["mim_weight"] == weight]
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    rows = []
    for weight, label in ((0.0, "supervised only"), (args.mim_weight, f"supervised + MIM (lambda={args.mim_weight})")):
        t_mean, t_std = summary(weight, "top1")
        k_mean, k_std = summary(weight, "knn_top1")
        rows.append({"arm": label, "top1_mean": t_mean, "top1_std": t_std, "knn_mean": k_mean, "knn_std": k_std})
    results = {"steps": args.steps, "seeds": args.seeds, "runs": runs, "summary": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"Fashion-MNIST, {args.steps} steps x batch 256 per run, seeds {args.seeds} (mean ± std)",
        "",
        "| arm | test top-1 (%) | kNN top-1 (%) |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {r['arm']} | {r['top1_mean']:.2f} ± {r['top1_std']:.2f} | {r['knn_mean']:.2f} ± {r['knn_std']:.2f} |"
        for r in rows
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
