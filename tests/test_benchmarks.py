"""benchmarks/throughput.py and benchmarks/flops.py: the analytic FLOPs against FlopCounterMode, and a tiny run.

No timing is asserted: the tests check the formula and that a run writes complete reports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import flops  # noqa: E402
import throughput  # noqa: E402

from semmim.config import load_config  # noqa: E402
from semmim.masking import random_masking  # noqa: E402
from semmim.methods import build_method  # noqa: E402
from semmim.models.vit import ViTEncoder  # noqa: E402

CPU = torch.device("cpu")
TINY_VIT = flops.ViTShape(embed_dim=64, depth=2, num_heads=2, patch_size=8)


def tiny_encoder(shape: flops.ViTShape = TINY_VIT, img_size: int = 32) -> ViTEncoder:
    return ViTEncoder(
        img_size=img_size,
        patch_size=shape.patch_size,
        embed_dim=shape.embed_dim,
        depth=shape.depth,
        num_heads=shape.num_heads,
        mask_token=True,
    )


def counted_encoder_flops(enc: ViTEncoder, dense: bool, batch: int = 2) -> tuple[int, int]:
    """Per-image (forward, forward + backward) FLOPs of an encoder path counted by FlopCounterMode."""
    torch.manual_seed(0)
    x = torch.randn(batch, enc.in_chans, enc.img_size, enc.img_size)
    mask = random_masking(batch, enc.num_patches, 0.75)
    with throughput.countable_attention(CPU):
        with throughput.FlopCounterMode(display=False) as fwd:
            out = enc.forward_masked(x, mask.mask) if dense else enc.forward_visible(x, mask.ids_keep)
        with throughput.FlopCounterMode(display=False) as bwd:
            out.mean().backward()
    return fwd.get_total_flops() // batch, (fwd.get_total_flops() + bwd.get_total_flops()) // batch


def test_block_formula_matches_the_docstring() -> None:
    t, d = 197, 768
    assert flops.vit_block_flops(t, d) == 2 * t * 12 * d * d + 2 * 2 * t * t * d
    # the prompting block with every token a query is a plain block
    assert flops.prompting_block_flops(t, t, d) == flops.vit_block_flops(t, d)


def test_dense_encoder_flops_match_flop_counter() -> None:
    enc = tiny_encoder()
    forward, train = counted_encoder_flops(enc, dense=True)
    analytic = flops.encoder_step_flops(TINY_VIT, 32, 1 + enc.num_patches)
    assert forward == pytest.approx(analytic.forward, rel=0.15)
    assert train == pytest.approx(analytic.train, rel=0.15)


def test_mae_method_flops_match_flop_counter() -> None:
    overrides = [
        "model.img_size=32",
        "model.patch_size=8",
        "model.embed_dim=64",
        "model.depth=2",
        "model.num_heads=2",
        "decoder.embed_dim=32",
        "decoder.depth=1",
        "decoder.num_heads=2",
    ]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    method = build_method(cfg)
    preset = throughput.PRESETS["tiny"]
    batch = throughput.make_batch(2, 32, CPU)
    forward, train, backend = throughput.count_flops(method, batch, CPU)
    analytic = flops.method_flops(throughput.step_shape("mae", cfg, preset, 2))
    assert backend in ("default", "math")
    assert forward / 2 == pytest.approx(analytic.forward, rel=0.15)
    assert train / 2 == pytest.approx(analytic.train, rel=0.15)


def test_multi_mask_milan_flops_match_flop_counter(tmp_path: Path) -> None:
    """MILAN with 2 masks per image: the student terms double, the teacher runs once."""
    ctx = throughput.Context(
        device=CPU, steps=1, warmup=0, compile=False, num_masks=2, teachers=throughput.TeacherFactory(tmp_path),
        peak=None, matmul=1.0,
    )  # fmt: skip
    preset = throughput.PRESETS["tiny"]
    method, cfg = throughput.build_method("milan", preset, 32, ctx)
    forward, train, _ = throughput.count_flops(method, throughput.make_batch(2, 32, CPU), CPU)
    shape = throughput.step_shape("milan", cfg, preset, 2)
    assert shape.num_masks == 2
    analytic = flops.method_flops(shape)
    assert forward / 2 == pytest.approx(analytic.forward, rel=0.15)
    assert train / 2 == pytest.approx(analytic.train, rel=0.15)
    single = flops.method_flops(flops.StepShape(**{**shape.__dict__, "num_masks": 1}))
    teacher = sum(t.train for t in single.terms if t.name.startswith("teacher."))
    assert analytic.train == 2 * single.train - teacher


def test_visible_encoder_costs_under_a_third_of_dense() -> None:
    # ViT-S/16 at 224 (2 of its 12 blocks: the ratio is per block), 75% masked
    shape = flops.ViTShape(embed_dim=384, depth=2, num_heads=6, patch_size=16)
    enc = tiny_encoder(shape, img_size=224)
    _, visible = counted_encoder_flops(enc, dense=False, batch=1)
    _, dense = counted_encoder_flops(enc, dense=True, batch=1)
    assert visible < 0.3 * dense
    for preset in ("s", "b"):
        e = throughput.PRESETS[preset].encoder
        vis = flops.encoder_step_flops(e, 224, 1 + 49).train
        full = flops.encoder_step_flops(e, 224, 1 + 196).train
        assert vis < 0.3 * full


def test_cpu_defaults_are_the_quick_profile() -> None:
    args = throughput.parse_args(["--device", "cpu"])
    assert args.models == list(throughput.QUICK.models) or tuple(args.models) == throughput.QUICK.models
    assert args.batch_size == throughput.QUICK.batch_size
    assert args.steps == throughput.QUICK.steps


def test_tiny_run_writes_json_and_markdown(tmp_path: Path) -> None:
    argv = [
        "--device", "cpu", "--models", "tiny", "--methods", "mae", "milan", "maskdistill", "supmim",
        "--img-size", "32", "--batch-size", "2", "--batch-sizes", "2", "--img-sizes", "32",
        "--dense-img-size", "32", "--steps", "1", "--warmup", "1", "--repeats", "1", "--out", str(tmp_path),
    ]  # fmt: skip
    throughput.main(argv)
    report = json.loads((tmp_path / "cpu.json").read_text())
    for key in ("env", "config", "flops_convention", "matmul", "train", "flop_check", "visible_vs_dense", "scaling"):
        assert key in report
    for key in ("torch", "device_name", "threads", "date", "git_commit"):
        assert key in report["env"]
    assert report["peak_flops"] is None  # no peak on CPU
    assert {r["method"] for r in report["train"]} == {"mae", "milan", "maskdistill", "supmim"}
    for row in report["train"]:
        assert row["error"] is None
        assert row["images_per_s"] > 0 and row["train_flops_per_image"] > row["forward_flops_per_image"] > 0
        assert row["mfu_peak"] is None and row["mfu_matmul"] > 0
    for check in report["flop_check"]:
        assert check["ratio_forward"] == pytest.approx(1.0, abs=0.15)
        assert check["ratio_train"] == pytest.approx(1.0, abs=0.15)
    dense = report["visible_vs_dense"][0]
    assert dense["visible_tokens"] < dense["dense_tokens"] and dense["speedup"] > 0
    assert report["visible_vs_dense_check"] is None  # only for ViT-S
    assert [r["batch_size"] for r in report["scaling"]["batch_size"]] == [2]
    assert [r["img_size"] for r in report["scaling"]["img_size"]] == [32]
    markdown = (tmp_path / "cpu.md").read_text()
    for heading in ("## Training step", "## FLOPs formula", "FlopCounterMode", "## Visible-only", "## Scaling"):
        assert heading in markdown
