"""Shared fixtures: tiny configs that train in seconds on a CPU, and a tiny exported teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semmim.export import save_encoder
from semmim.models.vit import ViTEncoder

TINY = [
    "data.name=synthetic",
    "data.limit=64",
    "data.batch_size=8",
    "data.num_workers=0",
    "data.pin_memory=false",
    "data.mean=[0.5,0.5,0.5]",
    "data.std=[0.25,0.25,0.25]",
    "data.crop_scale=[0.2,1.0]",
    "model.img_size=16",
    "model.patch_size=4",
    "model.in_chans=3",
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "model.timm_name=vit_tiny_patch16_224",
    "decoder.embed_dim=32",
    "decoder.depth=1",
    "decoder.num_heads=2",
    "optim.lr=1e-3",
    "optim.warmup_steps=1",
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
    "trainer.progress_bar=false",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
]


NO_DECODER_SHAPE = ("clip", "maskdistill")
"""Methods whose decoder node takes no shape keys (clip has no decoder, MaskDistill a linear head)."""


def tiny_overrides(*extra: str) -> list[str]:
    """The tiny config plus ``extra``; decoder shape keys only for methods whose decoder takes them."""
    names = [e.split("=", 1)[1] for e in extra if e.startswith("method.name=")]
    base = [o for o in TINY if not (names and names[-1] in NO_DECODER_SHAPE and o.startswith("decoder."))]
    return [*base, *extra]


METHOD_EXTRA: dict[str, list[str]] = {
    "supmim": ["method.num_classes=10"],
    "clip": ["method.embed_dim=16"],
    "rils": ["method.embed_dim=16"],
}
"""Per-method keys of the tiny test configs (a key a method does not read is an error)."""

TEACHER_METHODS = ("milan", "maskdistill")


def method_overrides(name: str, teacher_dir: Path | None = None) -> list[str]:
    """The tiny config for method ``name``: its own keys, and the tiny teacher when it takes one."""
    extra = [f"method.name={name}", *METHOD_EXTRA.get(name, [])]
    if name in TEACHER_METHODS:
        assert teacher_dir is not None, f"{name} needs the tiny teacher"
        extra += teacher_overrides(teacher_dir)
    return tiny_overrides(*extra)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-block ViT exported like a semmim run (encoder.safetensors with timm metadata)."""
    torch.manual_seed(123)
    enc = ViTEncoder(
        img_size=16,
        patch_size=4,
        in_chans=3,
        embed_dim=48,
        depth=2,
        num_heads=3,
        timm_name="vit_tiny_patch16_224",
    )
    out = tmp_path_factory.mktemp("teacher")
    save_encoder(out / "encoder.safetensors", enc.timm_state_dict(), enc.timm_name, enc.timm_kwargs())
    return out


def teacher_overrides(teacher_dir: Path) -> list[str]:
    return ["teacher.name=timm", f"teacher.path={teacher_dir}"]
