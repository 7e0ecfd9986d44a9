"""The pretraining recipe: it never changes its config, says what it uses, logs plainly off a terminal;
the teacher keys are checked up front; a run folder is opened with ``semmim.run.load_run``."""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from semmim.config import ConfigError, load_config, to_dict
from semmim.engine import PretrainRecipe, pretrain
from semmim.engine.checkpoint import load_verified
from semmim.engine.optim import LARS, clamp_warmup, layer_decay_groups
from semmim.methods import build_method, method_class
from semmim.methods.base import Method
from semmim.run import Run, RunFolderError, load_run
from semmim.teachers import check_teacher_config
from tests.conftest import teacher_overrides, tiny_overrides


def _cfg(*extra: str):  # type: ignore[no-untyped-def]
    # a teacher section is read only by a method whose target takes a teacher: those tests use milan
    teacher = any(e.startswith("teacher.") for e in extra) and not any(e.startswith("method.name") for e in extra)
    return load_config(None, tiny_overrides(*(["method.name=milan"] if teacher else []), *extra))


def _captured_pretrain(cfg, out: Path, **kw):  # type: ignore[no-untyped-def]
    """Run ``pretrain`` with stdout / stderr captured in StringIO (not terminals)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        result = pretrain(cfg, out, **kw)
    return result, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def supmim_run(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A supmim run (num_classes from the data), base_lr scaling, a warmup longer than the run, bar on."""
    cfg = _cfg(
        "method.name=supmim",
        "optim.lr=null",
        "optim.base_lr=1e-3",
        "optim.warmup_steps=5",
        "trainer.max_steps=3",
        "trainer.progress_bar=true",
    )
    before = copy.deepcopy(cfg)
    out = tmp_path_factory.mktemp("recipe") / "run"
    _, stdout, stderr = _captured_pretrain(cfg, out)
    return cfg, before, out, stdout, stderr


def test_pretrain_does_not_change_the_callers_config(supmim_run) -> None:  # type: ignore[no-untyped-def]
    cfg, before, out, _, _ = supmim_run
    assert to_dict(cfg) == to_dict(before)
    assert cfg.method.num_classes is None
    # the run's own config records what it derived from the data: it rebuilds the same method
    assert load_config(out / "config.yaml").method.num_classes == 10


def test_warmup_covering_the_whole_run_is_warned_about(supmim_run) -> None:  # type: ignore[no-untyped-def]
    _, _, _, _, stderr = supmim_run
    lines = [ln for ln in stderr.splitlines() if "warmup" in ln]
    assert len(lines) == 1, stderr
    assert "optim.warmup_steps: 5 steps" in lines[0] and "whole run of 3 steps" in lines[0]
    assert clamp_warmup(5, 3) == (3, lines[0].removeprefix("[semmim] warning: "))
    assert clamp_warmup(2, 3) == (2, None)


def test_start_line_prints_the_learning_rate_used(supmim_run) -> None:  # type: ignore[no-untyped-def]
    _, _, _, stdout, _ = supmim_run
    start = next(ln for ln in stdout.splitlines() if "trainable parameters" in ln)
    assert "effective batch 8" in start
    assert f"lr {1e-3 * 8 / 256:.3g} (base_lr 0.001 x effective batch 8 / 256)" in start, start


def test_plain_log_lines_when_stdout_is_not_a_terminal(supmim_run) -> None:  # type: ignore[no-untyped-def]
    _, _, _, stdout, stderr = supmim_run
    steps = [ln for ln in stdout.splitlines() if ln.startswith("[semmim] step ")]
    assert [ln.split()[2] for ln in steps] == ["1/3", "2/3", "3/3"], stdout
    for ln in steps:
        assert " epoch 0 loss " in ln and " lr " in ln and " img_s " in ln
    assert "it/s" not in stderr and "\r" not in stderr + stdout  # no tqdm bar


def test_explicit_lr_is_said_to_be_unscaled(tmp_path: Path) -> None:
    _, stdout, stderr = _captured_pretrain(_cfg("trainer.max_steps=2"), tmp_path / "run")
    assert "lr 0.001 (optim.lr, not scaled)" in stdout
    assert "warmup" not in stderr
    assert "[semmim] step 2/2 epoch 0 loss" in stdout  # progress_bar=false: plain lines too


def test_start_line_names_the_loaded_teacher(tmp_path: Path, tiny_teacher_dir: Path) -> None:
    cfg = _cfg("method.name=milan", "trainer.max_steps=1", *teacher_overrides(tiny_teacher_dir))
    _, stdout, _ = _captured_pretrain(cfg, tmp_path / "run")
    lines = [ln for ln in stdout.splitlines() if ln.startswith("[semmim] teacher: ")]
    assert len(lines) == 1, stdout
    assert f"timm vit_tiny_patch16_224 from {tiny_teacher_dir / 'encoder.safetensors'}" in lines[0]


def test_recipe_setup_leaves_the_config_alone_and_uses_the_method_hook(tmp_path: Path) -> None:
    cfg = _cfg("method.name=supmim")
    before = copy.deepcopy(cfg)
    recipe = PretrainRecipe(cfg, tmp_path)
    recipe.setup_fabric()
    recipe.setup_data()
    assert recipe.context == {"num_classes": 10}
    recipe.setup_model()
    assert recipe.method.num_classes == 10  # type: ignore[attr-defined]
    assert to_dict(cfg) == to_dict(before)


# ------------------------------------------------------------------------------ the method hook
def test_data_context_hook() -> None:
    from semmim.data import build_dataset

    cfg = _cfg("method.name=supmim")
    ds = build_dataset(cfg.data, img_size=16, in_chans=3, train=True, seed=0)
    assert Method.data_context(cfg, ds) == {}
    assert method_class(cfg).data_context(cfg, ds) == {"num_classes": 10}
    with pytest.raises(ConfigError, match=r"method.num_classes=3 < 10 classes"):
        method_class(cfg).data_context(_cfg("method.name=supmim", "method.num_classes=3"), ds)
    assert build_method(cfg, num_classes=4).num_classes == 4  # type: ignore[attr-defined]
    clip = _cfg("method.name=clip")
    assert method_class(clip).needs_captions
    with pytest.raises(ConfigError, match=r"method 'clip' needs captions.*data.captions=templates"):
        method_class(clip).data_context(clip, ds)


def test_eval_uses_the_shared_optimiser_pieces() -> None:
    from semmim.eval import finetune, linear

    assert linear.LARS is LARS
    assert finetune.layer_decay_groups is layer_decay_groups


# ------------------------------------------------------------------------------ teacher keys
def test_model_with_a_run_directory_of_another_architecture_is_refused(tiny_teacher_dir: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"teacher.model=vit_small_patch16_224 and teacher.path=.*unset teacher.model"
    ):
        _cfg(*teacher_overrides(tiny_teacher_dir), "teacher.model=vit_small_patch16_224")
    # the same architecture as the export records is only redundant
    _cfg(*teacher_overrides(tiny_teacher_dir), "teacher.model=vit_tiny_patch16_224")


def test_pretrained_with_a_path_is_refused(tiny_teacher_dir: Path) -> None:
    for value in ("false", "true", "augreg_in21k"):
        with pytest.raises(ConfigError, match=rf"(?i)teacher.pretrained={value} .*teacher.path=.* conflict: keep one"):
            _cfg(*teacher_overrides(tiny_teacher_dir), f"teacher.pretrained={value}")
    with pytest.raises(ConfigError, match=r"teacher.pretrained=openai .*teacher.path"):
        _cfg("teacher.name=open_clip", "teacher.model=ViT-B-16", "teacher.pretrained=openai", "teacher.path=x.pt")


def test_demo_milan_with_a_model_on_top_is_refused() -> None:
    # configs/demo/milan.yaml sets teacher.path (a run directory): asking for a random timm model on top of it
    # used to load the path silently
    with pytest.raises(ConfigError, match=r"(?i)teacher.pretrained=false .*teacher.path=runs/demo/teacher"):
        load_config(
            Path(__file__).parents[1] / "configs" / "demo" / "milan.yaml",
            ["teacher.model=vit_tiny_patch16_224", "teacher.pretrained=false"],
        )


def test_legitimate_teacher_combinations_pass(tmp_path: Path) -> None:
    weights = tmp_path / "vit.safetensors"
    save_file({"w": torch.zeros(1)}, str(weights))  # a plain weights file: no architecture recorded
    _cfg("teacher.name=timm", "teacher.model=vit_small_patch16_224", f"teacher.path={weights}")
    _cfg("teacher.name=open_clip", "teacher.model=ViT-B-16", "teacher.path=x.pt")
    _cfg("teacher.name=hf_clip", "teacher.path=some/dir", "teacher.pretrained=false")
    _cfg("teacher.name=timm", "teacher.model=vit_small_patch16_224", "teacher.pretrained=true")
    with pytest.raises(ConfigError, match=r"teacher.model=a and teacher.path=b name two hf_clip checkpoints"):
        _cfg("teacher.name=hf_clip", "teacher.model=a", "teacher.path=b")
    check_teacher_config(load_config(None, []).teacher)


# ------------------------------------------------------------------------------ load_run
def test_load_run(supmim_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, out, _, _ = supmim_run
    run = load_run(out)
    assert isinstance(run, Run) and run.path == out
    assert run.cfg.method.name == "supmim" and run.cfg.method.num_classes == 10
    assert run.ckpt.is_file() and run.encoder.is_file()
    assert run.build_teacher() is None
    method = run.load_method("cpu")
    assert not method.training and method.num_masks == 1
    fresh = run.build_method()
    ckpt = load_verified(run.ckpt, required_keys=("model",))["model"]
    for k, v in method.state_dict().items():
        assert torch.equal(v, ckpt[k]), k
    assert any(not torch.equal(v, method.state_dict()[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(FileNotFoundError, match=r"no config\.yaml"):
        load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="run directory not found"):
        load_run(tmp_path / "missing")


def test_resume_with_the_same_config_keeps_keys_taken_from_the_data(tmp_path: Path) -> None:
    """supmim's num_classes, unset in the config, comes from the data; resuming with the same config is no change."""
    over = ["method.name=supmim", "trainer.ckpt_every_n_steps=1"]
    out = tmp_path / "run"
    pretrain(_cfg(*over, "trainer.max_steps=2"), out)
    assert load_config(out / "config.yaml").method.num_classes == 10
    result = pretrain(_cfg(*over, "trainer.max_steps=3"), out, resume=True)
    assert result.steps == 3
    with pytest.raises(RunFolderError, match=r"method\.num_classes"):  # a different explicit value is another run
        pretrain(_cfg(*over, "trainer.max_steps=4", "method.num_classes=12"), out, resume=True)
