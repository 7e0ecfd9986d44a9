"""CUDA path: bf16 autocast, fused AdamW, the teacher under autocast. Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from semmim.config import load_config
from semmim.engine import pretrain
from semmim.engine.metrics import read_metrics
from tests.conftest import teacher_overrides, tiny_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("method", ["mae", "milan"])
def test_pretrain_on_gpu_bf16(method: str, tmp_path: Path, tiny_teacher_dir: Path) -> None:
    extra = teacher_overrides(tiny_teacher_dir) if method == "milan" else []
    cfg = load_config(
        None,
        tiny_overrides(
            f"method.name={method}",
            "trainer.accelerator=gpu",
            "trainer.precision=auto",
            "trainer.max_steps=5",
            *extra,
        ),
    )
    result = pretrain(cfg, tmp_path / method)
    assert result.steps == 5
    assert all(r["loss"] is not None for r in read_metrics(tmp_path / method))
