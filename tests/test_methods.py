"""Every registered method builds from a config, runs forward/backward, and gives a finite loss."""

from __future__ import annotations

import pytest
import torch

from semmim.config import ConfigError, load_config
from semmim.methods import MILAN, build_method
from semmim.registry import METHODS
from tests.conftest import method_overrides, teacher_overrides, tiny_overrides


def _batch(cfg, n: int = 4) -> dict[str, torch.Tensor]:
    m = cfg.model
    return {
        "image": torch.rand(n, m.in_chans, m.img_size, m.img_size),
        "label": torch.zeros(n, dtype=torch.long),
        "caption": [f"a photo of a class_{i % 2}." for i in range(n)],
    }


@pytest.mark.parametrize("name", METHODS.names())
def test_method_forward_backward(name: str, tiny_teacher_dir) -> None:
    cfg = load_config(None, method_overrides(name, tiny_teacher_dir))
    torch.manual_seed(0)
    method = build_method(cfg)
    out = method(_batch(cfg))
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in method.encoder.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_milan_teacher_is_frozen_and_not_checkpointed(tiny_teacher_dir) -> None:
    cfg = load_config(None, tiny_overrides("method.name=milan", *teacher_overrides(tiny_teacher_dir)))
    method = build_method(cfg)
    assert isinstance(method, MILAN)
    method.train()
    teacher = method.target.teacher
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    sd = method.state_dict()
    assert not any(k.startswith("target.teacher.") for k in sd)
    # loading back without teacher keys is fine (strict), other missing keys are not
    method.load_state_dict(sd, strict=True)
    sd.pop("encoder.cls_token")
    with pytest.raises(RuntimeError, match=r"encoder\.cls_token"):
        method.load_state_dict(sd, strict=True)
    # the teacher gets no gradient
    method(_batch(cfg))["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_milan_uses_one_teacher_pass_for_targets_and_attention(tiny_teacher_dir) -> None:
    cfg = load_config(None, tiny_overrides("method.name=milan", *teacher_overrides(tiny_teacher_dir)))
    method = build_method(cfg)
    calls = []
    teacher_model = method.target.teacher
    handle = teacher_model.register_forward_hook(lambda *a: calls.append(1))
    method(_batch(cfg))
    handle.remove()
    assert len(calls) == 1


def test_milan_semantic_masking_follows_teacher_attention(tiny_teacher_dir) -> None:
    """The visible patches are drawn from the teacher's CLS attention of the same images."""
    cfg = load_config(None, tiny_overrides("method.name=milan", *teacher_overrides(tiny_teacher_dir)))
    method = build_method(cfg)
    images = torch.rand(64, 3, 16, 16)
    attn = method.target(images, method.grid, need_attn=True).cls_attn
    torch.manual_seed(0)
    out = method({"image": images})
    visible = ~out["mask"]
    # attention mass on visible patches exceeds what a uniform draw of the same count would get
    kept_mass = (attn * visible).sum(1).mean()
    uniform_mass = visible.float().mean()
    assert kept_mass > uniform_mass


def test_mae_rejects_block_masking() -> None:
    with pytest.raises(ConfigError, match="visible-only encoder"):  # caught when the config loads
        load_config(None, tiny_overrides("method.name=mae", "method.masker=block"))


def test_milan_without_teacher_is_a_clear_error() -> None:
    cfg = load_config(None, tiny_overrides("method.name=milan"))
    with pytest.raises(ConfigError, match="needs a teacher"):
        build_method(cfg)


def test_milan_missing_teacher_file_names_the_file(tmp_path) -> None:
    missing = tmp_path / "nope" / "teacher.safetensors"
    cfg = load_config(None, tiny_overrides("method.name=milan", "teacher.name=timm", f"teacher.path={missing}"))
    with pytest.raises(FileNotFoundError, match=r"teacher\.safetensors"):
        build_method(cfg)
