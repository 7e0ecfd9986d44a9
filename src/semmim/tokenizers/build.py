"""Build a codebook over a teacher's patch tokens from a run config (``semmim codebook``).

The dataset (``data.*``, evaluation transform: no augmentation) streams once through the teacher
(``teacher.*``, or one passed from Python); its patch tokens, resampled to the student's grid
(``model.img_size / model.patch_size``) and conditioned (``none`` | ``ln``), are sampled uniformly with a
seeded reservoir of at most ``max_tokens`` tokens (memory stays bounded whatever the dataset), and k-means
(:func:`semmim.tokenizers.kmeans.kmeans`) runs on that sample. Same data, teacher, options and seed: the same
file.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from semmim.config import Config, ConfigError
from semmim.tokenizers.codebook import (
    CODEBOOK_NORMS,
    Codebook,
    condition,
    describe_teacher,
    teacher_fingerprint,
)
from semmim.tokenizers.kmeans import INITS, METRICS, code_usage, kmeans


@dataclass
class CodebookReport:
    """What ``semmim codebook`` prints: the file and how well the codes cover the sampled tokens."""

    path: str
    size: int
    dim: int
    used: int
    usage: float
    perplexity: float
    inertia: float
    tokens: int
    images: int
    iterations: int
    reseeded: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_options(k: int, iters: int, metric: str, norm: str, init: str, max_tokens: int) -> None:
    """Refuse impossible k-means options before the teacher or the data are touched.

    Raises:
        ConfigError: one line naming the option and what is allowed.
    """
    if k < 2:
        raise ConfigError(f"--k must be >= 2 (the vocabulary size), got {k}")
    if iters < 1:
        raise ConfigError(f"--iters must be >= 1, got {iters}")
    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if norm not in CODEBOOK_NORMS:
        raise ConfigError(
            f"--norm must be one of {', '.join(CODEBOOK_NORMS)}, got {norm!r} (conditionings with running "
            "statistics, such as center or whiten, cannot be stored in a codebook)"
        )
    if init not in INITS:
        raise ConfigError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    if max_tokens < k:
        raise ConfigError(f"--max-tokens={max_tokens} must be >= --k={k} (k-means needs at least k tokens)")


class Reservoir:
    """A seeded uniform sample of at most ``capacity`` rows out of a stream of (n, D) blocks.

    Every row gets a random key from a seeded generator; the sample is the ``capacity`` rows with the smallest
    keys seen so far (a bottom-k sample, uniform without replacement).
    """

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = int(capacity)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.rows: Tensor | None = None
        self.keys: Tensor | None = None
        self.seen = 0

    def add(self, rows: Tensor) -> None:
        rows = rows.detach().float().cpu()
        keys = torch.rand(rows.shape[0], generator=self.gen)
        self.seen += rows.shape[0]
        if self.rows is not None and self.keys is not None:
            rows = torch.cat([self.rows, rows])
            keys = torch.cat([self.keys, keys])
        if rows.shape[0] > self.capacity:
            keep = torch.topk(keys, self.capacity, largest=False).indices.sort().values
            rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys

    def sample(self) -> Tensor:
        if self.rows is None:
            raise ValueError("no tokens were collected (an empty dataset?)")
        return self.rows


@torch.no_grad()
def collect_tokens(
    teacher: nn.Module,
    loader: Any,
    grid: tuple[int, int],
    norm: str,
    max_tokens: int,
    seed: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[Tensor, int]:
    """Stream ``loader`` through ``teacher``: a uniform sample of at most ``max_tokens`` conditioned patch tokens.

    Returns:
        (n, D) float32 tokens (n <= max_tokens) and the number of images seen.
    """
    from semmim.methods.base import as_float01

    reservoir = Reservoir(max_tokens, seed)
    images = 0
    batches: Any = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="teacher tokens", unit="batch", leave=False)
    for batch in batches:
        x = as_float01(batch["image"]).to(device)
        patches = teacher(x, grid).tokens[:, 1:]  # (N, L, D) on the student's grid, global token dropped
        reservoir.add(condition(patches, norm).flatten(0, 1))
        images += x.shape[0]
    return reservoir.sample(), images


def build_codebook(
    cfg: Config,
    out: str | Path,
    k: int,
    *,
    iters: int = 20,
    metric: str = "cosine",
    norm: str = "none",
    init: str = "kmeans++",
    max_tokens: int = 200_000,
    seed: int = 0,
    teacher: nn.Module | None = None,
    device: torch.device | str = "cpu",
) -> CodebookReport:
    """Write a codebook of ``k`` codes over the teacher tokens of ``cfg``'s data to ``out``.

    Args:
        cfg: a run config: its ``teacher`` section (unless ``teacher`` is given), its ``data`` section and the
            student's grid (``model.img_size``, ``model.patch_size``, ``model.in_chans``) are read.
        out: the safetensors file to write.
        k: vocabulary size.
        iters: k-means iterations.
        metric: "cosine" or "l2".
        norm: conditioning of the teacher tokens: "none" or "ln".
        init: "kmeans++" or "random".
        max_tokens: most tokens k-means sees (a seeded uniform sample of all the data's tokens).
        seed: seed of the sample and of the initialisation.
        teacher: a :class:`semmim.teachers.Teacher` from Python (``cfg.teacher`` is then only recorded).
        device: where the teacher runs.

    Returns:
        :class:`CodebookReport`.
    """
    from semmim.data.loader import build_dataset, build_loader
    from semmim.eval.features import show_progress
    from semmim.methods.base import build_teacher

    check_options(k, iters, metric, norm, init, max_tokens)
    t0 = time.perf_counter()
    model = cfg.model
    grid = (model.img_size // model.patch_size, model.img_size // model.patch_size)
    tm = build_teacher(cfg, teacher).to(device)
    dataset = build_dataset(cfg.data, img_size=model.img_size, in_chans=model.in_chans, train=False, seed=seed)
    loader = build_loader(
        dataset,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        pin_memory=False,
        sampler=None,
        drop_last=False,
    )
    try:
        progress = show_progress(len(dataset))
    except TypeError:  # a stream of unknown length
        progress = False
    tokens, images = collect_tokens(tm, loader, grid, norm, max_tokens, seed, device, progress)
    if tokens.shape[0] < k:
        raise ConfigError(
            f"--k={k} codes but the data gave only {tokens.shape[0]} tokens ({images} images x {grid[0] * grid[1]}): "
            "use more images (data.limit) or a smaller --k"
        )
    result = kmeans(tokens, k, iters=iters, metric=metric, init=init, seed=seed)
    usage, perplexity = code_usage(result.counts)
    used = int((result.counts > 0).sum())
    data = {"name": cfg.data.name, "root": cfg.data.root, "split": cfg.data.split, "limit": cfg.data.limit}
    codebook = Codebook(
        centroids=result.centroids,
        metric=metric,
        norm=norm,
        grid=grid,
        teacher={"config": dataclasses.asdict(cfg.teacher), "description": describe_teacher(tm)},
        teacher_sha256=teacher_fingerprint(tm),
        info={
            "iters": str(iters),
            "iterations_run": str(result.iterations),
            "init": init,
            "seed": str(seed),
            "max_tokens": str(max_tokens),
            "tokens": str(tokens.shape[0]),
            "images": str(images),
            "data": str(data),
            "usage": f"{usage:.6f}",
            "perplexity": f"{perplexity:.3f}",
            "inertia": f"{result.inertia:.6f}",
            "reseeded": str(result.reseeded),
        },
    )
    path = codebook.save(out)
    return CodebookReport(
        path=str(path),
        size=k,
        dim=codebook.dim,
        used=used,
        usage=round(usage, 4),
        perplexity=round(perplexity, 2),
        inertia=round(result.inertia, 6),
        tokens=int(tokens.shape[0]),
        images=images,
        iterations=result.iterations,
        reseeded=result.reseeded,
        seconds=round(time.perf_counter() - t0, 1),
    )
