"""The fast paths behave like the reference ones: torch.compile, fused attention, M masks per teacher pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semmim.config import ConfigError, load_config
from semmim.engine.trainer import use_compile
from semmim.methods import build_method
from semmim.models.decoders import PromptingDecoder
from semmim.models.vit import ViTEncoder, set_fused_attention
from tests.conftest import teacher_overrides, tiny_overrides


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    return {"image": torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))}


def test_compiled_and_eager_losses_agree() -> None:
    """Inductor (with aten's random numbers, so the masks are the same) gives the eager loss and gradients."""
    import torch._inductor.config as inductor_config

    cfg = load_config(None, tiny_overrides("method.name=mae"))
    torch.manual_seed(0)
    method = build_method(cfg)
    batch = _batch()
    torch.manual_seed(1)
    eager = method(batch)["loss"]
    eager.backward()
    grads = {k: p.grad.clone() for k, p in method.named_parameters() if p.grad is not None}
    method.zero_grad()
    compiled = torch.compile(method)
    with inductor_config.patch(fallback_random=True):
        torch.manual_seed(1)
        loss = compiled(batch)["loss"]
        loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-4, atol=1e-5)
    for k, p in method.named_parameters():
        if k in grads:
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-3, atol=1e-5)


def test_compile_setting() -> None:
    assert use_compile("auto", torch.device("cuda")) and not use_compile("auto", torch.device("cpu"))
    assert use_compile(True, torch.device("cpu")) and not use_compile(False, torch.device("cuda"))
    with pytest.raises(ConfigError, match=r"trainer\.compile"):
        load_config(None, ["trainer.compile=sometimes"])


def test_fused_and_plain_attention_agree() -> None:
    torch.manual_seed(0)
    enc = ViTEncoder(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4)
    dec = PromptingDecoder((4, 4), encoder_dim=64, out_dim=24, embed_dim=32, depth=2, num_heads=4)
    x = torch.randn(3, 3, 32, 32)
    from semmim.masking import random_masking

    mask = random_masking(3, 16, 0.75, device="cpu")
    outs = []
    for fused in (True, False):
        assert set_fused_attention(enc, fused) == 2 and set_fused_attention(dec, fused) == 2
        outs.append((enc.forward_features(x), dec(enc.forward_visible(x, mask.ids_keep), mask)))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method_name", ["milan", "maskdistill"])
def test_m_masks_share_one_teacher_pass(method_name: str, tiny_teacher_dir: Path) -> None:
    """M = 3: the teacher sees each of the 4 images once, the student 12 differently masked views."""
    cfg = load_config(
        None, tiny_overrides(f"method.name={method_name}", "method.num_masks=3", *teacher_overrides(tiny_teacher_dir))
    )
    method = build_method(cfg)
    seen: list[int] = []
    method.target.teacher.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    out = method(_batch(4))
    assert seen == [4]
    mask = out["mask"]
    assert mask.shape[0] == 12 and torch.isfinite(out["loss"])
    for i in range(4):
        views = mask[3 * i : 3 * i + 3]
        assert len({tuple(v.tolist()) for v in views}) == 3  # three different masks of image i
        assert torch.equal(views.float().sum(1), views[:1].float().sum(1).expand(3)) or method_name == "maskdistill"


def test_m_masks_for_mae_and_unsupported_methods() -> None:
    method = build_method(load_config(None, tiny_overrides("method.name=mae", "method.num_masks=2")))
    out = method(_batch(4))
    assert out["mask"].shape[0] == 8 and out["pred"].shape[0] == 8
    assert not torch.equal(out["mask"][0], out["mask"][1])
    with pytest.raises(ConfigError, match="num_masks"):
        load_config(None, ["method.name=clip", "method.num_masks=2"])
    with pytest.raises(ConfigError, match="num_masks must be >= 1"):
        load_config(None, ["method.num_masks=0"])


def test_uint8_batches_give_the_float_loss(tmp_path: Path) -> None:
    """data.uint8=true: items are uint8, converted and normalised on the device, and train to the same loss."""
    from semmim.data import build_dataset
    from semmim.engine import pretrain

    cfg8 = load_config(None, tiny_overrides("data.uint8=true"))
    item = build_dataset(cfg8.data, img_size=16, in_chans=3, train=True)[0]
    ref = build_dataset(load_config(None, tiny_overrides()).data, img_size=16, in_chans=3, train=True)[0]
    assert item["image"].dtype == torch.uint8 and ref["image"].dtype == torch.float32
    torch.testing.assert_close(item["image"].float() / 255, ref["image"], atol=1e-6, rtol=0)
    res8 = pretrain(cfg8, tmp_path / "u8")
    res32 = pretrain(load_config(None, tiny_overrides()), tmp_path / "f32")
    assert res8.final_loss == pytest.approx(res32.final_loss, rel=1e-5)


def test_input_bound_runs_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import time

    from semmim.data.datasets import SyntheticDataset
    from semmim.engine import pretrain
    from semmim.engine.metrics import read_metrics

    slow_load = SyntheticDataset.load

    def slow(self, index):  # type: ignore[no-untyped-def]
        time.sleep(0.01)
        return slow_load(self, index)

    monkeypatch.setattr(SyntheticDataset, "load", slow)
    pretrain(load_config(None, tiny_overrides("trainer.max_steps=4")), tmp_path / "run")
    assert "input-bound" in capsys.readouterr().out
    assert read_metrics(tmp_path / "run")[-1]["data_wait_frac"] > 0.25


def test_input_bound_note_suggests_only_what_the_run_does_not_use() -> None:
    from semmim.config import DataConfig
    from semmim.engine.trainer import input_bound_message

    fast = input_bound_message(0.3, DataConfig(name="webdataset", decode="torchvision", uint8=True))
    assert "data.uint8" not in fast and "data.decode" not in fast and "more workers or faster storage" in fast
    plain = input_bound_message(0.3, DataConfig(name="imagefolder"))
    assert "more workers, data.uint8=true, data.decode=torchvision or faster storage" in plain
    for data in (DataConfig(name="fashion_mnist"), DataConfig(name="imagefolder", rand_augment="rand-m9-mstd0.5")):
        assert "data.decode" not in input_bound_message(0.3, data)  # refused there: not a remedy
