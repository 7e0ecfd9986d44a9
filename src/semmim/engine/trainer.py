"""The pretraining engine: Lightning Fabric runs ``method(batch)["loss"]`` on 1..N devices.

Fabric gives distributed launch (DDP on one or many nodes, torchrun and SLURM environments are
detected), mixed precision and checkpoint I/O; the loop itself is ours so that every step is
reproducible: everything random in optimizer step ``s`` (masks, drop path, augmentation) is a
function of ``(seed, rank, s)`` and the data order of ``(seed, epoch)``, which makes ``--resume``
continue exactly where a run stopped.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset

from semmim import run as rundir
from semmim.config import Config, ConfigError, load_saved_config, to_dict, to_yaml
from semmim.data.badfiles import DataError, EpochBadFiles, one_line_error
from semmim.engine.checkpoint import CheckpointError, ChecksummedCheckpointIO
from semmim.engine.data_state import BAD_FILES_KEY, LOADER_KEY, ResumePosition, gather_loader_states, resume_position
from semmim.engine.metrics import MetricsWriter
from semmim.engine.optim import build_adamw, clamp_warmup, cosine_lr, scaled_lr, set_lr

INPUT_BOUND_FRACTION = 0.25
"""A run that waits for data more than this share of the time is reported as input-bound."""

EXPLAINED_WARN = 0.05
"""A feature-target run whose ``target_explained`` stays under this for 3 log steps after warmup is warned
about: the student then predicts little more than the teacher's average token."""


def input_bound_message(wait_frac: float, data: Any) -> str:
    """The one-time note for an input-bound run, suggesting only the speed-ups the data config does not use yet.

    Examples:
        >>> from semmim.config import DataConfig
        >>> input_bound_message(0.3, DataConfig(name="imagefolder", decode="torchvision", uint8=True, num_workers=2))
        '[semmim] input-bound: 30% of the step time is spent waiting for data (data.num_workers=2); more workers or faster storage would speed this run up'
    """  # noqa: E501
    remedies = ["more workers"]
    if not data.uint8:
        remedies.append("data.uint8=true")
    if data.decode == "pil":
        from semmim.data.tensor_decode import decode_conflict
        from semmim.registry import DATASETS

        dataset = DATASETS.get(data.name) if data.name in DATASETS.names() else None
        if dataset is not None and decode_conflict("torchvision", data.name, dataset, data.rand_augment) is None:
            remedies.append("data.decode=torchvision")
    remedies.append("faster storage")
    return (
        f"[semmim] input-bound: {wait_frac:.0%} of the step time is spent waiting for data "
        f"(data.num_workers={data.num_workers}); {', '.join(remedies[:-1])} or {remedies[-1]} would speed this run up"
    )


def explained_warning(value: float, step: int) -> str:
    """The one-time warning for a student that learns only the teacher's average token."""
    return (
        f"[semmim] warning: target_explained is {value:.3f} at step {step} (under {EXPLAINED_WARN} for 3 log steps "
        "after warmup): the student predicts little more than the teacher's average token. Likely causes: the "
        "teacher's tokens share a large common component (post-ReLU CNN features, raw features), a teacher map "
        "much coarser than the student's grid, or the learning rate. Knobs: method.target.norm=center (or "
        "center_ln, whiten, pca with method.target.pca_dim), teacher.image_size (run the teacher at the size whose map "
        "matches the student's grid) or method.target.grid=native, optim.lr; see the README's teacher section."
    )


CKPT_DIR = rundir.CKPT_DIR
LAST_CKPT = rundir.LAST_CKPT
DATA_SIZE_KEY = "data_size"
"""Checkpoint key: the samples of an epoch over all ranks when it was written; a resume on other data says so."""

CKPT_KEYS = ("model", "optimizer", "step", "epoch", "batch_in_epoch")
"""What a checkpoint must hold to be resumed (``loader``, the per-rank data positions, is optional: a
checkpoint written before it existed resumes by skipping ``batch_in_epoch`` batches)."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf more often in a row than ``trainer.max_nonfinite_steps`` allows."""


@dataclass
class RunResult:
    out_dir: Path
    steps: int
    final_loss: float
    encoder_path: Path | None
    images_per_s: float
    elapsed_s: float


def step_seed(seed: int, rank: int, micro_step: int) -> int:
    """A 63-bit seed for one micro-batch, a pure function of (seed, rank, micro_step)."""
    return int(np.random.SeedSequence([seed, rank, micro_step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def grad_cache_backward(
    model: Callable[..., Any],
    method: Any,
    batches: list[dict[str, Any]],
    seeds: list[int],
    backward: Callable[[torch.Tensor], Any],
    no_sync: Callable[[bool], AbstractContextManager[Any]],
) -> dict[str, Any]:
    """One optimizer step's forward and backward with GradCache (Gao et al. 2021, arXiv:2101.06983).

    The method's loss is taken over the whole effective batch (:class:`semmim.methods.base.GradCachePass`):
    pass 1 embeds every micro-batch without gradient; :meth:`~semmim.methods.base.Method.batch_loss` over all
    the reps (leaf tensors) gives their gradients; pass 2 re-runs each micro-batch under the same seed (masks,
    dropout and drop path are the same as in pass 1) and back-propagates ``sum(rep * d loss / d rep)`` plus
    the micro-batch's own loss term, if any. Gradients are synchronised only after the last micro-batch.

    Args:
        model: the (wrapped) method, called as ``model(batch, grad_cache=GradCachePass(...))``.
        method: the method itself (its :meth:`batch_loss`).
        batches: the micro-batches of the step, on the device.
        seeds: the torch seed of each micro-batch.
        backward: back-propagates a scalar (``fabric.backward``: loss scaling, strategies).
        no_sync: ``no_sync(enabled)``, a context without gradient synchronisation when ``enabled``.

    Returns:
        ``{"loss": the effective batch's loss (detached), "logs": its logs}``: the batch loss plus the
        micro-batches' own terms, and their logs added up.
    """
    from semmim.methods.base import GradCachePass

    starts = np.cumsum([0] + [int(b["image"].shape[0]) for b in batches]).tolist()
    with torch.no_grad():  # pass 1: the reps of every micro-batch
        parts = []
        for i, (b, seed) in enumerate(zip(batches, seeds, strict=True)):
            torch.manual_seed(seed)
            parts.append(model(b, grad_cache=GradCachePass(i, starts[i]))["reps"])
    keys = list(parts[0])
    leaves = {  # rows of all micro-batches joined; a 0-dim rep (a temperature) is shared, taken once
        k: (parts[0][k] if parts[0][k].dim() == 0 else torch.cat([p[k] for p in parts])).detach().requires_grad_()
        for k in keys
    }
    del parts
    out, context = method.batch_loss(leaves, batches)
    loss = out["loss"]
    wanted = [k for k in keys if leaves[k].requires_grad]
    grads = dict(zip(wanted, torch.autograd.grad(loss, [leaves[k] for k in wanted], allow_unused=True), strict=True))
    del leaves
    total = loss.detach()
    logs = dict(out.get("logs", {}))
    for i, (b, seed) in enumerate(zip(batches, seeds, strict=True)):  # pass 2: the same forward, with gradient
        torch.manual_seed(seed)
        last = i == len(batches) - 1
        with no_sync(not last):
            o = model(b, grad_cache=GradCachePass(i, starts[i], context))
            # sum(rep * d loss / d rep) back-propagates the cached gradient exactly; a shared 0-dim rep gets its
            # gradient once, in the last micro-batch (the one whose backward synchronises)
            local = o.get("loss")
            surrogate = local
            for k, rep in o["reps"].items():
                g = grads.get(k)
                if g is None or not rep.requires_grad or (rep.dim() == 0 and not last):
                    continue
                g_part = g if rep.dim() == 0 else g[starts[i] : starts[i + 1]]
                term = (rep.float() * g_part.float()).sum()
                surrogate = term if surrogate is None else surrogate + term
            if surrogate is not None:
                backward(surrogate)
        if local is not None:
            total = total + local.detach()
            for k, v in o.get("logs", {}).items():
                logs[k] = logs[k] + v if k in logs else v
    return {"loss": total, "logs": logs}


def check_writable(out_dir: Path) -> None:
    """Fail before training if the output folder cannot be created or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write to the output folder {out_dir}: {e.strerror or e}") from None


def use_compile(setting: Any, device: torch.device) -> bool:
    """``trainer.compile``: true, false, or "auto" (on for CUDA devices)."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def resolve_precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if on_gpu else "32-true"


FAULT_ENV = "SEMMIM_FAULT"
"""Fault injection for the reliability tests (docs/reliability.md): ``kill_after_step:K`` sends SIGKILL
to this process right after optimizer step K; ``kill_in_save:K`` leaves a half-written temporary
checkpoint at step K and then sends SIGKILL."""


def _fault(kind: str, step: int) -> bool:
    spec = os.environ.get(FAULT_ENV, "")
    return bool(spec) and spec == f"{kind}:{step}"


def _sigkill_self() -> None:
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_bytes(model: nn.Module) -> int:
    """Rough size of a checkpoint: fp32 weights plus AdamW's two moments."""
    return sum(p.numel() * 4 * (3 if p.requires_grad else 1) for p in model.state_dict(keep_vars=True).values())


def check_free_space(out_dir: Path, need: int) -> None:
    """Fail before training when ``out_dir``'s disk cannot hold two checkpoints (the old and the new one)."""
    import shutil

    free = shutil.disk_usage(out_dir).free
    if free < 2 * need:
        raise OSError(
            f"not enough free disk space in {out_dir}: {free / 2**20:.0f} MiB free, a checkpoint needs about "
            f"{need / 2**20:.0f} MiB and an atomic save needs room for two"
        )


def _save_atomic(fabric: Any, path: Path, state: dict[str, Any], step: int) -> None:
    """Write ``path`` via a temporary file and a rename: a crash mid-write keeps the previous checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fabric.save(tmp, state)
    except (OSError, RuntimeError) as e:  # disk full, quota, I/O error (torch wraps some as RuntimeError)
        if fabric.global_rank == 0:
            tmp.unlink(missing_ok=True)
        kept = f"; the previous checkpoint {path} is intact" if path.exists() else ""
        raise OSError(f"could not write the checkpoint {tmp} at step {step}: {e}{kept}") from e
    if _fault("kill_in_save", step) and fabric.global_rank == 0:
        with open(tmp, "r+b") as f:
            f.truncate(max(1, os.path.getsize(tmp) // 2))
        _sigkill_self()
    fabric.barrier()
    if fabric.global_rank == 0:
        os.replace(tmp, path)
    fabric.barrier()


class NonFiniteGuard:
    """Counts non-finite optimizer steps on the device and reads the count every step.

    On a CPU the count is read at once (there is no device to wait for). On a GPU the count of step ``s``
    is copied to pinned host memory without blocking and read after step ``s + 1`` has been queued, so the
    check never stalls the device queue and a streak is seen one step late at most.

    Args:
        device: the training device.
        limit: ``trainer.max_nonfinite_steps``.
    """

    def __init__(self, device: torch.device, limit: int) -> None:
        self.limit = limit
        self.lagged = device.type == "cuda"
        self.row = torch.zeros((), device=device, dtype=torch.long)
        self.total = torch.zeros((), device=device, dtype=torch.long)
        self.loss = torch.zeros((), device=device)
        self._host: torch.Tensor | None = None
        self._event: Any = None

    def update(self, finite: torch.Tensor, loss: torch.Tensor) -> None:
        """Record one step: ``finite`` (bool scalar) and its ``loss`` (scalar)."""
        bad = (~finite).long()
        self.row = (self.row + 1) * bad
        self.total = self.total + bad
        self.loss = loss.detach().float()

    def _packed(self) -> torch.Tensor:
        return torch.stack([self.row.double(), self.total.double(), self.loss.double()])

    def read_now(self) -> tuple[int, int, float]:
        """(non-finite steps in a row, in total, last loss), now (a sync on a GPU)."""
        row, total, loss = self._packed().tolist()
        return int(row), int(total), loss

    def read(self) -> tuple[int, int, float] | None:
        """The latest count that can be read without waiting for the device (None: none yet)."""
        if not self.lagged:
            return self.read_now()
        previous = None
        if self._event is not None and self._host is not None:
            self._event.synchronize()  # the copy queued one step ago: done unless the device lags by a step
            row, total, loss = self._host.tolist()
            previous = (int(row), int(total), loss)
        if self._host is None:
            self._host = torch.zeros(3, dtype=torch.float64, pin_memory=True)
        self._host.copy_(self._packed(), non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        return previous

    def step_of_state(self, step: int) -> int:
        """The optimizer step (0-based) whose state :meth:`read` returned after ``step`` steps."""
        return step - (2 if self.lagged else 1)


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The total 2-norm of the parameters' gradients, on the device (no sync)."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else "cpu")
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def all_finite(module: nn.Module) -> bool:
    """Whether every parameter and buffer of ``module`` is finite (one sync)."""
    tensors = [t for t in module.state_dict().values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def with_python_teacher(cfg: Config, teacher: nn.Module) -> Config:
    """A copy of ``cfg`` that records a teacher passed from Python (``teacher.name=module``, no source).

    The config's own teacher source, if any, is not what the run uses, so it is not recorded; a note says so.
    """
    from semmim.methods.base import PYTHON_TEACHER

    out = copy.deepcopy(cfg)
    t = out.teacher
    ignored: dict[str, Any] = {
        k: v
        for k, v in (("name", t.name), ("model", t.model), ("pretrained", t.pretrained), ("path", t.path))
        if v is not None and not (k == "name" and v in (PYTHON_TEACHER, "none"))
    }
    ignored.update(
        {
            k: v
            for k, v in (("image_size", t.image_size), ("mean", t.mean), ("std", t.std), ("tokens", t.tokens))
            if v is not None
        }
    )
    if t.input_norm != "own":  # the Python teacher normalises with the statistics it was built with
        ignored["input_norm"] = t.input_norm
    if t.kwargs:
        ignored["kwargs"] = dict(t.kwargs)
    if ignored and int(os.environ.get("RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        what = ", ".join(f"teacher.{k}={v}" for k, v in ignored.items())
        print(f"[semmim] the teacher passed from Python replaces the config's {what}", flush=True)
    t.name, t.model, t.pretrained, t.path, t.image_size, t.mean, t.std, t.tokens = PYTHON_TEACHER, *([None] * 7)
    t.input_norm, t.kwargs = "own", {}
    return out


def pretrain(
    cfg: Config,
    out_dir: str | os.PathLike[str],
    resume: bool = False,
    teacher: nn.Module | None = None,
    on_step: Callable[[int, float], None] | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Pretrain ``cfg.method.name`` and write the run directory.

    ``out_dir`` receives ``config.yaml`` (resolved), ``checkpoints/last.ckpt`` (every
    ``trainer.ckpt_every_n_steps`` optimizer steps and at the end), ``metrics.jsonl`` /
    ``metrics.csv``, TensorBoard events under ``tensorboard/`` and, at the end,
    ``encoder.safetensors`` (timm-compatible); :mod:`semmim.run` describes the folder.

    One process writes a run directory at a time (a lock file names it). A new run is refused in a folder
    that holds another one unless ``overwrite``; a resume may change only the keys of
    :data:`semmim.run.RESUME_MAY_CHANGE` (recorded in ``events.jsonl`` and ``config.yaml``).
    ``cfg`` itself is never changed (the run works on a copy): :class:`PretrainRecipe` does the work.

    Args:
        cfg: the run configuration.
        out_dir: run directory.
        resume: continue from ``out_dir/checkpoints/last.ckpt`` (model, optimizer, step, data position).
        teacher: a :class:`semmim.teachers.Teacher` overriding ``cfg.teacher`` (Python use).
        on_step: called as ``on_step(step, loss)`` after every optimizer step on rank 0.
        overwrite: delete a previous run in ``out_dir`` and start anew.

    Raises:
        RunFolderError: the folder is written by another process, holds another run (without
            ``overwrite``), or the resume changes a key that defines the run.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: choose one")
    if teacher is not None:
        cfg = with_python_teacher(cfg, teacher)
    out = Path(out_dir)
    ckpt_path = rundir.ckpt_path(out)
    if resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    if not _is_rank0_env():  # rank 0 owns the folder; it checked it before launching this process
        return PretrainRecipe(cfg, out, resume=resume, teacher=teacher, on_step=on_step).run()
    check_writable(out)
    lock = rundir.RunLock(out)
    lock.acquire()
    try:
        changes: dict[str, tuple[Any, Any]] = {}
        replace = False
        if resume:
            saved = out / rundir.CONFIG
            if saved.is_file():
                before, now = to_dict(load_saved_config(saved)), to_dict(cfg)
                from semmim.methods import method_class

                for key in method_class(cfg).data_keys:  # unset = "from the data", which the saved run recorded
                    if now["method"].get(key) is None:
                        now["method"][key] = before["method"].get(key)
                changes = rundir.resume_changes(before, now)
        else:  # a previous run is deleted only once the new one has passed its checks (data, model, teacher)
            replace = rundir.check_new_run(out, overwrite)
        recipe = PretrainRecipe(cfg, out, resume=resume, teacher=teacher, on_step=on_step, changes=changes)
        recipe.replace_previous = replace
        return recipe.run()
    finally:
        lock.release()


def _is_rank0_env() -> bool:
    """Rank 0 by the launcher's environment (RANK / LOCAL_RANK tell launched children apart)."""
    return int(os.environ.get("RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0


@contextmanager
def _rng_preserved() -> Iterator[None]:
    """Run a block without moving the global random states (python, numpy, torch CPU)."""
    import random

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py)
    np.random.set_state(npy)


def _record_context(cfg: Config, context: dict[str, Any]) -> None:
    """Record build context that fills an unset ``method.*`` key in the run's own config copy."""
    for key, value in context.items():
        if hasattr(cfg.method, key) and getattr(cfg.method, key) is None:
            setattr(cfg.method, key, value)


def _wants_plain_log(progress_bar: bool) -> bool:
    """Plain text lines per log step when the bar is off or stdout is not a terminal (a log file, CI)."""
    if not progress_bar:
        return True
    try:
        return not sys.stdout.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stdout
        return True


class PretrainRecipe:
    """One pretraining run as a recipe: set up data, model and optimiser, then train.

    The recipe works on its own copy of ``cfg`` (the caller's config is never changed); what the method
    needs from the data comes from the method's :meth:`~semmim.methods.base.Method.data_context` hook.
    :func:`pretrain` checks the run folder (lock, overwrite, resume changes) and then calls :meth:`run`,
    which is :meth:`setup` and :meth:`train`.

    Args:
        cfg: the run configuration (copied).
        out: the run directory.
        resume: continue from its last checkpoint.
        teacher: a Python teacher overriding ``cfg.teacher`` (``cfg`` already records it).
        on_step: called as ``on_step(step, loss)`` after every optimizer step on rank 0.
        changes: the allowed config changes of a resume (``{key: (old, new)}``), logged and recorded.
    """

    def __init__(
        self,
        cfg: Config,
        out: Path,
        *,
        resume: bool = False,
        teacher: nn.Module | None = None,
        on_step: Callable[[int, float], None] | None = None,
        changes: dict[str, tuple[Any, Any]] | None = None,
    ) -> None:
        self.cfg = copy.deepcopy(cfg)
        self.out = Path(out)
        self.resume = resume
        self.teacher = teacher
        self.on_step = on_step
        self.changes = dict(changes or {})
        self.replace_previous = False
        """A new run over an earlier one (``--overwrite``): rank 0 deletes it after the data and model are built."""
        self.ckpt_path = rundir.ckpt_path(self.out)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.position: ResumePosition | None = None  # a resume's data position, applied when the loop starts
        self.resumed_bad: list[str] = []  # the bad files this rank had met in the resumed epoch before the checkpoint
        self.bar: Any = None
        self.plain_log = False
        self.monitor: Any = None
        self.context: dict[str, Any] = {}
        self._reported = 0  # non-finite steps already warned about

    # ------------------------------------------------------------------ setup
    def run(self) -> RunResult:
        self.setup()
        try:
            return self.train()
        except DataError as e:  # one re-raised by the DataLoader carries the worker's traceback: keep one line
            if "\n" not in str(e):
                raise
            raise DataError(one_line_error(e)) from None

    def setup(self) -> None:
        """Everything before the first step; every check that can fail runs here."""
        self.setup_fabric()
        self.setup_data()
        self.setup_model()
        self.setup_optimizer()
        if self.replace_previous and self.is_main:  # every check that can fail has passed: nothing is lost
            rundir.delete_previous_run(self.out)
            (self.out / CKPT_DIR).mkdir(exist_ok=True)
        if self.resume:
            self.load_checkpoint()
        self.setup_monitor()
        self.n_params = sum(p.numel() for p in self.method.parameters() if p.requires_grad)
        if self.is_main:
            check_free_space(self.out, checkpoint_bytes(self.method))
            if not self.resume:  # written once every check has passed: a run that could not start leaves none
                (self.out / rundir.CONFIG).write_text(to_yaml(self.cfg))
            self.log_start()
        self.writer = MetricsWriter(self.out, enabled=self.is_main, resume_step=self.step if self.resume else None)
        if self.resume:
            self.writer.note(
                {"event": "resume", "step": self.step, "changed": {k: list(v) for k, v in self.changes.items()}}
            )
        self.guard = NonFiniteGuard(self.fabric.device, self.cfg.trainer.max_nonfinite_steps)
        # a contrastive method sees the whole effective batch: GradCache over the accumulated micro-batches
        self.grad_cache = bool(getattr(self.method_cls, "grad_cache", False)) and self.accumulate > 1
        self.pending: list[dict[str, Any]] = []
        self.trainable = [p for p in self.method.parameters() if p.requires_grad]
        self.check_grads = "fsdp" not in str(self.cfg.trainer.strategy).lower()  # sharded grads: per-rank norms

    def setup_fabric(self) -> None:
        import lightning as L
        from lightning.fabric.loggers import TensorBoardLogger

        (self.out / CKPT_DIR).mkdir(exist_ok=True)
        stale = self.ckpt_path.with_name(self.ckpt_path.name + ".tmp")
        if stale.exists() and _is_rank0_env():
            print(f"[semmim] removing {stale}, left by a run that stopped while saving", flush=True)
            stale.unlink(missing_ok=True)
        t = self.cfg.trainer
        self.precision = resolve_precision(t.precision, t.accelerator)
        self.fabric = L.Fabric(
            accelerator=t.accelerator,
            devices=t.devices,
            num_nodes=t.num_nodes,
            strategy=t.strategy,
            precision=self.precision,  # type: ignore[arg-type]
            loggers=[TensorBoardLogger(root_dir=str(self.out), name=rundir.TENSORBOARD, version="")],
            plugins=[ChecksummedCheckpointIO(required_keys=CKPT_KEYS)],
        )
        self.fabric.launch()
        self.rank, self.world = self.fabric.global_rank, self.fabric.world_size
        self.is_main = self.rank == 0
        self.fabric.seed_everything(t.seed, verbose=False)

    def setup_data(self) -> None:
        """The dataset, its sampler and loader; the epoch and step counts, warmup and learning rate."""
        from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

        from semmim.data import build_dataset, build_loader, train_sampler
        from semmim.methods import method_class

        cfg, t, world = self.cfg, self.cfg.trainer, self.world
        self.method_cls = method_class(cfg)
        dataset = build_dataset(
            cfg.data,
            img_size=cfg.model.img_size,
            in_chans=cfg.model.in_chans,
            train=True,
            seed=t.seed,
            require_captions=self.method_cls.needs_captions,  # a shard sample without one is a counted bad sample
        )
        if cfg.teacher.cache is not None:  # the cached maps must be this data's and this teacher's, before any work
            from semmim.teachers.cache import check_cache_for_run

            with _rng_preserved():
                cache = check_cache_for_run(cfg, dataset, self.teacher)
            dataset.geometry = True  # type: ignore[union-attr]  # items carry their crop box and flip
            dataset.extras = cache.item  # type: ignore[union-attr]  # and their stored maps, read in the workers
            if cfg.teacher.cache_crops == "stored":  # the views are the cache's stored crops
                dataset.crop_source = cache.stored_crop  # type: ignore[union-attr]
        self.dataset = dataset
        self.streaming = isinstance(dataset, IterableDataset)
        self.sampler: StatefulDistributedSampler | None = None
        self.stream: Any = dataset
        if self.streaming:  # WebDataset shards: the stream splits shards by rank and worker itself
            stream: Any = self.stream
            num_samples = cfg.data.num_samples or stream.num_samples or sum(stream.shard_counts().values())
            if not num_samples:
                raise ConfigError(
                    "data.num_samples is needed to size the epochs of a WebDataset stream (the shards' manifest.json "
                    "records it when semmim wrote them)"
                )
            stream.rank, stream.world_size, stream.num_samples = self.rank, world, int(num_samples)
            stream.batch_size, stream.drop_last = cfg.data.batch_size, True
            self.shard_size = int(num_samples) // world
            self.data_size = int(num_samples)
        else:
            self.sampler = train_sampler(dataset, seed=t.seed, rank=self.rank, world_size=world)
            self.shard_size = self.sampler.num_samples
            self.data_size = len(dataset)
        self.loader = build_loader(
            dataset,
            batch_size=cfg.data.batch_size,
            num_workers=cfg.data.num_workers,
            pin_memory=cfg.data.pin_memory and self.fabric.device.type == "cuda",
            sampler=self.sampler,
            drop_last=True,
        )
        accumulate = cfg.optim.accumulate
        if cfg.optim.effective_batch:
            accumulate = max(1, math.ceil(cfg.optim.effective_batch / (cfg.data.batch_size * world)))
        self.accumulate = accumulate
        batches_per_epoch = self.shard_size // cfg.data.batch_size
        self.steps_per_epoch = batches_per_epoch // accumulate
        self.batches_per_epoch = self.steps_per_epoch * accumulate  # what the loop consumes of an epoch
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the dataset has {self.shard_size * world} images: {world} device(s) x data.batch_size="
                f"{cfg.data.batch_size} x {accumulate} accumulation step(s) is more than one epoch holds; "
                "lower data.batch_size"
            )
        self.total_steps = t.max_steps if t.max_steps is not None else t.max_epochs * self.steps_per_epoch
        warmup = cfg.optim.warmup_steps
        where = "optim.warmup_steps"
        if warmup is None:
            warmup = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
            where = f"optim.warmup_epochs={cfg.optim.warmup_epochs:g}"
        self.warmup, self.warmup_warning = clamp_warmup(warmup, self.total_steps, where)
        self.eff_batch = cfg.data.batch_size * world * accumulate
        self.peak_lr = cfg.optim.lr if cfg.optim.lr is not None else scaled_lr(cfg.optim.base_lr, self.eff_batch)
        # what the method needs from the data (labels, captions) and derives from it (supmim: num_classes);
        # the random states are kept as they were, so the model's initialisation does not depend on this check
        with _rng_preserved():
            self.context = self.method_cls.data_context(cfg, dataset)
        _record_context(cfg, self.context)  # the run's own copy: config.yaml rebuilds the same method

    def setup_model(self) -> None:
        from semmim.methods import build_method
        from semmim.methods.base import check_teacher_attention

        self.method = build_method(self.cfg, teacher=self.teacher, **self.context)
        check_teacher_attention(self.method, self.fabric.device)  # semantic masking needs the teacher's attention

    def teacher_description(self) -> str | None:
        """The teacher the method actually loaded, as it describes itself (None: the method has none)."""
        target: Any = getattr(self.method, "target", None)
        cache: Any = getattr(target, "cache", None)
        if cache is not None:  # teacher.cache: no teacher runs
            h, w = cache.map_hw
            described = cache.meta["teacher"]["description"]
            return f"cached maps in {cache.root} ({h}x{w}x{cache.dim} {cache.dtype}, no teacher forward) of {described}"
        tm: Any = getattr(target, "teacher", None)
        if tm is None:
            return None
        return str(tm.describe()) if hasattr(tm, "describe") else type(tm).__name__

    def setup_optimizer(self) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        # fused AdamW (CUDA and CPU) takes found_inf, which lets a non-finite step be skipped without a sync
        fused = self.fabric.device.type in ("cuda", "cpu")
        self.sync_free = fused and "16-mixed" not in self.precision  # fp16's GradScaler manages found_inf itself
        optimizer = build_adamw(
            self.method,
            lr=self.peak_lr,
            weight_decay=cfg.optim.weight_decay,
            betas=(cfg.optim.betas[0], cfg.optim.betas[1]),
            eps=cfg.optim.eps,
            fused=fused,
        )
        self.inner_optimizer = optimizer
        module: nn.Module = self.method
        if use_compile(t.compile, self.fabric.device):
            if t.compile == "auto":  # on by default where it compiles: graphs that fail fall back to eager
                import torch._dynamo as dynamo

                dynamo.config.suppress_errors = True
            module = torch.compile(self.method)  # type: ignore[assignment]
        self.model, self.optimizer = self.fabric.setup(module, optimizer)
        # the loader is not wrapped by fabric.setup_dataloaders: its wrapper calls sampler.set_epoch(<number of
        # iter() calls>) at every iter(), which would override the epoch set below after a resume; batches are
        # moved to the device with fabric.to_device instead

    def setup_monitor(self) -> None:
        cfg, t = self.cfg, self.cfg.trainer
        if not (t.knn_every_n_steps and self.is_main):  # built (and its dataset checked) before any step
            return
        from semmim.eval.monitor import KnnMonitor

        try:
            self.monitor = KnnMonitor(
                t.knn_data or cfg.data.name,
                t.knn_root if t.knn_root is not None else cfg.data.root,
                img_size=cfg.model.img_size,
                in_chans=cfg.model.in_chans,
                mean=list(cfg.data.mean),
                std=list(cfg.data.std),
                train_limit=t.knn_train_limit,
                test_limit=t.knn_test_limit,
                num_workers=min(cfg.data.num_workers, 2),
            )
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise ConfigError(f"trainer.knn_every_n_steps={t.knn_every_n_steps}: {e}") from e

    # ------------------------------------------------------------------ checkpoints
    def load_checkpoint(self) -> None:
        """Model, optimizer and data position from ``last.ckpt``; a resume's changes are logged and recorded."""
        state = {"model": self.model, "optimizer": self.optimizer}
        try:
            rest = self.fabric.load(self.ckpt_path, state, weights_only=True)
        except CheckpointError as e:
            raise CheckpointError(f"--resume: {e}") from e
        except Exception as e:
            raise CheckpointError(
                f"--resume: cannot load the checkpoint {self.ckpt_path} ({type(e).__name__}: {e}); it may be "
                "truncated or written by an incompatible version"
            ) from e
        self.step = int(rest["step"])
        self.position = resume_position(
            rest,
            rank=self.rank,
            world=self.world,
            batches_per_epoch=self.batches_per_epoch,
            num_workers=self.cfg.data.num_workers,
            streaming=self.streaming,
        )
        self.epoch, self.batch_in_epoch = self.position.epoch, self.position.batch_in_epoch
        saved_size, size = rest.get(DATA_SIZE_KEY), self.data_size
        if saved_size is not None and int(saved_size) != size and self.is_main:
            where = f"the rest of epoch {self.epoch}" if self.batch_in_epoch else f"epoch {self.epoch} on"
            print(
                f"[semmim] warning: the training data has {size} samples now, {int(saved_size)} when the checkpoint "
                f"was written: {where} is read in another order than the run would have read it (the resume is not "
                "exact; samples of this epoch may be repeated or left out)",
                flush=True,
            )
        saved_bad = rest.get(BAD_FILES_KEY)
        if self.batch_in_epoch and isinstance(saved_bad, list) and len(saved_bad) == self.world:
            self.resumed_bad = [str(e) for e in saved_bad[self.rank]]
        if self.position.note and self.is_main:
            print(f"[semmim] resume: {self.position.note}", flush=True)
        if self.changes and self.is_main:
            print(
                "[semmim] resuming with changed settings: "
                + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in self.changes.items()),
                flush=True,
            )
            (self.out / rundir.CONFIG).write_text(to_yaml(self.cfg))

    def save_checkpoint(self) -> None:
        """Write ``last.ckpt``, never from a non-finite state (the previous checkpoint stays then)."""
        in_row, _, _ = self.guard.read_now()
        ckpt_path = self.ckpt_path
        if in_row:
            if self.is_main:
                print(
                    f"[semmim] warning: step {self.step} had a non-finite loss: no checkpoint written at it"
                    + (f"; {ckpt_path} keeps the last good one" if ckpt_path.exists() else ""),
                    flush=True,
                )
            return
        if not all_finite(self.method):
            raise NonFiniteLossError(
                f"the weights or optimizer state of method '{self.cfg.method.name}' became non-finite by step "
                f"{self.step} (epoch {self.epoch}); no checkpoint was written"
                + (f", the last good one is {ckpt_path}" if ckpt_path.exists() else "")
                + ". Lower the learning rate, set optim.clip_grad, or check the data."
            )
        state = {
            "model": self.model,
            "optimizer": self.optimizer,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            LOADER_KEY: self.loader_states(),
            BAD_FILES_KEY: self.bad_file_states(),
            DATA_SIZE_KEY: self.data_size,
            "config": to_dict(self.cfg),
        }
        _save_atomic(self.fabric, ckpt_path, state, self.step)

    def loader_states(self) -> list[dict[str, Any]] | None:
        """Every rank's loader state in the middle of an epoch (a collective call), ``None`` at its end."""
        if not 0 < self.batch_in_epoch < self.batches_per_epoch:
            return None
        return gather_loader_states(self.loader.state_dict(), self.world)

    def bad_file_states(self) -> list[list[str]] | None:
        """Every rank's bad files of the current epoch so far (a collective call), ``None`` at its end: a run
        resumed mid-epoch still counts the files met before the checkpoint against ``data.max_bad_fraction``."""
        if not 0 < self.batch_in_epoch < self.batches_per_epoch:
            return None
        return gather_loader_states(self.bad_files.entries, self.world)

    def start_epoch(self) -> Iterator[dict[str, Any]]:
        """The iterator over the current epoch; after a resume, continuing at ``batch_in_epoch``."""
        self.dataset.set_epoch(self.epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        position, self.position = self.position, None
        if position is None or position.batch_in_epoch == 0:
            return iter(self.loader)
        if position.loader is not None:
            self.loader.load_state_dict(position.loader)
            return iter(self.loader)
        if self.sampler is not None:  # map-style: the position is the number of samples drawn this epoch
            self.sampler.load_state_dict({"yielded": position.batch_in_epoch * self.cfg.data.batch_size})
            return iter(self.loader)
        iterator = iter(self.loader)  # a stream without a saved state: read the consumed batches again
        for _ in range(position.batch_in_epoch):
            if next(iterator, None) is None:
                break
        return iterator

    # ------------------------------------------------------------------ logging
    def start_lines(self) -> list[str]:
        """What the run prints when it starts: size, batch, the learning rate actually used, the teacher."""
        cfg = self.cfg
        if cfg.optim.lr is not None:
            lr_how = "optim.lr, not scaled"
        else:
            lr_how = f"base_lr {cfg.optim.base_lr:g} x effective batch {self.eff_batch} / 256"
        line = (
            f"[semmim] {cfg.method.name}: {self.n_params / 1e6:.2f}M trainable parameters | "
            f"{self.shard_size * self.world} images | {self.world} device(s) x batch {cfg.data.batch_size} x "
            f"accumulate {self.accumulate} = effective batch {self.eff_batch} | lr {self.peak_lr:.3g} ({lr_how}) | "
            f"{self.total_steps} steps, warmup {self.warmup} | precision {self.precision} | "
            f"device {self.fabric.device}" + (f" | resuming at step {self.step}" if self.resume else "")
        )
        lines = [line]
        teacher = self.teacher_description()
        if teacher is not None:
            lines.append(f"[semmim] teacher: {teacher}")
        return lines

    def log_start(self) -> None:
        for line in self.start_lines():
            print(line, flush=True)
        if self.warmup_warning:
            print(f"[semmim] warning: {self.warmup_warning}", file=sys.stderr, flush=True)

    def log(self, row: dict[str, Any], extras: dict[str, float]) -> None:
        """One log step: metrics files, TensorBoard, and the progress bar or one plain text line."""
        self.writer.write(row)
        loss_value, lr, ips = row["loss"], row["lr"], row["images_per_s"]
        scalars = {"train/loss": loss_value, "train/lr": lr, "train/images_per_s": ips}
        scalars.update({f"train/{k}": v for k, v in extras.items()})
        self.fabric.log_dict(scalars, step=self.step)
        shown = {"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}", "img_s": f"{ips:.0f}"}
        if "target_explained" in extras:
            shown["explained"] = f"{extras['target_explained']:.3f}"
        if "knn_top1" in extras:
            shown["knn"] = f"{extras['knn_top1']:.1f}"
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
        elif self.plain_log and self.is_main:
            rest = " ".join(f"{k} {v}" for k, v in shown.items())
            print(f"[semmim] step {self.step}/{self.total_steps} epoch {self.epoch} {rest}", flush=True)

    def _count_bad(self, batch: dict[str, Any]) -> None:
        """Add a batch's bad files to the epoch's distinct ones; stop at the batch that crosses the limit.

        Items name the file they replaced in ``"bad"`` (``"<path>: <reason>"``); a file counts once per epoch
        however many workers meet it. Items with only a ``"skipped"`` count are summed on the device instead
        and checked at the end of the epoch.
        """
        if "bad" in batch:
            try:
                self.bad_files.add(batch["bad"])
            except DataError:
                if self.bar is not None:
                    self.bar.close()
                raise
        elif "skipped" in batch:
            self.skipped += batch["skipped"].sum()

    def _report_skipped(self, samples: int) -> None:
        """Sum this (part of an) epoch's unreadable files over ranks, print and record them; too many stop the run."""
        tally = self.bad_files
        # named bad files are gathered and counted once over the ranks; unnamed ones (items with only "skipped")
        # are summed
        counts = torch.stack([self.skipped.float(), torch.tensor(float(samples), device=self.fabric.device)])
        entries = tally.entries
        if self.world > 1:
            counts = self.fabric.all_reduce(counts, reduce_op="sum")  # type: ignore[assignment]
            entries = _gather_entries(entries)
        n_unnamed, n_seen = (int(v) for v in counts.tolist())
        n_bad = len(entries) + n_unnamed
        if n_bad == 0:
            return
        cfg, epoch = self.cfg, self.epoch
        if self.is_main:
            names = [e.partition(": ")[0] for e in entries]
            shown = f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else ""
            print(f"[semmim] epoch {epoch}: skipped {n_bad} unreadable image(s) in {n_seen} samples{shown}", flush=True)
            self.writer.note(
                {"epoch": epoch, "step": self.step, "skipped_images": n_bad, "samples": n_seen, "bad_files": entries}
            )
        whole = EpochBadFiles(cfg.data.max_bad_fraction, tally.epoch_size * self.world)
        if n_bad > whole.limit:
            raise DataError(
                f"epoch {epoch}: {n_bad} images could not be decoded, more than data.max_bad_fraction="
                f"{cfg.data.max_bad_fraction:g} allows ({whole.limit} per epoch of {whole.epoch_size}); "
                f"{'; '.join(entries[:3]) or 'the warnings above name them'}: fix or remove them, or raise "
                "data.max_bad_fraction"
            )

    def _check_nonfinite(self, state: tuple[int, int, float] | None) -> None:
        """Warn about a skipped step; stop when more than max_nonfinite_steps came in a row."""
        if state is None:
            return
        in_row, total, loss_value = state
        if not in_row or total <= self._reported:
            return
        self._reported = total
        limit = self.cfg.trainer.max_nonfinite_steps
        at = self.guard.step_of_state(self.step)
        what = f"loss ({loss_value})" if not math.isfinite(loss_value) else f"gradients (loss {loss_value:.4g})"
        msg = f"non-finite {what} at step {at} (epoch {self.epoch}) of method '{self.cfg.method.name}'"
        if in_row > limit:
            if self.bar is not None:
                self.bar.close()
            good = f"; the last good checkpoint is {self.ckpt_path}" if self.ckpt_path.exists() else ""
            raise NonFiniteLossError(
                f"{msg}: stopping after {in_row} in a row (trainer.max_nonfinite_steps={limit}){good}. "
                "Lower the learning rate or check the data."
            )
        if self.is_main:
            print(f"[semmim] warning: {msg}; update skipped ({total} so far)", flush=True)

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Forward and backward of one micro-batch (seeded by ``(seed, rank, micro step)``).

        Returns:
            (the method's outputs, whether this micro-batch completes an optimizer step).
        """
        self._count_bad(batch)  # before the batch trains: the run stops at the batch that crosses the limit
        t, accumulate = self.cfg.trainer, self.accumulate
        micro = self.batch_in_epoch % accumulate
        last_micro = micro == accumulate - 1
        outputs: dict[str, Any]
        if self.grad_cache:  # the micro-batches of one step are kept; the last one runs them all
            self.pending.append(batch)
            outputs = dict(self.grad_cache_step()) if last_micro else {}
        else:
            torch.manual_seed(step_seed(t.seed, self.rank, self.step * accumulate + micro))
            with self.fabric.no_backward_sync(self.model, enabled=not last_micro):
                outputs = dict(self.model(batch))
                loss = outputs["loss"]
                self.fabric.backward(loss / accumulate)
            self.running += loss.detach() / accumulate
        self.batch_in_epoch += 1
        return outputs, last_micro

    def grad_cache_step(self) -> dict[str, Any]:
        """Forward and backward of one optimizer step's micro-batches with GradCache (:func:`grad_cache_backward`).

        Each micro-batch runs under the seed of its plain micro step, as without GradCache.

        Returns:
            the effective batch's outputs: ``loss`` (also added to the running loss) and ``logs``.
        """
        t, accumulate, fabric = self.cfg.trainer, self.accumulate, self.fabric
        batches, self.pending = self.pending, []
        seeds = [step_seed(t.seed, self.rank, self.step * accumulate + i) for i in range(len(batches))]
        out = grad_cache_backward(
            self.model,
            self.method,
            batches,
            seeds,
            backward=fabric.backward,
            no_sync=lambda enabled: fabric.no_backward_sync(self.model, enabled=enabled),
        )
        self.running += out["loss"]
        return out

    def optimizer_step(self) -> tuple[torch.Tensor, float]:
        """Schedule, clip, skip a non-finite update, step. Returns (the loss averaged over ranks, the lr)."""
        cfg = self.cfg
        # the mean over ranks: every rank logs the same loss and agrees on skipping a non-finite step
        # (all_reduce may work in place: reduce a copy, since ``running`` is reset right after)
        reduced: torch.Tensor = self.running.clone()
        if self.world > 1:
            reduced = self.fabric.all_reduce(reduced, reduce_op="mean")  # type: ignore[assignment]
        self.running.zero_()
        lr = cosine_lr(self.step, self.total_steps, self.warmup, self.peak_lr, cfg.optim.min_lr)
        set_lr(self.optimizer, lr)
        finite = torch.isfinite(reduced)
        if cfg.optim.clip_grad:
            norm = self.fabric.clip_gradients(
                self.model, self.optimizer, max_norm=cfg.optim.clip_grad, error_if_nonfinite=False
            )
            finite = finite & torch.isfinite(norm)  # type: ignore[arg-type]
        elif self.check_grads:  # a finite loss can still give inf gradients (overflow in the backward pass)
            finite = finite & torch.isfinite(grad_norm(self.trainable))
        if self.sync_free:
            # no host-device sync: the fused AdamW skips its update on the device when found_inf is 1
            self.inner_optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]
        elif not bool(finite):
            self.optimizer.zero_grad(set_to_none=True)
        if self.sync_free or bool(finite):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.update(finite, reduced)
        self.step += 1
        # every step: exact on a CPU, the previous step's count on a GPU (read without stalling the queue)
        self._check_nonfinite(self.guard.read())
        return reduced, lr

    # ------------------------------------------------------------------ the loop
    def train(self) -> RunResult:
        cfg, t, fabric, world = self.cfg, self.cfg.trainer, self.fabric, self.world
        is_main, accumulate, total_steps = self.is_main, self.accumulate, self.total_steps
        per_epoch = self.batches_per_epoch
        self.plain_log = _wants_plain_log(bool(t.progress_bar))
        if is_main and not self.plain_log:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps, initial=self.step, desc=cfg.method.name, dynamic_ncols=True, mininterval=1.0
            )

        input_bound_warned = explained_warned = False
        explained_low = 0  # log steps in a row with target_explained under EXPLAINED_WARN
        last_loss_t: torch.Tensor | None = None
        window_imgs, window_compute, window_wait = 0, 0.0, 0.0
        t_start = time.perf_counter()
        window_start = t_start
        self.running = torch.zeros((), device=fabric.device)
        self.skipped = torch.zeros((), device=fabric.device, dtype=torch.long)
        self.bad_files = EpochBadFiles(cfg.data.max_bad_fraction, self.shard_size)
        monitor = self.monitor

        self.model.train()
        while self.step < total_steps:
            iterator = self.start_epoch()
            self.running.zero_()
            self.pending = []
            self.skipped.zero_()
            self.bad_files.reset()
            self.bad_files.record(self.resumed_bad)  # a resumed epoch: the files met before the checkpoint
            self.resumed_bad = []
            epoch_samples = self.batch_in_epoch * cfg.data.batch_size
            ended_early = False
            while self.batch_in_epoch < per_epoch and self.step < total_steps:
                t0 = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    ended_early = True
                    break
                batch = fabric.to_device(batch)
                t1 = time.perf_counter()
                outputs, last_micro = self.train_step(batch)
                epoch_samples += int(batch["image"].shape[0])
                window_imgs += int(batch["image"].shape[0]) * world
                if not last_micro:
                    window_wait += t1 - t0
                    window_compute += time.perf_counter() - t1
                    continue
                reduced, lr = self.optimizer_step()
                last_loss_t = reduced
                step = self.step
                t2 = time.perf_counter()
                window_wait += t1 - t0
                window_compute += t2 - t1
                if self.bar is not None:
                    self.bar.update(1)
                knn_now = monitor is not None and step % t.knn_every_n_steps == 0
                log_now = step % t.log_every_n_steps == 0 or step == total_steps or knn_now
                loss_value = float("nan")
                if self.on_step is not None or log_now:
                    loss_value = float(reduced.item())
                    if self.on_step is not None and is_main:
                        self.on_step(step, loss_value)
                if log_now:
                    now = time.perf_counter()
                    ips = window_imgs / max(now - window_start, 1e-9)
                    wait_frac = window_wait / max(window_wait + window_compute, 1e-9)
                    if wait_frac > INPUT_BOUND_FRACTION and not input_bound_warned and is_main and step > 1:
                        input_bound_warned = True  # said once: the share is logged as data_wait_frac at every log step
                        print(input_bound_message(wait_frac, cfg.data), flush=True)
                    extras = {
                        k: float(v.detach().float().item())
                        for k, v in outputs.get("logs", {}).items()
                        if isinstance(v, torch.Tensor) and v.dim() == 0
                    }
                    if "target_explained" in extras and step > self.warmup:
                        explained_low = explained_low + 1 if extras["target_explained"] < EXPLAINED_WARN else 0
                        if explained_low >= 3 and not explained_warned and is_main:
                            explained_warned = True
                            print(explained_warning(extras["target_explained"], step), flush=True)
                    if monitor is not None and (knn_now or step == total_steps):
                        extras["knn_top1"] = monitor(self.method.encoder, fabric.device)
                    row = {
                        **extras,
                        "step": step,
                        "epoch": self.epoch,
                        "loss": loss_value,
                        "lr": lr,
                        "images_per_s": ips,
                        "data_wait_frac": wait_frac,
                        "elapsed_s": now - t_start,
                        "skipped_nonfinite": self.guard.read_now()[1],
                    }
                    self.log(row, extras)
                    # the next window starts after the logging (and the kNN monitor): neither counts as training
                    window_imgs, window_compute, window_wait, window_start = 0, 0.0, 0.0, time.perf_counter()
                if step % t.ckpt_every_n_steps == 0 and step < total_steps:
                    self.save_checkpoint()
                if _fault("kill_after_step", step) and is_main:
                    _sigkill_self()
            self._report_skipped(epoch_samples)
            if ended_early and self.batch_in_epoch < per_epoch:
                # a stream that yields fewer batches than its epoch size ends its epoch where it ends
                if self.batch_in_epoch == 0:
                    raise RuntimeError(
                        f"epoch {self.epoch}: the data yielded no batch of {cfg.data.batch_size} (dataset "
                        f"'{cfg.data.name}', root {cfg.data.root}); check that it holds readable samples"
                    )
                if is_main:
                    print(
                        f"[semmim] epoch {self.epoch} ended after {self.batch_in_epoch} of {per_epoch} "
                        "planned batches: the data stream ran out (unreadable samples or a truncated shard)",
                        flush=True,
                    )
                if self.batch_in_epoch % accumulate:  # an unfinished accumulation does not leak into the next epoch
                    self.optimizer.zero_grad(set_to_none=True)
                    self.running.zero_()
                    self.pending = []
                self.batch_in_epoch = per_epoch
            if self.batch_in_epoch >= per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
        if self.bar is not None:
            self.bar.close()
        self._check_nonfinite(self.guard.read_now())
        self.save_checkpoint()
        elapsed = time.perf_counter() - t_start
        return self.finish(last_loss_t, elapsed)

    def finish(self, last_loss_t: torch.Tensor | None, elapsed: float) -> RunResult:
        """Export the encoder (rank 0), close the loggers, summarise the run."""
        cfg, out = self.cfg, self.out
        encoder_path = None
        if self.is_main:
            encoder_path = self.method.export(
                out,
                {
                    "method": cfg.method.name,
                    "steps": str(self.step),
                    "mean": json.dumps(list(cfg.data.mean)),
                    "std": json.dumps(list(cfg.data.std)),
                },
            )
        self.fabric.barrier()
        for logger in self.fabric.loggers:
            logger.finalize("success")
        images_per_s = 0.0
        rows = [r for r in _safe_rows(out) if r.get("images_per_s")]
        if rows:
            images_per_s = float(np.median([r["images_per_s"] for r in rows]))
        last_loss = float(last_loss_t.item()) if last_loss_t is not None else float("nan")
        return RunResult(out, self.step, last_loss, encoder_path, images_per_s, elapsed)


def _gather_entries(entries: list[str]) -> list[str]:
    """The distinct bad-file entries of every rank, in rank order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return entries
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, entries)
    merged = EpochBadFiles(1.0, 0)  # a file two ranks both read (a padded sampler) is counted once
    for part in gathered:
        merged.record(part or [])
    return merged.entries


def _safe_rows(out: Path) -> list[dict[str, Any]]:
    from semmim.engine.metrics import read_metrics

    try:
        return read_metrics(out)
    except (OSError, ValueError):
        return []
