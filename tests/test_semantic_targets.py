"""Semantic targets from any teacher: target_explained, its warning, target conditioning, the kNN monitor,
fixed-batch learning of every feature-target method, and Python (module) teachers end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from semmim.config import ConfigError, load_config
from semmim.engine import pretrain
from semmim.engine.metrics import read_metrics
from semmim.losses.reconstruction import CosineLoss, MaskedMSE, MaskedSmoothL1
from semmim.methods import build_method
from semmim.methods.base import target_explained
from semmim.targets.conditioning import TargetConditioner
from semmim.teachers import ModuleTeacher
from tests.conftest import teacher_overrides, tiny_overrides


# ------------------------------------------------------------------------------------ target_explained
@pytest.mark.parametrize("loss_fn", [CosineLoss(), MaskedMSE(), MaskedSmoothL1(beta=1.0)])
def test_target_explained_is_0_for_the_mean_and_1_for_the_target(loss_fn: nn.Module) -> None:
    torch.manual_seed(0)
    t = torch.randn(6, 5, 8) + 2.0
    mask = torch.rand(6, 5) > 0.5
    perfect = target_explained(loss_fn, loss_fn(t, t, mask), t, mask, global_token=False)
    assert float(perfect) == pytest.approx(1.0)
    mean = t.mean(dim=(0, 1), keepdim=True).expand_as(t)
    assert float(target_explained(loss_fn, loss_fn(mean, t, mask), t, mask, global_token=False)) == pytest.approx(
        0.0, abs=1e-6
    )


def test_target_explained_by_hand_with_a_global_token() -> None:
    """MSE, 2 images x (global + 2 patches) x 1 channel: the baseline is the mean global / mean patch token."""
    t = torch.tensor([[[1.0], [0.0], [2.0]], [[3.0], [4.0], [6.0]]])
    # baseline: global mean 2, patch mean 3 -> squared errors (1, 9, 1, 1, 1, 9) / 6 = 22 / 6
    pred = torch.zeros_like(t)  # errors 1, 0, 4, 9, 16, 36 -> 66 / 6
    fn = MaskedMSE()
    got = target_explained(fn, fn(pred, t, None), t, None, global_token=True)
    assert float(got) == pytest.approx(1 - 66 / 22)


# ---------------------------------------------------------------------------------------- conditioning
def _tokens(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(16, 10, 12, generator=g) + 1.5) * torch.linspace(0.5, 3, 12)


def test_center_removes_the_per_channel_mean_and_keeps_a_running_one() -> None:
    c = TargetConditioner("center", dim=12, momentum=0.9)
    a, b = _tokens(0), _tokens(1) + 1.0
    out = c(a)
    assert out.mean(dim=(0, 1)).abs().max() < 1e-5  # the first batch sets the centre
    c(b)
    expected = 0.9 * a.mean(dim=(0, 1)) + 0.1 * b.mean(dim=(0, 1))
    torch.testing.assert_close(c.center, expected)
    c.eval()  # evaluation uses the running centre without updating it
    before = c.center.clone()
    torch.testing.assert_close(c(b), b - before)
    torch.testing.assert_close(c.center, before)


def test_whiten_gives_unit_variance_per_channel_and_ln_per_token() -> None:
    t = _tokens()
    w = TargetConditioner("whiten", dim=12)(t)
    torch.testing.assert_close(w.pow(2).mean(dim=(0, 1)), torch.ones(12), atol=1e-3, rtol=1e-3)
    ln = TargetConditioner("ln", dim=12)(t)
    torch.testing.assert_close(ln.mean(-1), torch.zeros(16, 10), atol=1e-5, rtol=0)
    torch.testing.assert_close(ln.var(-1, unbiased=False), torch.ones(16, 10), atol=1e-3, rtol=0)
    cln = TargetConditioner("center_ln", dim=12)(t)
    assert cln.shape == t.shape and torch.isfinite(cln).all()
    assert torch.equal(TargetConditioner("none", dim=12)(t), t)


def test_pca_keeps_the_top_principal_directions() -> None:
    torch.manual_seed(0)
    # 3 strong directions plus noise in 12 dims
    basis = torch.linalg.qr(torch.randn(12, 12))[0]
    coeff = torch.randn(400, 12) * torch.tensor([10.0, 5.0, 3.0] + [0.1] * 9)
    t = (coeff @ basis.T).reshape(40, 10, 12) + 4.0
    c = TargetConditioner("pca", dim=12, pca_dim=3)
    out = c(t)
    assert out.shape == (40, 10, 3) and c.out_dim == 3
    torch.testing.assert_close(c.basis.T @ c.basis, torch.eye(3), atol=1e-4, rtol=0)  # orthonormal
    # it spans the 3 strong directions
    proj = basis[:, :3].T @ c.basis
    assert torch.linalg.svdvals(proj).min() > 0.99


def test_conditioning_state_round_trips_for_exact_resume() -> None:
    a = TargetConditioner("whiten", dim=12)
    a(_tokens(0))
    a(_tokens(1))
    b = TargetConditioner("whiten", dim=12)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(_tokens(2)), b(_tokens(2)))
    assert set(TargetConditioner("ln", dim=4).state_dict()) == set()  # stateless modes add no keys


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["method.name=mae", "method.target.norm=center"], "method.target.norm: target 'pixels' has no key 'norm'"),
        (["method.name=milan", "method.target.norm=zca"], "is not one of none, ln, center"),
        (["method.name=milan", "method.target.norm=pca"], "needs pca_dim"),
        (["method.name=milan", "method.target.pca_dim=8"], "used only by norm=pca"),
        (["method.name=milan", "teacher.ln_target=true"], "'teacher.ln_target' has moved to method.target.norm"),
        (["method.name=maskdistill", "method.target.grid=native"], "only milan pools its predictions"),
        (["method.name=maskdistill", "method.global_weight=2"], "unknown config key 'method.global_weight'"),
        (["method.name=milan", "method.global_weight=-1"], "method.global_weight must be >= 0"),
    ],
)
def test_target_options_that_do_not_apply_are_errors(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, tiny_overrides(*overrides))


# ------------------------------------------------------------------------------- fixed-batch learning
BEIT_POSITIONS = ["model.rel_pos_bias=shared", "model.abs_pos=none", "model.timm_name=beit_base_patch16_224"]
"""BEiT's positions: a relative position bias shared by all blocks, no absolute embedding (MaskDistill's recipe)."""


def _fixed_batch(cfg, n: int = 16) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    m = cfg.model
    return {"image": torch.rand(n, m.in_chans, m.img_size, m.img_size, generator=g), "label": torch.arange(n) % 4}


@pytest.mark.parametrize(
    "extra",
    [
        ["method.name=milan", "method.masker=random"],
        ["method.name=milan", "method.masker=random", "decoder.prompt_norm=true"],
        ["method.name=milan", "method.target.norm=none"],
        ["method.name=milan", "method.target.norm=whiten", "method.loss=mse"],
        ["method.name=maskdistill"],
        ["method.name=maskdistill", *BEIT_POSITIONS],
        ["method.name=milan", "method.masker=random", *BEIT_POSITIONS, "model.rel_pos_bias=per_block"],
        ["method.name=supmim", "method.target=teacher_features", "method.num_classes=4"],
    ],
    ids=[
        "milan",
        "milan-prompt-norm",
        "milan-raw",
        "milan-whiten-mse",
        "maskdistill",
        "maskdistill-relpos",
        "milan-relpos",
        "supmim-features",
    ],
)
def test_feature_target_method_learns_a_fixed_batch(extra: list[str], tiny_teacher_dir: Path) -> None:
    """60 Adam steps on one batch: the loss falls and target_explained rises."""
    cfg = load_config(None, tiny_overrides(*extra, *teacher_overrides(tiny_teacher_dir)))
    torch.manual_seed(0)
    method = build_method(cfg)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    batch = _fixed_batch(cfg)
    losses, explained = [], []
    for step in range(60):
        torch.manual_seed(step % 2)  # two fixed masks alternate: the batch is fixed, masks do not wander
        out = method(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
        explained.append(float(out["logs"]["target_explained"]))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert sum(explained[-5:]) / 5 > sum(explained[:5]) / 5 + 0.1, explained


# ----------------------------------------------------------------------------- the warning, the monitor
class RandomMap(nn.Module):
    """A 'teacher' whose output has nothing to do with the image: the student can only predict its mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.rand(x.shape[0], 8, 4, 4, device=x.device) + 1.0


class PixelMap(nn.Module):
    """A fixed random projection of 4x4 pixel blocks: fully predictable from the image."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.proj = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _module_teacher(module: nn.Module) -> ModuleTeacher:
    return ModuleTeacher(module, embed_dim=8, image_size=16, mean=[0.5] * 3, std=[0.25] * 3, name=type(module).__name__)


WARN_RUN = ("method.name=milan", "method.masker=random", "trainer.max_steps=8", "optim.warmup_steps=1")


def test_explained_warning_fires_on_a_collapsed_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(None, tiny_overrides(*WARN_RUN, "method.target.norm=center"))
    pretrain(cfg, tmp_path / "run", teacher=_module_teacher(RandomMap()))
    printed = capsys.readouterr().out
    assert printed.count("warning: target_explained is") == 1
    assert "method.target.norm=center (or" in printed
    assert all(r["target_explained"] < 0.05 for r in read_metrics(tmp_path / "run")[2:])


def test_explained_warning_stays_quiet_on_a_learning_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(None, tiny_overrides(*WARN_RUN, "optim.lr=3e-3", "data.limit=16", "data.batch_size=16"))
    pretrain(cfg, tmp_path / "run", teacher=_module_teacher(PixelMap()))
    assert "target_explained is" not in capsys.readouterr().out
    assert read_metrics(tmp_path / "run")[-1]["target_explained"] > 0.1


def test_knn_monitor_matches_eval_knn(tmp_path: Path) -> None:
    from semmim.eval.config import KnnConfig
    from semmim.eval.knn import knn_eval

    cfg = load_config(
        "configs/demo/mae.yaml",
        [
            "data.limit=256",
            "data.batch_size=64",
            "data.num_workers=0",
            "model.depth=1",
            "trainer.max_steps=4",
            "trainer.knn_every_n_steps=2",
            "trainer.knn_train_limit=300",
            "trainer.knn_test_limit=100",
            "trainer.log_every_n_steps=3",
            "trainer.progress_bar=false",
        ],
    )
    pretrain(cfg, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "knn_top1" in r] == [2, 4]  # every 2 steps, not only on log steps
    expected = knn_eval(tmp_path / "run", KnnConfig(train_limit=300, test_limit=100, num_workers=0))["top1"]
    assert rows[-1]["knn_top1"] == pytest.approx(expected, abs=1e-9)


def test_knn_monitor_on_unlabelled_data_fails_before_training(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "imgs"  # a flat folder of images: trainable, but no labels and no train/ val/
    root.mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(root / f"{i}.png")
    overrides = ("trainer.knn_every_n_steps=1", "data.name=imagefolder", f"data.root={root}", "data.limit=null")
    cfg = load_config(None, tiny_overrides(*overrides))
    with pytest.raises(ConfigError, match=r"trainer.knn_every_n_steps=1: .*train"):
        pretrain(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------- module teachers
def test_module_teacher_run_resumes_and_reports(tmp_path: Path) -> None:
    from semmim.report import write_report

    overrides = tiny_overrides("method.name=milan", "method.masker=random", "trainer.ckpt_every_n_steps=2")
    cfg = load_config(None, [*overrides, "trainer.max_steps=4"])
    out = tmp_path / "run"
    pretrain(load_config(None, [*overrides, "trainer.max_steps=2"]), out, teacher=_module_teacher(PixelMap()))
    saved = load_config(out / "config.yaml")
    assert saved.teacher.name == "module" and saved.teacher.path is None
    with pytest.raises(ConfigError, match="teacher passed from Python"):
        pretrain(load_config(out / "config.yaml", ["trainer.max_steps=4"]), out, resume=True)
    result = pretrain(cfg, out, resume=True, teacher=_module_teacher(PixelMap()))
    assert result.steps == 4
    report = write_report([out], tmp_path / "report", teachers={str(out): _module_teacher(PixelMap())})
    text = report.read_text()
    assert "could not rebuild" not in text and "_pca.png" in text


def test_module_teacher_from_the_command_line_is_a_one_line_error(tmp_path: Path) -> None:
    from semmim.cli import main

    assert main(["pretrain", "--config", "demo/milan", "--out", str(tmp_path / "r"), "teacher.name=module"]) == 2


def test_semantic_masking_without_attention_names_the_teacher_before_step_0(tmp_path: Path) -> None:
    class ViTLikeTokens(nn.Module):  # a ViT-style module returning (N, 1 + L, D) tokens, without attention
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 17, 8)

    teacher = ModuleTeacher(ViTLikeTokens(), embed_dim=8, image_size=16, mean=[0.5] * 3, std=[0.25] * 3)
    cfg = load_config(None, tiny_overrides("method.name=milan", "method.masker=semantic"))
    with pytest.raises(ConfigError, match=r"the teacher module ViTLikeTokens.* gives none \(a module teacher") as e:
        pretrain(cfg, tmp_path / "run", teacher=teacher)
    assert "CNN" not in str(e.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_python_teacher_replaces_the_config_source_and_says_so(
    tmp_path: Path, tiny_teacher_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(
        None,
        tiny_overrides(
            "method.name=milan", "method.masker=random", "trainer.max_steps=1", *teacher_overrides(tiny_teacher_dir)
        ),
    )
    pretrain(cfg, tmp_path / "run", teacher=_module_teacher(PixelMap()))
    printed = capsys.readouterr().out
    assert f"replaces the config's teacher.name=timm, teacher.path={tiny_teacher_dir}" in printed
    assert "teacher: PixelMap" in printed  # the start line names the teacher actually used
    assert json.loads(json.dumps(load_config(tmp_path / "run" / "config.yaml").teacher.name)) == "module"
