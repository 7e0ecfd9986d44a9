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
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

ENCODER_FILE = "encoder.safetensors"


def resolve_run_file(path: str | os.PathLike[str], filename: str = ENCODER_FILE) -> Path:
    """A run directory or a ``.safetensors`` file -> the weights file; a clear error if missing."""
    p = Path(path)
    if p.is_dir():
        p = p / filename
    if not p.is_file():
        raise FileNotFoundError(
            f"weights not found: {p} (give a semmim run directory holding {filename}, or the file itself)"
        )
    return p


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


def read_timm_config(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """The timm model name and kwargs stored in a semmim export."""
    meta = read_metadata(path)
    if "timm_model" not in meta:
        raise ValueError(f"{resolve_encoder_file(path)} has no 'timm_model' metadata: it was not written by semmim")
    return meta["timm_model"], json.loads(meta.get("timm_kwargs", "{}"))


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
