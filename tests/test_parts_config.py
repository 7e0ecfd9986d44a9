"""Parts are built from their own config nodes; methods declare what they accept; nothing is silently ignored."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from semmim.config import ConfigError, explain, find_config, load_config, to_yaml
from semmim.methods import build_method
from semmim.parts import resolve_part
from semmim.registry import LOSSES, MASKERS
from tests.conftest import method_overrides, teacher_overrides, tiny_overrides


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    return {"image": torch.rand(n, 3, 16, 16), "label": torch.zeros(n, dtype=torch.long)}


# ------------------------------------------------------------------ what used to be silently ignored
@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["method.name=mae", "method.target=teacher_features"], r"method.target='teacher_features'.*'mae'.*features"),
        (["method.name=mae", "method.kl_weight=3"], r"unknown config key 'method.kl_weight'"),
        (["method.name=mae", "method.loss=info_nce"], r"method.loss='info_nce'.*contrastive loss"),
        (["method.name=mae", "method.masker=semantic"], r"teacher's CLS attention"),
        (["method.name=mae", "teacher.name=timm"], r"teacher.name='timm' is not used: method 'mae'"),
        (["method.name=mae", "text.max_length=8"], r"text.max_length=8 is not used"),
        (["method.name=clip", "method.masker=random"], r"method.masker: method 'clip' uses no masker"),
        (["method.name=clip", "decoder.depth=2"], r"decoder: method 'clip' uses no decoder"),
        (["method.name=maskdistill", "decoder.depth=2"], r"decoder.depth: decoder 'linear' has no key 'depth'"),
        (["method.name=maskdistill", "decoder=mae"], r"decoder='mae' cannot be used by method 'maskdistill'"),
        (["method.name=mae", "method.masker.min_patches=4"], r"method.masker.min_patches: masker 'random' has no key"),
        (["method.name=mae", "decoder.out_dim=4"], r"decoder.out_dim is set by the method"),
        (["method.name=mae", "method.masker.mask_ratio=1.2"], r"method.masker.mask_ratio=1.2"),
        (["method.name=mae", "method.mask_ratio=0.5"], r"'method.mask_ratio' has moved to method.masker.mask_ratio"),
        (["method.name=milan", "teacher.target_norm=ln"], r"'teacher.target_norm' has moved to method.target.norm"),
        (["method.name=mae", "method.num_masks=2", "method.name=rils"], r"num_masks=2 is supported by"),
        (["method.name=maskdistill", "method.target.grid=native"], r"method.target.grid='native'"),
        (["data.name=synthetic", "data.root=/nonexistent/dir"], r"data.root='/nonexistent/dir': dataset 'synthetic'"),
        (["data.name=synthetic", "data.shuffle_buffer=10"], r"data.shuffle_buffer=10 is only read by data.name=webdat"),
        (["data.name=synthetic", "data.num_samples=10"], r"data.num_samples=10 is only read by data.name=webdataset"),
        (["data.name=synthetic", "data.manifest_image_key=img"], r"data.manifest_image_key='img' is only read by"),
        (["data.name=webdataset", "data.root=/x", "data.limit=4"], r"data.limit=4 is not read by data.name=webdataset"),
    ],
)
def test_settings_that_would_be_ignored_are_errors(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as err:
        load_config(None, tiny_overrides(*overrides))
    assert "\n" not in str(err.value)  # one line


def test_milan_target_must_be_features(tiny_teacher_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"method.target='pixels'.*'milan'.*allowed here: teacher_features"):
        load_config(None, [*method_overrides("milan", tiny_teacher_dir), "method.target=pixels"])


@pytest.mark.parametrize("loss", ["mse", "smooth_l1", "cosine"])
def test_milan_takes_any_reconstruction_loss(loss: str, tiny_teacher_dir: Path) -> None:
    cfg = load_config(None, [*method_overrides("milan", tiny_teacher_dir), f"method.loss={loss}"])
    assert cfg.method.loss["name"] == loss
    torch.manual_seed(0)
    out = build_method(cfg)(_batch())
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    out["loss"].backward()


def test_maskdistill_cosine_loss_stays_on_masked_patches(tiny_teacher_dir: Path) -> None:
    cfg = load_config(None, [*method_overrides("maskdistill", tiny_teacher_dir), "method.loss=cosine"])
    method = build_method(cfg)
    torch.manual_seed(0)
    out = method(_batch())
    pred, target, mask = out["pred"], out["target"], out["mask"]
    cos = torch.nn.functional.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-6)
    on_masked = ((2 - 2 * cos) * mask).sum() / mask.sum()
    on_all = (2 - 2 * cos).mean()
    assert out["loss"].item() == pytest.approx(on_masked.item(), rel=1e-5)
    assert not math.isclose(on_masked.item(), on_all.item(), rel_tol=1e-4)


def test_fashion_mnist_honours_data_root(tmp_path: Path) -> None:
    from semmim.data.fashion_mnist import FashionMNIST

    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        FashionMNIST(root=str(tmp_path / "nope"), split="train")


# ------------------------------------------------------------------ part nodes
def test_part_node_defaults_merge_and_replace() -> None:
    cfg = load_config(None, ["method.name=maskdistill", "teacher.name=timm", "teacher.model=vit_tiny_patch16_224"])
    assert cfg.method.masker == {"name": "block", "mask_ratio": 0.4, "min_patches": 16, "min_aspect": 0.3}
    # a key without a name updates the method's default part; naming another part replaces the node
    cfg = load_config(
        None,
        [
            "method.name=maskdistill",
            "teacher.name=timm",
            "teacher.model=vit_tiny_patch16_224",
            "method.masker.min_patches=4",
        ],
    )
    assert cfg.method.masker["min_patches"] == 4 and cfg.method.masker["name"] == "block"
    cfg = load_config(
        None,
        ["method.name=maskdistill", "teacher.name=timm", "teacher.model=vit_tiny_patch16_224", "method.masker=random"],
    )
    assert cfg.method.masker == {"name": "random", "mask_ratio": 0.75}
    assert resolve_part(LOSSES, {"name": "smooth_l1", "beta": 1}, "method.loss") == {"name": "smooth_l1", "beta": 1.0}
    with pytest.raises(ConfigError, match=r"bad value for 'method.loss.beta'"):
        resolve_part(LOSSES, {"name": "smooth_l1", "beta": "wide"}, "method.loss")
    with pytest.raises(ConfigError, match=r"method.masker.name: unknown masker 'blok'.*Did you mean 'block'"):
        resolve_part(MASKERS, "blok", "method.masker")


def test_resolved_config_round_trips(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    cfg = load_config(None, method_overrides("milan", tiny_teacher_dir))
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "config.yaml") == cfg


USER_PARTS = textwrap.dedent(
    """
    import torch
    from torch import nn

    from semmim.masking.random_mask import RandomMasker
    from semmim.registry import LOSSES, MASKERS

    CALLS = {}


    @MASKERS.register("test_every_kth")
    class EveryKth(RandomMasker):
        '''Random masking that always also hides patch 0.

        Args:
            mask_ratio: fraction hidden.
            k: a key of this masker's own.
        '''

        def __init__(self, mask_ratio: float = 0.5, k: int = 2) -> None:
            super().__init__(mask_ratio)
            self.k = k
            CALLS["k"] = k


    @LOSSES.register("test_scaled_mse")
    class ScaledMSE(nn.Module):
        '''MSE times a factor.

        Args:
            scale: the factor.
        '''

        def __init__(self, scale: float = 1.0) -> None:
            super().__init__()
            self.scale = scale
            CALLS["scale"] = scale

        def forward(self, pred, target, mask):
            per_token = (pred - target).pow(2).mean(-1)
            return self.scale * (per_token * mask).sum() / mask.sum()
    """
)


def test_user_registered_masker_and_loss_get_their_own_yaml_keys(tmp_path: Path) -> None:
    """A user's parts, registered in their own module, are configured from YAML and train through the CLI."""
    (tmp_path / "my_parts.py").write_text(USER_PARTS)
    config = tmp_path / "mine.yaml"
    config.write_text(
        textwrap.dedent(
            """
            base: demo/mae
            method:
              masker: {name: test_every_kth, mask_ratio: 0.6, k: 3}
              loss: {name: test_scaled_mse, scale: 2.5}
            """
        )
    )
    out = tmp_path / "run"
    over = [o for o in tiny_overrides("method.name=mae") if not o.startswith("method.name")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path.cwd() / "src"), str(Path.cwd())])}
    argv = ["pretrain", "--import", "my_parts", "--config", str(config), "--out", str(out), *over]
    res = subprocess.run(
        [sys.executable, "-m", "semmim", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    saved = (out / "config.yaml").read_text()
    assert "test_every_kth" in saved and "k: 3" in saved and "scale: 2.5" in saved
    # the module really ran: its parts recorded the keys they were built with (it prints nothing itself)
    res = subprocess.run(
        [sys.executable, "-m", "semmim", "config", "show", "--import", "my_parts", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0 and "k: 3" in res.stdout and "a key of this masker's own" in res.stdout, res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "semmim", "config", "show", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and "unknown masker 'test_every_kth'" in res.stderr and "--import" in res.stderr


# ------------------------------------------------------------------ composing files
def test_base_files_compose_and_defaults_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("data: {batch_size: 4}\ntrainer: {max_steps: 7}\n")
    (tmp_path / "b.yaml").write_text("base: a\ntrainer: {max_steps: 9}\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.data.batch_size, cfg.trainer.max_steps) == (4, 9)
    (tmp_path / "c.yaml").write_text("base: [demo/mae, a.yaml]\n")  # a shipped name and a sibling file
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.model.img_size == 28 and cfg.data.batch_size == 4
    (tmp_path / "d.yaml").write_text("defaults: [a]\n")
    with pytest.raises(ConfigError, match="'defaults:' is not read"):
        load_config(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("base: f\n")
    (tmp_path / "f.yaml").write_text("base: e\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "e.yaml")


def test_shipped_configs_resolve_outside_the_repository(tmp_path: Path) -> None:
    assert find_config("demo/mae").is_file()
    res = subprocess.run(
        [sys.executable, "-c", "from semmim.config import load_config; print(load_config('demo/milan').method.name)"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path.cwd() / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and res.stdout.strip() == "milan", res.stderr


def test_explain_gives_every_key_with_its_help(tiny_teacher_dir: Path) -> None:
    text = explain(load_config(None, method_overrides("maskdistill", tiny_teacher_dir)))
    assert "min_patches: 16" in text and "smallest block, in patches" in text
    assert "beta: 2.0" in text and "batch_size: 8" in text and "Per-device batch size" in text


def test_teacher_user_keys_overridden_with_python_teacher_still_checked(tiny_teacher_dir: Path) -> None:
    cfg = load_config(None, tiny_overrides("method.name=maskdistill", *teacher_overrides(tiny_teacher_dir)))
    assert cfg.method.target["norm"] == "ln" and cfg.method.loss == {"name": "smooth_l1", "beta": 2.0}


def test_config_show_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from semmim.cli import main

    assert main(["config", "show", "--config", "demo/mae", "method.masker.mask_ratio=0.6"]) == 0
    out = capsys.readouterr().out
    assert "mask_ratio: 0.6" in out and "fraction of patches hidden" in out and "decoder:" in out
    assert main(["config", "show", "--config", "demo/mae", "method.masker.min_patches=3"]) == 2
    assert "masker 'random' has no key 'min_patches'" in capsys.readouterr().err
