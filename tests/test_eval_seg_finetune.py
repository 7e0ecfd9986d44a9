"""The fine-tuned UperNet segmentation recipe: UperNet parts, sliding windows, poly lr, drop path, config
errors, and a few training iterations end to end (``seg`` with ``mode: finetune``)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import semmim.cli.eval as cli_eval
from semmim.cli import main
from semmim.engine.optim import poly_lr
from semmim.errors import ConfigError
from semmim.eval.common import load_encoder
from semmim.eval.config import SegConfig, load_eval_config
from semmim.eval.seg import SegModel, seg_eval
from semmim.eval.seg_finetune import set_drop_path, slide_inference, slide_windows
from semmim.eval.upernet import FCNHead, UPerHead, UPerNet, ViTPyramid
from tests.test_eval_seg import _fake_fashion, _small_vit


@pytest.fixture(scope="module")
def fake_fashion_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _fake_fashion(tmp_path_factory.mktemp("fmnist_ft"))


# --------------------------------------------------------------------------------------------------
# UperNet parts
# --------------------------------------------------------------------------------------------------


def test_upernet_head_output_shape_on_a_pyramid() -> None:
    torch.manual_seed(0)
    levels = [torch.randn(2, 24, s, s) for s in (32, 16, 8, 4)]  # strides 4, 8, 16, 32 of a 128 px image
    head = UPerHead(24, num_classes=5, channels=8)
    out = head(levels)
    assert out.shape == (2, 5, 32, 32)  # at the finest level
    out.sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    assert len(head.ppm) == 4 and [b[0].output_size for b in head.ppm] == [1, 2, 3, 6]
    assert FCNHead(24, 5, channels=8)(levels[2]).shape == (2, 5, 8, 8)
    # the classifiers start small (N(0, 0.01), mmseg's conv_seg), the conv blocks Kaiming fan-out
    assert (
        float(head.classifier.weight.detach().std()) == pytest.approx(0.01, rel=0.5) and not head.classifier.bias.any()
    )


def test_upernet_aux_head_reads_the_stride_16_level() -> None:
    torch.manual_seed(0)
    net = UPerNet(16, 3, channels=8, aux_channels=4).eval()
    feats = [torch.randn(2, 16, 4, 4) for _ in range(4)]
    logits, aux = net.forward_train(feats, (16, 16))
    assert logits.shape == aux.shape == (2, 3, 16, 16)  # type: ignore[union-attr]
    torch.testing.assert_close(logits, net(feats, (16, 16)))
    assert net.aux is not None
    expected = nn.functional.interpolate(net.aux(feats[2]), size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(aux, expected)  # level 2 is the identity level: block 3 of 4 as it is
    assert UPerNet(16, 3, channels=8).forward_train(feats, (16, 16))[1] is None


def test_pyramid_from_vit_taps_has_strides_4_8_16_32() -> None:
    enc = _small_vit(128, 16, depth=12, dim=16)  # ViT-B's depth and patch, a narrow width
    model = SegModel(enc, UPerNet(16, 4, channels=8), frozen=False)
    assert model.indices == [3, 5, 7, 11]  # BEiT / MAE: blocks 4, 6, 8, 12
    x = torch.randn(2, 3, 128, 128)
    levels = ViTPyramid(16)(model.features(x))
    assert [128 // lv.shape[-1] for lv in levels] == [4, 8, 16, 32]
    assert [lv.shape[-2] for lv in levels] == [lv.shape[-1] for lv in levels] and all(
        lv.shape[1] == 16 for lv in levels
    )


# --------------------------------------------------------------------------------------------------
# sliding windows
# --------------------------------------------------------------------------------------------------


def _window_min(k: int) -> Any:
    """A "model" whose logits are, everywhere in a window, the smallest input value in that window."""

    def fn(crops: Tensor) -> Tensor:
        return crops.amin(dim=(1, 2, 3), keepdim=True).expand(-1, k, crops.shape[-2], crops.shape[-1])

    return fn


def test_slide_windows_cover_the_image() -> None:
    assert slide_windows(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert slide_windows(3, 5, 3, 2) == [(0, 3, 0, 3), (0, 3, 2, 5)]
    assert slide_windows(2, 2, 3, 2) == [(0, 2, 0, 2)]  # smaller than the window: one (padded) window
    for h, w, crop, stride in [(7, 11, 4, 3), (9, 9, 3, 3), (5, 13, 5, 1)]:
        hits = torch.zeros(h, w)
        for t, b, lf, r in slide_windows(h, w, crop, stride):
            assert b - t == min(crop, h) and r - lf == min(crop, w)
            hits[t:b, lf:r] += 1
        assert bool((hits > 0).all())


def test_slide_inference_averages_overlaps_by_their_count() -> None:
    # one row of windows over columns 0..4: x1 = 0 (value 0) and x1 = 2 (value 2); column 2 is in both
    x = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 3, 5).contiguous()
    out = slide_inference(_window_min(2), x, num_classes=2, crop=3, stride=2)
    assert out.shape == (1, 2, 3, 5)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.0, 1.0, 2.0, 2.0]] * 3))
    # 2-D: windows at (0, 0), (0, 2), (2, 0), (2, 2) of a 5x5 image whose value is 10 * row + column
    x2 = (10 * torch.arange(5.0).view(5, 1) + torch.arange(5.0).view(1, 5)).view(1, 1, 5, 5)
    out2 = slide_inference(_window_min(1), x2, num_classes=1, crop=3, stride=2, max_windows=3)  # two fn calls
    expected = torch.tensor(
        [
            [0, 0, 1, 2, 2],
            [0, 0, 1, 2, 2],
            [10, 10, 11, 12, 12],  # (0 + 20) / 2; (0 + 2 + 20 + 22) / 4 = 11; (2 + 22) / 2
            [20, 20, 21, 22, 22],
            [20, 20, 21, 22, 22],
        ],
        dtype=torch.float32,
    )
    torch.testing.assert_close(out2[0, 0], expected)
    with pytest.raises(ValueError, match="stride"):
        slide_inference(_window_min(1), x2, 1, crop=3, stride=4)


def test_slide_inference_equals_whole_image_inference_when_the_crop_covers_it() -> None:
    enc = _small_vit(16, 4, depth=4)
    model = SegModel(enc, UPerNet(32, 5, channels=8, aux_channels=4), frozen=False).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(slide_inference(model, x, 5, crop=16, stride=10), model(x), rtol=0, atol=0)
    # a crop larger than the image pads it; a per-pixel model does not see the padding
    conv = nn.Conv2d(3, 4, 1)
    y = torch.randn(1, 3, 10, 12)
    with torch.no_grad():
        torch.testing.assert_close(slide_inference(conv, y, 4, crop=16, stride=8), conv(y))


def test_test_images_are_batched_by_size() -> None:
    from semmim.eval.seg_finetune import _same_size

    def item(h: int, w: int, i: int) -> dict[str, Any]:
        return {"image": torch.zeros(3, h, w), "mask": torch.zeros(h + 1, w + 1), "index": i}

    items = [item(4, 6, 0), item(6, 4, 1), item(4, 6, 2), item(4, 6, 3)]
    assert [[it["index"] for it in g] for g in _same_size(items)] == [[0, 2, 3], [1]]


# --------------------------------------------------------------------------------------------------
# schedule and drop path
# --------------------------------------------------------------------------------------------------


def test_poly_schedule_hand_checked() -> None:
    # poly: (peak - min) * (1 - t / T) ** p + min; warmup scales it by 1e-6 + (1 - 1e-6) * t / W (mmcv)
    assert poly_lr(0, 100, 10, 1.0) == pytest.approx(1e-6)
    assert poly_lr(5, 100, 10, 1.0) == pytest.approx(0.95 * (1e-6 + (1 - 1e-6) * 0.5))
    assert poly_lr(10, 100, 10, 1.0) == pytest.approx(0.9)
    assert poly_lr(55, 100, 10, 1.0, power=2.0) == pytest.approx(0.45**2)
    assert poly_lr(75, 100, 0, 1e-4, power=1.0, min_lr=1e-5) == pytest.approx(9e-5 * 0.25 + 1e-5)
    assert poly_lr(100, 100, 10, 1.0) == 0.0 and poly_lr(160000, 160000, 1500, 1e-4) == 0.0
    lrs = [poly_lr(t, 160000, 1500, 1e-4) for t in (1500, 80000, 159999)]
    assert lrs == pytest.approx([1e-4 * (1 - 1500 / 160000), 5e-5, 1e-4 / 160000])


def test_set_drop_path_rises_linearly_over_the_blocks() -> None:
    from timm.layers import DropPath

    enc = _small_vit(16, 4, depth=3)
    set_drop_path(enc, 0.1)
    blocks: Any = enc.get_submodule("blocks")
    assert isinstance(blocks[0].drop_path1, nn.Identity)
    assert [b.drop_path2.drop_prob for b in blocks[1:]] == pytest.approx([0.05, 0.1])
    assert isinstance(blocks[2].drop_path1, DropPath)
    set_drop_path(enc, 0.0)
    assert all(isinstance(b.drop_path1, nn.Identity) for b in blocks)
    bare = nn.Module()
    bare.blocks = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="drop_path1"):
        set_drop_path(bare, 0.1)


# --------------------------------------------------------------------------------------------------
# config: the recipe's defaults and the keys of the other mode
# --------------------------------------------------------------------------------------------------


def test_recipe_defaults_are_beit_mae_ade20k_settings() -> None:
    cfg = SegConfig()
    assert cfg.mode == "frozen"  # the quick protocol stays the default
    assert (cfg.iters, cfg.batch_size, cfg.crop_size, cfg.layer_decay, cfg.weight_decay) == (
        160000,
        16,
        512,
        0.65,
        0.05,
    )
    assert (cfg.drop_path, cfg.aux_weight, cfg.aux_channels, cfg.poly_power, cfg.min_lr) == (0.1, 0.4, 256, 1.0, 0.0)
    assert (cfg.ratio_range, cfg.cat_max_ratio, cfg.flip_prob, cfg.photometric) == ([0.5, 2.0], 0.75, 0.5, True)
    from semmim.eval.seg_finetune import recipe_settings

    rec = recipe_settings(SegConfig(mode="finetune"), embed_dim=768, n_train=20210)
    assert (rec["lr"], rec["warmup_steps"], rec["channels"], rec["scale"], rec["slide_stride"]) == (
        1e-4,
        1500,
        768,
        [2048, 512],
        341,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mode=finetune", "epochs=3"], "epochs is a mode=frozen key .*uses iters"),
        (["mode=finetune", "epochs=10"], "epochs is a mode=frozen key"),  # given, even at its default
        (["mode=finetune", "head=upernet"], "head is a mode=frozen key"),
        (["mode=finetune", "img_size=512"], "img_size is a mode=frozen key .*uses crop_size"),
        (["mode=finetune", "max_steps=5"], "max_steps is a mode=frozen key"),
        (["iters=100"], "iters is a mode=finetune key .*uses epochs or max_steps"),
        (["crop_size=256"], "crop_size is a mode=finetune key"),
        (["layer_decay=0.65"], "layer_decay is a mode=finetune key"),
        (["mode=frozen", "photometric=false"], "photometric is a mode=finetune key"),
        (["mode=finetune", "iters=100"], "warmup_steps=1500 covers the whole run of iters=100"),
        (["mode=finetune", "crop_size=64", "slide_stride=65"], "slide_stride=65 is larger than crop_size=64"),
        (["mode=finetune", "ratio_range=[2.0,0.5]"], "ratio_range must be"),
        (["mode=finetune", "scale=[512]"], "scale must be 2 positive numbers"),
        (["mode=finetune", "cat_max_ratio=0"], r"cat_max_ratio must lie in \(0, 1\]"),
        (["mode=finetune", "aux_weight=-1"], "aux_weight must be >= 0"),
        (["mode=tuned"], "mode='tuned' is not one of frozen, finetune"),
        (["finetune=true"], "mode=finetune runs the fine-tuned UperNet recipe"),
    ],
)
def test_keys_of_the_other_mode_and_impossible_recipes_are_one_line_errors(
    overrides: list[str], message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nothing may run")

    monkeypatch.setattr(cli_eval, "_run", no_work)
    with pytest.raises(ConfigError, match=message):
        load_eval_config("seg", None, overrides)
    assert main(["eval", "seg", "--encoder", "RUN", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("semmim eval: error:")


def test_show_prints_the_keys_of_the_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "seg", "--show", "--mode", "finetune", "--iters", "100", "--warmup-steps", "10"]) == 0
    shown = capsys.readouterr().out
    assert "iters: 100" in shown and "crop_size: 512" in shown and "epochs:" not in shown and "head:" not in shown
    assert main(["eval", "seg", "--show"]) == 0
    shown = capsys.readouterr().out
    assert "mode: frozen" in shown and "head: linear" in shown and "iters:" not in shown


def test_the_old_finetune_flag_points_to_the_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "seg", "--encoder", "RUN", "--finetune"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mode=finetune" in err


def test_the_python_api_refuses_a_key_of_the_other_mode_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import semmim.eval.seg as seg
    import semmim.eval.seg_common as seg_common

    def no_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nothing may be loaded")

    monkeypatch.setattr(seg, "prepare_encoder", no_work)
    monkeypatch.setattr(seg_common, "prepare_encoder", no_work)
    with pytest.raises(ConfigError, match="head is a mode=frozen key"):
        seg_eval("RUN", SegConfig(mode="finetune", head="upernet"))
    with pytest.raises(ConfigError, match="drop_path is a mode=finetune key"):
        seg_eval("RUN", SegConfig(drop_path=0.2))


# --------------------------------------------------------------------------------------------------
# the recipe end to end, tiny
# --------------------------------------------------------------------------------------------------

TINY = {
    "mode": "finetune",
    "iters": 12,
    "warmup_steps": 1,
    "batch_size": 4,
    "train_limit": 8,
    "test_limit": 3,
    "channels": 8,
    "aux_channels": 8,
    "lr": 2e-3,
    "num_workers": 0,
    "device": "cpu",
}


def test_finetune_trains_encoder_and_head_and_scores_at_the_original_size(
    tiny_teacher_dir: Path, fake_fashion_root: Path
) -> None:
    enc, mean, std = load_encoder(tiny_teacher_dir)  # 16 px, patch 4, depth 2
    before = copy.deepcopy(enc.state_dict())
    cfg = SegConfig(root=str(fake_fashion_root), crop_size=24, mean=mean, std=std, **TINY)  # type: ignore[arg-type]
    out = seg_eval(enc, cfg)
    after = enc.state_dict()
    assert enc.get_parameter("pos_embed").shape[1] == 1 + 36  # resized to the 24 px crop (6x6 grid)
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])  # end to end
    assert not torch.equal(before["patch_embed.proj.weight"], after["patch_embed.proj.weight"])
    assert out["protocol"] == "seg" and out["mode"] == "finetune" and out["head"] == "upernet"
    assert out["steps"] == 12 and out["feature_blocks"] == [0, 0, 0, 1]
    assert out["train_loss"] < out["train_loss_start"]  # the loss falls (last 3 vs first 3 iterations)
    assert 0.0 <= out["miou"] <= 100.0 and len(out["per_class_iou"]) == out["num_classes"] == 11
    rec = out["recipe"]
    assert (rec["scale"], rec["slide_stride"], rec["crop_size"], rec["batch_size"]) == ([96, 24], 16, 24, 4)
    assert (rec["lr"], rec["warmup_steps"], rec["aux_channels"], rec["layer_decay"]) == (2e-3, 1, 8, 0.65)
    assert math.isfinite(out["train_time_s"]) and out["n_test"] == 3


def test_finetune_cli_records_mode_and_settings(
    tiny_teacher_dir: Path, fake_fashion_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "seg"
    args = ["eval", "seg", "--encoder", str(tiny_teacher_dir), "--data", "fashion_mnist"]
    args += ["--root", str(fake_fashion_root), "--crop-size", "16", "--out", str(out)]
    args += [f"{k}={v}" for k, v in {**TINY, "iters": 3, "test_limit": 2, "aux_weight": 0}.items()]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "finetune" and metrics["steps"] == 3 and metrics["recipe"]["aux_channels"] is None
    settings = metrics["settings"]
    assert settings["mode"] == "finetune" and settings["crop_size"] == 16 and settings["iters"] == 3
    assert not {"head", "epochs", "img_size", "max_steps"} & settings.keys()  # the frozen protocol's keys
    assert metrics["measured_on"]["data"] == "fashion_mnist"
    from semmim.eval.seg import seg_result_name

    assert seg_result_name(SegConfig(mode="finetune")) == "seg_upernet_finetune"
    assert seg_result_name(SegConfig(head="upernet")) == "seg_upernet"


def test_finetune_takes_a_beit_export_with_relative_positions(fake_fashion_root: Path, tmp_path: Path) -> None:
    """A MaskDistill-style encoder (relative position bias, no absolute positions) exports to timm's BEiT;
    the recipe resizes its per-block bias tables to the crop's grid and trains it end to end."""
    from semmim.export import save_encoder
    from semmim.models.vit import ViTEncoder

    torch.manual_seed(0)
    enc = ViTEncoder(
        img_size=16,
        patch_size=4,
        in_chans=3,
        embed_dim=32,
        depth=2,
        num_heads=2,
        layer_scale_init=0.1,
        rel_pos_bias="shared",
        abs_pos="none",
        timm_name="beit_base_patch16_224",
    )
    save_encoder(tmp_path / "encoder.safetensors", enc.timm_state_dict(), enc.timm_name, enc.timm_kwargs())
    beit, mean, std = load_encoder(tmp_path)
    table = "blocks.0.attn.relative_position_bias_table"
    before = beit.state_dict()[table].clone()
    assert before.shape[0] == 7 * 7 + 3  # (2*4-1)^2 + 3 on the 4x4 grid
    cfg = SegConfig(root=str(fake_fashion_root), crop_size=24, mean=mean, std=std, **TINY)  # type: ignore[arg-type]
    out = seg_eval(beit, cfg)
    after = beit.state_dict()[table]
    assert after.shape[0] == 11 * 11 + 3  # resized to the 6x6 grid of the 24 px crop
    assert out["train_loss"] < out["train_loss_start"] and 0.0 <= out["miou"] <= 100.0
