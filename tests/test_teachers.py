"""Frozen teachers: shapes on the student grid, freezing, exact CLS attention, loading and errors.

All models are tiny and randomly initialised; nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from semmim.export import save_encoder
from semmim.registry import TEACHERS
from semmim.teachers import (
    HFCLIPTeacher,
    ModuleTeacher,
    OpenCLIPTeacher,
    Teacher,
    TeacherOutput,
    TimmTeacher,
    resample_attention,
    resample_tokens,
)

timm = pytest.importorskip("timm")

VIT_KW: dict[str, Any] = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
VIT_NAME = "vit_tiny_patch16_224"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _images(n: int = 2, c: int = 3, size: int = 32) -> Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, c, size, size, generator=g)


def _check_output(out: TeacherOutput, n: int, grid: tuple[int, int], dim: int, attn: bool) -> None:
    assert out.tokens.shape == (n, 1 + grid[0] * grid[1], dim)
    assert out.tokens.dtype == torch.float32
    assert torch.isfinite(out.tokens).all()
    if attn:
        assert out.cls_attn is not None
        assert out.cls_attn.shape == (n, grid[0] * grid[1])
        assert out.cls_attn.dtype == torch.float32
        assert (out.cls_attn >= 0).all()
        torch.testing.assert_close(out.cls_attn.sum(1), torch.ones(n), atol=1e-5, rtol=0)
    else:
        assert out.cls_attn is None


class _Counter:
    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, *args: Any) -> None:
        self.calls += 1


def _cls_row(full: Tensor, num_prefix: int = 1) -> Tensor:
    """(N, H, T, T) attention -> CLS row over the patch keys, mean over heads, renormalised: (N, L)."""
    row = full.float().mean(1)[:, 0, num_prefix:]
    return row / row.sum(1, keepdim=True)


# --------------------------------------------------------------------------------------------- timm


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(VIT_NAME, num_classes=0, **VIT_KW)
    path = tmp_path_factory.mktemp("timm") / "vit.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def vit_teacher(vit_file: Path) -> Teacher:
    return TEACHERS.build(
        "timm",
        model=VIT_NAME,
        pretrained=None,
        path=str(vit_file),
        image_size=None,
        mean=None,
        std=None,
        **VIT_KW,
    )


def test_registry_has_all_teachers() -> None:
    for name in ("open_clip", "hf_clip", "timm", "module"):
        assert name in TEACHERS


def test_timm_vit_shapes_and_resampling(vit_teacher: Teacher) -> None:
    assert isinstance(vit_teacher, TimmTeacher)
    assert vit_teacher.embed_dim == 32 and vit_teacher.image_size == (32, 32)
    x = _images()
    native = vit_teacher(x, (4, 4), need_attn=True)
    _check_output(native, 2, (4, 4), 32, attn=True)
    torch.testing.assert_close(vit_teacher(x, None, need_attn=True).tokens, native.tokens)
    for grid in [(2, 2), (7, 5)]:
        out = vit_teacher(x, grid, need_attn=True)
        _check_output(out, 2, grid, 32, attn=True)
        torch.testing.assert_close(out.tokens[:, 0], native.tokens[:, 0])  # CLS untouched
        torch.testing.assert_close(out.tokens[:, 1:], resample_tokens(native.tokens[:, 1:], (4, 4), grid))
        assert native.cls_attn is not None and out.cls_attn is not None
        torch.testing.assert_close(out.cls_attn, resample_attention(native.cls_attn, (4, 4), grid))
    assert vit_teacher(x, (4, 4)).cls_attn is None
    assert "D=32" in vit_teacher.describe() and "4x4" in vit_teacher.describe()


def test_timm_tokens_match_forward_features(vit_teacher: TimmTeacher) -> None:
    x = _images()
    out = vit_teacher(x, (4, 4))
    with torch.no_grad():
        ref = vit_teacher.model.forward_features(vit_teacher.preprocess(x))
    torch.testing.assert_close(out.tokens, ref, atol=1e-6, rtol=1e-5)


def test_input_channels_and_size_are_adapted(vit_teacher: Teacher) -> None:
    gray = _images(c=1, size=48)
    out = vit_teacher(gray, (6, 6), need_attn=True)
    _check_output(out, 2, (6, 6), 32, attn=True)
    same = vit_teacher(gray.expand(-1, 3, -1, -1), (6, 6))
    torch.testing.assert_close(out.tokens, same.tokens)
    pre = vit_teacher.preprocess(gray)
    assert pre.shape == (2, 3, 32, 32)
    # 3-channel images into a 1-channel teacher are averaged; its mean/std are fitted to one channel
    mono = TEACHERS.build("timm", model=VIT_NAME, **{**VIT_KW, "in_chans": 1})
    assert mono.in_chans == 1 and mono.mean.shape == (1,) and mono.std.shape == (1,)
    rgb = _images()
    torch.testing.assert_close(mono(rgb, (4, 4)).tokens, mono(rgb.mean(1, keepdim=True), (4, 4)).tokens)


def test_timm_teacher_is_frozen(vit_teacher: Teacher) -> None:
    parent = nn.ModuleDict({"student": nn.Linear(4, 4), "teacher": vit_teacher})
    parent.train()
    assert parent["student"].training
    assert vit_teacher.training is False
    assert not any(m.training for m in vit_teacher.modules())
    assert not any(p.requires_grad for p in vit_teacher.parameters())
    x = _images().requires_grad_(True)
    out = vit_teacher(x, (4, 4), need_attn=True)
    assert not out.tokens.requires_grad
    assert out.cls_attn is not None and not out.cls_attn.requires_grad


@pytest.mark.parametrize("extra", [{}, {"reg_tokens": 2, "qk_norm": True}])
def test_timm_cls_attention_is_exact_and_from_one_pass(extra: dict[str, Any]) -> None:
    torch.manual_seed(0)
    teacher = TEACHERS.build("timm", model=VIT_NAME, **VIT_KW, **extra)
    model = teacher.model
    num_prefix = model.num_prefix_tokens
    assert num_prefix == 1 + extra.get("reg_tokens", 0)
    x = _images()
    counter = _Counter(model.patch_embed)
    out = teacher(x, (4, 4), need_attn=True)
    assert counter.calls == 1
    counter.handle.remove()
    _check_output(out, 2, (4, 4), 32, attn=True)
    assert out.tokens.shape[1] == 1 + 16  # register tokens dropped

    # reference: timm's own (unfused) attention matrix, taken at its dropout layer
    attn = model.blocks[-1].attn
    seen: list[Tensor] = []
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    fused = attn.fused_attn
    attn.fused_attn = False
    try:
        with torch.no_grad():
            feats = model.forward_features(teacher.preprocess(x))
    finally:
        attn.fused_attn = fused
        handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(out.cls_attn, _cls_row(seen[0], num_prefix), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.tokens[:, 1:], feats[:, num_prefix:], atol=1e-5, rtol=1e-4)


def test_timm_without_class_token_uses_patch_mean() -> None:
    teacher = TEACHERS.build("timm", model=VIT_NAME, **VIT_KW, class_token=False, global_pool="avg")
    out = teacher(_images(), (4, 4), need_attn=True)
    _check_output(out, 2, (4, 4), 32, attn=False)  # no CLS query -> no attention
    torch.testing.assert_close(out.tokens[:, 0], out.tokens[:, 1:].mean(1))


def test_timm_image_size_override_resizes_vit() -> None:
    teacher = TEACHERS.build("timm", model=VIT_NAME, image_size=48, **VIT_KW)
    assert teacher.image_size == (48, 48)
    out = teacher(_images(), None, need_attn=True)
    _check_output(out, 2, (6, 6), 32, attn=True)


def test_timm_cnn_teacher() -> None:
    teacher = TEACHERS.build("timm", model="test_resnet", image_size=64)
    assert teacher.image_size == (64, 64)
    x = _images(size=64)
    native = teacher(x, None, need_attn=True)
    assert teacher.native_grid == (2, 2)
    _check_output(native, 2, (2, 2), teacher.embed_dim, attn=False)
    torch.testing.assert_close(native.tokens[:, 0], native.tokens[:, 1:].mean(1))
    out = teacher(_images(c=1, size=40), (4, 4), need_attn=True)
    _check_output(out, 2, (4, 4), teacher.embed_dim, attn=False)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_timm_semmim_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model(VIT_NAME, num_classes=0, **VIT_KW)
    save_encoder(tmp_path / "encoder.safetensors", model.state_dict(), VIT_NAME, VIT_KW)
    x = _images()
    with torch.no_grad():
        ref = model.eval().forward_features(x)
    for source in (tmp_path, tmp_path / "encoder.safetensors"):
        teacher = TEACHERS.build("timm", path=str(source), mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
        torch.testing.assert_close(teacher(x, (4, 4)).tokens, ref, atol=1e-6, rtol=1e-5)


def test_timm_head_keys_ignored_and_mismatch_reported(tmp_path: Path) -> None:
    with_head = timm.create_model(VIT_NAME, num_classes=10, **VIT_KW)
    file = tmp_path / "with_head.pth"
    torch.save({"state_dict": with_head.state_dict()}, file)
    teacher = TEACHERS.build("timm", model=VIT_NAME, path=str(file), **VIT_KW)
    torch.testing.assert_close(teacher.model.cls_token, with_head.cls_token)

    state = dict(with_head.state_dict())
    state.pop("cls_token")
    state["decoder_embed.weight"] = torch.zeros(2, 2)
    bad = tmp_path / "mismatch.safetensors"
    save_file(state, str(bad))
    with pytest.raises(ValueError, match=re.escape(str(bad))) as err:
        TEACHERS.build("timm", model=VIT_NAME, path=str(bad), **VIT_KW)
    assert "cls_token" in str(err.value) and "decoder_embed.weight" in str(err.value)


def test_timm_missing_and_corrupt_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        TEACHERS.build("timm", model=VIT_NAME, path=str(missing), **VIT_KW)
    run_dir = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError, match=re.escape(str(run_dir))):
        TEACHERS.build("timm", path=str(run_dir))
    g = torch.Generator().manual_seed(0)
    for name in ("corrupt.safetensors", "corrupt.pth"):
        bad = tmp_path / name
        bad.write_bytes(bytes(torch.randint(0, 256, (512,), generator=g, dtype=torch.uint8).tolist()))
        with pytest.raises(ValueError, match=re.escape(str(bad))):
            TEACHERS.build("timm", model=VIT_NAME, path=str(bad), **VIT_KW)


def test_timm_pretrained_string_values(tmp_path: Path, vit_file: Path) -> None:
    teacher = TEACHERS.build("timm", model=VIT_NAME, pretrained=str(vit_file), **VIT_KW)
    assert str(vit_file) in teacher.describe()
    teacher = TEACHERS.build("timm", model=VIT_NAME, pretrained="false", **VIT_KW)
    assert isinstance(teacher, TimmTeacher)


# ---------------------------------------------------------------------------------------- open_clip

OC_VISION: dict[str, Any] = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2.0)
OC_TEXT: dict[str, Any] = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)


def _oc_cfg(**vision: Any) -> dict[str, Any]:
    return dict(embed_dim=24, vision_cfg={**OC_VISION, **vision}, text_cfg=OC_TEXT)


@pytest.fixture(scope="module")
def oc_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    pytest.importorskip("open_clip")
    from open_clip.model import CLIP

    torch.manual_seed(0)
    clip = CLIP(**_oc_cfg()).eval()
    path = tmp_path_factory.mktemp("open_clip") / "clip.pt"
    torch.save(clip.state_dict(), path)
    return path, clip


def test_open_clip_tokens_match_encode_image(oc_file: tuple[Path, Any]) -> None:
    path, clip = oc_file
    teacher = TEACHERS.build("open_clip", model_cfg=_oc_cfg(), path=str(path), pretrained=None)
    assert isinstance(teacher, OpenCLIPTeacher)
    assert teacher.embed_dim == 24 and teacher.image_size == (32, 32)
    torch.testing.assert_close(teacher.mean, torch.tensor([0.48145466, 0.4578275, 0.40821073]))
    x = _images()
    out = teacher(x, (4, 4), need_attn=True)
    _check_output(out, 2, (4, 4), 24, attn=True)
    with torch.no_grad():
        ref = clip.encode_image(teacher.preprocess(x))
    torch.testing.assert_close(out.tokens[:, 0], ref, atol=1e-5, rtol=1e-5)
    _check_output(teacher(_images(c=1, size=40), (7, 7), need_attn=True), 2, (7, 7), 24, attn=True)
    # a visual-only state dict loads too
    vis_only = path.with_name("visual.pt")
    torch.save(clip.visual.state_dict(), vis_only)
    teacher2 = TEACHERS.build("open_clip", model_cfg=_oc_cfg(), pretrained=str(vis_only))
    torch.testing.assert_close(teacher2(x, (4, 4)).tokens, out.tokens)


@pytest.mark.parametrize("vision", [{}, {"qk_norm": True}])
def test_open_clip_cls_attention_is_exact(vision: dict[str, Any]) -> None:
    pytest.importorskip("open_clip")
    teacher = TEACHERS.build("open_clip", model_cfg=_oc_cfg(**vision))
    visual = teacher.visual
    x = _images()
    counter = _Counter(visual.conv1)
    out = teacher(x, (4, 4), need_attn=True)
    assert counter.calls == 1
    counter.handle.remove()
    _check_output(out, 2, (4, 4), 24, attn=True)

    block = visual.transformer.resblocks[-1]
    assert isinstance(block.attn, nn.MultiheadAttention) == (not vision)
    captured: list[Tensor] = []
    handle = block.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    with torch.no_grad():
        visual(teacher.preprocess(x))
    handle.remove()
    h = captured[0]
    if not visual.transformer.batch_first:
        h = h.transpose(0, 1)
    h = block.ln_1(h)
    with torch.no_grad():
        if isinstance(block.attn, nn.MultiheadAttention):
            _, full = block.attn(h, h, h, need_weights=True, average_attn_weights=False)
        else:  # open_clip's own Attention (its unfused path fails on 4-D tensors): plain full matrix
            a = block.attn
            n, t, _ = h.shape
            q, k, _v = F.linear(h, a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1)
            q = a.ln_q(q.reshape(n, t, a.num_heads, -1).transpose(1, 2))
            k = a.ln_k(k.reshape(n, t, a.num_heads, -1).transpose(1, 2))
            full = (q @ k.transpose(-1, -2) * a.scale).softmax(-1)
    torch.testing.assert_close(out.cls_attn, _cls_row(full), atol=1e-5, rtol=1e-4)


def test_open_clip_sequence_first_transformer() -> None:
    """Legacy (L, N, D) transformers: the captured block input is transposed back before use."""
    pytest.importorskip("open_clip")
    teacher = TEACHERS.build("open_clip", model_cfg=_oc_cfg())
    x = _images()
    ref = teacher(x, (4, 4), need_attn=True)
    teacher.visual.transformer.batch_first = False
    for block in teacher.visual.transformer.resblocks:
        block.attn.batch_first = False
    out = teacher(x, (4, 4), need_attn=True)
    torch.testing.assert_close(out.tokens, ref.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls_attn, ref.cls_attn, atol=1e-6, rtol=1e-5)


def test_open_clip_by_architecture_name(tmp_path: Path, oc_file: tuple[Path, Any]) -> None:
    import open_clip

    path, clip = oc_file
    cfg_file = tmp_path / "semmim-test-tiny-vit.json"
    cfg_file.write_text(json.dumps(_oc_cfg()))
    open_clip.add_model_config(cfg_file)
    teacher = TEACHERS.build("open_clip", model="semmim-test-tiny-vit", pretrained=str(path))
    assert "semmim-test-tiny-vit" in teacher.describe()
    x = _images()
    with torch.no_grad():
        ref = clip.encode_image(teacher.preprocess(x))
    torch.testing.assert_close(teacher(x, (4, 4)).tokens[:, 0], ref, atol=1e-5, rtol=1e-5)
    assert not hasattr(teacher, "transformer")  # the text tower is not kept


def test_open_clip_image_size_override() -> None:
    pytest.importorskip("open_clip")
    teacher = TEACHERS.build("open_clip", model_cfg=_oc_cfg(), image_size=48, mean=[0.5] * 3, std=[0.5] * 3)
    assert teacher.image_size == (48, 48)
    torch.testing.assert_close(teacher.mean, torch.full((3,), 0.5))
    _check_output(teacher(_images(size=48), None, need_attn=True), 2, (6, 6), 24, attn=True)
    assert teacher.native_grid == (6, 6)


def test_open_clip_errors(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    missing = tmp_path / "missing_clip.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        TEACHERS.build("open_clip", model_cfg=_oc_cfg(), path=str(missing))
    bad = tmp_path / "garbage.bin"
    bad.write_bytes(b"\x00\x13not a checkpoint" * 20)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        TEACHERS.build("open_clip", model_cfg=_oc_cfg(), path=str(bad))
    with pytest.raises(NotImplementedError, match="ModifiedResNet"):
        TEACHERS.build(
            "open_clip",
            model_cfg=dict(
                embed_dim=24,
                vision_cfg=dict(layers=[1, 1, 1, 1], width=8, image_size=32, head_width=8),
                text_cfg=OC_TEXT,
            ),
        )


def test_open_clip_last_block_tokens_are_the_raw_transformer_output(oc_file: tuple[Path, Any]) -> None:
    """tokens=last_block: the last block's output before ln_post and proj (width 32), not the 24-d projection."""
    path, _clip = oc_file
    proj = TEACHERS.build("open_clip", model_cfg=_oc_cfg(), path=str(path))
    raw = TEACHERS.build("open_clip", model_cfg=_oc_cfg(), path=str(path), tokens="last_block")
    assert isinstance(raw, OpenCLIPTeacher) and (proj.embed_dim, raw.embed_dim) == (24, 32)
    assert "last_block tokens" in raw.describe()
    x = _images()
    out = raw(x, (4, 4), need_attn=True)
    _check_output(out, 2, (4, 4), 32, attn=True)
    caught: list[Tensor] = []
    handle = raw.visual.transformer.register_forward_hook(lambda m, i, o: caught.append(o))
    with torch.no_grad():
        raw.visual(raw.preprocess(x))
    handle.remove()
    block_out = caught[0] if raw.visual.transformer.batch_first else caught[0].transpose(0, 1)
    torch.testing.assert_close(out.tokens, block_out)  # the teacher's own 4x4 grid: no resampling
    # the projected tokens are ln_post @ proj of the same block output; the attention does not change
    v = raw.visual
    torch.testing.assert_close(proj(x, (4, 4)).tokens, v.ln_post(block_out) @ v.proj, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls_attn, proj(x, (4, 4), need_attn=True).cls_attn)
    with pytest.raises(ValueError, match="proj, last_block"):
        TEACHERS.build("open_clip", model_cfg=_oc_cfg(), tokens="ln_post")


# ------------------------------------------------------------------------------------------ hf_clip


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPVisionModelWithProjection(cfg)
    path = tmp_path_factory.mktemp("hf") / "tiny_clip"
    model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]})
    )
    return path


def test_hf_clip_tokens_and_attention(hf_dir: Path) -> None:
    import transformers

    teacher = TEACHERS.build("hf_clip", model=str(hf_dir))
    assert isinstance(teacher, HFCLIPTeacher)
    assert teacher.embed_dim == 16 and teacher.image_size == (32, 32)
    torch.testing.assert_close(teacher.mean, torch.tensor([0.5, 0.4, 0.3]))
    x = _images()
    counter = _Counter(teacher.vision.embeddings)
    out = teacher(x, (4, 4), need_attn=True)
    assert counter.calls == 1
    counter.handle.remove()
    _check_output(out, 2, (4, 4), 16, attn=True)

    ref = transformers.CLIPVisionModelWithProjection.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        res = ref(pixel_values=teacher.preprocess(x), output_attentions=True)
    torch.testing.assert_close(out.tokens[:, 0], res.image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls_attn, _cls_row(res.attentions[-1]), atol=1e-5, rtol=1e-4)

    _check_output(teacher(_images(c=1, size=24), (2, 2), need_attn=True), 2, (2, 2), 16, attn=True)
    parent = nn.Sequential(teacher)
    parent.train()
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_hf_clip_last_block_tokens_are_last_hidden_state(hf_dir: Path) -> None:
    """tokens=last_block: ``last_hidden_state`` (hidden size 32) instead of the 16-d projected tokens."""
    import transformers

    raw = TEACHERS.build("hf_clip", model=str(hf_dir), tokens="last_block")
    assert isinstance(raw, HFCLIPTeacher) and raw.embed_dim == 32
    x = _images()
    out = raw(x, (4, 4), need_attn=True)
    _check_output(out, 2, (4, 4), 32, attn=True)
    ref = transformers.CLIPVisionModelWithProjection.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        res = ref(pixel_values=raw.preprocess(x), output_hidden_states=True)
    torch.testing.assert_close(out.tokens, res.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert TEACHERS.build("hf_clip", model=str(hf_dir), tokens="proj").embed_dim == 16
    with pytest.raises(ValueError, match="proj, last_block"):
        TEACHERS.build("hf_clip", model=str(hf_dir), tokens="penultimate")


def test_teacher_tokens_from_the_config_reach_the_teacher(tiny_teacher_dir: Path) -> None:
    """teacher.tokens builds the CLIP teacher with that choice; a non-CLIP teacher refuses the key."""
    pytest.importorskip("open_clip")
    from semmim.config import ConfigError, load_config
    from semmim.engine.trainer import with_python_teacher
    from semmim.methods.base import build_teacher
    from tests.conftest import teacher_overrides, tiny_overrides

    base = tiny_overrides("method.name=maskdistill")
    oc = ["teacher.name=open_clip", f"teacher.kwargs={json.dumps({'model_cfg': _oc_cfg()})}"]
    cfg = load_config(None, [*base, *oc, "teacher.tokens=last_block"])
    teacher = build_teacher(cfg)
    assert isinstance(teacher, OpenCLIPTeacher) and teacher.tokens == "last_block" and teacher.embed_dim == 32
    assert build_teacher(load_config(None, [*base, *oc])).embed_dim == 24  # unset: the projected tokens
    assert with_python_teacher(cfg, teacher).teacher.tokens is None  # a Python teacher replaces the choice too
    with pytest.raises(ConfigError, match=r"teacher.tokens=last_block .* teacher 'timm' .* remove teacher.tokens"):
        load_config(None, [*base, *teacher_overrides(tiny_teacher_dir), "teacher.tokens=last_block"])
    with pytest.raises(ConfigError, match=r"teacher.tokens='pooled' is not one of proj, last_block"):
        load_config(None, [*base, *oc, "teacher.tokens=pooled"])
    with pytest.raises(ConfigError, match=r"teacher.kwargs.tokens: .* is teacher.tokens"):
        load_config(None, [*base, "teacher.name=open_clip", "teacher.kwargs={tokens: last_block}"])
    with pytest.raises(ConfigError, match=r"teacher.tokens='last_block' is not used: method 'mae'"):
        load_config(None, [*tiny_overrides(), "teacher.tokens=last_block"])


def test_hf_clip_image_size_override_and_path_kwarg(hf_dir: Path) -> None:
    teacher = TEACHERS.build("hf_clip", path=str(hf_dir), image_size=48, mean=[0.5] * 3, std=[0.5] * 3)
    torch.testing.assert_close(teacher.std, torch.full((3,), 0.5))
    _check_output(teacher(_images(size=48), (3, 3), need_attn=True), 2, (3, 3), 16, attn=True)
    assert teacher.native_grid == (6, 6)


@pytest.mark.parametrize("kind", ["CLIPModel", "CLIPVisionModel"])
def test_hf_clip_other_model_classes(tmp_path: Path, kind: str) -> None:
    transformers = pytest.importorskip("transformers")
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    if kind == "CLIPModel":
        text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=12)
        model = transformers.CLIPModel(cfg).eval()
        dim = 12
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision)).eval()
        dim = 32
    model.save_pretrained(tmp_path / kind)
    mean = [0.48145466, 0.4578275, 0.40821073]
    if kind == "CLIPModel":  # newer processors nest the image settings in processor_config.json
        mean = [0.1, 0.2, 0.3]
        nested = {"image_processor": {"image_mean": mean, "image_std": [0.5, 0.5, 0.5]}}
        (tmp_path / kind / "processor_config.json").write_text(json.dumps(nested))
    teacher = TEACHERS.build("hf_clip", model=str(tmp_path / kind))
    assert teacher.embed_dim == dim
    assert not hasattr(teacher, "text_model")
    torch.testing.assert_close(teacher.mean, torch.tensor(mean))
    x = _images()
    out = teacher(x, (4, 4), need_attn=True)
    _check_output(out, 2, (4, 4), dim, attn=True)
    with torch.no_grad():
        tower = model.vision_model if kind == "CLIPModel" else model
        ref = tower(pixel_values=teacher.preprocess(x)).pooler_output
        if kind == "CLIPModel":
            ref = model.visual_projection(ref)
    torch.testing.assert_close(out.tokens[:, 0], ref, atol=1e-5, rtol=1e-5)


def test_hf_clip_missing_directory(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    missing = tmp_path / "no_clip_here"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        TEACHERS.build("hf_clip", model=str(missing))


# ------------------------------------------------------------------------------------------- module


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.conv(x))


class _DictNet(nn.Module):
    def __init__(self, has_cls: bool) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.has_cls = has_cls

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        patches = self.proj(x).flatten(2).transpose(1, 2)  # (N, 16, 8)
        attn = patches.norm(dim=-1).softmax(-1)
        tokens = torch.cat([patches.amax(1, keepdim=True), patches], 1) if self.has_cls else patches
        return {"tokens": tokens, "cls_attn": attn}


def test_module_teacher_feature_map() -> None:
    teacher = TEACHERS.build("module", module=_ConvNet(), embed_dim=8, image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    assert isinstance(teacher, ModuleTeacher)
    parent = nn.ModuleList([teacher])
    parent.train()
    assert not any(m.training for m in teacher.module.modules())
    x = _images()
    out = teacher(x, None, need_attn=True)
    _check_output(out, 2, (8, 8), 8, attn=False)
    torch.testing.assert_close(out.tokens[:, 0], out.tokens[:, 1:].mean(1))
    torch.testing.assert_close(teacher(x, None).tokens, out.tokens)  # dropout off
    _check_output(teacher(_images(c=1), (4, 4)), 2, (4, 4), 8, attn=False)


@pytest.mark.parametrize("has_cls", [True, False])
def test_module_teacher_dict_output(has_cls: bool) -> None:
    net = _DictNet(has_cls)
    teacher = ModuleTeacher(net, 8, 32, mean=[0.0] * 3, std=[1.0] * 3, has_cls=has_cls)
    x = _images()
    out = teacher(x, (4, 4), need_attn=True)
    _check_output(out, 2, (4, 4), 8, attn=True)
    with torch.no_grad():
        ref = net(x)
    torch.testing.assert_close(out.cls_attn, ref["cls_attn"])
    if has_cls:
        torch.testing.assert_close(out.tokens, ref["tokens"])
    else:
        torch.testing.assert_close(out.tokens[:, 0], ref["tokens"].mean(1))
    _check_output(teacher(x, (2, 8), need_attn=True), 2, (2, 8), 8, attn=True)
    assert teacher(x, (4, 4)).cls_attn is None


def test_teacher_rejects_bad_channels() -> None:
    teacher = ModuleTeacher(_ConvNet(), 8, 32, mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(ValueError, match="channels"):
        teacher(torch.rand(1, 2, 32, 32), None)


@pytest.fixture
def cuda_device() -> Iterator[torch.device]:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    yield torch.device("cuda")


@pytest.mark.gpu
def test_timm_teacher_on_cuda_bf16(vit_teacher: Teacher, cuda_device: torch.device) -> None:
    x = _images()
    cpu = vit_teacher(x, (4, 4), need_attn=True)
    vit_teacher.to(cuda_device)
    try:
        gpu = vit_teacher(x.to(cuda_device), (4, 4), need_attn=True)
    finally:
        vit_teacher.to("cpu")
    assert gpu.tokens.dtype == torch.float32 and gpu.cls_attn is not None
    assert cpu.cls_attn is not None
    torch.testing.assert_close(gpu.tokens.cpu(), cpu.tokens, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(gpu.cls_attn.cpu(), cpu.cls_attn, atol=2e-2, rtol=5e-2)
    assert F.cosine_similarity(gpu.tokens.cpu().flatten(1), cpu.tokens.flatten(1)).min() > 0.99


# ----------------------------------------------------------------------------------- teacher.input_norm
def _teacher_input(method: nn.Module, images: Tensor) -> Tensor:
    """What the teacher's model receives when ``method`` trains on ``images``."""
    seen: list[Tensor] = []
    model = method.target.teacher.model.patch_embed  # type: ignore[union-attr]  # the ViT's first layer
    handle = model.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        method({"image": images})
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def test_input_norm_data_feeds_the_teacher_the_student_input(tiny_teacher_dir: Path) -> None:
    """``data``: the teacher gets exactly the student's input (as MILAN's CLIP got the ImageNet-normalised
    batch); ``own``: the teacher's own statistics, which differ from the data's here."""
    from semmim.config import load_config
    from semmim.methods import build_method
    from tests.conftest import teacher_overrides, tiny_overrides

    images = _images(4, 3, 16)
    for input_norm in ("own", "data"):
        over = [*teacher_overrides(tiny_teacher_dir), f"teacher.input_norm={input_norm}"]
        method = build_method(load_config(None, tiny_overrides("method.name=milan", *over)))
        teacher = method.target.teacher
        seen = _teacher_input(method, images)
        student = method.normalize(images)
        if input_norm == "data":
            torch.testing.assert_close(teacher.mean, torch.tensor([0.5, 0.5, 0.5]))  # data.mean of the tiny config
            torch.testing.assert_close(teacher.std, torch.tensor([0.25, 0.25, 0.25]))
            torch.testing.assert_close(seen, student)
        else:
            own = (images - teacher.mean.view(1, -1, 1, 1)) / teacher.std.view(1, -1, 1, 1)
            torch.testing.assert_close(seen, own)
            assert not torch.allclose(seen, student, atol=1e-3)  # the tiny teacher's statistics are not the data's


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["method.name=milan", "teacher.input_norm=data", "teacher.mean=[0.4,0.4,0.4]"],
            r"teacher.input_norm=data \(normalise with data.mean/std\) and teacher.mean=\[0.4, 0.4, 0.4\] .* conflict: "
            r"keep one. .* unset teacher.mean \(set to null\); to use these statistics, set teacher.input_norm=own",
        ),
        (
            ["method.name=milan", "teacher.input_norm=data", "teacher.std=[0.3,0.3,0.3]"],
            r"teacher.input_norm=data .* and teacher.std=.* conflict",
        ),
        (["method.name=milan", "teacher.input_norm=clip"], r"teacher.input_norm='clip' is not one of own, data"),
        (["method.name=mae", "teacher.input_norm=data"], r"teacher.input_norm='data' is not used: method 'mae'"),
    ],
    ids=["with-mean", "with-std", "unknown", "no-teacher"],
)
def test_input_norm_conflicts_are_config_errors(overrides: list[str], needle: str, tiny_teacher_dir: Path) -> None:
    from semmim.config import ConfigError, load_config
    from tests.conftest import teacher_overrides, tiny_overrides

    teacher = teacher_overrides(tiny_teacher_dir) if "method.name=milan" in overrides else []
    with pytest.raises(ConfigError, match=needle):
        load_config(None, tiny_overrides(*overrides, *teacher))


def test_input_norm_data_and_a_python_teacher(capsys: pytest.CaptureFixture[str]) -> None:
    """A teacher passed from Python normalises with the statistics it was built with: building a method
    around it with input_norm=data is an error; ``pretrain`` records it as replaced, with a note."""
    from semmim.config import ConfigError, load_config
    from semmim.engine.trainer import with_python_teacher
    from semmim.methods import build_method
    from tests.conftest import tiny_overrides

    cfg = load_config(None, tiny_overrides("method.name=milan", "method.masker=random", "teacher.input_norm=data"))
    teacher = ModuleTeacher(_ConvNet(), 8, 16, mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(
        ConfigError,
        match=r"teacher.input_norm=data does not reach a teacher passed from Python.*"
        r"mean=\[0.5, 0.5, 0.5\], std=\[0.25, 0.25, 0.25\]",
    ):
        build_method(cfg, teacher=teacher)
    recorded = with_python_teacher(cfg, teacher)
    assert "replaces the config's teacher.input_norm=data" in capsys.readouterr().out
    assert recorded.teacher.input_norm == "own" and cfg.teacher.input_norm == "data"
    build_method(recorded, teacher=teacher)
