"""Batches per second of torchdata's StatefulDataLoader against torch's DataLoader, in one process.

Both loaders read the same dataset in the same DistributedSampler order (batch 32, drop_last, non-persistent
workers). ``tiny`` is a dataset whose items cost almost nothing (a stored (3, 16, 16) tensor), so the loader's
own cost shows; ``semmim`` is ``SeededDataset(SyntheticDataset)`` with the pretraining transform at 32 px.
``state_dict`` times one ``loader.state_dict()`` mid-epoch (what a checkpoint adds).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/loader_overhead.py --out benchmarks/results/loader_overhead

writes ``results.json`` and ``results.md`` in ``--out`` (rows are also printed as JSON lines).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from semmim.data import SeededDataset, SyntheticDataset, build_loader, pretrain_transform, train_sampler


class Tiny(Dataset[dict[str, Any]]):
    def __init__(self, n: int) -> None:
        self.images = torch.rand(n, 3, 16, 16)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "index": i}


def plain(ds: Dataset[Any], workers: int) -> tuple[DataLoader[Any], DistributedSampler[Any]]:
    sampler: DistributedSampler[Any] = DistributedSampler(
        ds, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True
    )
    loader = DataLoader(ds, batch_size=32, sampler=sampler, num_workers=workers, drop_last=True)
    return loader, sampler


def stateful(ds: Dataset[Any], workers: int) -> tuple[Any, Any]:
    sampler = train_sampler(ds, seed=0)  # type: ignore[arg-type]
    return build_loader(ds, batch_size=32, num_workers=workers, pin_memory=False, sampler=sampler), sampler


def rate(make: Any, ds: Dataset[Any], workers: int, epochs: int) -> dict[str, float]:
    loader, sampler = make(ds, workers)
    batches, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for _ in loader:
            batches += 1
    out = {"batches_per_s": batches / (time.perf_counter() - t0)}
    if hasattr(loader, "state_dict"):
        it = iter(loader)
        next(it)
        t1 = time.perf_counter()
        for _ in range(100):
            loader.state_dict()
        out["state_dict_ms"] = (time.perf_counter() - t1) * 10
        del it
    return out


def write_report(rows: list[dict[str, Any]], out: Path, command: str) -> None:
    """``results.json`` and a Markdown table in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "platform": platform.platform(), "cpus": os.cpu_count(), "command": command}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# StatefulDataLoader vs DataLoader: batches/s in one process",
        "",
        f"Produced by `{command}` (torch {meta['torch']}, {meta['cpus']} CPUs, shared machine: best of the repeats,",
        "loaders interleaved). `tiny`: stored 3x16x16 tensors (the loader's own cost); `semmim`: SeededDataset of",
        "synthetic images with the 32 px pretraining transform. Ratio = StatefulDataLoader / DataLoader.",
        "",
        "| data | workers | DataLoader batches/s | StatefulDataLoader batches/s | ratio | state_dict() ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['workers']} | {r['DataLoader_batches_per_s']} | "
            f"{r['StatefulDataLoader_batches_per_s']} | {r['ratio']:.2f} | {r['state_dict_ms']} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny-size", type=int, default=4096, help="items of the tiny dataset")
    parser.add_argument("--semmim-size", type=int, default=1024, help="items of the augmented dataset")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json / results.md")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    data = {
        "tiny": Tiny(args.tiny_size),
        "semmim": SeededDataset(
            SyntheticDataset(args.semmim_size, img_size=40, seed=0), seed=0, transform=pretrain_transform(32)
        ),
    }
    rows: list[dict[str, Any]] = []
    for name, ds in data.items():
        for workers in (0, 2):
            best: dict[str, dict[str, float]] = {}
            for _ in range(args.repeats):  # interleaved, best of repeats: the machine is shared
                for label, make in (("DataLoader", plain), ("StatefulDataLoader", stateful)):
                    r = rate(make, ds, workers, args.epochs)
                    if label not in best or r["batches_per_s"] > best[label]["batches_per_s"]:
                        best[label] = r
            a, b = best["DataLoader"]["batches_per_s"], best["StatefulDataLoader"]["batches_per_s"]
            row = {
                "data": name,
                "workers": workers,
                "DataLoader_batches_per_s": round(a, 1),
                "StatefulDataLoader_batches_per_s": round(b, 1),
                "ratio": round(b / a, 3),
                "state_dict_ms": round(best["StatefulDataLoader"]["state_dict_ms"], 3),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out is not None:
        argv_text = " ".join(sys.argv[1:] if argv is None else argv)
        write_report(rows, args.out, f"OMP_NUM_THREADS=1 python benchmarks/loader_overhead.py {argv_text}".strip())


if __name__ == "__main__":
    main()
