"""GradCache (Gao et al. 2021, arXiv:2101.06983): a contrastive method sees the whole effective batch.

With ``optim.accumulate`` > 1, clip and rils compute their InfoNCE (and rils its prototypes and retrieval
gate) over all micro-batches of an optimizer step, so 2 micro-batches of 8 train as 1 batch of 16.
"""

from __future__ import annotations

from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from semmim.config import load_config
from semmim.engine import pretrain
from semmim.engine.metrics import read_metrics
from semmim.engine.trainer import grad_cache_backward
from semmim.masking.base import MaskOutput
from semmim.methods import build_method
from tests.conftest import TINY, tiny_overrides

LANG = ("data.captions=templates", "method.embed_dim=16", "text.name=minilm", "text.locked=true")


def _train(out: Path, method: str, *extra: str) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    cfg = load_config(
        None, tiny_overrides(f"method.name={method}", *LANG, "trainer.max_steps=3", "optim.lr=3e-3", *extra)
    )
    pretrain(cfg, out)
    return read_metrics(out), load_file(str(out / "encoder.safetensors"))


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Equal to 1e-5, but for the attention's key bias: it cannot change a softmax, so its gradient is ~0 in
    exact arithmetic and float noise, which Adam amplifies to ~lr, decides its update (as in the plain
    2-process test of test_reliability); its query and value parts must agree."""
    assert set(got) == set(want)
    for k in want:
        a, b = got[k], want[k]
        if k.endswith("qkv.bias"):
            d = a.shape[0] // 3
            torch.testing.assert_close(a[d : 2 * d], b[d : 2 * d], rtol=0, atol=5e-3)
            a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=k)


def test_clip_two_micro_batches_train_as_one_batch(tmp_path: Path) -> None:
    """clip: 2 micro-batches x 8 (GradCache) give the losses and weights of 1 batch x 16 after 3 steps."""
    rows_acc, w_acc = _train(tmp_path / "acc", "clip", "data.batch_size=8", "optim.accumulate=2")
    rows_one, w_one = _train(tmp_path / "one", "clip", "data.batch_size=16", "optim.accumulate=1")
    assert len(rows_acc) == len(rows_one) == 3
    for key in ("loss", "i2t_acc", "temperature"):
        np.testing.assert_allclose([r[key] for r in rows_acc], [r[key] for r in rows_one], rtol=0, atol=1e-5)
    _assert_same_weights(w_acc, w_one)


def test_clip_grad_cache_is_off_without_accumulation_and_plain_accumulation_differs(tmp_path: Path) -> None:
    """Without GradCache each micro-batch's InfoNCE would see 8 negatives: the losses differ from 1 x 16."""
    from semmim.methods.clip import CLIP

    rows_one, _ = _train(tmp_path / "one", "clip", "data.batch_size=16")
    CLIP.grad_cache = False
    try:
        rows_plain, _ = _train(tmp_path / "plain", "clip", "data.batch_size=8", "optim.accumulate=2")
    finally:
        CLIP.grad_cache = True
    assert abs(rows_plain[0]["loss"] - rows_one[0]["loss"]) > 1e-3


class FixedMasker:
    """The same mask for every image (no random draw), so two runs can be compared row by row."""

    uniform_count = True

    def __call__(self, n: int, grid: tuple[int, int], device: Any = None, **_: Any) -> MaskOutput:
        length = grid[0] * grid[1]
        keep = torch.arange(0, length, 4, device=device)
        mask = torch.ones(length, dtype=torch.bool, device=device)
        mask[keep] = False
        hidden = torch.nonzero(mask).flatten()
        restore = torch.argsort(torch.cat([keep, hidden]))
        rows = [t.expand(n, -1).clone() for t in (mask, keep, hidden, restore)]
        return MaskOutput(mask=rows[0], ids_keep=rows[1], ids_mask=rows[2], ids_restore=rows[3])


def _grad_cache_step(method: Any, batches: list[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The engine's GradCache step in one process, without a wrapper."""
    out = grad_cache_backward(
        method, method, batches, [0] * len(batches), backward=torch.Tensor.backward, no_sync=lambda _: nullcontext()
    )
    return out["loss"], out["logs"]


@pytest.mark.parametrize("variant", ["locked_separate", "faithful"])
def test_rils_grad_cache_matches_one_batch(variant: str, tmp_path: Path) -> None:
    """rils: the effective batch's InfoNCE, prototypes, gate and KL normalisation over 2 halves = 1 batch of 16,
    with a locked sentence model and the decoder predicting joint-space tokens, and as published: a trainable
    random CLIP text tower and the predictions through the shared image projection."""
    if variant == "faithful":
        from tests.test_rils import faithful_overrides, write_tiny_open_clip

        over = faithful_overrides(write_tiny_open_clip(tmp_path / "tower"), "method.gate_correct=true")
    else:
        over = tiny_overrides(
            "method.name=rils", *LANG, "decoder.depth=1", "method.gate_correct=true", "method.kl_projection=separate"
        )
    cfg = load_config(None, over)
    torch.manual_seed(0)
    method = build_method(cfg)
    method.masker = FixedMasker()
    torch.manual_seed(1)
    images = torch.rand(16, 3, 16, 16)
    captions = [f"a photo of a {['cat', 'dog', 'car', 'ship', 'frog'][i % 5]}" for i in range(16)]
    batch = {"image": images, "caption": captions}
    halves = [{"image": images[:8], "caption": captions[:8]}, {"image": images[8:], "caption": captions[8:]}]

    out = method(batch)
    out["loss"].backward()
    ref = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.zero_grad(set_to_none=True)
    loss, logs = _grad_cache_step(method, halves)
    got = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    assert 0.0 < float(out["logs"]["gate_frac"]) < 1.0  # the gate drops some samples' KL
    torch.testing.assert_close(loss, out["loss"].detach(), rtol=0, atol=1e-5)
    for k in ("info_nce", "kl", "gate_frac"):
        torch.testing.assert_close(logs[k], out["logs"][k], rtol=0, atol=1e-5)
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)
    if variant == "faithful":  # the text tower and the projection are trained through the cached gradients
        assert any(n.startswith("text_encoder.model.transformer.") for n in got)
        assert method.kl_projection == "shared" and "image_proj.weight" in got


def test_rils_two_micro_batches_train_as_one_batch(tmp_path: Path, monkeypatch: Any) -> None:
    """rils in the engine: 2 micro-batches x 8 (GradCache) = 1 batch x 16, with a mask that is the same in both."""
    import semmim.methods.rils as rils

    monkeypatch.setattr(rils, "build_masker", lambda cfg: FixedMasker())
    rows_acc, w_acc = _train(tmp_path / "acc", "rils", "decoder.depth=1", "data.batch_size=8", "optim.accumulate=2")
    rows_one, w_one = _train(tmp_path / "one", "rils", "decoder.depth=1", "data.batch_size=16")
    assert len(rows_acc) == len(rows_one) == 3
    for key in ("loss", "info_nce", "kl", "gate_frac"):
        np.testing.assert_allclose([r[key] for r in rows_acc], [r[key] for r in rows_one], rtol=0, atol=1e-5)
    assert all(abs(r["loss"] - (r["info_nce"] + 0.5 * r["kl"])) < 1e-5 for r in rows_acc)
    _assert_same_weights(w_acc, w_one)


def test_clip_two_gloo_processes_with_grad_cache_match_one_process(tmp_path: Path) -> None:
    """2 processes x 2 micro-batches x 4 (gloo, GradCache, all-gather with gradient) = 1 process x 16."""
    from tests.test_reliability import _run, _weights

    base = [o for o in TINY if not o.startswith(("data.batch_size", "trainer.devices", "decoder."))]  # clip: no decoder
    common = [*base, *LANG, "trainer.max_steps=3", "optim.lr=3e-3"]
    two = _run(
        tmp_path / "two",
        *common,
        "data.batch_size=4",
        "optim.accumulate=2",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        config="demo/clip",
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 device(s) x batch 4 x accumulate 2 = effective batch 16" in two.stdout
    one = _run(tmp_path / "one", *common, "data.batch_size=16", "trainer.devices=1", config="demo/clip")
    assert one.returncode == 0, one.stderr[-3000:]
    loss_two = [r["loss"] for r in read_metrics(tmp_path / "two")]
    loss_one = [r["loss"] for r in read_metrics(tmp_path / "one")]
    assert len(loss_one) == len(loss_two) == 3
    np.testing.assert_allclose(loss_two, loss_one, rtol=0, atol=1e-5)
    _assert_same_weights(_weights(tmp_path / "two"), _weights(tmp_path / "one"))


def test_grad_cache_resume_is_exact(tmp_path: Path) -> None:
    """A GradCache run interrupted in epoch 1 and resumed equals the uninterrupted run bit for bit.

    The resumed run's locked-tower cache starts empty and meets its captions in other groups than the
    uninterrupted run did; their cached features are the same bits all the same (``encode_each``).
    """
    from tests.test_resume import Crash, _assert_same_run, _crash_at

    # 64 images / (batch 8 x accumulate 2) = 4 optimizer steps per epoch
    over = tiny_overrides(
        "method.name=clip", *LANG, "optim.accumulate=2", "trainer.max_steps=6", "trainer.ckpt_every_n_steps=1"
    )
    pretrain(load_config(None, over), tmp_path / "ref")
    out = tmp_path / "run"
    with suppress(Crash):
        pretrain(load_config(None, over), out, on_step=_crash_at(6))
    assert int(torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["step"]) == 5
    pretrain(load_config(None, over), out, resume=True)
    _assert_same_run(tmp_path / "ref", out)


def test_grad_cache_nonfinite_loss_skips_the_step(tmp_path: Path, monkeypatch: Any) -> None:
    """A NaN effective-batch loss at step 2 skips that update (counted, logged) and the run goes on."""
    from semmim.methods.clip import CLIP

    original = CLIP.batch_loss
    calls = {"n": 0}

    def batch_loss(self, reps, batches):  # type: ignore[no-untyped-def]
        out, context = original(self, reps, batches)
        calls["n"] += 1
        if calls["n"] == 2:
            out["loss"] = out["loss"] * float("nan")
        return out, context

    monkeypatch.setattr(CLIP, "batch_loss", batch_loss)
    over = tiny_overrides("method.name=clip", *LANG, "optim.accumulate=2", "trainer.max_steps=4")
    pretrain(load_config(None, over), tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    assert [isinstance(r["loss"], float) and np.isfinite(r["loss"]) for r in rows] == [True, False, True, True]
    assert rows[-1]["skipped_nonfinite"] == 1
    assert all(bool(torch.isfinite(t).all()) for t in load_file(str(tmp_path / "run" / "encoder.safetensors")).values())
