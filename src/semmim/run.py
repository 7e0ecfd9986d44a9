"""The run directory: the names of its files, its single writer, and what a resume may change.

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
folder that holds another one unless asked to replace it (:func:`prepare_new_run`), and a resume may
change only the keys in :data:`RESUME_MAY_CHANGE` (:func:`resume_changes`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from semmim.config import Config
    from semmim.methods.base import Method

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


class RunFolderError(RuntimeError):
    """The run directory is in use, holds another run, or a resume would change what the run is."""


def ckpt_path(out: Path) -> Path:
    return out / CKPT_DIR / LAST_CKPT


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds (the start of) a semmim run."""
    return ckpt_path(out).is_file() or any((out / name).exists() for name in (CONFIG, METRICS_JSONL, ENCODER))


def _run_summary(out: Path) -> str:
    bits = []
    metrics = out / METRICS_JSONL
    if metrics.is_file():
        try:
            lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
            if lines:
                bits.append(f"logged up to step {json.loads(lines[-1]).get('step')}")
        except (OSError, ValueError):
            pass
    if (out / ENCODER).is_file():
        bits.append("finished, with an exported encoder")
    elif ckpt_path(out).is_file():
        bits.append("with a checkpoint")
    return f" ({', '.join(bits)})" if bits else ""


def prepare_new_run(out: Path, overwrite: bool) -> None:
    """Refuse to start a new run in a folder holding another one, unless ``overwrite`` deletes it.

    Raises:
        RunFolderError: ``out`` holds a run and ``overwrite`` is false.
    """
    if not holds_run(out):
        return
    if not overwrite:
        raise RunFolderError(
            f"{out} already holds a run{_run_summary(out)}: continue it with --resume (resume=True), or replace it "
            "with --overwrite (overwrite=True), which deletes its checkpoints, metrics, TensorBoard logs, eval "
            "results and export"
        )
    for name in RUN_FILES:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    print(f"[semmim] --overwrite: deleted the previous run in {out}", flush=True)


@dataclass
class Run:
    """A run directory opened for reading: its resolved config and how to rebuild its method and teacher.

    Get one with :func:`load_run`. A run trained with a teacher passed from Python (``teacher.name=module``)
    needs that same teacher again: pass it as ``teacher=`` to the builders.
    """

    path: Path
    cfg: Config

    @property
    def ckpt(self) -> Path:
        """``checkpoints/last.ckpt`` (it may not exist: a run that has not saved yet)."""
        return ckpt_path(self.path)

    @property
    def encoder(self) -> Path:
        """``encoder.safetensors`` (written at the end of the run)."""
        return self.path / ENCODER

    def build_teacher(self, teacher: nn.Module | None = None) -> nn.Module | None:
        """The run's teacher as its config names it (``teacher``: the Python one); None when it has none."""
        from semmim.methods.base import build_teacher

        t = self.cfg.teacher
        if teacher is None and (not t.name or t.name == "none"):
            return None
        return build_teacher(self.cfg, teacher)

    def build_method(self, teacher: nn.Module | None = None) -> Method:
        """The run's method with fresh weights, as its config describes it."""
        from semmim.methods import build_method

        return build_method(self.cfg, teacher=teacher)

    def load_method(self, device: torch.device | str = "cpu", teacher: nn.Module | None = None) -> Method:
        """The run's method with the weights of ``last.ckpt`` (strict), one masked view per image, in eval mode.

        Raises:
            FileNotFoundError: the run has no checkpoint.
        """
        from semmim.engine.checkpoint import load_verified

        if not self.ckpt.is_file():
            raise FileNotFoundError(f"no checkpoint at {self.ckpt}")
        method = self.build_method(teacher)
        method.num_masks = 1  # one masked view per shown image, whatever the run trained with
        state = load_verified(self.ckpt, required_keys=("model",))["model"]
        if not isinstance(state, dict):
            raise ValueError(f"checkpoint {self.ckpt}: its 'model' entry is a {type(state).__name__}, not a state dict")
        state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
        method.load_state_dict(state, strict=True)
        return method.to(device).eval()


def load_run(run_dir: str | os.PathLike[str]) -> Run:
    """Open the run directory ``run_dir``: its resolved ``config.yaml`` (validated) and helpers to rebuild it.

    Raises:
        FileNotFoundError: ``run_dir`` or its ``config.yaml`` does not exist.
        ConfigError: the config cannot be read or is invalid.
    """
    from semmim.config import load_config

    p = Path(run_dir)
    if not p.is_dir():
        raise FileNotFoundError(f"run directory not found: {p}")
    if not (p / CONFIG).is_file():
        raise FileNotFoundError(f"{p} is not a semmim run directory: it has no {CONFIG}")
    return Run(p, load_config(p / CONFIG))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, key + "."))
        else:
            flat[key] = v
    return flat


def resume_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The keys whose values differ between the run's saved config and the resume's config.

    Returns:
        ``{key: (old, new)}`` for the allowed changes (:data:`RESUME_MAY_CHANGE`).

    Raises:
        RunFolderError: a key outside :data:`RESUME_MAY_CHANGE` differs; the message lists every such key.
    """
    a, b = _flatten(saved), _flatten(new)
    changed = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    refused = {k: v for k, v in changed.items() if k not in RESUME_MAY_CHANGE}
    if refused:
        what = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise RunFolderError(
            f"--resume cannot change what the run is ({what}): start a new run in another folder (or with "
            f"--overwrite). A resume may change only {', '.join(sorted(RESUME_MAY_CHANGE))}"
        )
    return changed


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


class RunLock:
    """An exclusive lock on a run directory, held by the one process that writes it.

    The lock is ``DIR/.semmim.lock``, locked with ``flock`` and holding the owner's pid, host, process
    start time and command line. The kernel drops the ``flock`` when the owner exits, however it exits
    (SIGKILL included), so a lock file left by a dead run is stale and is taken over with a note; a live
    owner makes :meth:`acquire` fail with its pid and host. Use it as a context manager
    (``with RunLock(out): ...``) or with :meth:`acquire` / :meth:`release`.
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK
        self._fd: int | None = None

    def _owner(self) -> dict[str, Any]:
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return owner if isinstance(owner, dict) else {}

    def acquire(self) -> None:
        import fcntl

        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                o = self._owner()
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(o["time"])) if "time" in o else "?"
                raise RunFolderError(
                    f"{self.out} is being written by another semmim process (pid {o.get('pid', '?')} on host "
                    f"{o.get('host', '?')}, since {since}): wait for it to end or stop it, or choose another --out"
                ) from None
            # the file may have been removed (by an owner releasing it) between open and flock: retry
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = self._owner()
            if previous.get("pid"):
                print(
                    f"[semmim] taking over the stale lock {self.path} of process {previous.get('pid')} on "
                    f"{previous.get('host', '?')}, which has ended",
                    flush=True,
                )
            me = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "process_start": _process_start(os.getpid()),
                "time": time.time(),
                "argv": sys.argv,
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            self._fd = fd
            return
        raise RunFolderError(f"could not lock {self.path}: it keeps being replaced by another process")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
