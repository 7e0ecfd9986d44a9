"""The pretraining engine: Lightning Fabric runs ``method(batch)["loss"]`` on 1..N devices.

Fabric gives distributed launch (DDP on one or many nodes, torchrun and SLURM environments are
detected), mixed precision and checkpoint I/O; the loop itself is ours so that every step is
reproducible: everything random in optimizer step ``s`` (masks, drop path, augmentation) is a
function of ``(seed, rank, s)`` and the data order of ``(seed, epoch)``, which makes ``--resume``
continue exactly where a run stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset

from semmim import run as rundir
from semmim.config import Config, ConfigError, load_config, to_dict, to_yaml
from semmim.engine.checkpoint import CheckpointError, ChecksummedCheckpointIO
from semmim.engine.metrics import MetricsWriter
from semmim.engine.optim import build_adamw, cosine_lr

INPUT_BOUND_FRACTION = 0.25
"""A run that waits for data more than this share of the time is reported as input-bound."""

EXPLAINED_WARN = 0.05
"""A feature-target run whose ``target_explained`` stays under this for 3 log steps after warmup is warned
about: the student then predicts little more than the teacher's average token."""


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
CKPT_KEYS = ("model", "optimizer", "step", "epoch", "batch_in_epoch")
"""What a checkpoint must hold to be resumed."""


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
    import copy

    from semmim.methods.base import PYTHON_TEACHER

    out = copy.deepcopy(cfg)
    t = out.teacher
    ignored: dict[str, Any] = {
        k: v
        for k, v in (("name", t.name), ("model", t.model), ("pretrained", t.pretrained), ("path", t.path))
        if v is not None and not (k == "name" and v in (PYTHON_TEACHER, "none"))
    }
    ignored.update({k: v for k, v in (("image_size", t.image_size), ("mean", t.mean), ("std", t.std)) if v is not None})
    if t.kwargs:
        ignored["kwargs"] = dict(t.kwargs)
    if ignored and int(os.environ.get("RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        what = ", ".join(f"teacher.{k}={v}" for k, v in ignored.items())
        print(f"[semmim] the teacher passed from Python replaces the config's {what}", flush=True)
    t.name, t.model, t.pretrained, t.path, t.image_size, t.mean, t.std = PYTHON_TEACHER, *([None] * 6)
    t.kwargs = {}
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
    # before the processes are launched: RANK / LOCAL_RANK tell launched children apart from rank 0
    is_rank0 = int(os.environ.get("RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0
    if not is_rank0:  # rank 0 owns the folder; it checked it before launching this process
        return _pretrain(cfg, out, resume, teacher, on_step, changes={})
    check_writable(out)
    lock = rundir.RunLock(out)
    lock.acquire()
    try:
        changes: dict[str, tuple[Any, Any]] = {}
        if resume:
            saved = out / rundir.CONFIG
            if saved.is_file():
                changes = rundir.resume_changes(to_dict(load_config(saved)), to_dict(cfg))
        else:
            rundir.prepare_new_run(out, overwrite)
        return _pretrain(cfg, out, resume, teacher, on_step, changes)
    finally:
        lock.release()


def _pretrain(
    cfg: Config,
    out: Path,
    resume: bool,
    teacher: nn.Module | None,
    on_step: Callable[[int, float], None] | None,
    changes: dict[str, tuple[Any, Any]],
) -> RunResult:
    import lightning as L
    from lightning.fabric.loggers import TensorBoardLogger

    from semmim.data import ResumableSampler, build_dataset, build_loader
    from semmim.methods import build_method

    ckpt_path = rundir.ckpt_path(out)
    (out / CKPT_DIR).mkdir(exist_ok=True)
    stale = ckpt_path.with_name(ckpt_path.name + ".tmp")
    is_rank0 = int(os.environ.get("RANK", 0)) == 0 and int(os.environ.get("LOCAL_RANK", 0)) == 0
    if stale.exists() and is_rank0:
        print(f"[semmim] removing {stale}, left by a run that stopped while saving", flush=True)
        stale.unlink(missing_ok=True)

    t = cfg.trainer
    precision = resolve_precision(t.precision, t.accelerator)
    fabric = L.Fabric(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision,  # type: ignore[arg-type]
        loggers=[TensorBoardLogger(root_dir=str(out), name=rundir.TENSORBOARD, version="")],
        plugins=[ChecksummedCheckpointIO(required_keys=CKPT_KEYS)],
    )
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    is_main = rank == 0
    fabric.seed_everything(t.seed, verbose=False)

    # ---------------------------------------------------------------- data
    from semmim.registry import METHODS

    needs_captions = bool(getattr(METHODS.get(cfg.method.name), "needs_captions", False))  # clip, rils
    dataset = build_dataset(
        cfg.data,
        img_size=cfg.model.img_size,
        in_chans=cfg.model.in_chans,
        train=True,
        seed=t.seed,
        require_captions=needs_captions,  # a shard sample without a caption is a counted bad sample
    )
    streaming = isinstance(dataset, IterableDataset)
    sampler: ResumableSampler | None = None
    stream: Any = dataset
    if streaming:  # WebDataset shards: the stream splits shards by rank and worker itself
        num_samples = cfg.data.num_samples or stream.num_samples or sum(stream.shard_counts().values())
        if not num_samples:
            raise ConfigError(
                "data.num_samples is needed to size the epochs of a WebDataset stream (the shards' manifest.json "
                "records it when semmim wrote them)"
            )
        stream.rank, stream.world_size, stream.num_samples = rank, world, int(num_samples)
        stream.batch_size, stream.drop_last = cfg.data.batch_size, True
        shard_size = int(num_samples) // world
    else:
        sampler = ResumableSampler(len(dataset), shuffle=True, seed=t.seed, rank=rank, world_size=world, drop_last=True)
        shard_size = sampler.shard_size
    loader = build_loader(
        dataset,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        pin_memory=cfg.data.pin_memory and fabric.device.type == "cuda",
        sampler=sampler,
        drop_last=True,
    )
    accumulate = cfg.optim.accumulate
    if cfg.optim.effective_batch:
        accumulate = max(1, math.ceil(cfg.optim.effective_batch / (cfg.data.batch_size * world)))
    batches_per_epoch = shard_size // cfg.data.batch_size
    steps_per_epoch = batches_per_epoch // accumulate
    if steps_per_epoch < 1:
        raise ConfigError(
            f"the dataset has {shard_size * world} images: {world} device(s) x data.batch_size={cfg.data.batch_size} "
            f"x {accumulate} accumulation step(s) is more than one epoch holds; lower data.batch_size"
        )
    total_steps = t.max_steps if t.max_steps is not None else t.max_epochs * steps_per_epoch
    warmup = cfg.optim.warmup_steps
    if warmup is None:
        warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, total_steps)
    eff_batch = cfg.data.batch_size * world * accumulate
    peak_lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.base_lr * eff_batch / 256

    # ---------------------------------------------------------------- model
    if getattr(METHODS.get(cfg.method.name), "needs_labels", False):
        classes = list(getattr(dataset, "classes", []) or [])
        if not classes:
            raise ConfigError(
                f"method '{cfg.method.name}' trains a classifier and needs labelled images, but the dataset "
                f"'{cfg.data.name}' (root {cfg.data.root}) has no classes: use an image folder with one "
                "subfolder per class (root/<class>/<image>) or data.name=fashion_mnist"
            )
        if cfg.method.num_classes is None:
            cfg.method.num_classes = len(classes)
        elif cfg.method.num_classes < len(classes):
            raise ConfigError(f"method.num_classes={cfg.method.num_classes} < {len(classes)} classes in the data")
    method = build_method(cfg, teacher=teacher)
    from semmim.methods.base import check_teacher_attention

    check_teacher_attention(method, fabric.device)  # semantic masking with a teacher that has no attention
    teacher_line = ""
    tm: Any = getattr(getattr(method, "target", None), "teacher", None)
    if tm is not None:
        teacher_line = f" | teacher {tm.describe() if hasattr(tm, 'describe') else type(tm).__name__}"
    # fused AdamW (CUDA and CPU) takes found_inf, which lets a non-finite step be skipped without a sync
    fused = fabric.device.type in ("cuda", "cpu")
    sync_free = fused and "16-mixed" not in precision  # fp16's GradScaler manages found_inf itself
    optimizer = build_adamw(
        method,
        lr=peak_lr,
        weight_decay=cfg.optim.weight_decay,
        betas=(cfg.optim.betas[0], cfg.optim.betas[1]),
        eps=cfg.optim.eps,
        fused=fused,
    )
    inner_optimizer = optimizer
    module: nn.Module = method
    if use_compile(t.compile, fabric.device):
        if t.compile == "auto":  # on by default where it compiles: graphs that fail fall back to eager
            import torch._dynamo as dynamo

            dynamo.config.suppress_errors = True
        module = torch.compile(method)  # type: ignore[assignment]
    model, optimizer = fabric.setup(module, optimizer)
    # the loader is not wrapped by fabric.setup_dataloaders: its wrapper calls sampler.set_epoch(<number of
    # iter() calls>) at every iter(), which would override the epoch set below after a resume; batches are
    # moved to the device with fabric.to_device instead

    step, epoch, batch_in_epoch = 0, 0, 0
    if resume:
        state = {"model": model, "optimizer": optimizer}
        try:
            rest = fabric.load(ckpt_path, state, weights_only=True)
        except CheckpointError as e:
            raise CheckpointError(f"--resume: {e}") from e
        except Exception as e:
            raise CheckpointError(
                f"--resume: cannot load the checkpoint {ckpt_path} ({type(e).__name__}: {e}); it may be truncated "
                "or written by an incompatible version"
            ) from e
        step, epoch, batch_in_epoch = int(rest["step"]), int(rest["epoch"]), int(rest["batch_in_epoch"])
        if changes and is_main:
            print(
                "[semmim] resuming with changed settings: "
                + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items()),
                flush=True,
            )
            (out / rundir.CONFIG).write_text(to_yaml(cfg))

    if getattr(method, "needs_captions", False) and not streaming and "caption" not in stream[0]:
        raise ConfigError(
            f"method '{cfg.method.name}' needs captions, but dataset '{cfg.data.name}' gives none: set "
            "data.captions=templates for a labelled dataset, or use data.name=manifest / webdataset"
        )
    monitor = None
    if t.knn_every_n_steps and is_main:  # built (and its dataset checked) before any step
        from semmim.eval.monitor import KnnMonitor

        try:
            monitor = KnnMonitor(
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
    n_params = sum(p.numel() for p in method.parameters() if p.requires_grad)
    if is_main:
        check_free_space(out, checkpoint_bytes(method))
        if not resume:  # written once every check has passed: a run that could not start leaves no run behind
            (out / rundir.CONFIG).write_text(to_yaml(cfg))
    if is_main:
        print(
            f"[semmim] {cfg.method.name}: {n_params / 1e6:.2f}M trainable parameters | {shard_size * world} images | "
            f"{world} device(s) x batch {cfg.data.batch_size} x accumulate {accumulate} "
            f"= effective batch {eff_batch} | "
            f"lr {peak_lr:.3g} (base_lr {cfg.optim.base_lr:g} x {eff_batch}/256) | {total_steps} steps, "
            f"warmup {warmup} | precision {precision} | device {fabric.device}"
            + teacher_line
            + (f" | resuming at step {step}" if resume else ""),
            flush=True,
        )
    writer = MetricsWriter(out, enabled=is_main, resume_step=step if resume else None)
    if resume:
        writer.note({"event": "resume", "step": step, "changed": {k: list(v) for k, v in changes.items()}})

    guard = NonFiniteGuard(fabric.device, t.max_nonfinite_steps)
    trainable = [p for p in method.parameters() if p.requires_grad]
    check_grads = "fsdp" not in str(t.strategy).lower()  # sharded gradients give per-rank norms

    def save_checkpoint() -> None:
        """Write ``last.ckpt``, never from a non-finite state (the previous checkpoint stays then)."""
        in_row, _, _ = guard.read_now()
        if in_row:
            if is_main:
                print(
                    f"[semmim] warning: step {step} had a non-finite loss: no checkpoint written at it"
                    + (f"; {ckpt_path} keeps the last good one" if ckpt_path.exists() else ""),
                    flush=True,
                )
            return
        if not all_finite(method):
            raise NonFiniteLossError(
                f"the weights or optimizer state of method '{cfg.method.name}' became non-finite by step {step} "
                f"(epoch {epoch}); no checkpoint was written"
                + (f", the last good one is {ckpt_path}" if ckpt_path.exists() else "")
                + ". Lower the learning rate, set optim.clip_grad, or check the data."
            )
        state = {
            "model": model,
            "optimizer": optimizer,
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "config": to_dict(cfg),
        }
        _save_atomic(fabric, ckpt_path, state, step)

    bar = None
    if is_main and t.progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=cfg.method.name, dynamic_ncols=True, mininterval=1.0)

    input_bound_warned = explained_warned = False
    explained_low = 0  # log steps in a row with target_explained under EXPLAINED_WARN
    last_loss_t: torch.Tensor | None = None
    window_imgs, window_compute, window_wait = 0, 0.0, 0.0
    t_start = time.perf_counter()
    window_start = t_start
    running = torch.zeros((), device=fabric.device)
    skipped = torch.zeros((), device=fabric.device, dtype=torch.long)

    def report_skipped(epoch: int, samples: int) -> None:
        """Sum the unreadable files of this (part of an) epoch over workers and ranks; too many stop the run."""
        counts = torch.stack([skipped.float(), torch.tensor(float(samples), device=fabric.device)])
        total = fabric.all_reduce(counts, reduce_op="sum") if world > 1 else counts
        n_bad, n_seen = (int(v) for v in total.tolist())  # type: ignore[union-attr]
        if n_bad == 0:
            return
        if is_main:
            print(f"[semmim] epoch {epoch}: skipped {n_bad} unreadable image(s) in {n_seen} samples", flush=True)
            writer.note({"epoch": epoch, "step": step, "skipped_images": n_bad, "samples": n_seen})
        if n_bad > max(1, cfg.data.max_bad_fraction * n_seen):
            raise RuntimeError(
                f"epoch {epoch}: {n_bad} of {n_seen} images could not be decoded, more than "
                f"data.max_bad_fraction={cfg.data.max_bad_fraction} allows; the warnings above name the files"
            )

    reported = [0]  # non-finite steps already warned about

    def check_nonfinite(state: tuple[int, int, float] | None) -> None:
        """Warn about a skipped step; stop when more than max_nonfinite_steps came in a row."""
        if state is None:
            return
        in_row, total, loss_value = state
        if not in_row or total <= reported[0]:
            return
        reported[0] = total
        at = guard.step_of_state(step)
        what = f"loss ({loss_value})" if not math.isfinite(loss_value) else f"gradients (loss {loss_value:.4g})"
        msg = f"non-finite {what} at step {at} (epoch {epoch}) of method '{cfg.method.name}'"
        if in_row > t.max_nonfinite_steps:
            if bar is not None:
                bar.close()
            good = f"; the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else ""
            raise NonFiniteLossError(
                f"{msg}: stopping after {in_row} in a row (trainer.max_nonfinite_steps="
                f"{t.max_nonfinite_steps}){good}. Lower the learning rate or check the data."
            )
        if is_main:
            print(f"[semmim] warning: {msg}; update skipped ({total} so far)", flush=True)

    model.train()
    while step < total_steps:
        dataset.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
            sampler.set_start(batch_in_epoch * cfg.data.batch_size)
        else:
            stream.set_start(batch_in_epoch * cfg.data.batch_size)
        iterator = iter(loader)
        running.zero_()
        skipped.zero_()
        epoch_samples = 0
        ended_early = False
        while batch_in_epoch < steps_per_epoch * accumulate and step < total_steps:
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                ended_early = True
                break
            batch = fabric.to_device(batch)
            t1 = time.perf_counter()
            micro = batch_in_epoch % accumulate
            torch.manual_seed(step_seed(t.seed, rank, step * accumulate + micro))
            last_micro = micro == accumulate - 1
            with fabric.no_backward_sync(model, enabled=not last_micro):
                outputs = model(batch)
                loss = outputs["loss"]
                fabric.backward(loss / accumulate)
            running += loss.detach() / accumulate
            if "skipped" in batch:
                skipped += batch["skipped"].sum()
            epoch_samples += int(batch["image"].shape[0])
            batch_in_epoch += 1
            window_imgs += int(batch["image"].shape[0]) * world
            if not last_micro:
                window_wait += t1 - t0
                window_compute += time.perf_counter() - t1
                continue
            # the mean over ranks: every rank logs the same loss and agrees on skipping a non-finite step
            # (all_reduce may work in place: reduce a copy, since ``running`` is reset right after)
            reduced: torch.Tensor = running.clone()
            if world > 1:
                reduced = fabric.all_reduce(reduced, reduce_op="mean")  # type: ignore[assignment]
            running.zero_()
            lr = cosine_lr(step, total_steps, warmup, peak_lr, cfg.optim.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            finite = torch.isfinite(reduced)  # type: ignore[arg-type]
            if cfg.optim.clip_grad:
                norm = fabric.clip_gradients(model, optimizer, max_norm=cfg.optim.clip_grad, error_if_nonfinite=False)
                finite = finite & torch.isfinite(norm)  # type: ignore[arg-type]
            elif check_grads:  # a finite loss can still give inf gradients (overflow in the backward pass)
                finite = finite & torch.isfinite(grad_norm(trainable))
            if sync_free:
                # no host-device sync: the fused AdamW skips its update on the device when found_inf is 1
                inner_optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]
            elif not bool(finite):
                optimizer.zero_grad(set_to_none=True)
            if sync_free or bool(finite):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            guard.update(finite, reduced)
            last_loss_t = reduced
            step += 1
            # every step: exact on a CPU, the previous step's count on a GPU (read without stalling the queue)
            check_nonfinite(guard.read())
            t2 = time.perf_counter()
            window_wait += t1 - t0
            window_compute += t2 - t1
            if bar is not None:
                bar.update(1)
            knn_now = monitor is not None and step % t.knn_every_n_steps == 0
            log_now = step % t.log_every_n_steps == 0 or step == total_steps or knn_now
            loss_value = float("nan")
            if on_step is not None or log_now:
                loss_value = float(reduced.item())  # type: ignore[union-attr]
                if on_step is not None and is_main:
                    on_step(step, loss_value)
            if log_now:
                now = time.perf_counter()
                ips = window_imgs / max(now - window_start, 1e-9)
                wait_frac = window_wait / max(window_wait + window_compute, 1e-9)
                if wait_frac > INPUT_BOUND_FRACTION and not input_bound_warned and is_main and step > 1:
                    input_bound_warned = True  # said once: the share is logged as data_wait_frac at every log step
                    print(
                        f"[semmim] input-bound: {wait_frac:.0%} of the step time is spent waiting for data "
                        f"(data.num_workers={cfg.data.num_workers}); more workers, data.uint8=true or faster storage "
                        "would speed this run up",
                        flush=True,
                    )
                extras = {
                    k: float(v.detach().float().item())
                    for k, v in outputs.get("logs", {}).items()
                    if isinstance(v, torch.Tensor) and v.dim() == 0
                }
                if "target_explained" in extras and step > warmup:
                    explained_low = explained_low + 1 if extras["target_explained"] < EXPLAINED_WARN else 0
                    if explained_low >= 3 and not explained_warned and is_main:
                        explained_warned = True
                        print(explained_warning(extras["target_explained"], step), flush=True)
                if monitor is not None and (knn_now or step == total_steps):
                    extras["knn_top1"] = monitor(method.encoder, fabric.device)
                row = {
                    **extras,
                    "step": step,
                    "epoch": epoch,
                    "loss": loss_value,
                    "lr": lr,
                    "images_per_s": ips,
                    "data_wait_frac": wait_frac,
                    "elapsed_s": now - t_start,
                    "skipped_nonfinite": guard.read_now()[1],
                }
                writer.write(row)
                scalars = {"train/loss": loss_value, "train/lr": lr, "train/images_per_s": ips}
                scalars.update({f"train/{k}": v for k, v in extras.items()})
                fabric.log_dict(scalars, step=step)
                if bar is not None:
                    shown = {"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}", "img_s": f"{ips:.0f}"}
                    if "target_explained" in extras:
                        shown["explained"] = f"{extras['target_explained']:.3f}"
                    if "knn_top1" in extras:
                        shown["knn"] = f"{extras['knn_top1']:.1f}"
                    bar.set_postfix(shown, refresh=False)
                # the next window starts after the logging (and the kNN monitor): neither counts as training time
                window_imgs, window_compute, window_wait, window_start = 0, 0.0, 0.0, time.perf_counter()
            if step % t.ckpt_every_n_steps == 0 and step < total_steps:
                save_checkpoint()
            if _fault("kill_after_step", step) and is_main:
                _sigkill_self()
        report_skipped(epoch, epoch_samples)
        if ended_early and batch_in_epoch < steps_per_epoch * accumulate:
            # a stream that yields fewer batches than its epoch size ends its epoch where it ends
            if batch_in_epoch == 0:
                raise RuntimeError(
                    f"epoch {epoch}: the data yielded no batch of {cfg.data.batch_size} (dataset "
                    f"'{cfg.data.name}', root {cfg.data.root}); check that it holds readable samples"
                )
            if is_main:
                print(
                    f"[semmim] epoch {epoch} ended after {batch_in_epoch} of {steps_per_epoch * accumulate} "
                    "planned batches: the data stream ran out (unreadable samples or a truncated shard)",
                    flush=True,
                )
            if batch_in_epoch % accumulate:  # an unfinished accumulation does not leak into the next epoch
                optimizer.zero_grad(set_to_none=True)
                running.zero_()
            batch_in_epoch = steps_per_epoch * accumulate
        if batch_in_epoch >= steps_per_epoch * accumulate:
            epoch += 1
            batch_in_epoch = 0
    if bar is not None:
        bar.close()
    check_nonfinite(guard.read_now())
    save_checkpoint()
    elapsed = time.perf_counter() - t_start
    encoder_path = None
    if is_main:
        encoder_path = method.export(
            out,
            {
                "method": cfg.method.name,
                "steps": str(step),
                "mean": json.dumps(list(cfg.data.mean)),
                "std": json.dumps(list(cfg.data.std)),
            },
        )
    fabric.barrier()
    for logger in fabric.loggers:
        logger.finalize("success")
    images_per_s = 0.0
    rows = [r for r in _safe_rows(out) if r.get("images_per_s")]
    if rows:
        images_per_s = float(np.median([r["images_per_s"] for r in rows]))
    last_loss = float(last_loss_t.item()) if last_loss_t is not None else float("nan")
    return RunResult(out, step, last_loss, encoder_path, images_per_s, elapsed)


def _safe_rows(out: Path) -> list[dict[str, Any]]:
    from semmim.engine.metrics import read_metrics

    try:
        return read_metrics(out)
    except (OSError, ValueError):
        return []
