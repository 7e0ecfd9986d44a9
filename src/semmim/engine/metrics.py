"""Metric files of a run: ``metrics.jsonl`` (one JSON object per logged step) and ``metrics.csv``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from semmim.run.files import METRICS_CSV, METRICS_JSONL


class MetricsWriter:
    """Append rows to ``DIR/metrics.jsonl`` and ``DIR/metrics.csv`` (rank 0 only).

    On resume, rows at or after the resumed step are dropped first so the files never hold a step twice.
    """

    CSV_FIELDS = ("step", "epoch", "loss", "lr", "images_per_s", "data_wait_frac", "elapsed_s")

    def __init__(self, out_dir: Path, enabled: bool = True, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.jsonl = out_dir / METRICS_JSONL
        self.csv = out_dir / METRICS_CSV
        if not enabled:
            return
        if resume_step is None:
            for p in (self.jsonl, self.csv):
                p.unlink(missing_ok=True)
        else:
            self._truncate(resume_step)
        if not self.csv.exists():
            with self.csv.open("w", newline="") as f:
                csv.writer(f).writerow(self.CSV_FIELDS)

    def _truncate(self, step: int) -> None:
        if self.jsonl.exists():
            rows = [r for r in read_metrics(self.jsonl) if int(r.get("step", 0)) <= step]
            self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
            with self.csv.open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(self.CSV_FIELDS)
                for r in rows:
                    w.writerow([r.get(k, "") for k in self.CSV_FIELDS])

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with self.jsonl.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        with self.csv.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self.CSV_FIELDS])

    def note(self, row: dict[str, Any]) -> None:
        """Append an event (not a training step) to ``events.jsonl``, e.g. the unreadable files of an epoch."""
        if not self.enabled:
            return
        with (self.jsonl.parent / "events.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` file (a run directory is accepted)."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_JSONL
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
