"""``make demo``: the whole pipeline offline on Fashion-MNIST, on a CPU, in minutes.

1. teacher: a small ViT trained with labels (no CLIP weights ship offline; this stands in for
   the CLIP teacher and is exported timm-compatible, then loaded back through the ``timm`` teacher);
2. MAE and 3. MILAN (semantic-aware masking from the teacher's CLS attention, prompting decoder,
   cosine loss on the teacher's tokens) pretrain the same student architecture for the same steps;
4. weighted kNN top-1 (DINO protocol) of each encoder vs the same architecture at random init;
5. ``report.md`` and ``results.json`` in the demo folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semmim.cli import resolve_config
from semmim.config import DataConfig, load_config
from semmim.data import ResumableSampler, build_dataset, build_loader
from semmim.engine import build_adamw, cosine_lr, pretrain
from semmim.eval.protocols import knn_eval
from semmim.export import ENCODER_FILE, save_encoder
from semmim.methods.base import build_encoder

# full demo: stages sized for ~2 CPU cores; quick: a smoke test of every stage
BUDGET = {
    "full": {"teacher_steps": 300, "steps": 300, "knn_train": 10000, "knn_test": 2000},
    "quick": {"teacher_steps": 5, "steps": 5, "knn_train": 500, "knn_test": 200},
}


def train_teacher(out: Path, steps: int, seed: int = 0) -> Path:
    """Train a small supervised ViT on Fashion-MNIST and export it (the demo's stand-in for CLIP).

    The teacher uses 7x7 patches (a 4x4 grid, 3x cheaper than the student's 7x7 grid of 4x4
    patches), so MILAN also exercises the resampling of teacher tokens and attention to the
    student's grid, as with a CLIP teacher of another patch size.
    """
    cfg = load_config(resolve_config("demo/mae"), [f"trainer.seed={seed}", "model.patch_size=7"])
    torch.manual_seed(seed)
    encoder = build_encoder(cfg)
    head = nn.Linear(encoder.embed_dim, 10)
    model = nn.ModuleDict({"encoder": encoder, "head": head})
    data_cfg = DataConfig(**{**vars(cfg.data), "crop_scale": [0.6, 1.0]})
    dataset = build_dataset(data_cfg, img_size=28, in_chans=1, train=True, seed=seed)
    sampler = ResumableSampler(len(dataset), seed=seed)
    loader = build_loader(dataset, batch_size=256, num_workers=2, pin_memory=False, sampler=sampler)
    opt = build_adamw(model, lr=2e-3, weight_decay=0.05, betas=(0.9, 0.999))
    mean = torch.tensor(cfg.data.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, -1, 1, 1)
    step, epoch, correct, seen = 0, 0, 0, 0
    model.train()
    while step < steps:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for batch in loader:
            for g in opt.param_groups:
                g["lr"] = cosine_lr(step, steps, min(50, steps // 10), 2e-3)
            logits = head(encoder.forward_features((batch["image"] - mean) / std)[:, 0])
            loss = F.cross_entropy(logits, batch["label"], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == batch["label"]).sum())
            seen += len(logits)
            step += 1
            if step % 50 == 0 or step == steps:
                print(f"[teacher] step {step}/{steps} loss {loss.item():.3f} train acc {100 * correct / seen:.1f}%")
                correct = seen = 0
            if step >= steps:
                break
        epoch += 1
    out.mkdir(parents=True, exist_ok=True)
    save_encoder(
        out / ENCODER_FILE,
        encoder.timm_state_dict(),
        encoder.timm_name,
        encoder.timm_kwargs(),
        extra={"method": "supervised", "mean": json.dumps(cfg.data.mean), "std": json.dumps(cfg.data.std)},
    )
    return out


def _fmt_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| encoder | kNN top-1, CLS (%) | kNN top-1, mean-pool (%) | steps | final loss | time (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        loss = f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "-"
        lines.append(
            f"| {r['name']} | {r['top1_cls']:.2f} | {r['top1_mean']:.2f} | {r.get('steps', '-')} | {loss} | "
            f"{r.get('seconds', 0):.0f} |"
        )
    return "\n".join(lines)


def run_demo(out: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the demo into ``out`` and return the results (also written to results.json / report.md)."""
    budget = BUDGET["quick" if quick else "full"]
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    common = [f"trainer.max_steps={budget['steps']}", f"trainer.seed={seed}"]
    if quick:
        common += ["data.limit=2048", "data.batch_size=64", "trainer.log_every_n_steps=1"]

    print("== 1/4 teacher: supervised ViT on Fashion-MNIST (stand-in for a CLIP teacher)")
    t0 = time.perf_counter()
    teacher_dir = train_teacher(out / "teacher", budget["teacher_steps"], seed)
    t_teacher = time.perf_counter() - t0

    runs: dict[str, Any] = {}
    for i, (name, extra) in enumerate((("mae", []), ("milan", [f"teacher.path={teacher_dir}"])), start=2):
        print(f"== {i}/4 {name}: pretraining {budget['steps']} steps")
        cfg = load_config(resolve_config(f"demo/{name}"), common + extra)
        t0 = time.perf_counter()
        runs[name] = (pretrain(cfg, out / name), time.perf_counter() - t0)

    print("== 4/4 kNN evaluation (k=20, T=0.07; CLS token and mean of patch tokens) on Fashion-MNIST test images")
    knn_kw: dict[str, Any] = {
        "train_limit": budget["knn_train"],
        "test_limit": budget["knn_test"],
        "num_workers": 2,
        "pool": "both",
    }
    rows: list[dict[str, Any]] = []
    rows.append({"name": "random init", **knn_eval(f"random:{out / 'mae'}", **knn_kw)})
    for name, (result, seconds) in runs.items():
        rows.append(
            {
                "name": name,
                **knn_eval(out / name, **knn_kw),
                "steps": result.steps,
                "final_loss": result.final_loss,
                "seconds": seconds,
                "images_per_s": result.images_per_s,
            }
        )
    rows.append({"name": "teacher (supervised, labels)", **knn_eval(teacher_dir, **knn_kw), "seconds": t_teacher})
    total = time.perf_counter() - t_all
    results = {"rows": rows, "total_seconds": total, "budget": budget, "quick": quick}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = _fmt_table(rows)
    report = f"""# semmim demo report

Fashion-MNIST (offline, Debian package `dataset-fashion-mnist`), 28x28 grey images.
Student: ViT 4 blocks x 128 wide, 4 heads, 4x4 patches (7x7 grid); {budget["steps"]} optimizer steps
of batch 256 per method, identical data order and seed. Teacher for MILAN: a ViT of the same width
with 7x7 patches trained {budget["teacher_steps"]} steps with labels (no CLIP weights ship offline),
exported timm-compatible and loaded through the `timm` teacher; MILAN uses its CLS attention for
semantic-aware masking and its tokens (resampled to the student's grid) as targets.

kNN: weighted 20-NN (cosine, temperature 0.07) on the CLS token and on the mean of the patch
tokens; memory bank = first {budget["knn_train"]} training images, evaluated on the first
{budget["knn_test"]} test images.

{table}

Total time: {total / 60:.1f} min. Runs: `mae/`, `milan/` (config.yaml, metrics.jsonl, checkpoints,
encoder.safetensors), `teacher/encoder.safetensors`.
"""
    (out / "report.md").write_text(report)
    print()
    print(table)
    print(f"\nreport: {out / 'report.md'}  (total {total / 60:.1f} min)")
    return results
