"""`semmim report`: Markdown/HTML comparison of tiny runs, curves, reconstructions, PCA and semantic masks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from semmim.config import load_config
from semmim.engine import pretrain
from semmim.report import write_report
from semmim.targets.pixels import normalize_patches, patchify, unpatchify
from semmim.viz import grey_masked, pca_rgb, reconstruct_pixels, to_display
from tests.conftest import teacher_overrides, tiny_overrides

GREY = ("model.in_chans=1", "data.mean=[0.5]", "data.std=[0.25]")


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report_runs")
    teacher = teacher_overrides(tiny_teacher_dir)
    specs = {
        "mae": tiny_overrides("method.name=mae"),
        "milan": tiny_overrides("method.name=milan", "method.masker=semantic", *teacher),
        "maskdistill": tiny_overrides("method.name=maskdistill", *teacher),
        "supmim_grey": tiny_overrides("method.name=supmim", *GREY),
    }
    out = {}
    for name, over in specs.items():
        pretrain(load_config(None, over), root / name)
        out[name] = root / name
    knn = out["mae"] / "eval" / "knn"
    knn.mkdir(parents=True)
    (knn / "metrics.json").write_text(json.dumps({"top1": 42.5, "top5": 90.0, "protocol": "knn"}))
    return out


@pytest.fixture(scope="session")
def report(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    return write_report(list(runs.values()), out, title="tiny runs", num_images=4)


def _table(md: str) -> list[list[str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


def _assert_png(path: Path, min_side: int = 100) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and min(im.size) >= min_side, (path, im.size)


def test_report_files_table_and_pictures(report: Path, runs: dict[str, Path]) -> None:
    out = report.parent
    assert report.name == "report.md" and (out / "report.html").is_file()
    md = report.read_text()
    table = _table(md)
    header, body = table[0], table[2:]
    assert "kNN top-1" in header and "final loss" in header
    assert [r[0] for r in body] == list(runs)
    knn = header.index("kNN top-1")
    by_name = {r[0]: r for r in body}
    assert by_name["mae"][knn] == "42.5" and by_name["milan"][knn] == "–"
    assert by_name["mae"][header.index("steps")] == "3"
    assert by_name["milan"][header.index("method")] == "milan" and by_name["milan"][header.index("teacher")] != "–"
    for png in ("curves.png", "mae_reconstruction.png", "milan_pca.png", "milan_semantic_mask.png"):
        _assert_png(out / png)
        assert f"]({png})" in md
    _assert_png(out / "maskdistill_pca.png")
    _assert_png(out / "supmim_grey_reconstruction.png")
    assert not (out / "mae_pca.png").exists() and not (out / "maskdistill_semantic_mask.png").exists()
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 6 and "<table>" in page and "42.5" in page


def test_unpatchify_inverts_patchify_and_reconstruction_of_the_target_is_the_input() -> None:
    torch.manual_seed(0)
    for c in (1, 3):
        imgs = torch.rand(2, c, 8, 12)
        assert torch.equal(unpatchify(patchify(imgs, 4), 4, (2, 3), c), imgs)
        mean, std = torch.full((1, c, 1, 1), 0.5), torch.full((1, c, 1, 1), 0.25)
        x = (imgs - mean) / std
        mask = torch.rand(2, 6) > 0.5
        for norm_pix in (True, False):
            target = patchify(x, 4)
            pred = normalize_patches(target) if norm_pix else target
            rec, pasted = reconstruct_pixels(pred, x, mask, 4, mean, std, norm_pix)
            torch.testing.assert_close(rec, imgs, atol=1e-4, rtol=0)
            torch.testing.assert_close(pasted, imgs, atol=1e-4, rtol=0)
        shown = to_display(grey_masked(imgs, mask, 4))
        assert shown.shape == (2, 8, 12, 3) and shown.min() >= 0 and shown.max() <= 1


def test_pasted_reconstruction_keeps_visible_patches() -> None:
    imgs = torch.rand(1, 3, 8, 8)
    mask = torch.tensor([[True, False, False, True]])
    rec, pasted = reconstruct_pixels(
        torch.zeros(1, 4, 48), imgs, mask, 4, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), False
    )
    assert torch.equal(pasted[..., :4, 4:], imgs[..., :4, 4:]) and torch.equal(pasted[..., :4, :4], rec[..., :4, :4])


def test_pca_rgb_range_and_shape() -> None:
    torch.manual_seed(0)
    fit, other = torch.randn(3, 16, 10) * 5, torch.randn(2, 16, 10) * 50
    a, b = pca_rgb(fit, other, grid=(4, 4), size=(16, 16))
    assert a.shape == (3, 16, 16, 3) and b.shape == (2, 16, 16, 3)
    for t in (a, b):
        assert float(t.min()) >= 0 and float(t.max()) <= 1
    assert float(a.min()) == 0 and float(a.max()) == 1
    (small,) = pca_rgb(torch.randn(1, 4, 2), grid=(2, 2))  # fewer than 3 feature dimensions
    assert small.shape == (1, 2, 2, 3) and float(small.min()) >= 0 and float(small.max()) <= 1


def test_missing_run_directory_or_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        write_report([tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.yaml"):
        write_report([tmp_path / "empty"], tmp_path / "out")


def test_runs_without_checkpoint_metrics_or_teacher_still_get_a_report(runs: dict[str, Path], tmp_path: Path) -> None:
    no_ckpt = shutil.copytree(runs["mae"], tmp_path / "no_ckpt")
    (no_ckpt / "checkpoints" / "last.ckpt").unlink()
    no_metrics = shutil.copytree(runs["mae"], tmp_path / "no_metrics")
    (no_metrics / "metrics.jsonl").unlink()
    (no_metrics / "checkpoints" / "last.ckpt").unlink()
    no_teacher = shutil.copytree(runs["milan"], tmp_path / "no_teacher")
    cfg = no_teacher / "config.yaml"
    cfg.write_text(cfg.read_text().replace(str(teacher_path(runs["milan"])), str(tmp_path / "gone")))
    md = write_report([no_ckpt, no_metrics, no_teacher], tmp_path / "out", num_images=2)
    text = md.read_text()
    rows = _table(text)[2:]
    assert [r[0] for r in rows] == ["no_ckpt", "no_metrics", "no_teacher"]
    assert rows[1][3] == "–" and rows[0][3] == "3"
    assert "no checkpoint" in text and "no metrics.jsonl" in text and "teacher" in text
    assert not list((tmp_path / "out").glob("no_*.png"))
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "curves.png").is_file()


def teacher_path(run: Path) -> str:
    return str(load_config(run / "config.yaml").teacher.path)


def test_metrics_table_evaluation_columns() -> None:
    from semmim.report import RunInfo, metrics_table

    rows = [{"step": 5, "loss": 0.5, "images_per_s": 10.0, "data_wait_frac": 0.1, "elapsed_s": 30.0}]
    evals = {"lowshot": {"top1_1pct": 50.0, "top1_1pct_std": 1.25, "top1_10pct": 60.0}, "seg": {"miou": 33.33}}
    a = RunInfo("a", Path("a"), {"method": {"name": "mae"}}, rows, evals)
    b = RunInfo("b", Path("b"), {"method": {"name": "milan"}, "teacher": {"name": "timm", "path": "x/t"}}, [], {})
    header, table = metrics_table([a, b])
    assert header[-3:] == ["1% low-shot top-1", "10% low-shot top-1", "seg mIoU"] and "kNN top-1" not in header
    assert table[0][3:] == ["5", "0.5", "10.0", "10%", "30.0 s", "50.0 ± 1.2", "60.0", "33.3"]
    assert table[1][2] == "timm: t" and table[1][3:] == ["–"] * 8


def test_report_names_the_recipe_of_each_fine_tune_and_linear_number() -> None:
    from semmim.report import RunInfo, _markdown, metrics_table, recipe_notes

    def linear(top1: float, recipe: str, **extra: Any) -> dict[str, Any]:
        return {"protocol": "linear", "top1": top1, "settings": {"recipe": recipe}, **extra}

    a_evals = {
        "linear": linear(61.0, "default", recipe_overrides={}),
        "linear_milan": linear(64.5, "milan", recipe_overrides={"epochs": 3}),
        "linear_milan_random": linear(12.0, "milan"),
        "finetune_maskdistill": {"protocol": "finetune", "top1": 80.0, "settings": {"recipe": "maskdistill"}},
    }
    b_evals = {"linear": {"protocol": "linear", "top1": 58.0}}  # written before recipes: no recipe recorded
    a = RunInfo("a", Path("a"), {"method": {"name": "milan"}}, [], a_evals)
    b = RunInfo("b", Path("b"), {"method": {"name": "mae"}}, [], b_evals)
    header, table = metrics_table([a, b])
    cells = {h: (table[0][i], table[1][i]) for i, h in enumerate(header)}
    assert cells["linear top-1"] == ("–", "58.0")
    assert cells["linear top-1 (default recipe)"] == ("61.0", "–")
    assert cells["linear top-1 (milan recipe)"] == ("64.5", "–")
    assert cells["fine-tune top-1 (maskdistill recipe)"] == ("80.0", "–")
    assert cells["linear_random top-1 (milan recipe)"] == ("12.0", "–")
    assert header.index("linear top-1") < header.index("linear top-1 (default recipe)")
    assert header.index("linear top-1 (default recipe)") < header.index("linear top-1 (milan recipe)")
    notes = recipe_notes(a)
    assert "eval/linear_milan: linear, milan recipe; overridden: epochs=3" in notes
    assert "eval/finetune_maskdistill: finetune, maskdistill recipe" in notes and not recipe_notes(b)
    md = _markdown("t", [a, b], header, table, None)
    assert "- eval/linear_milan: linear, milan recipe; overridden: epochs=3" in md
    assert "name the evaluation recipe" in md
