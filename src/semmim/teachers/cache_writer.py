"""Write a teacher cache from a run config (``semmim teacher cache``); the layout is in :mod:`semmim.teachers.cache`.

Every image of the training data (``data.*``) is resized whole (no crop, aspect not kept) to ``size`` x ``size``
and goes through the run's teacher (``teacher.*``) once; its token map on the teacher's own grid is stored (with
``crops``, also each fixed crop of it, resized to the same size: :func:`semmim.teachers.cache.crop_boxes`). The
work is cut into chunks of ``chunk_size`` images; rank ``r`` of ``world`` writes the chunks ``r::world``, each into
a temporary file renamed into place when complete, so a rerun skips the chunks already there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from semmim.config import Config, ConfigError
from semmim.teachers.cache import (
    CACHE_DTYPES,
    CACHE_FORMAT,
    CACHE_VERSION,
    META_FILE,
    PCA_FILE,
    chunk_name,
    chunk_ranges,
    crop_boxes,
    dataset_identity,
    masker_needs_attention,
    quantize_int8,
    teacher_identity,
    weights_stamp,
)


@dataclass
class CacheReport:
    """What ``semmim teacher cache`` prints."""

    path: str
    images: int
    chunks: int
    written: int
    skipped: int
    map_hw: list[int]
    dim: int
    dtype: str
    has_attn: bool
    crops: int
    pca_dim: int | None
    pca_explained: float | None
    bytes: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class FullResize:
    """The whole image resized to ``size`` x ``size`` (bicubic, antialiased), float (C, H, W) in [0, 1]; with
    ``crops`` (K, 4 normalised boxes), also each crop resized to the same size: (1 + K, C, H, W), the full image first.

    Takes a PIL image or a uint8 tensor (C, H, W) (``data.decode=torchvision``; its crops go through PIL, which
    resamples fractional boxes exactly).
    """

    def __init__(
        self,
        size: int,
        crops: list[list[float]] | None = None,
        random_crops: int = 0,
        scale: tuple[float, float] = (0.2, 1.0),
        hflip: bool = False,
    ) -> None:
        self.size = int(size)
        self.crops = [list(map(float, b)) for b in crops or []]
        self.random_crops = int(random_crops)
        self.scale = (float(scale[0]), float(scale[1]))
        self.hflip = bool(hflip)

    def __call__(self, img: Any) -> Tensor:
        from PIL import Image

        from semmim.data.datasets import pil_to_tensor01
        from semmim.data.tensor_transforms import resize_uint8

        s = self.size
        if isinstance(img, Tensor):
            full = resize_uint8(img, (s, s)).float().div_(255.0)
            if not self.crops:
                return full
            from torchvision.transforms.functional import to_pil_image

            img = to_pil_image(img)
        else:
            full = pil_to_tensor01(img.resize((s, s), Image.Resampling.BICUBIC))
            if not self.crops:
                return full
        w, h = img.size
        views = [full]
        for x0, y0, x1, y1 in self.crops:
            views.append(
                pil_to_tensor01(img.resize((s, s), Image.Resampling.BICUBIC, box=(x0 * w, y0 * h, x1 * w, y1 * h)))
            )
        return torch.stack(views)

    def random_views(self, img: Any) -> tuple[Tensor, Tensor, Tensor]:
        """The full image and ``random_crops`` views of the training transform itself at this size (random resized
        crop, a flip with ``hflip``; the PIL or the uint8-tensor one, as ``img`` is; call it in a seeded context),
        stacked (1 + K, C, s, s), with their (K, 4) normalised boxes and (K,) flips."""
        from semmim.data.tensor_transforms import TensorPretrainTransform
        from semmim.data.transforms import pretrain_transform

        s = self.size
        if isinstance(img, Tensor):
            training: Any = TensorPretrainTransform(s, crop_scale=self.scale, hflip=self.hflip)
        else:
            training = pretrain_transform(s, crop_scale=self.scale, hflip=self.hflip)
        views, boxes, flips = [self.__class__(s)(img)], [], []
        for _ in range(self.random_crops):
            view, geometry = training.with_geometry(img)
            views.append(view)
            boxes.append(geometry.box)
            flips.append(geometry.flip)
        return torch.stack(views), torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips, dtype=torch.bool)


class RandomViews(torch.utils.data.Dataset):
    """Item ``i`` of a :class:`semmim.data.SeededDataset` as :meth:`FullResize.random_views`, drawn in a seeded
    context of the item, so every writer and every rerun draws the same crops: ``{"image", "crop_box"}``. Its epoch
    is -1, a stream no training epoch draws from: a run with ``teacher.cache_crops=nearest`` does not meet these
    crops by chance."""

    def __init__(self, dataset: Any, views: FullResize) -> None:
        self.dataset, self.views = dataset, views

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        from semmim.data.seeding import seeded

        img, _ = self.dataset.dataset.load(index)
        with seeded(self.dataset.seed, -1, index):
            image, boxes, flips = self.views.random_views(img)
        return {"image": image, "crop_box": boxes, "crop_flip": flips}


def rank_and_world(rank: int | None, world: int | None) -> tuple[int, int]:
    """``--rank/--world``, else ``RANK``/``WORLD_SIZE`` from the environment (torchrun), else (0, 1)."""
    r = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    w = int(os.environ.get("WORLD_SIZE", 1)) if world is None else int(world)
    if w < 1 or not 0 <= r < w:
        raise ConfigError(f"--rank={r} must be in [0, --world={w})")
    return r, w


def _save_atomic(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def fit_pca(
    tm: nn.Module, dataset: Any, dim: int, fit_images: int, batch_size: int, device: Any, workers: int
) -> tuple[dict[str, Tensor], float]:
    """Principal directions of the teacher's map tokens over ``fit_images`` images spread evenly over ``dataset``
    (full views only): ``{"mean": (D,), "components": (dim, D)}`` float32 and the share of variance they keep.

    The covariance is accumulated in float64 (D x D), so any number of images fits in memory.
    """
    n = len(dataset)
    idx = sorted({int(i) for i in np.rint(np.linspace(0, n - 1, num=min(n, max(1, int(fit_images)))))})
    total = None
    outer = None
    count = 0
    for batch in DataLoader(Subset(dataset, idx), batch_size=batch_size, num_workers=workers):
        x = batch["image"]
        x = x[:, 0] if x.dim() == 5 else x  # the full image of each (full + crops) stack
        tok = tm(x.to(device), None).tokens[:, 1:]
        flat = tok.reshape(-1, tok.shape[-1]).double().cpu()
        total = flat.sum(0) if total is None else total + flat.sum(0)
        outer = flat.T @ flat if outer is None else outer + flat.T @ flat
        count += flat.shape[0]
    assert total is not None and outer is not None
    mean = total / count
    cov = outer / count - torch.outer(mean, mean)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    top = torch.argsort(values, descending=True)[:dim]
    explained = float(values[top].clamp_min(0).sum() / values.clamp_min(0).sum().clamp_min(1e-30))
    return {"mean": mean.float(), "components": vectors[:, top].T.contiguous().float()}, explained


def shared_pca(root: Path, fit: Any) -> tuple[dict[str, Tensor], float]:
    """The cache's PCA basis: the one in ``root`` (another rank's or an earlier run's), else ``fit()`` saved there.

    The file is published with a hard link, which fails when it exists, so every writer of a cache projects with
    the same basis even when several fit one at once.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = root / PCA_FILE
    if not path.is_file():
        basis, explained = fit()
        tmp = path.with_name(f".{PCA_FILE}.{os.getpid()}.tmp")
        save_file(basis, str(tmp), metadata={"explained": repr(explained)})
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, float(f.metadata()["explained"])  # noqa: SIM118


META_KEYS = (
    "dataset",
    "teacher",
    "size",
    "map_hw",
    "dim",
    "dtype",
    "has_attn",
    "chunk_size",
    "crops",
    "random_crops",
    "pca",
)
"""What a rerun into an existing cache directory must ask for as it did."""


def _write_meta(meta: dict[str, Any], out: Path) -> None:
    """Write ``cache.json`` (atomically), or check that the one there describes the same cache."""
    path = out / META_FILE
    text = json.dumps(meta, indent=1, sort_keys=True)
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [
            k for k in META_KEYS if json.dumps(old.get(k), sort_keys=True) != json.dumps(meta.get(k), sort_keys=True)
        ]
        if diff:
            raise ConfigError(
                f"--out {out} holds a cache of another {', '.join(diff)}: choose another directory or delete it"
            )
        return
    tmp = path.with_name(f".{META_FILE}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@torch.no_grad()
def write_cache(
    cfg: Config,
    out: str | Path,
    *,
    size: int | None = None,
    dtype: str = "float16",
    chunk_size: int = 1024,
    rank: int | None = None,
    world: int | None = None,
    batch_size: int | None = None,
    teacher: nn.Module | None = None,
    device: torch.device | str = "cpu",
    attn: bool | None = None,
    crops: int = 0,
    crop_side: float | None = None,
    pca: int | None = None,
    pca_fit: int | None = None,
    random_crops: int = 0,
) -> CacheReport:
    """Run ``cfg``'s teacher over its training data once and store the token maps in ``out``.

    Args:
        cfg: a run config (``teacher``, ``data``, ``model.in_chans``, ``method.masker`` are read).
        out: the cache directory (created).
        size: the full images are resized to ``size`` x ``size``; ``None`` = the teacher's input size.
        dtype: "float16" or "int8" (with a float32 scale per token).
        chunk_size: images per chunk file.
        rank, world: this process writes chunks ``rank::world`` (default: ``RANK``/``WORLD_SIZE`` or 0/1).
        batch_size: teacher batch; ``None`` = ``data.batch_size``.
        teacher: a :class:`semmim.teachers.Teacher` from Python instead of ``cfg.teacher``.
        device: where the teacher runs.
        attn: store the CLS attention maps; ``None`` = when the run's masker needs them (semantic masking).
        crops: also store the teacher's maps of fixed crops of every image: 0 (none), 5 (the four corners and the
            centre) or 9 (a 3 x 3 grid); training views then take their target from the nearest stored view.
        crop_side: the crops' width and height, as a fraction of the image's (``None``: 0.8; only with crops).
        random_crops: instead of fixed crops, store this many random resized crops per image, drawn as the run's
            training transform draws them (``data.crop_scale``, aspect 3/4-4/3), with their boxes: a run with
            ``teacher.cache_crops=stored`` then trains on exactly these crops.
        pca: store the map tokens as their coordinates on this many principal directions (fitted on ``pca_fit``
            images spread over the data, default 4096; saved as ``pca.safetensors``); training maps them back to
            the teacher's width. ``None``: the full width.

    Returns:
        :class:`CacheReport`.
    """
    from semmim.data.loader import build_dataset
    from semmim.methods.base import build_teacher
    from semmim.tokenizers.codebook import describe_teacher, teacher_fingerprint

    if dtype not in CACHE_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
    if chunk_size < 1:
        raise ConfigError(f"--chunk-size must be >= 1, got {chunk_size}")
    if crop_side is not None and not crops:
        raise ConfigError(f"--crop-side {crop_side} sizes the fixed crops, but none are stored: add --crops 5 or 9")
    if pca_fit is not None and pca is None:
        raise ConfigError(f"--pca-fit {pca_fit} fits the PCA of --pca, which is unset: add --pca K or drop it")
    if random_crops and crops:
        raise ConfigError(f"--crops {crops} and --random-crops {random_crops} both choose the stored crops: keep one")
    if random_crops < 0:
        raise ConfigError(f"--random-crops must be >= 0, got {random_crops}")
    boxes = crop_boxes(int(crops), 0.8 if crop_side is None else float(crop_side))
    pca_fit = 4096 if pca_fit is None else int(pca_fit)
    if cfg.data.name == "webdataset":
        raise ConfigError("a teacher cache is indexed by dataset index: data.name=webdataset streams have none")
    r, w = rank_and_world(rank, world)
    t0 = time.perf_counter()
    tm: Any = build_teacher(cfg, teacher).to(device)
    own_size = tuple(tm.image_size)
    need_attn = masker_needs_attention(cfg) if attn is None else bool(attn)
    probe = torch.zeros(1, tm.in_chans, *own_size, device=device)
    out0 = tm(probe, None, need_attn=need_attn)
    teacher_grid = list(tm.native_grid)
    if need_attn and out0.cls_attn is None:
        raise ConfigError(f"the cache would store the CLS attention, but {describe_teacher(tm)} gives none")
    s = int(size) if size is not None else int(own_size[0])
    if s < 1:
        raise ConfigError(f"--size must be >= 1, got {s}")
    sha256 = teacher_fingerprint(tm)  # the run's teacher, at its own input size
    if (s, s) != own_size:  # the same teacher built for the cache's size (positional embeddings resampled)
        if teacher is not None:
            raise ConfigError(
                f"--size {s} differs from the Python teacher's input size {own_size[0]}x{own_size[1]}: a teacher "
                "passed from Python is cached at its own size (leave --size unset)"
            )
        sized = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, image_size=s))
        tm = build_teacher(sized).to(device)
    out1 = tm(torch.zeros(1, tm.in_chans, s, s, device=device), None)
    map_hw = list(tm.native_grid)
    dim = int(out1.tokens.shape[-1])
    if pca is not None and not 1 <= int(pca) < dim:
        raise ConfigError(f"--pca keeps 1 to {dim - 1} of the teacher's {dim} dims, got {pca}")
    if pca_fit < 1:
        raise ConfigError(f"--pca-fit must be >= 1 image, got {pca_fit}")
    # the training run's dataset (generated data depends on model.img_size), each image then resized whole to s
    dataset: Any = build_dataset(cfg.data, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans, train=False)
    scale = (float(cfg.data.crop_scale[0]), float(cfg.data.crop_scale[1]))
    dataset.transform = FullResize(s, boxes, random_crops, scale, bool(cfg.data.hflip))
    source = RandomViews(dataset, dataset.transform) if random_crops else dataset  # what the teacher runs on
    n = len(dataset)
    ranges = chunk_ranges(n, chunk_size)
    meta = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "dataset": dataset_identity(dataset, cfg.data.name, cfg.data.root),
        "teacher": {
            "config": teacher_identity(cfg.teacher),
            "description": describe_teacher(tm),
            "sha256": sha256,
            "weights": weights_stamp(cfg.teacher),
        },
        "size": s,
        "map_hw": map_hw,
        "teacher_grid": teacher_grid,
        "dim": dim,
        "dtype": dtype,
        "has_attn": need_attn,
        "crops": boxes,
        "random_crops": {"count": int(random_crops), "scale": list(scale), "hflip": bool(cfg.data.hflip)}
        if random_crops
        else None,
        "pca": None if pca is None else {"dim": int(pca), "fit_images": min(n, int(pca_fit))},
        "chunk_size": int(chunk_size),
        "chunks": [{"file": chunk_name(c), "start": a, "stop": b} for c, (a, b) in enumerate(ranges)],
    }
    root = Path(out).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    _write_meta(meta, root)
    bs = int(batch_size or cfg.data.batch_size)
    basis: dict[str, Tensor] | None = None
    explained = None
    if pca is not None:
        basis, explained = shared_pca(
            root, lambda: fit_pca(tm, dataset, int(pca), pca_fit, bs, device, cfg.data.num_workers)
        )
    written = skipped = 0
    for c in range(r, len(ranges), w):
        path = root / chunk_name(c)
        if path.is_file():
            skipped += 1
            continue
        a, b = ranges[c]
        toks, globs, attns = [], [], []
        loader = DataLoader(Subset(source, range(a, b)), batch_size=bs, num_workers=cfg.data.num_workers)
        views = 1 + len(boxes) + int(random_crops)
        stored_boxes, stored_flips = [], []
        for batch in loader:
            image = batch["image"]
            if random_crops:
                stored_boxes.append(batch["crop_box"])
                stored_flips.append(batch["crop_flip"])
            x = image.to(device).reshape(-1, *image.shape[-3:])  # (B * views, C, s, s)
            k = x.shape[0] // views
            res = tm(x, None, need_attn=need_attn)
            toks.append(res.tokens[:, 1:].reshape(k, views, map_hw[0], map_hw[1], dim).cpu())
            globs.append(res.tokens[:, 0].reshape(k, views, dim).cpu())
            if need_attn:
                attns.append(res.cls_attn.reshape(k, views, map_hw[0], map_hw[1]).cpu())
        tokens, globals_ = torch.cat(toks), torch.cat(globs)
        flipped = torch.cat(stored_flips) if random_crops else None  # (k, K): those crops' maps back to the image's
        if flipped is not None:  # orientation (the full image, view 0, is never mirrored)
            mirror = torch.cat([torch.zeros_like(flipped[:, :1]), flipped], 1).view(flipped.shape[0], views, 1, 1)
            tokens = torch.where(mirror.unsqueeze(-1), tokens.flip(3), tokens)
            if need_attn:
                attns = [torch.where(mirror, torch.cat(attns).flip(3), torch.cat(attns))]
        parts: dict[str, Tensor] = {"global": globals_[:, 0]}
        if views > 1:
            parts["crop_global"] = globals_[:, 1:]
        tensors: dict[str, Tensor] = {k: v.half() for k, v in parts.items()}
        if basis is not None:  # coordinates on the principal directions
            tokens = (tokens - basis["mean"]) @ basis["components"].T
        for name, t in [("", tokens[:, 0]), *([("crop_", tokens[:, 1:])] if views > 1 else [])]:
            if dtype == "int8":
                tensors[f"{name}tokens"], tensors[f"{name}scale"] = quantize_int8(t)
            else:
                tensors[f"{name}tokens"] = t.half()
        if need_attn:
            maps = torch.cat(attns)
            tensors["attn"] = maps[:, 0].half()
            if views > 1:
                tensors["crop_attn"] = maps[:, 1:].half()
        if flipped is not None:
            tensors["crop_box"] = torch.cat(stored_boxes).float()
            tensors["crop_flip"] = flipped
        _save_atomic(tensors, path)
        written += 1
    total = sum(p.stat().st_size for p in root.glob("chunk-*.safetensors"))
    return CacheReport(
        path=str(root),
        images=n,
        chunks=len(ranges),
        written=written,
        skipped=skipped,
        map_hw=map_hw,
        dim=dim,
        dtype=dtype,
        has_attn=need_attn,
        crops=len(boxes) + int(random_crops),
        pca_dim=None if pca is None else int(pca),
        pca_explained=explained,
        bytes=total,
        seconds=round(time.perf_counter() - t0, 1),
    )
