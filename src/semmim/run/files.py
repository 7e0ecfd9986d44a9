"""The names of a run directory's files (a leaf module: every other module may import it).

See :mod:`semmim.run` for what each holds.
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"
CKPT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
EVENTS = "events.jsonl"
TENSORBOARD = "tensorboard"
ENCODER = "encoder.safetensors"
EVAL_DIR = "eval"
LOCK = ".semmim.lock"

RUN_FILES = (CONFIG, CKPT_DIR, METRICS_JSONL, METRICS_CSV, EVENTS, TENSORBOARD, ENCODER, EVAL_DIR)
"""What ``--overwrite`` deletes: everything a run writes. Other files in the folder are left alone."""

RESUME_MAY_CHANGE = frozenset(
    {
        "trainer.max_steps",
        "trainer.max_epochs",
        "trainer.log_every_n_steps",
        "trainer.ckpt_every_n_steps",
        "trainer.progress_bar",
        "trainer.max_nonfinite_steps",
        "data.num_workers",
        "data.pin_memory",
        "data.max_bad_fraction",
    }
)
"""Keys a ``--resume`` may change: how long the run goes on and how it is logged, checkpointed and fed.
Every other key (lr, seed, batch size, mask ratio, data, model, ...) defines the run and is fixed."""


def ckpt_path(out: Path) -> Path:
    return out / CKPT_DIR / LAST_CKPT
