"""Pictures of pretraining runs: training curves, MAE reconstructions, PCA of features, semantic masks.

Everything here draws with matplotlib's non-interactive ``Agg`` canvas into PNG files (pyplot and its
global backend are not touched). The picture
code of a run (:func:`run_pictures`) rebuilds the method from ``RUN/config.yaml``, loads
``RUN/checkpoints/last.ckpt`` and runs one masked forward pass on a few fixed images of the run's
dataset (evaluation transform, ``torch.manual_seed(seed)``), so the pictures are reproducible.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from semmim.targets.pixels import patchify, unpatchify

GREY = 0.5
"""Value (in [0, 1]) that masked patches are painted with."""


@dataclass
class Picture:
    """A PNG written for the report, with what it shows."""

    path: Path
    title: str
    caption: str


# ------------------------------------------------------------------ tensor helpers
def to_display(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> (N, H, W, 3) float numpy in [0, 1]; 1-channel images become grey RGB."""
    x = images.detach().float().cpu().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        x = x.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).numpy()


def grey_masked(images: Tensor, mask: Tensor, patch_size: int) -> Tensor:
    """Paint the masked patches grey.

    Args:
        images: (N, C, H, W) in [0, 1].
        mask: (N, L) bool or float, 1 = masked; L = (H/p) * (W/p) row-major.
        patch_size: p.

    Returns:
        (N, C, H, W) with masked patches set to :data:`GREY`.
    """
    n, _, h, w = images.shape
    m = mask.to(images.device).float().view(n, h // patch_size, w // patch_size)
    m = m.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1) > 0.5
    return torch.where(m, torch.full_like(images, GREY), images)


def reconstruct_pixels(
    pred: Tensor,
    x: Tensor,
    mask: Tensor,
    patch_size: int,
    mean: Tensor,
    std: Tensor,
    norm_pix: bool,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Turn pixel predictions into images, as MAE's visualisation does.

    With ``norm_pix`` the model predicts every patch standardised by its own mean and variance; the
    true statistics of each patch (of the normalised input ``x``) undo it.

    Args:
        pred: (N, L, p*p*C) predictions in the space of ``patchify(x)``.
        x: (N, C, H, W) student input (normalised with ``mean``/``std``).
        mask: (N, L) 1 = masked.
        patch_size: p.
        mean, std: (1, C, 1, 1) the input normalisation, undone for display.
        norm_pix: the target was normalised per patch.
        eps: the epsilon of the per-patch normalisation.

    Returns:
        (reconstruction, reconstruction with the visible patches pasted in), each (N, C, H, W) in [0, 1].
    """
    c, h, w = x.shape[1:]
    grid = (h // patch_size, w // patch_size)
    target = patchify(x.float(), patch_size)  # (N, L, p*p*C)
    rec = pred.float()
    if norm_pix:
        mu = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        rec = rec * (var + eps) ** 0.5 + mu
    pasted = torch.where(mask.bool().unsqueeze(-1), rec, target)

    def to_image(patches: Tensor) -> Tensor:
        return (unpatchify(patches, patch_size, grid, c) * std + mean).clamp(0, 1)

    return to_image(rec), to_image(pasted)


def pca_rgb(
    fit: Tensor,
    *others: Tensor,
    grid: tuple[int, int],
    size: tuple[int, int] | None = None,
) -> list[Tensor]:
    """Project patch features on the first 3 principal components of ``fit`` and show them as RGB.

    One PCA is fitted on all tokens of ``fit`` (e.g. the teacher's features of every shown image); the
    same centring, projection and per-component min-max range (that of ``fit``) map ``fit`` and
    ``others`` to colours, so equal colours mean equal features. Values outside the range are clipped.

    Args:
        fit: (N, L, D) tokens the PCA is fitted on, L = grid[0] * grid[1] row-major.
        *others: (N', L, D) tokens projected with the same PCA (e.g. predictions).
        grid: (h, w) patch grid.
        size: (H, W) output size (nearest upsampling); None = the grid.

    Returns:
        One (N, H, W, 3) float tensor in [0, 1] per input, ``fit`` first.
    """
    d = fit.shape[-1]
    flat = fit.detach().float().cpu().reshape(-1, d)
    mu = flat.mean(0)
    centred = flat - mu
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    comps = torch.zeros(d, 3)
    k = min(3, vh.shape[0])
    comps[:, :k] = vh[:k].T
    # deterministic signs: the largest loading of every component is positive
    signs = torch.sign(comps[comps.abs().argmax(0), torch.arange(3)])
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    proj = centred @ comps
    lo, hi = proj.min(0).values, proj.max(0).values
    span = (hi - lo).clamp_min(1e-8)
    h, w = grid
    out = []
    for t in (fit, *others):
        if t.shape[-2:] != fit.shape[-2:]:
            raise ValueError(f"features of shape {tuple(t.shape)} do not match the fitted {tuple(fit.shape)}")
        p = (t.detach().float().cpu().reshape(-1, d) - mu) @ comps
        rgb = ((p - lo) / span).clamp(0, 1).view(-1, h, w, 3)
        if size is not None and tuple(size) != (h, w):
            rgb = F.interpolate(rgb.permute(0, 3, 1, 2), size=size, mode="nearest").permute(0, 2, 3, 1)
        out.append(rgb.contiguous())
    return out


def heat_maps(images: Tensor, heat: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Show per-patch scores (e.g. the teacher's CLS attention) alone and over the images.

    Args:
        images: (N, C, H, W) in [0, 1].
        heat: (N, h, w) non-negative scores on the patch grid (scaled to [0, 1] by each image's maximum).

    Returns:
        (heat map coloured with ``inferno``, images weighted by the scores), each (N, H, W, 3) numpy in [0, 1].
    """
    n, _, hh, ww = images.shape
    hm = heat.detach().float().cpu().clamp_min(0)
    hm = hm / hm.flatten(1).max(1).values.clamp_min(1e-12).view(n, 1, 1)
    up: np.ndarray = F.interpolate(hm.unsqueeze(1), size=(hh, ww), mode="nearest").squeeze(1).numpy()
    colours = np.asarray(matplotlib.colormaps["inferno"](up))[..., :3]
    return colours, to_display(images) * (0.15 + 0.85 * up[..., None])


# ------------------------------------------------------------------ figures
def _figure(size: tuple[float, float]) -> Figure:
    """A figure drawn by the Agg backend, independent of pyplot's global backend and figure list."""
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def save_grid(rows: Sequence[tuple[str, np.ndarray]], path: Path, title: str) -> Path:
    """Save a grid of images: one labelled row per entry, one column per image.

    Args:
        rows: (label, (N, H, W, 3) array in [0, 1]) per row.
        path: PNG to write.
        title: figure title.
    """
    n_rows, n_cols = len(rows), max(len(r[1]) for r in rows)
    cell = 1.5
    fig = _figure((cell * n_cols + 1.2, cell * n_rows + 0.6))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i, (label, imgs) in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(imgs):
                ax.imshow(np.clip(np.asarray(imgs[j], dtype=np.float32), 0, 1), interpolation="nearest")
            if j == 0:
                ax.set_ylabel(label, fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path | None:
    """Loss (log scale when positive), learning rate and images/s against the step, every run overlaid,
    plus ``target_explained`` and the online ``knn_top1`` when a run logged them.

    Args:
        runs: run name -> metrics rows (``step`` plus ``loss``, ``lr``, ``images_per_s``, optionally
            ``target_explained`` and ``knn_top1``).
        path: PNG to write.

    Returns:
        ``path``, or None when no run has metrics.
    """
    panels = [("loss", "training loss"), ("lr", "learning rate"), ("images_per_s", "images / s")]
    for key, label in (
        ("target_explained", "target explained (1 - loss / loss of the mean)"),
        ("knn_top1", "online kNN top-1 (%)"),
    ):
        if any(r.get(key) is not None for rows in runs.values() for r in rows):
            panels.append((key, label))
    if not any(runs.values()):
        return None
    fig = _figure((5 * len(panels), 4))
    axes = fig.subplots(1, len(panels))
    for ax, (key, label) in zip(axes, panels, strict=True):
        values_all: list[float] = []
        for name, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and r.get("step") is not None]
            pts = [(s, v) for s, v in pts if math.isfinite(float(v))]
            if not pts:
                continue
            steps, values = zip(*pts, strict=True)
            values_all.extend(float(v) for v in values)
            ax.plot(steps, values, marker="." if len(pts) < 30 else None, label=name)
        if key == "loss" and values_all and min(values_all) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9)
        fig.tight_layout(rect=(0, 0.08, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# ------------------------------------------------------------------ run pictures
def load_method(run_dir: Path, device: torch.device, teacher: Any = None) -> tuple[Any, Any]:
    """Rebuild ``RUN``'s method from its config and load ``checkpoints/last.ckpt`` (strict).

    ``teacher`` is the Python teacher a run was trained with (``teacher.name=module``): such a teacher
    cannot be rebuilt from the config.

    Returns:
        (config, method in eval mode on ``device``).
    """
    from semmim.run import load_run

    run = load_run(run_dir)
    return run.cfg, run.load_method(device, teacher=teacher)


def sample_images(cfg: Any, num_images: int) -> dict[str, Tensor]:
    """The first ``num_images`` images of the run's dataset with the evaluation transform.

    Returns:
        ``{"image": (N, C, H, W) in [0, 1], "label": (N,)}`` (+ ``"caption"`` when the data has them).
    """
    from torch.utils.data import IterableDataset

    from semmim.data import build_dataset

    data = cfg.data
    if data.name != "webdataset":
        data = dataclasses.replace(data, limit=min(data.limit or num_images, num_images), uint8=False)
    else:
        data = dataclasses.replace(data, uint8=False)
    ds = build_dataset(
        data, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans, train=False, seed=cfg.trainer.seed
    )
    if isinstance(ds, IterableDataset):  # WebDataset shards: the first images of the stream
        items = list(itertools.islice(iter(ds), num_images))
    else:
        items = [ds[i] for i in range(min(num_images, len(ds)))]
    if not items:
        raise ValueError("the run's dataset is empty")
    batch: dict[str, Any] = {
        "image": torch.stack([it["image"] for it in items]),
        "label": torch.tensor([int(it.get("label", -1)) for it in items]),
    }
    if all("caption" in it for it in items):
        batch["caption"] = [it["caption"] for it in items]
    return batch


def _patch_tokens(t: Tensor, length: int) -> Tensor:
    """Drop a leading CLS token: (N, 1 + L, D) or (N, L, D) -> (N, L, D)."""
    return t[:, 1:] if t.shape[1] == length + 1 else t


@torch.no_grad()
def predict(method: Any, batch: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """One masked forward pass of a MIM method and what the pictures need.

    Returns:
        A dict with ``kind`` ("pixels" | "features" | "tokens" | None), ``mask`` (N, L) bool, ``pred`` (N, L, D),
        ``teacher`` (N, L, D) feature targets (features), ``cls_attn`` (N, L) or None, ``x`` (N, C, H, W)
        student input, ``normalize_features`` (bool: the loss is a cosine, compare directions).
    """
    from semmim.losses.reconstruction import CosineLoss

    imgs = batch["image"]
    grid = method.grid
    length = grid[0] * grid[1]
    x = method.normalize(imgs)
    res: dict[str, Any] = {"kind": None, "x": x, "cls_attn": None, "teacher": None, "normalize_features": False}
    torch.manual_seed(seed)
    out = method(dict(batch))
    if "mask" not in out or "pred" not in out:
        return res
    res.update(mask=out["mask"].bool(), pred=_patch_tokens(out["pred"].float(), length))
    target = getattr(method, "target", None)
    loss_fn = getattr(method, "loss_fn", None)
    if target is not None and getattr(target, "kind", "features") == "pixels":
        res.update(kind="pixels", norm_pix=bool(getattr(target, "norm_pix", False)))
        return res
    if target is not None and getattr(target, "kind", "features") == "tokens":
        res.update(kind="tokens")  # code ids: no reconstruction or feature picture
        return res
    if "target" in out:
        res.update(kind="features", teacher=_patch_tokens(out["target"].float(), length))
        res["normalize_features"] = loss_fn is None or isinstance(loss_fn, CosineLoss)
    if target is not None and getattr(getattr(method, "masker", None), "needs_scores", False):
        res["cls_attn"] = target(imgs, grid, need_attn=True).cls_attn
    return res


def run_pictures(
    run_dir: Path,
    out_dir: Path,
    stem: str,
    num_images: int = 8,
    seed: int = 0,
    device: str | torch.device | None = None,
    teacher: Any = None,
) -> tuple[list[Picture], list[str]]:
    """Write the pictures of one run into ``out_dir`` (files ``<stem>_*.png``).

    ``teacher``: the Python teacher of a run trained with one (see :func:`load_method`).

    Pixel targets give a reconstruction grid, feature targets a PCA grid, maskers that need teacher
    scores an attention/mask grid. Nothing raises: what could not be drawn is explained in the notes.

    Returns:
        (pictures, notes).
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from semmim.run import ckpt_path

    ckpt = ckpt_path(run_dir)
    if not ckpt.is_file():
        return [], [f"no pictures: no checkpoint at {ckpt}"]
    try:
        cfg, method = load_method(run_dir, dev, teacher=teacher)
    except Exception as e:  # a missing teacher/checkpoint or an old config must not stop the report
        return [], [f"no pictures: could not rebuild the model ({type(e).__name__}: {e})"]
    if getattr(method, "masker", None) is None:
        return [], [f"no MIM pictures: method '{cfg.method.name}' masks no patches"]
    try:
        batch = sample_images(cfg, num_images)
        batch["image"] = batch["image"].to(dev)
        batch["label"] = batch["label"].to(dev)
        res = predict(method, batch, seed)
    except Exception as e:
        return [], [f"no pictures: the forward pass failed ({type(e).__name__}: {e})"]
    if res["kind"] is None:
        return [], [f"no MIM pictures: method '{cfg.method.name}' gave no masked prediction"]
    if res["kind"] == "tokens":
        what = cfg.method.target["name"] if cfg.method.target else "token"
        return [], [f"no MIM pictures: the target ({what}) is discrete code ids, which have no picture"]
    return _draw(cfg, method, batch["image"], res, out_dir, stem), []


def _draw(cfg: Any, method: Any, imgs: Tensor, res: dict[str, Any], out_dir: Path, stem: str) -> list[Picture]:
    p = cfg.model.patch_size
    grid = method.grid
    mask = res["mask"]
    name = cfg.method.name
    n_masked = mask.float().sum(1).mean().item()
    ratio = f"{n_masked / mask.shape[1]:.0%} of {mask.shape[1]} patches masked"
    pics: list[Picture] = []
    masked_in = to_display(grey_masked(imgs, mask, p))
    if res["kind"] == "pixels":
        rec, pasted = reconstruct_pixels(
            res["pred"], res["x"], mask, p, method.pixel_mean, method.pixel_std, bool(res["norm_pix"])
        )
        rows = [
            ("input", to_display(imgs)),
            ("masked input", masked_in),
            ("reconstruction", to_display(rec)),
            ("rec. + visible", to_display(pasted)),
        ]
        path = save_grid(rows, out_dir / f"{stem}_reconstruction.png", f"{stem} ({name}): pixel reconstruction")
        undo = " (the per-patch normalised prediction is mapped back with each true patch's mean and variance)"
        pics.append(
            Picture(
                path,
                "Reconstruction",
                f"Rows: input image; masked input ({ratio}, grey = masked); the decoder's prediction for "
                f"every patch{undo if res['norm_pix'] else ''}; the prediction with the visible patches pasted in.",
            )
        )
    else:
        teacher, pred = res["teacher"].float(), res["pred"].float()
        if res["normalize_features"]:
            teacher, pred = F.normalize(teacher, dim=-1), F.normalize(pred, dim=-1)
        size = (imgs.shape[-2], imgs.shape[-1])
        t_rgb, p_rgb = pca_rgb(teacher, pred, grid=grid, size=size)
        rows = [
            ("input", to_display(imgs)),
            ("mask", masked_in),
            ("target PCA", t_rgb.numpy()),
            ("predicted PCA", p_rgb.numpy()),
        ]
        path = save_grid(rows, out_dir / f"{stem}_pca.png", f"{stem} ({name}): feature PCA")
        has_teacher = getattr(getattr(method, "target", None), "teacher", None) is not None
        what = "the teacher's patch features" if has_teacher else "the method's own target tokens (unmasked pass)"
        pics.append(
            Picture(
                path,
                "Feature targets and predictions (PCA)",
                f"Rows: input; mask ({ratio}, grey = masked); {what} (the target) and the model's predicted "
                "features, both projected on the first 3 principal components of the targets of all shown images "
                "(one PCA, same colour range: equal colours = similar features"
                + (
                    "; tokens L2-normalised, as the cosine loss compares directions"
                    if res["normalize_features"]
                    else ""
                )
                + ").",
            )
        )
    if res["cls_attn"] is not None and getattr(method.masker, "needs_scores", False):
        heat, weighted = heat_maps(imgs, res["cls_attn"].float().view(-1, *grid))
        rows = [
            ("input", to_display(imgs)),
            ("teacher CLS attn.", heat),
            ("attn. x input", weighted),
            ("visible patches", masked_in),
        ]
        path = save_grid(rows, out_dir / f"{stem}_semantic_mask.png", f"{stem} ({name}): semantic-aware masking")
        pics.append(
            Picture(
                path,
                "Semantic-aware masking",
                "Rows: input; the teacher's CLS-token attention to every patch in its last block (bright = high; "
                "the scores the masker samples visible patches with, scaled to each image's maximum); the input "
                f"weighted by that attention; the patches kept visible ({ratio}).",
            )
        )
    return pics
