"""Engine pieces: AdamW groups, the lr schedule, lr scaling, per-step seeds, metric files."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from semmim.config import load_config
from semmim.engine import cosine_lr, param_groups
from semmim.engine.metrics import MetricsWriter, read_metrics
from semmim.engine.trainer import check_writable, resolve_precision, step_seed
from semmim.methods import build_method
from tests.conftest import tiny_overrides


def test_no_weight_decay_on_norms_biases_and_tokens() -> None:
    method = build_method(load_config(None, tiny_overrides()))
    groups = {g["name"]: g for g in param_groups(method, 0.05)}
    names = {id(p): n for n, p in method.named_parameters()}
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    plain = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert "encoder.blocks.0.attn.qkv.weight" in decayed and "encoder.patch_embed.proj.weight" in decayed
    for n in ("encoder.cls_token", "decoder.mask_token", "encoder.blocks.0.norm1.weight", "encoder.norm.bias"):
        assert n in plain, n
    assert not any("bias" in n or "norm" in n for n in decayed)
    # fixed sin-cos tables are frozen and in neither group
    assert "encoder.pos_embed" not in decayed | plain and "decoder.pos_embed" not in decayed | plain


def test_cosine_schedule_with_linear_warmup() -> None:
    lrs = [cosine_lr(s, 100, 10, 1.0, 0.1) for s in range(101)]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_lr_scaling_and_accumulation_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from semmim.engine import pretrain

    cfg = load_config(
        None, tiny_overrides("optim.lr=null", "optim.base_lr=1e-3", "optim.effective_batch=32", "trainer.max_steps=1")
    )
    pretrain(cfg, tmp_path / "run")
    text = capsys.readouterr().out
    # batch 8 on one device, effective 32 -> accumulate 4; lr = 1e-3 * 32 / 256
    assert "accumulate 4" in text and "effective batch 32" in text and "lr 0.000125" in text


def test_step_seed_is_a_pure_function() -> None:
    assert step_seed(0, 0, 5) == step_seed(0, 0, 5)
    assert len({step_seed(0, r, s) for r in range(4) for s in range(50)}) == 200
    assert 0 <= step_seed(2**31, 7, 10**9) < 2**63


def test_precision_auto() -> None:
    assert resolve_precision("auto", "cpu") == "32-true"
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"
    if not torch.cuda.is_available():
        assert resolve_precision("auto", "auto") == "32-true"


def test_unwritable_output_folder_fails_early(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot write to the output folder"):
        check_writable(blocker / "run")


def test_metrics_writer_truncates_on_resume(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path)
    for s in (1, 2, 3, 4):
        w.write({"step": s, "loss": 1.0 / s})
    MetricsWriter(tmp_path, resume_step=2).write({"step": 3, "loss": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 4  # header + 3 rows
