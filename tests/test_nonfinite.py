"""The non-finite guard runs every step: a streak stops the run in time, and no checkpoint holds a bad state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from semmim.config import load_config
from semmim.engine import NonFiniteLossError, pretrain
from semmim.engine.metrics import read_metrics
from semmim.engine.trainer import NonFiniteGuard, all_finite, grad_norm
from tests.conftest import tiny_overrides


def _nan_at(monkeypatch: pytest.MonkeyPatch, bad_calls: set[int]) -> None:
    """Make MAE's loss NaN at the given forward calls (1-based)."""
    from semmim.methods.mae import MAE

    original = MAE.forward
    calls = {"n": 0}

    def forward(self, batch):  # type: ignore[no-untyped-def]
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] in bad_calls:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MAE, "forward", forward)


def test_streak_between_log_steps_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """5 NaN steps in a row (steps 3..7) with log_every_n_steps=10 and max_nonfinite_steps=3: stop at the 4th."""
    _nan_at(monkeypatch, {3, 4, 5, 6, 7})
    cfg = load_config(None, tiny_overrides("trainer.max_steps=20", "trainer.log_every_n_steps=10"))
    seen: list[int] = []
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 5 .*stopping after 4 in a row"):
        pretrain(cfg, tmp_path / "run", on_step=lambda s, loss: seen.append(s))
    assert max(seen) <= 6  # stopped within the limit, not at the next log step
    assert not (tmp_path / "run" / "encoder.safetensors").exists()


def test_no_checkpoint_is_written_during_a_streak(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Steps 3 and 4 are NaN and step 4 is a checkpoint step: last.ckpt keeps step 2; the run goes on."""
    _nan_at(monkeypatch, {3, 4})
    cfg = load_config(None, tiny_overrides("trainer.max_steps=5", "trainer.ckpt_every_n_steps=2"))
    saved: list[int] = []
    import semmim.engine.trainer as tr

    real = tr._save_atomic

    def spy(fabric, path, state, step):  # type: ignore[no-untyped-def]
        saved.append(step)
        real(fabric, path, state, step)

    monkeypatch.setattr(tr, "_save_atomic", spy)
    result = pretrain(cfg, tmp_path / "run")
    assert result.steps == 5
    assert saved == [2, 5]  # not 4
    assert "step 4 had a non-finite loss: no checkpoint written" in capsys.readouterr().out
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["skipped_nonfinite"] == 2


def test_nonfinite_weights_are_never_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights gone bad behind a finite loss (here: written after the forward pass) stop the run at the
    checkpoint step, which writes nothing."""
    from semmim.methods.mae import MAE

    original = MAE.forward
    calls = {"n": 0}

    def forward(self, batch):  # type: ignore[no-untyped-def]
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] == 4:  # a bias is not needed by the backward pass: the step itself stays finite
            with torch.no_grad():
                self.encoder.blocks[0].attn.proj.bias.fill_(float("inf"))
        return out

    monkeypatch.setattr(MAE, "forward", forward)
    cfg = load_config(None, tiny_overrides("trainer.max_steps=6", "trainer.ckpt_every_n_steps=2"))
    with pytest.raises(NonFiniteLossError, match=r"became non-finite by step 4 .*no checkpoint was written"):
        pretrain(cfg, tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_inf_gradient_with_a_finite_loss_skips_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from semmim.methods.mae import MAE

    original = MAE.forward
    calls = {"n": 0}

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def,override]
            return x.clone()

        @staticmethod
        def backward(ctx, g):  # type: ignore[no-untyped-def,override]
            return g * float("inf")

    def forward(self, batch):  # type: ignore[no-untyped-def]
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] == 2:
            out["loss"] = InfGrad.apply(out["loss"])
        return out

    monkeypatch.setattr(MAE, "forward", forward)
    pretrain(load_config(None, tiny_overrides("trainer.max_steps=3")), tmp_path / "run")
    assert read_metrics(tmp_path / "run")[-1]["skipped_nonfinite"] == 1
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "run" / "encoder.safetensors")).values())


def test_guard_counts_rows_and_totals() -> None:
    g = NonFiniteGuard(torch.device("cpu"), limit=3)
    seq = [True, False, False, True, False]
    rows = []
    for ok in seq:
        g.update(torch.tensor(ok), torch.tensor(1.0 if ok else float("nan")))
        state = g.read()
        assert state is not None
        rows.append(state[:2])
    assert rows == [(0, 0), (1, 1), (2, 2), (0, 2), (1, 3)]
    assert g.step_of_state(5) == 4


def test_grad_norm_and_all_finite() -> None:
    lin = torch.nn.Linear(3, 2)
    lin(torch.ones(1, 3)).sum().backward()
    expected = torch.cat([p.grad.flatten() for p in lin.parameters()]).norm()  # type: ignore[union-attr]
    assert torch.allclose(grad_norm(list(lin.parameters())), expected)
    assert all_finite(lin)
    with torch.no_grad():
        lin.bias[0] = float("nan")
    assert not all_finite(lin)
    assert np.isfinite(float(grad_norm([])))
