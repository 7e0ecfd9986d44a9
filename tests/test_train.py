"""End to end: `semmim pretrain` through the CLI, timm loading of the result, exact resume, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from semmim.cli import main
from semmim.config import load_config
from semmim.engine import NonFiniteLossError, pretrain
from semmim.engine.metrics import read_metrics
from semmim.export import read_timm_config
from tests.conftest import teacher_overrides, tiny_overrides

pytestmark = pytest.mark.slow


def _cli(*args: str) -> int:
    return main(list(args))


@pytest.mark.parametrize("method", ["mae", "milan"])
def test_cli_pretrain_three_steps_and_timm_loads(method: str, tmp_path: Path, tiny_teacher_dir: Path) -> None:
    out = tmp_path / method
    extra = teacher_overrides(tiny_teacher_dir) if method == "milan" else []
    rc = _cli("pretrain", "--config", f"demo/{method}", "--out", str(out), *tiny_overrides(*extra))
    assert rc == 0
    for f in ("config.yaml", "checkpoints/last.ckpt", "metrics.jsonl", "metrics.csv", "encoder.safetensors"):
        assert (out / f).is_file(), f
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss"] is not None and r["loss"] > 0 for r in rows)
    resolved = load_config(out / "config.yaml")
    assert resolved.trainer.max_steps == 3 and resolved.method.name == method
    name, kwargs = read_timm_config(out)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    result = model.load_state_dict(load_file(str(out / "encoder.safetensors")), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 32)


def test_max_steps_counts_optimizer_steps_with_accumulation(tmp_path: Path) -> None:
    cfg = load_config(None, tiny_overrides("optim.accumulate=2", "trainer.max_steps=2"))
    result = pretrain(cfg, tmp_path / "acc")
    assert result.steps == 2
    assert [r["step"] for r in read_metrics(tmp_path / "acc")] == [1, 2]


def test_resume_after_a_crash_continues_exactly(tmp_path: Path) -> None:
    """Crash after step 3 (last checkpoint at step 2), resume: steps 3..6 match an uninterrupted run."""
    overrides = tiny_overrides("trainer.max_steps=6", "trainer.ckpt_every_n_steps=2", "data.crop_scale=[0.3,1.0]")
    cfg = load_config(None, overrides)
    full = pretrain(cfg, tmp_path / "full")
    losses_full = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full")}

    class Crash(Exception):
        pass

    def crash_at_3(step: int, loss: float) -> None:
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        pretrain(cfg, tmp_path / "crashed", on_step=crash_at_3)
    resumed = pretrain(cfg, tmp_path / "crashed", resume=True)
    losses_resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "crashed")}
    assert resumed.steps == full.steps == 6
    assert sorted(losses_resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert losses_resumed[step] == pytest.approx(losses_full[step], rel=1e-5, abs=1e-6), step
    a = load_file(str(tmp_path / "full" / "encoder.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "encoder.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_cli_resume_reads_config_from_run_dir(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert _cli("pretrain", "--config", "demo/mae", "--out", str(out), *tiny_overrides("trainer.max_steps=2")) == 0
    assert _cli("pretrain", "--out", str(out), "--resume") == 0  # already done: no new step, still exports
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_nan_loss_stops_with_a_clear_error(tmp_path: Path) -> None:
    cfg = load_config(None, tiny_overrides("optim.lr=1e30", "optim.warmup_steps=0", "trainer.max_steps=20"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at step \d+"):
        pretrain(cfg, tmp_path / "nan")


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["pretrain", "--config", "demo/mae", "--out", str(tmp_path / "x")]
    assert _cli(*base, *tiny_overrides("trainer.max_stepz=3")) == 2
    assert "trainer.max_stepz" in capsys.readouterr().err
    missing = tmp_path / "does-not-exist"
    assert _cli(*base, *tiny_overrides("data.name=imagefolder", f"data.root={missing}")) == 2
    assert str(missing) in capsys.readouterr().err
    assert _cli("pretrain", "--config", "no/such.yaml", "--out", str(tmp_path / "y")) == 2
    assert "no/such.yaml" in capsys.readouterr().err
    teacher_file = tmp_path / "missing_teacher.safetensors"
    over = tiny_overrides("teacher.name=timm", f"teacher.path={teacher_file}")
    assert _cli("pretrain", "--config", "demo/milan", "--out", str(tmp_path / "z"), *over) == 2
    assert "missing_teacher.safetensors" in capsys.readouterr().err


def test_corrupt_images_are_skipped_with_a_warning(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(40):
        Image.new("RGB", (20, 20), (i * 5, 100, 200 - i * 4)).save(root / f"img{i:02d}.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    cfg = load_config(
        None,
        tiny_overrides("data.name=imagefolder", f"data.root={root}", "data.limit=null", "data.max_bad_fraction=0.1"),
    )
    with pytest.warns(RuntimeWarning, match="broken.jpg"):
        result = pretrain(cfg, tmp_path / "run")
    assert result.steps == 3


def test_help_of_every_command() -> None:
    for args in (
        ["--help"],
        ["pretrain", "--help"],
        ["list", "--help"],
        *(["eval", p, "--help"] for p in ("knn", "linear", "finetune", "lowshot", "seg", "zeroshot", "classify")),
        ["report", "--help"],
        ["data", "shards", "--help"],
        ["demo", "--help"],
    ):
        proc = subprocess.run([sys.executable, "-m", "semmim.cli", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "usage" in proc.stdout.lower(), (args, proc.stderr)


def test_list_shows_registries_and_configs(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("list") == 0
    text = capsys.readouterr().out
    for needle in (
        "methods:",
        "mae",
        "milan",
        "maskers:",
        "semantic",
        "block",
        "teachers:",
        "open_clip",
        "hf_clip",
        "timm",
        "decoders:",
        "prompting",
        "losses:",
        "cosine",
        "demo/mae.yaml",
        "milan/vit_base_p16_in1k.yaml",
    ):
        assert needle in text, needle


def test_eval_knn_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    over = [
        "model.img_size=28",
        "model.in_chans=1",
        "data.mean=[0.5]",
        "data.std=[0.5]",
    ]
    assert _cli("pretrain", "--config", "demo/mae", "--out", str(out), *tiny_overrides(*over)) == 0
    capsys.readouterr()
    rc = _cli(
        "eval",
        "knn",
        "--encoder",
        str(out),
        "--train-limit",
        "200",
        "--test-limit",
        "100",
        "--num-workers",
        "0",
        "--out",
        str(tmp_path / "knn"),
    )
    assert rc == 0
    metrics = json.loads((tmp_path / "knn" / "metrics.json").read_text())
    assert 0 <= metrics["top1"] <= 100 and metrics["n_test"] == 100


def test_demo_quick(tmp_path: Path) -> None:
    """Every stage of `make demo` (teacher, MAE, MILAN, kNN, report) for a few steps."""
    from semmim.demo import run_demo

    results = run_demo(tmp_path / "demo", quick=True)
    names = [r["name"] for r in results["rows"]]
    assert names == ["random init", "mae", "milan", "rils", "clip teacher"]
    assert all(r.get("zeroshot_top1") is not None for r in results["rows"] if r["name"] in ("rils", "clip teacher"))
    for r in results["rows"]:
        assert 0 <= r["top1_cls"] <= 100 and 0 <= r["top1_mean"] <= 100
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| mae |" in report and "| milan |" in report
    assert (tmp_path / "demo" / "milan" / "encoder.safetensors").is_file()
    for r in results["rows"]:
        assert 0 <= r["linear_top1"] <= 100 and 0 <= r["seg_miou"] <= 100
    full = tmp_path / "demo" / "report"
    assert (full / "report.md").is_file() and (full / "report.html").is_file()
    text = (full / "report.md").read_text()
    assert "kNN" in text and "linear" in text.lower()
    pngs = {p.name for p in full.glob("*.png")}
    assert "curves.png" in pngs and "mae_reconstruction.png" in pngs and "milan_pca.png" in pngs
    assert "milan_semantic_mask.png" in pngs
    assert json.loads((tmp_path / "demo" / "mae" / "eval" / "knn" / "metrics.json").read_text())["protocol"] == "knn"
