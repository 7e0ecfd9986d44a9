"""The run directory: the names of its files, its single writer, what a resume may change, opening it.

One owner in three modules: :mod:`.files` (names; a leaf), :mod:`.folder` (guards), :mod:`.load` (opens).

A run directory holds one run::

    RUN/config.yaml               the resolved config (updated when a resume changes an allowed key)
    RUN/checkpoints/last.ckpt     model, optimizer, step, data position, checksum
    RUN/metrics.jsonl, .csv       one row per logged step
    RUN/events.jsonl              per-epoch bad-file counts, resumes and the changes they made
    RUN/tensorboard/              TensorBoard events
    RUN/encoder.safetensors       the timm-compatible export, at the end
    RUN/eval/<protocol>/          evaluation results (``semmim eval ...``)
    RUN/.semmim.lock              present while a process writes the run (pid, host, start time)

Only one process writes a run directory at a time (:class:`RunLock`); a new run is not started in a
folder that holds another one unless asked to replace it (:func:`check_new_run`; the old run is deleted
by :func:`delete_previous_run` once the new one has passed its checks), and a resume may
change only the keys in :data:`RESUME_MAY_CHANGE` (:func:`resume_changes`).
"""

from semmim.run.files import (
    CKPT_DIR,
    CONFIG,
    ENCODER,
    EVAL_DIR,
    EVENTS,
    LAST_CKPT,
    LOCK,
    METRICS_CSV,
    METRICS_JSONL,
    RESUME_MAY_CHANGE,
    RUN_FILES,
    TENSORBOARD,
    ckpt_path,
)
from semmim.run.folder import (
    RunFolderError,
    RunLock,
    check_new_run,
    delete_previous_run,
    holds_run,
    resume_changes,
)
from semmim.run.load import Run, load_run

__all__ = [
    "CKPT_DIR",
    "CONFIG",
    "ENCODER",
    "EVAL_DIR",
    "EVENTS",
    "LAST_CKPT",
    "LOCK",
    "METRICS_CSV",
    "METRICS_JSONL",
    "RESUME_MAY_CHANGE",
    "RUN_FILES",
    "TENSORBOARD",
    "Run",
    "RunFolderError",
    "RunLock",
    "check_new_run",
    "ckpt_path",
    "delete_previous_run",
    "holds_run",
    "load_run",
    "resume_changes",
]
