"""A run directory's single writer (:class:`RunLock`), starting a new run in it, and what a resume may change."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from semmim.run.files import CONFIG, ENCODER, LOCK, METRICS_JSONL, RESUME_MAY_CHANGE, RUN_FILES, ckpt_path


class RunFolderError(RuntimeError):
    """The run directory is in use, holds another run, or a resume would change what the run is."""


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


def check_new_run(out: Path, overwrite: bool) -> bool:
    """Refuse to start a new run in a folder holding another one, unless ``overwrite``; returns whether a previous
    run is there to be replaced (:func:`delete_previous_run`, once the new run has passed its checks).

    Raises:
        RunFolderError: ``out`` holds a run and ``overwrite`` is false.
    """
    if not holds_run(out):
        return False
    if not overwrite:
        raise RunFolderError(
            f"{out} already holds a run{_run_summary(out)}: continue it with --resume (resume=True), or replace it "
            "with --overwrite (overwrite=True), which deletes its checkpoints, metrics, TensorBoard logs, eval "
            "results and export"
        )
    return True


def delete_previous_run(out: Path) -> None:
    """Delete what a run writes in ``out`` (:data:`semmim.run.files.RUN_FILES`); other files stay."""
    for name in RUN_FILES:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    print(f"[semmim] --overwrite: deleted the previous run in {out}", flush=True)


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
