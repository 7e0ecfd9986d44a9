"""Cached teacher feature maps: the frozen teacher runs once per image, training crops its stored map.

A frozen teacher's output for an image never changes, only the training crop does. ``semmim teacher cache``
(:func:`semmim.teachers.cache_writer.write_cache`) runs the teacher once on every *full* image of the training set,
resized to a set size, and stores its dense token map; a run with ``teacher.cache=DIR`` then takes each view's
target from that map, cut to the view's crop box and resampled onto the student's grid with RoIAlign, and
mirrored when the view was flipped (label-map caching: ReLabel, Yun et al. 2021, arXiv:2101.05022). No teacher
forward runs during training; the teacher is not even built.

The directory holds ``cache.json`` and chunked safetensors files ``chunk-00000.safetensors``, ... . Chunk ``c``
covers the dataset indices ``[c * chunk_size, min(n, (c + 1) * chunk_size))`` and holds, for its ``k`` images:

==========  ===========================================================================================
``tokens``  (k, h, w, D) the patch-token map: float16, or int8 with ``scale`` (k, h, w) float32 per token
``global``  (k, D) float16: the teacher's global (CLS) token of the full image
``attn``    (k, h, w) float16: the CLS attention map, only when the run's masker needs it (``has_attn``)
==========  ===========================================================================================

With fixed crops (``semmim teacher cache --crops 5|9``: the four corners and the centre, or a 3 x 3 grid, each
``--crop-side`` of the width and height), the teacher also runs on each of those ``K`` crops resized to the same size,
and the chunks hold ``crop_tokens`` (k, K, h, w, D) (with ``crop_scale`` (k, K, h, w) for int8), ``crop_global``
(k, K, D) and ``crop_attn`` (k, K, h, w). A training view then takes its target from the stored view that overlaps it
most (largest IoU of the boxes, the full image included; :func:`best_view`): its global token and, for the output
cells whose centres fall inside that view, its map; the cells outside come from the full image's map
(:func:`view_cells`). Without crops the global token is always the full image's, which a crop's own cannot be cut
from; with them it is the one of the nearest stored view. The crops cost ``K`` more teacher passes once and ``K``
times the storage; at demo scale they close most of MILAN's accuracy gap to the online teacher
(benchmarks/results/teacher_cache).

With ``--random-crops K`` the teacher instead runs on ``K`` random resized crops of every image, drawn as the
training transform draws them (``data.crop_scale``, aspect 3/4-4/3) from a seeded stream of their own, and the
chunks also hold their boxes, ``crop_box`` (k, K, 4), and flips, ``crop_flip`` (k, K) (each crop mirrored at random
before the teacher sees it when ``data.hflip``; its map is stored mirrored back, in the image's orientation). Training
views then either take the nearest of them, as above (``teacher.cache_crops=nearest``), or are those very crops
(``teacher.cache_crops=stored``: each view is one of its image's ``K`` crops with its flip, drawn at random,
:meth:`TeacherCache.stored_crop`), so that a view's target is the teacher's own output for it, exact up to the storage
precision, at the price of ``K`` views per image over the whole run (FKD, Shen & Xing 2021,
arXiv:2112.01528, stores region-level soft labels the same way).

With ``--pca k`` the map tokens (``tokens``, ``crop_tokens``) hold ``k`` coordinates instead of ``D`` values: their
projection on the ``k`` principal directions of the teacher's map tokens, fitted once (on ``--pca-fit`` images spread
over the data) and saved as ``pca.safetensors`` (``mean`` (D,), ``components`` (k, D), the share of variance kept in
its metadata); reading maps them back (``coords @ components + mean``), so targets keep the teacher's width. Global
tokens are stored whole.

``cache.json`` records ``format``/``version``, the dataset identity (:func:`dataset_identity`), the teacher
(its config section, description and :func:`semmim.tokenizers.codebook.teacher_fingerprint`), the image size the
maps were computed at, the map size ``(h, w)``, the teacher's own grid at its input size, ``dtype``, ``dim`` (D),
``has_attn``, the fixed crop boxes (``crops``, normalised ``(x0, y0, x1, y1)``; absent or empty: none), the random
crops (``random_crops``: ``count`` and the ``scale`` they were drawn with, or none), ``pca`` (``dim`` and
``fit_images``, or none) and the index range of every chunk.

At train time the engine checks the cache against the data and the teacher (:func:`check_cache_for_run`), makes
the training items carry their crop box and flip (``SeededDataset.geometry``) and their stored maps, read in the
loader's workers (``SeededDataset.extras`` = :meth:`TeacherCache.item`); the target
(:class:`semmim.targets.TeacherFeatureTarget` with ``teacher_cache``) cuts them on the device (:func:`crop_maps`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from semmim.errors import ConfigError

CACHE_FORMAT = "semmim-teacher-cache"
CACHE_VERSION = 1
CACHE_DTYPES = ("float16", "int8")
META_FILE = "cache.json"
PCA_FILE = "pca.safetensors"
TEACHER_KEYS = ("name", "model", "pretrained", "path", "image_size", "mean", "std", "input_norm", "tokens", "kwargs")
"""The ``teacher`` config keys that decide its tokens (``cache`` itself is not one of them)."""


def chunk_name(chunk: int) -> str:
    return f"chunk-{chunk:05d}.safetensors"


def chunk_ranges(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of every chunk of ``n`` images, ``chunk_size`` each (the last may be shorter)."""
    return [(s, min(n, s + chunk_size)) for s in range(0, n, chunk_size)]


# ------------------------------------------------------------------------------------ identity
def _base_dataset(dataset: Any) -> Any:
    """The dataset below a :class:`semmim.data.SeededDataset` (its ``dataset``), else ``dataset`` itself."""
    return getattr(dataset, "dataset", dataset)


def dataset_identity(dataset: Any, name: str | None, root: str | None) -> dict[str, Any]:
    """What a cache records about its dataset: name, root, number of images and a fingerprint.

    The fingerprint is a SHA-256 over the sorted ``(relative path, size in bytes)`` of the dataset's files when it
    lists them (``samples``: image folders, manifests) and, for every dataset, over its length and the decoded
    pixels of its first, middle and last images (generated datasets have no files).
    """
    base = _base_dataset(dataset)
    n = len(dataset)
    h = hashlib.sha256(f"n={n}|".encode())
    samples = getattr(base, "samples", None)
    if isinstance(samples, list) and samples:
        top = Path(str(getattr(base, "root", None) or "."))
        rows = []
        for sample in samples:
            path = Path(str(sample[0] if isinstance(sample, (tuple, list)) else sample))
            try:
                size = path.stat().st_size
            except OSError:
                size = -1
            try:
                rel = str(path.relative_to(top))
            except ValueError:
                rel = str(path)
            rows.append(f"{rel}|{size}")
        for row in sorted(rows):
            h.update(row.encode() + b"\n")
    for i in sorted({0, n // 2, n - 1}) if n else []:
        img, _ = base.load(i)
        pixels = img if isinstance(img, Tensor) else torch.from_numpy(np.asarray(img).copy())
        h.update(f"{i}|{tuple(pixels.shape)}|".encode())
        h.update(pixels.contiguous().reshape(-1).numpy().tobytes())
    return {"name": name, "root": None if root is None else str(root), "num_images": n, "fingerprint": h.hexdigest()}


def masker_needs_attention(cfg: Any) -> bool:
    """Whether the run's masker takes the teacher's CLS attention (semantic-aware masking)."""
    from semmim.registry import MASKERS

    node = cfg.method.masker
    return node is not None and bool(getattr(MASKERS.get(node["name"]), "needs_scores", False))


WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npz")


def weights_stamp(tcfg: Any) -> dict[str, str]:
    """SHA-256 of the local weight files ``teacher.path`` / ``teacher.pretrained`` name (a file, or the weight files
    directly in a directory), so weights replaced in place are noticed without building the teacher. Hub names and
    tags have no local file and are identified by the config keys alone."""
    out: dict[str, str] = {}
    for key in ("path", "pretrained"):
        value = getattr(tcfg, key, None)
        if not isinstance(value, str) or not value:
            continue
        p = Path(value).expanduser()
        files = [p] if p.is_file() else []
        if p.is_dir():
            files = sorted(f for f in p.glob("*") if f.suffix in WEIGHT_SUFFIXES)
        for f in files:
            h = hashlib.sha256()
            with f.open("rb") as fh:
                while block := fh.read(1 << 24):
                    h.update(block)
            out[f"{key}:{f.name}"] = h.hexdigest()
    return out


def teacher_identity(tcfg: Any) -> dict[str, Any]:
    """The ``teacher`` config keys that decide its tokens (:data:`TEACHER_KEYS`), as recorded in a cache."""
    return {k: getattr(tcfg, k, None) for k in TEACHER_KEYS}


# ------------------------------------------------------------------------------------ int8 codec
def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """(..., D) float -> (..., D) int8 and (...,) float32 per-token scale; ``|x - q * scale| <= scale / 2``.

    ``scale = max|x| / 127`` per token, so the error is at most ``max|x| / 254`` of that token.
    """
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    q = torch.round(x / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    """Inverse of :func:`quantize_int8`: (..., D) int8 and (...,) scale -> (..., D) float32."""
    return q.float() * scale.float().unsqueeze(-1)


# ------------------------------------------------------------------------------------ crops
def crop_maps(maps: Tensor, boxes: Tensor, flips: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """Cut each map to its crop box and resample it to ``out_hw`` (RoIAlign, ``aligned=True``), mirrored if flipped.

    Map cell ``(i, j)`` of an ``h x w`` map covers the normalised image area ``[j/w, (j+1)/w] x [i/h, (i+1)/h]``;
    every output cell averages the map bilinearly over its part of the box (adaptive sampling: more samples when
    the box is larger than the output, so shrinking averages every cell it covers).

    Args:
        maps: (N, C, h, w) float maps of the full images.
        boxes: (N, 4) crop boxes ``(x0, y0, x1, y1)`` in normalised image coordinates.
        flips: (N,) bool: the view was mirrored left-right after the crop.
        out_hw: output grid (h', w').

    Returns:
        (N, C, h', w') float32.
    """
    from torchvision.ops import roi_align

    n, _, h, w = maps.shape
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=maps.device)
    rois = torch.cat([torch.arange(n, device=maps.device, dtype=torch.float32)[:, None], boxes.float() * scale], 1)
    out = roi_align(maps.float(), rois, output_size=out_hw, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flips = flips.to(device=out.device, dtype=torch.bool).view(-1, 1, 1, 1)
    return torch.where(flips, out.flip(-1), out)


CROP_LAYOUTS = {0: "none", 5: "the four corners and the centre", 9: "a 3 x 3 grid"}
"""The fixed crops ``semmim teacher cache --crops K`` can store, by ``K``."""


def crop_boxes(count: int, side: float) -> list[list[float]]:
    """The fixed crop boxes ``(x0, y0, x1, y1)`` (normalised) of ``--crops count --crop-side side``.

    Examples:
        >>> crop_boxes(5, 0.5)[-1]  # the centre crop comes last
        [0.25, 0.25, 0.75, 0.75]
        >>> len(crop_boxes(9, 0.8)), crop_boxes(0, 0.8)
        (9, [])
    """
    if count not in CROP_LAYOUTS:
        raise ConfigError(f"--crops must be one of {', '.join(map(str, CROP_LAYOUTS))} ({CROP_LAYOUTS}), got {count}")
    if count and not 0.0 < side < 1.0:
        raise ConfigError(f"--crop-side is a fraction of the image's width and height in (0, 1), got {side}")
    lo, mid, hi = 0.0, (1.0 - side) / 2, 1.0 - side
    starts = [(lo, lo), (hi, lo), (lo, hi), (hi, hi), (mid, mid)] if count == 5 else []
    if count == 9:
        starts = [(x, y) for y in (lo, mid, hi) for x in (lo, mid, hi)]
    return [[round(x, 6), round(y, 6), round(x + side, 6), round(y + side, 6)] for x, y in starts]


def box_iou(boxes: Tensor, views: Tensor) -> Tensor:
    """IoU of (N, 4) boxes with (V, 4) boxes (``x0, y0, x1, y1``) -> (N, V)."""
    x0 = torch.maximum(boxes[:, None, 0], views[None, :, 0])
    y0 = torch.maximum(boxes[:, None, 1], views[None, :, 1])
    x1 = torch.minimum(boxes[:, None, 2], views[None, :, 2])
    y1 = torch.minimum(boxes[:, None, 3], views[None, :, 3])
    inter = (x1 - x0).clamp_min(0) * (y1 - y0).clamp_min(0)
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_v = (views[:, 2] - views[:, 0]) * (views[:, 3] - views[:, 1])
    return inter / (area_b[:, None] + area_v[None, :] - inter).clamp_min(1e-12)


def best_view(crop: Tensor, crops: Tensor) -> int:
    """Which stored view a training crop (4,) takes its target from: 0 = the full image, ``1 + k`` = fixed crop
    ``k`` of ``crops`` (K, 4); the largest IoU wins, the full image on ties."""
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float32)
    iou = box_iou(crop.float().view(1, 4), torch.cat([full, crops.float().view(-1, 4)]))[0]
    return int(torch.argmax(iou).item())  # the first maximum: the full image on a tie


def relative_boxes(boxes: Tensor, views: Tensor) -> Tensor:
    """(N, 4) boxes in image coordinates -> in the coordinates of their (N, 4) views (may leave [0, 1])."""
    w = (views[:, 2] - views[:, 0]).clamp_min(1e-12)
    h = (views[:, 3] - views[:, 1]).clamp_min(1e-12)
    return torch.stack(
        [
            (boxes[:, 0] - views[:, 0]) / w,
            (boxes[:, 1] - views[:, 1]) / h,
            (boxes[:, 2] - views[:, 0]) / w,
            (boxes[:, 3] - views[:, 1]) / h,
        ],
        dim=1,
    )


def view_cells(boxes: Tensor, views: Tensor, flips: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """(N, 1, h', w') bool: the output cells of each crop (as :func:`crop_maps` lays them out, mirrored where
    ``flips``) whose centres lie inside its view's box."""
    h, w = out_hw
    frac_y = (torch.arange(h, dtype=torch.float32, device=boxes.device) + 0.5) / h
    frac_x = (torch.arange(w, dtype=torch.float32, device=boxes.device) + 0.5) / w
    cy = boxes[:, 1:2] + (boxes[:, 3:4] - boxes[:, 1:2]) * frac_y  # (N, h)
    cx = boxes[:, 0:1] + (boxes[:, 2:3] - boxes[:, 0:1]) * frac_x  # (N, w)
    in_y = (cy >= views[:, 1:2]) & (cy <= views[:, 3:4])
    in_x = (cx >= views[:, 0:1]) & (cx <= views[:, 2:3])
    inside = (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1)
    flips = flips.to(device=inside.device, dtype=torch.bool).view(-1, 1, 1, 1)
    return torch.where(flips, inside.flip(-1), inside)


ITEM_KEYS = (
    "teacher_tokens",
    "teacher_scale",
    "teacher_global",
    "teacher_attn",
    "teacher_view_tokens",
    "teacher_view_scale",
    "teacher_view_global",
    "teacher_view_attn",
    "teacher_view_box",
)
"""Item fields :meth:`TeacherCache.item` adds (the stored maps, read in the loader's workers); the ``teacher_view_*``
ones (the stored view nearest the item's crop: :func:`best_view`) only for a cache with crops (fixed or random)."""


@dataclass
class CropBatch:
    """What the cached target needs of a batch: each item's dataset index, crop box and flip, and the stored maps
    when the loader already read them (:meth:`TeacherCache.item`; else the target reads them by index).

    Attributes:
        index: (N,) int64 dataset indices.
        crop: (N, 4) float crop boxes ``(x0, y0, x1, y1)`` in normalised coordinates of the original image.
        flip: (N,) bool.
        stored: the items' ``teacher_*`` fields as collated: ``teacher_tokens`` (N, h, w, D) float16 or int8,
            ``teacher_scale`` (N, h, w) (int8 only), ``teacher_global`` (N, D), ``teacher_attn`` (N, h, w), and for
            a cache with crops the same of each item's nearest stored view (``teacher_view_*``) with its box
            ``teacher_view_box`` (N, 4).
    """

    index: Tensor
    crop: Tensor
    flip: Tensor
    stored: dict[str, Tensor] | None = None


def crop_batch_of(batch: Any) -> CropBatch | None:
    """The :class:`CropBatch` of a collated batch with ``"index"``, ``"crop"`` and ``"flip"`` (else ``None``)."""
    if not hasattr(batch, "get") or batch.get("crop") is None:
        return None
    index = torch.as_tensor(batch["index"], dtype=torch.int64)
    flip = torch.as_tensor(batch["flip"], dtype=torch.bool)
    stored = {k: batch[k] for k in ITEM_KEYS if batch.get(k) is not None} or None
    return CropBatch(index=index, crop=torch.as_tensor(batch["crop"], dtype=torch.float32), flip=flip, stored=stored)


def stored_maps(
    stored: dict[str, Tensor], attn: bool, prefix: str = "teacher_", pca: dict[str, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Collated ``teacher_*`` item fields -> what :meth:`TeacherCache.read` returns (float32, on their device);
    ``prefix="teacher_view_"``: the same of the items' nearest stored views. ``pca``: the cache's basis
    (:attr:`TeacherCache.pca`), mapping stored coordinates back to the teacher's width."""
    tok = stored[f"{prefix}tokens"]
    tok = dequantize_int8(tok, stored[f"{prefix}scale"]) if tok.dtype == torch.int8 else tok.float()
    if pca is not None:
        tok = tok @ pca["components"].to(tok.device) + pca["mean"].to(tok.device)
    a = stored[f"{prefix}attn"].float().unsqueeze(1) if attn else None
    return tok.permute(0, 3, 1, 2).contiguous(), stored[f"{prefix}global"].float(), a


# ------------------------------------------------------------------------------------ reading
def read_meta(root: str | Path) -> dict[str, Any]:
    """``cache.json`` of a cache directory.

    Raises:
        ConfigError: no cache there, or not a semmim teacher cache of a version this code reads.
    """
    path = Path(root).expanduser() / META_FILE
    if not path.is_file():
        raise ConfigError(f"teacher.cache={root}: no {META_FILE} there; write the cache with `semmim teacher cache`")
    meta = json.loads(path.read_text())
    if meta.get("format") != CACHE_FORMAT or int(meta.get("version", -1)) != CACHE_VERSION:
        raise ConfigError(
            f"teacher.cache={root}: {path} is not a {CACHE_FORMAT} version {CACHE_VERSION} (format "
            f"{meta.get('format')!r}, version {meta.get('version')!r})"
        )
    return meta


class TeacherCache:
    """Read access to a complete cache directory (see the module docstring for the layout).

    Args:
        root: the cache directory.

    Raises:
        ConfigError: not a cache, or chunks are missing (an unfinished ``semmim teacher cache``).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.meta = read_meta(self.root)
        self.num_images = int(self.meta["dataset"]["num_images"])
        self.map_hw = (int(self.meta["map_hw"][0]), int(self.meta["map_hw"][1]))
        self.teacher_grid = (int(self.meta["teacher_grid"][0]), int(self.meta["teacher_grid"][1]))
        self.dim = int(self.meta["dim"])
        self.dtype = str(self.meta["dtype"])
        self.has_attn = bool(self.meta["has_attn"])
        self.chunk_size = int(self.meta["chunk_size"])
        self.crops = torch.tensor(self.meta.get("crops") or [], dtype=torch.float32).view(-1, 4)
        """(K, 4) the fixed crop boxes stored besides the full image (K = 0: none)."""
        random = self.meta.get("random_crops") or {}
        self.random_crops = int(random.get("count", 0))
        """Random resized crops stored per image, each with its own box (``crop_box`` in the chunks; 0: none)."""
        self.random_scale = [float(v) for v in random.get("scale", [])]
        """The ``data.crop_scale`` those crops were drawn with."""
        self.random_hflip = bool(random.get("hflip", False))
        """Whether each of those crops was mirrored at random (``data.hflip``) before the teacher saw it."""
        self.pca: dict[str, Tensor] | None = None
        """``{"mean": (D,), "components": (k, D)}`` when the maps are stored as PCA coordinates (``--pca k``)."""
        missing = [c["file"] for c in self.meta["chunks"] if not (self.root / c["file"]).is_file()]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise ConfigError(
                f"teacher.cache={root} is incomplete: {len(missing)} of {len(self.meta['chunks'])} chunks missing "
                f"({shown}); rerun `semmim teacher cache` (done chunks are skipped)"
            )
        if self.meta.get("pca"):
            from safetensors.torch import load_file

            if not (self.root / PCA_FILE).is_file():
                raise ConfigError(
                    f"teacher.cache={root} stores PCA coordinates but its basis {PCA_FILE} is missing; rebuild the "
                    "cache with `semmim teacher cache`"
                )
            self.pca = load_file(str(self.root / PCA_FILE))
        self._open: dict[int, Any] = {}

    def _chunk(self, c: int) -> Any:
        from safetensors import safe_open

        handle = self._open.get(c)
        if handle is None:
            handle = safe_open(str(self.root / chunk_name(c)), framework="pt", device="cpu")
            self._open[c] = handle
        return handle

    def __getstate__(self) -> dict[str, Any]:  # file handles do not pickle: reopened on first use
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def item(self, index: int, crop: Tensor | None = None) -> dict[str, Tensor]:
        """The stored maps of one image as item fields (:data:`ITEM_KEYS`), as stored (float16 / int8): what a
        dataset adds to its items so the loader's workers read the cache (``SeededDataset.extras``).

        With crops in the cache (fixed or random) and the item's ``crop`` box (4,), also the ``teacher_view_*``
        fields of the stored view nearest that box (:func:`best_view`; the full image's own maps again when it is
        the nearest).
        """
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} is outside the cache's {self.num_images} images")
        c, row = divmod(int(index), self.chunk_size)
        f = self._chunk(c)
        out = {"teacher_tokens": f.get_slice("tokens")[row], "teacher_global": f.get_slice("global")[row]}
        if self.dtype == "int8":
            out["teacher_scale"] = f.get_slice("scale")[row]
        if self.has_attn:
            out["teacher_attn"] = f.get_slice("attn")[row]
        if (len(self.crops) or self.random_crops) and crop is not None:
            boxes = self.crops if len(self.crops) else f.get_slice("crop_box")[row]
            v = best_view(torch.as_tensor(crop), boxes)
            box = [0.0, 0.0, 1.0, 1.0] if v == 0 else boxes[v - 1].tolist()
            out["teacher_view_box"] = torch.tensor(box, dtype=torch.float32)
            for key in ("tokens", "scale", "global", "attn"):
                if f"teacher_{key}" in out:
                    out[f"teacher_view_{key}"] = (
                        out[f"teacher_{key}"] if v == 0 else f.get_slice(f"crop_{key}")[row, v - 1]
                    )
        return out

    def stored_crop(self, index: int, img: Any) -> tuple[tuple[int, int, int, int], bool | None]:
        """One of image ``index``'s stored random crops, drawn with ``torch``'s generator (the item's seeded context),
        in pixels of ``img`` (a PIL image or a (C, H, W) tensor): ``(top, left, height, width)``, and whether the
        teacher saw it mirrored (the view is then mirrored too); what ``SeededDataset.crop_source`` gives the training
        transform under ``teacher.cache_crops=stored``."""
        if not self.random_crops:
            raise ValueError(
                f"teacher.cache={self.root} stores no random crops (semmim teacher cache --random-crops K)"
            )
        c, row = divmod(int(index), self.chunk_size)
        k = int(torch.randint(self.random_crops, (1,)).item())
        f = self._chunk(c)
        x0, y0, x1, y1 = f.get_slice("crop_box")[row, k].tolist()
        height, width = (int(img.shape[-2]), int(img.shape[-1])) if isinstance(img, Tensor) else img.size[::-1]
        top, left = round(y0 * height), round(x0 * width)
        flip = bool(f.get_slice("crop_flip")[row, k].item())
        return (top, left, round(y1 * height) - top, round(x1 * width) - left), flip

    def stored(self, index: Tensor, crop: Tensor | None = None) -> dict[str, Tensor]:
        """:meth:`item` of dataset indices ``index`` (N,) (and their crop boxes (N, 4)), collated."""
        rows = [self.item(int(i), None if crop is None else crop[k]) for k, i in enumerate(index.tolist())]
        return {key: torch.stack([r[key] for r in rows]) for key in rows[0]}

    def read(self, index: Tensor, attn: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """The full images' stored maps of dataset indices ``index`` (N,).

        Returns:
            (N, D, h, w) float32 token maps, (N, D) float32 global tokens, and (N, 1, h, w) float32 CLS
            attention maps when ``attn`` (else ``None``).
        """
        return stored_maps(self.stored(index), attn, pca=self.pca)


# ------------------------------------------------------------------------------------ checks
def check_cache_dataset(meta: dict[str, Any], identity: dict[str, Any], where: str) -> None:
    """Refuse a cache written for another dataset (count, then fingerprint), in one line.

    Raises:
        ConfigError: names the cache, what differs and how to rebuild it.
    """
    have = meta["dataset"]
    if int(have["num_images"]) != int(identity["num_images"]):
        raise ConfigError(
            f"teacher.cache={where} holds {have['num_images']} images ({have['name']} at {have['root']}) but the "
            f"training data has {identity['num_images']} ({identity['name']} at {identity['root']}): rebuild it "
            "with `semmim teacher cache` on this run's config"
        )
    if have["fingerprint"] != identity["fingerprint"]:
        raise ConfigError(
            f"teacher.cache={where} was written for other images ({have['name']} at {have['root']}, fingerprint "
            f"{have['fingerprint'][:12]}) than the training data ({identity['name']} at {identity['root']}, "
            f"{identity['fingerprint'][:12]}): rebuild it with `semmim teacher cache` on this run's config"
        )


def check_cache_teacher(meta: dict[str, Any], tcfg: Any, where: str, fingerprint: str | None = None) -> None:
    """Refuse a cache of another teacher: its recorded teacher keys (or, for a teacher passed from Python, the
    weights fingerprint) must be this run's.

    Raises:
        ConfigError: names the first key that differs.
    """
    recorded = meta["teacher"]["config"]
    if fingerprint is not None:
        if fingerprint != meta["teacher"]["sha256"]:
            raise ConfigError(
                f"teacher.cache={where} was written by another teacher (fingerprint {meta['teacher']['sha256'][:12]}, "
                f"this run's is {fingerprint[:12]}): rebuild it with this teacher"
            )
        return
    stamp, now = meta["teacher"].get("weights", {}), weights_stamp(tcfg)
    if stamp != now:
        changed = sorted(set(stamp) ^ set(now) | {k for k in stamp if k in now and stamp[k] != now[k]})
        raise ConfigError(
            f"teacher.cache={where}: the teacher's weight files changed since the cache was written "
            f"({', '.join(changed)}): rebuild it with `semmim teacher cache`"
        )
    mine = teacher_identity(tcfg)
    for key in TEACHER_KEYS:
        a, b = recorded.get(key), mine.get(key)
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            raise ConfigError(
                f"teacher.cache={where} was written with teacher.{key}={a!r} but this run has teacher.{key}={b!r}: "
                f"rebuild the cache with this run's teacher, or set teacher.{key} back"
            )


def check_cache_for_run(cfg: Any, dataset: Any, teacher: Any = None) -> TeacherCache:
    """Check ``cfg.teacher.cache`` against the run's training dataset and teacher; returns the opened cache.

    A teacher passed from Python is compared by its weights fingerprint, a configured one by its config keys (it
    is not built).

    Raises:
        ConfigError: one line: no cache, an incomplete one, another dataset (count, fingerprint), another
            teacher, a dataset that cannot report crops, or a masker needing the attention the cache lacks.
    """
    where = str(cfg.teacher.cache)
    if not hasattr(dataset, "geometry"):
        raise ConfigError(f"teacher.cache={where}: data.name={cfg.data.name} gives no stable index and crop geometry")
    cache = TeacherCache(where)
    meta = cache.meta
    check_cache_dataset(meta, dataset_identity(dataset, cfg.data.name, cfg.data.root), where)
    fingerprint = None
    if teacher is not None:
        from semmim.tokenizers.codebook import teacher_fingerprint

        fingerprint = teacher_fingerprint(teacher)
    check_cache_teacher(meta, cfg.teacher, where, fingerprint)
    if getattr(cfg.teacher, "cache_crops", "nearest") == "stored":
        if not cache.random_crops:
            raise ConfigError(
                f"teacher.cache_crops=stored trains on the random crops stored with the cache, but teacher.cache="
                f"{where} has none: rewrite it with `semmim teacher cache --random-crops K`, or use "
                "teacher.cache_crops=nearest"
            )
        if bool(cfg.data.hflip) != cache.random_hflip:
            raise ConfigError(
                f"teacher.cache={where} stores crops drawn with data.hflip={str(cache.random_hflip).lower()}, but this "
                f"run has data.hflip={str(bool(cfg.data.hflip)).lower()}: set it to the cache's, or rewrite the cache"
            )
        if [float(v) for v in cfg.data.crop_scale] != cache.random_scale:
            raise ConfigError(
                f"teacher.cache={where} stores crops drawn with data.crop_scale={cache.random_scale}, but this run has "
                f"data.crop_scale={list(cfg.data.crop_scale)}: set it to the cache's, or rewrite the cache"
            )
    if masker_needs_attention(cfg) and not cache.has_attn:
        raise ConfigError(
            f"teacher.cache={where} holds no CLS attention maps, which method.masker={cfg.method.masker['name']} "
            "needs: rebuild it with this run's config (it stores them when the masker needs them)"
        )
    return cache
