"""MaskDistill (block masking, LayerNorm targets, smooth-L1 on masked patches) and supervised + MIM."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from semmim.cli import main
from semmim.config import ConfigError, load_config
from semmim.engine import pretrain
from semmim.engine.metrics import read_metrics
from semmim.eval.classify import load_classifier
from semmim.export import read_timm_config
from semmim.losses import MaskedSmoothL1, masked_smooth_l1
from semmim.methods import MaskDistill, SupervisedMIM, build_method
from semmim.targets import TeacherFeatureTarget
from tests.conftest import teacher_overrides, tiny_overrides


def test_smooth_l1_hand_computation_masked_only() -> None:
    pred = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [9.0, 9.0]]])
    target = torch.tensor([[[1.0, 3.0], [0.5, 0.5], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])  # token 2 is visible: its huge error must not count
    beta = 2.0
    # token 0: e = 1 -> 0.5*1/2 = 0.25; e = 3 -> 3 - 1 = 2 -> mean 1.125
    # token 1: e = 0.5 -> 0.5*0.25/2 = 0.0625 (both) -> 0.0625
    expected = (1.125 + 0.0625) / 2
    assert masked_smooth_l1(pred, target, mask, beta).item() == pytest.approx(expected)
    assert MaskedSmoothL1(beta)(pred, target, mask).item() == pytest.approx(expected)
    # with beta=1 torch's default definition holds
    ref = F.smooth_l1_loss(pred[:, :2], target[:, :2], beta=1.0)
    assert masked_smooth_l1(pred, target, mask, 1.0).item() == pytest.approx(ref.item())


def test_smooth_l1_gradient_only_on_masked_tokens() -> None:
    pred = torch.randn(2, 5, 4, requires_grad=True)
    mask = torch.rand(2, 5) > 0.5
    mask[0, 0] = True
    masked_smooth_l1(pred, torch.randn(2, 5, 4), mask).backward()
    assert torch.all(pred.grad[~mask] == 0) and pred.grad[mask].abs().sum() > 0


def test_layernorm_target_zero_mean_unit_variance(tiny_teacher_dir: Path) -> None:
    cfg = load_config(None, tiny_overrides("method.name=maskdistill", *teacher_overrides(tiny_teacher_dir)))
    method = build_method(cfg)
    assert isinstance(method, MaskDistill) and isinstance(method.target, TeacherFeatureTarget)
    assert method.target.norm == "ln"  # MaskDistill's default
    tokens = method.target(torch.rand(3, 3, 16, 16), method.grid).tokens
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(tokens.shape[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens.var(-1, unbiased=False), torch.ones(tokens.shape[:2]), atol=1e-3, rtol=0)


def test_maskdistill_uses_mask_tokens_block_masks_and_masked_loss(tiny_teacher_dir: Path) -> None:
    over = tiny_overrides(
        "method.name=maskdistill",
        "model.img_size=32",
        "model.layer_scale_init=0.1",
        *teacher_overrides(tiny_teacher_dir),
    )
    method = build_method(load_config(None, over))
    assert method.encoder.mask_token is not None
    assert type(method.masker).__name__ == "BlockMasker" and type(method.head).__name__ == "LinearHead"
    torch.manual_seed(0)
    out = method({"image": torch.rand(4, 3, 32, 32)})
    assert out["pred"].shape[1] == 64  # every patch predicted, loss only where masked
    assert (out["mask"].sum(1) == round(64 * 0.4)).all()  # block masking hides exactly 26 of 64 patches
    # loss equals smooth-L1 over the masked patches of the LayerNorm-normalised teacher tokens
    assert torch.isfinite(out["loss"])


def test_maskdistill_with_shared_rel_pos_bias_run_exports_a_timm_beit(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    """A run with BEiT's positions writes an encoder that timm's Beit loads strictly, with the run's features,
    and that the evaluation protocols load (kNN / linear: as is; fine-tuning: avg pooling with a fresh fc_norm)."""
    from semmim.eval.common import load_encoder
    from semmim.eval.finetune import _build_model
    from semmim.export import load_timm_model
    from semmim.run import load_run

    beit = ["model.rel_pos_bias=shared", "model.abs_pos=none", "model.timm_name=beit_base_patch16_224"]
    over = tiny_overrides(
        "method.name=maskdistill", "model.layer_scale_init=0.1", *beit, *teacher_overrides(tiny_teacher_dir)
    )
    pretrain(load_config(None, over), tmp_path / "run")
    method = load_run(tmp_path / "run").load_method()
    enc = method.encoder
    assert enc.rel_pos_bias is not None and enc.pos_embed is None
    model = load_timm_model(tmp_path / "run")  # strict: no missing or unexpected key
    assert type(model).__name__ == "Beit"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (model.forward_features(x) - enc.forward_features(x)).abs().max() < 1e-5
    evaluated, mean, _ = load_encoder(tmp_path / "run")
    assert mean == [0.5, 0.5, 0.5] and type(evaluated).__name__ == "Beit"
    finetuned, name, _, _, _ = _build_model(tmp_path / "run", "avg", 0.1, seed=0)
    assert name == "beit_base_patch16_224" and type(finetuned.fc_norm).__name__ != "Identity"
    torch.testing.assert_close(
        finetuned.blocks[1].attn.relative_position_bias_table,
        enc.rel_pos_bias.relative_position_bias_table,  # type: ignore[union-attr]
    )


def test_supmim_classifier_equals_plain_timm_vit(tmp_path: Path) -> None:
    cfg = load_config(None, tiny_overrides("method.name=supmim", "method.num_classes=7"))
    method = build_method(cfg)
    assert isinstance(method, SupervisedMIM)
    method.eval()
    method.export(tmp_path, {"mean": "[0.5, 0.5, 0.5]", "std": "[0.25, 0.25, 0.25]"})
    name, kwargs = read_timm_config(tmp_path / "classifier.safetensors")
    vit = timm.create_model(name, pretrained=False, num_classes=7, **kwargs)
    vit.load_state_dict(load_file(str(tmp_path / "classifier.safetensors")), strict=True)
    vit.eval()
    images = torch.rand(5, 3, 16, 16)
    torch.testing.assert_close(method.classify(images), vit((images - 0.5) / 0.25), atol=1e-5, rtol=1e-5)
    loaded, mean, std = load_classifier(tmp_path)
    assert mean == [0.5, 0.5, 0.5] and std == [0.25, 0.25, 0.25]
    torch.testing.assert_close(loaded((images - 0.5) / 0.25), vit((images - 0.5) / 0.25))


def test_supmim_losses_and_weight_zero() -> None:
    batch = {"image": torch.rand(4, 3, 16, 16), "label": torch.tensor([0, 1, 2, 1])}
    with_mim = build_method(load_config(None, tiny_overrides("method.name=supmim", "method.num_classes=3")))
    out = with_mim(batch)
    assert out["loss"].item() == pytest.approx(out["logs"]["ce"].item() + out["logs"]["mim"].item(), rel=1e-5)
    sup = build_method(
        load_config(None, tiny_overrides("method.name=supmim", "method.num_classes=3", "method.mim_weight=0"))
    )
    out0 = sup(batch)
    assert "mim" not in out0["logs"] and out0["loss"].item() == pytest.approx(out0["logs"]["ce"].item())


def test_supmim_mixup_cutmix() -> None:
    cfg = load_config(
        None, tiny_overrides("method.name=supmim", "method.num_classes=3", "method.mixup=0.8", "method.cutmix=1.0")
    )
    method = build_method(cfg).train()
    out = method({"image": torch.rand(4, 3, 16, 16), "label": torch.tensor([0, 1, 2, 1])})
    assert torch.isfinite(out["loss"])


def test_supmim_rejects_unlabelled_batches() -> None:
    method = build_method(load_config(None, tiny_overrides("method.name=supmim", "method.num_classes=3")))
    with pytest.raises(ValueError, match="unlabelled"):
        method({"image": torch.rand(2, 3, 16, 16), "label": torch.tensor([-1, 0])})


def test_supmim_on_a_label_free_folder_is_a_clear_error(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "flat"
    root.mkdir()
    for i in range(20):
        Image.new("RGB", (16, 16), (i * 10, 0, 0)).save(root / f"{i}.png")
    cfg = load_config(
        None, tiny_overrides("method.name=supmim", "data.name=imagefolder", f"data.root={root}", "data.limit=null")
    )
    with pytest.raises(ConfigError, match="needs labelled images"):
        pretrain(cfg, tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["maskdistill", "supmim"])
def test_cli_three_steps_and_timm_loads(method: str, tmp_path: Path, tiny_teacher_dir: Path) -> None:
    out = tmp_path / method
    extra = teacher_overrides(tiny_teacher_dir) if method == "maskdistill" else []
    over = tiny_overrides(f"method.name={method}", *extra)
    assert main(["pretrain", "--config", f"demo/{method}", "--out", str(out), *over]) == 0
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    name, kwargs = read_timm_config(out)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    res = model.load_state_dict(load_file(str(out / "encoder.safetensors")), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    if method == "supmim":
        rows = read_metrics(out)
        assert "ce" in rows[-1] and "mim" in rows[-1]
        assert load_config(out / "config.yaml").method.num_classes == 10  # taken from the dataset
        classifier, _, _ = load_classifier(out)
        assert classifier(torch.rand(2, 3, 16, 16)).shape == (2, 10)


def test_supmim_with_teacher_feature_target(tiny_teacher_dir: Path) -> None:
    over = tiny_overrides(
        "method.name=supmim",
        "method.num_classes=3",
        "method.target=teacher_features",
        *teacher_overrides(tiny_teacher_dir),
    )
    method = build_method(load_config(None, over))
    assert isinstance(method.target, TeacherFeatureTarget)
    out = method({"image": torch.rand(4, 3, 16, 16), "label": torch.tensor([0, 1, 2, 1])})
    assert torch.isfinite(out["loss"]) and out["logs"]["mim"] > 0


def test_rand_augment_transform_from_config() -> None:
    from semmim.data import build_dataset

    cfg = load_config(None, tiny_overrides("data.rand_augment=rand-m9-mstd0.5-inc1"))
    ds = build_dataset(cfg.data, img_size=16, in_chans=3, train=True, seed=0)
    assert "RandAugment" in repr(ds.transform)
    x = ds[0]["image"]
    assert x.shape == (3, 16, 16) and float(x.min()) >= 0 and float(x.max()) <= 1
