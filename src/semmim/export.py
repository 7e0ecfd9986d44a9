"""Export encoders as timm-compatible safetensors files, and load them back.

An exported file holds the encoder's state dict with exactly timm's ``VisionTransformer`` key names,
plus metadata naming the timm architecture and the keyword arguments (image size, patch size,
width, depth, ...) that rebuild it::

    model = semmim.export.load_timm_model("runs/mae/encoder.safetensors")
    # same as:
    name, kwargs = semmim.export.read_timm_config("runs/mae/encoder.safetensors")
    model = timm.create_model(name, num_classes=0, **kwargs)
    model.load_state_dict(safetensors.torch.load_file("runs/mae/encoder.safetensors"))
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from semmim.run.files import ENCODER as ENCODER_FILE


def resolve_run_file(path: str | os.PathLike[str], filename: str = ENCODER_FILE) -> Path:
    """A run directory or a ``.safetensors`` file -> the weights file; a clear error if missing."""
    p = Path(path)
    if p.is_dir():
        p = p / filename
    if not p.is_file():
        raise FileNotFoundError(
            f"weights not found: {p} (give a semmim run directory holding {filename}, or the file itself)"
        )
    if p.suffix in TRAINING_CHECKPOINT_SUFFIXES:
        raise ValueError(
            f"{p} is a training checkpoint, not an exported encoder: give the run directory, whose {filename} is "
            "written when the run finishes (`semmim pretrain --resume` finishes a stopped one)"
        )
    return p


TRAINING_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
"""Files :func:`resolve_run_file` refuses with a clear message: training checkpoints, not exported weights."""


def resolve_encoder_file(path: str | os.PathLike[str]) -> Path:
    """A run directory or ``encoder.safetensors`` -> the encoder file."""
    return resolve_run_file(path, ENCODER_FILE)


def save_encoder(
    path: str | os.PathLike[str],
    state_dict: dict[str, torch.Tensor],
    timm_name: str,
    timm_kwargs: dict[str, Any],
    extra: dict[str, str] | None = None,
) -> Path:
    """Write ``state_dict`` as safetensors with the timm architecture in the metadata (atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    meta = {
        "format": "pt",
        "timm_model": timm_name,
        "timm_kwargs": json.dumps(timm_kwargs),
        "producer": "semmim",
    }
    meta.update(extra or {})
    tmp = p.with_name(p.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, p)
    return p


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    p = resolve_encoder_file(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{p} is not a readable safetensors file: {e}") from None


FORBIDDEN_TIMM_KWARGS = ("checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
"""``timm_kwargs`` an export may not carry: they would make ``timm.create_model`` read other files."""


def read_tensor_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a safetensors file, read from its header (no tensor is loaded).

    safetensors checks that the header's shapes and offsets account for exactly the bytes of the
    file, so these shapes are bounded by the file's size.
    """
    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            return {k: tuple(int(d) for d in f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{p} is not a readable safetensors file: {e}") from None


def check_export_architecture(
    path: str | os.PathLike[str], name: str, kwargs: dict[str, Any], num_classes: int = 0
) -> None:
    """Check that the tensors in an export's header are exactly those of the architecture its metadata claims.

    Runs before any real model is built: the claimed depth is bounded by the number of tensors in the
    file, the model is then built on the ``meta`` device (no memory for weights), and its parameter
    names and shapes are compared with the file's. A small file whose metadata asks for a huge model
    therefore fails in well under a second without allocating it.

    Raises:
        ValueError: one line naming the file and the first disagreement.
    """
    import timm

    p = Path(path)
    shapes = read_tensor_shapes(p)
    total = sum(math.prod(s) for s in shapes.values())
    for key in FORBIDDEN_TIMM_KWARGS:
        if key in kwargs:
            raise ValueError(f"{p}: metadata timm_kwargs.{key} is not allowed in a semmim export")
    for key, value in kwargs.items():
        if not isinstance(value, int | float | str | bool | list | type(None)):
            raise ValueError(f"{p}: metadata timm_kwargs.{key}={value!r} is not a plain number, string or list")
    depth = kwargs.get("depth")
    depths = kwargs.get("depths")
    claimed = depth if isinstance(depth, int) else sum(depths) if isinstance(depths, list) else None
    if isinstance(claimed, int) and not 0 <= claimed <= len(shapes):
        raise ValueError(
            f"{p}: metadata claims depth {claimed} but the file holds only {len(shapes)} tensors ({total} values)"
        )
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except Exception as e:
        raise ValueError(f"{p}: metadata timm_model={name!r} with {kwargs} cannot be built: {e}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = sum(math.prod(s) for s in expected.values())
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [k for k in expected if k in shapes and expected[k] != shapes[k]]
    if want != total or missing or unexpected or wrong:

        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = [f"missing {few(missing)}"] if missing else []
        parts += [f"unexpected {few(unexpected)}"] if unexpected else []
        parts += [f"{k} is {shapes[k]} in the file but {expected[k]} in the model" for k in wrong[:3]]
        raise ValueError(
            f"{p}: the metadata's architecture (timm {name}, {kwargs}) has {want} parameters but the file holds "
            f"{total} values: {'; '.join(parts) or 'the sizes differ'}"
        )


def read_timm_config(path: str | os.PathLike[str], verify: bool = True) -> tuple[str, dict[str, Any]]:
    """The timm model name and kwargs stored in a semmim export.

    Args:
        path: a run directory or an export file.
        verify: check first (:func:`check_export_architecture`) that the file's tensors are exactly those of
            that architecture, so a crafted metadata cannot make the caller build a huge model.

    Raises:
        ValueError: not a semmim export, malformed metadata, or tensors that do not fit the architecture.
    """
    p = resolve_encoder_file(path)
    meta = read_metadata(p)
    if "timm_model" not in meta:
        raise ValueError(f"{p} has no 'timm_model' metadata: it was not written by semmim")
    try:
        kwargs = json.loads(meta.get("timm_kwargs", "{}"))
        num_classes = int(meta.get("num_classes", 0))
    except ValueError as e:
        raise ValueError(f"{p}: malformed timm_kwargs / num_classes metadata: {e}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"{p}: metadata timm_kwargs is not a JSON object")
    name = meta["timm_model"]
    if verify:
        check_export_architecture(p, name, kwargs, num_classes)
    overlay = pretrained_cfg_of(meta, kwargs)
    if overlay is not None:
        kwargs["pretrained_cfg_overlay"] = overlay
    return name, kwargs


def pretrained_cfg_of(meta: dict[str, str], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """timm's ``pretrained_cfg`` entries for the run's preprocessing (input size, mean, std, interpolation, crop).

    Passed to ``timm.create_model`` as ``pretrained_cfg_overlay``, so ``timm.data.resolve_data_config({},
    model=model)`` gives the evaluation transform semmim itself uses (bicubic resize by 256/224 for images of
    at least 112 px, then a center crop). None when the export records no normalisation.
    """
    from semmim.data.transforms import EVAL_CROP_MIN_SIZE

    if "mean" not in meta or "std" not in meta:
        return None
    try:
        mean, std = [float(v) for v in json.loads(meta["mean"])], [float(v) for v in json.loads(meta["std"])]
    except (ValueError, TypeError):
        return None
    size = int(kwargs.get("img_size", 224))
    chans = int(kwargs.get("in_chans", 3))
    crop_pct = 224 / 256 if size >= EVAL_CROP_MIN_SIZE else 1.0
    return {
        "input_size": (chans, size, size),
        "mean": tuple(mean),
        "std": tuple(std),
        "interpolation": "bicubic",
        "crop_pct": crop_pct,
        "crop_mode": "center",
    }


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load weights from ``.safetensors`` or a torch checkpoint (``weights_only=True``).

    Nested checkpoints (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read weights from {p}: {type(e).__name__}: {e}") from None
    for key in ("state_dict", "model", "module", "encoder"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{p} does not hold a state dict (found {type(obj).__name__})")
    return obj


def load_timm_model(path: str | os.PathLike[str], num_classes: int = 0, **overrides: Any) -> torch.nn.Module:
    """Rebuild the timm model described by a semmim export and load its weights (strict)."""
    import timm
    from safetensors.torch import load_file

    p = resolve_encoder_file(path)
    name, kwargs = read_timm_config(p)
    kwargs.update(overrides)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    state = load_file(str(p))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")] if num_classes else list(missing)
    if missing or unexpected:
        raise ValueError(f"{p} does not match timm '{name}': missing {missing}, unexpected {unexpected}")
    return model


def read_normalization(path: str | os.PathLike[str]) -> tuple[list[float], list[float]] | None:
    """The input mean/std an exported encoder was trained with, when recorded."""
    meta = read_metadata(path)
    if "mean" in meta and "std" in meta:
        return json.loads(meta["mean"]), json.loads(meta["std"])
    return None
