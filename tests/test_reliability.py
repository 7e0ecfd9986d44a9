"""Reliability done for real: two gloo processes, SIGKILLed runs, broken image files, NaN steps, full disks.

docs/reliability.md lists what these tests guarantee.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from semmim.config import ConfigError, load_config
from semmim.engine import pretrain
from semmim.engine.metrics import read_metrics
from tests.conftest import TINY, tiny_overrides

SEMMIM = str(Path(sys.executable).with_name("semmim"))


def _run(out: Path, *overrides: str, config: str = "demo/mae", resume: bool = False, fault: str | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SEMMIM_FAULT", None)
    if fault:
        env["SEMMIM_FAULT"] = fault
    cmd = [SEMMIM, "pretrain", "--out", str(out)]
    cmd += ["--resume"] if resume else ["--config", config, *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "encoder.safetensors"))


def _ckpt_step(run: Path) -> int:
    return int(torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["step"])


# -------------------------------------------------------------------------------------------- DDP
def test_ddp_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    """Same global batch of 16: 2 processes x 8 (gloo, all-gather with gradient) vs 1 process x 16.

    The clip method has no masks, so both runs see the same images, captions and parameters at every step;
    the logged loss is the mean over ranks.
    """
    base = [o for o in TINY if not o.startswith(("data.batch_size", "trainer.devices", "decoder."))]  # clip: no decoder
    lang = ["data.captions=templates", "method.embed_dim=16", "text.name=minilm", "text.locked=true"]
    common = [*base, *lang, "trainer.max_steps=5", "optim.lr=3e-3"]
    two = _run(
        tmp_path / "two", *common, "data.batch_size=8", "trainer.devices=2", "trainer.strategy=ddp", config="demo/clip"
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 device(s) x batch 8 x accumulate 1 = effective batch 16" in two.stdout
    one = _run(tmp_path / "one", *common, "data.batch_size=16", "trainer.devices=1", config="demo/clip")
    assert one.returncode == 0, one.stderr[-3000:]
    loss_two = [r["loss"] for r in read_metrics(tmp_path / "two")]
    loss_one = [r["loss"] for r in read_metrics(tmp_path / "one")]
    assert len(loss_one) == len(loss_two) == 5
    np.testing.assert_allclose(loss_two, loss_one, rtol=1e-4, atol=1e-5)
    # weights agree up to Adam's amplification of float noise in gradients that are ~0 in exact arithmetic
    # (the key bias of attention cannot change a softmax): one update moves a parameter by at most ~lr
    w2, w1 = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=5e-3)


# ---------------------------------------------------------------------------- kill and resume
RESUME = tiny_overrides("trainer.max_steps=8", "trainer.ckpt_every_n_steps=2")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    res = _run(out, *RESUME)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_sigkilled_run_resumes_exactly(tmp_path: Path, uninterrupted: Path) -> None:
    """SIGKILL after step 5 (last checkpoint at step 4); --resume reaches the same weights at step 8."""
    out = tmp_path / "run"
    killed = _run(out, *RESUME, fault="kill_after_step:5")
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "encoder.safetensors").exists()
    assert _ckpt_step(out) == 4
    resumed = _run(out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 4" in resumed.stdout
    ref, got = _weights(uninterrupted), _weights(out)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 9))
    ref_loss = [r["loss"] for r in read_metrics(uninterrupted)]
    assert [r["loss"] for r in read_metrics(out)] == pytest.approx(ref_loss, rel=1e-6)


def test_sigkill_while_writing_a_checkpoint_keeps_the_last_good_one(tmp_path: Path, uninterrupted: Path) -> None:
    """Killed with a half-written checkpoint at step 4: last.ckpt still holds step 2 and the run resumes."""
    out = tmp_path / "run"
    killed = _run(out, *RESUME, fault="kill_in_save:4")
    assert killed.returncode == -signal.SIGKILL
    tmp = out / "checkpoints" / "last.ckpt.tmp"
    assert tmp.exists()  # the torn write
    assert _ckpt_step(out) == 2
    resumed = _run(out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "removing" in resumed.stdout and not tmp.exists()
    ref, got = _weights(uninterrupted), _weights(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    pretrain(load_config(None, tiny_overrides("trainer.max_steps=2")), out)
    ckpt = out / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=r"cannot load the checkpoint .*last\.ckpt"):
        pretrain(load_config(out / "config.yaml"), out, resume=True)


# ---------------------------------------------------------------------------- hostile images
def _hostile_folder(root: Path, good: int = 40) -> list[str]:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"good{i:02d}.png")
    Image.new("CMYK", (24, 20), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    Image.fromarray((np.arange(400, dtype=np.uint16).reshape(20, 20) * 150).astype(np.uint16)).save(root / "d16.png")
    Image.fromarray(np.full((20, 20), 90, dtype=np.uint8)).save(root / "grey.png")
    Image.new("RGB", (3000, 2000), (10, 200, 30)).save(root / "huge.png")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    (root / "empty.png").write_bytes(b"")
    full = root / "good00.png"
    (root / "truncated.png").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    return ["corrupt.jpg", "empty.png", "truncated.png"]


def test_hostile_images_are_decoded_or_skipped_and_counted_per_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Corrupt, zero-byte and truncated files are skipped in 2 worker processes and counted at the epoch end."""
    root = tmp_path / "imgs"
    bad = _hostile_folder(root)
    n_files = len(list(root.iterdir()))
    overrides = tiny_overrides(
        "data.name=imagefolder",
        f"data.root={root}",
        "data.limit=null",
        "data.max_bad_fraction=0.2",
        "data.num_workers=2",
        f"data.batch_size={n_files // 2}",
        "trainer.max_steps=4",
    )
    # the per-file warnings are raised in the worker processes; the epoch count reaches the main process
    result = pretrain(load_config(None, overrides), tmp_path / "run")
    assert result.steps == 4
    printed = capsys.readouterr().out
    seen = 2 * (n_files // 2)  # full batches only
    for epoch in (0, 1):
        assert f"epoch {epoch}: skipped 3 unreadable image(s) in {seen} samples" in printed
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["skipped_images"] for e in events] == [3, 3]
    assert len(bad) == 3


def test_too_many_bad_images_stop_the_run(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _hostile_folder(root, good=6)
    overrides = tiny_overrides(
        "data.name=imagefolder", f"data.root={root}", "data.limit=null", "data.max_bad_fraction=0.05"
    )
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="max_bad_fraction"):
        pretrain(load_config(None, overrides), tmp_path / "run")


# ---------------------------------------------------------------------------- NaN steps
def test_nan_step_is_skipped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from semmim.methods.mae import MAE

    original = MAE.forward
    calls = {"n": 0}

    def sometimes_nan(self, batch):  # type: ignore[no-untyped-def]
        out = original(self, batch)
        calls["n"] += 1
        if calls["n"] == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MAE, "forward", sometimes_nan)
    result = pretrain(load_config(None, tiny_overrides("trainer.max_steps=3")), tmp_path / "run")
    assert result.steps == 3 and np.isfinite(result.final_loss)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["skipped_nonfinite"] == 1
    assert all(np.isfinite(v) for v in _weights(tmp_path / "run")["cls_token"].flatten().tolist())


# ---------------------------------------------------------------------------- configs and disks
@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["method.name=maskdistill", "decoder.name=prompting"], "this method's encoder gives every token"),
        (["method.name=mae", "method.masker=block"], "allowed here: random"),
        (["method.name=mae", "method.masker.mask_ratio=1.0"], r"method.masker.mask_ratio=1.0 .*\(0, 1\)"),
        (["model.img_size=30", "model.patch_size=4"], "choose a patch size among"),
        (["data.batch_size=many"], "data.batch_size"),
    ],
)
def test_impossible_configs_fail_before_any_work(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)


def test_full_disk_is_detected_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(OSError, match="not enough free disk space"):
        pretrain(load_config(None, tiny_overrides()), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning

    out = tmp_path / "run"
    pretrain(load_config(None, tiny_overrides("trainer.max_steps=2")), out)
    before = (out / "checkpoints" / "last.ckpt").read_bytes()

    def disk_full(self, path, state):  # type: ignore[no-untyped-def]
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lightning.Fabric, "save", disk_full)
    cfg = load_config(out / "config.yaml", ["trainer.max_steps=4"])
    with pytest.raises(OSError, match=r"could not write the checkpoint .* at step 4: .*No space left.*previous"):
        pretrain(cfg, out, resume=True)
    assert (out / "checkpoints" / "last.ckpt").read_bytes() == before
    assert not (out / "checkpoints" / "last.ckpt.tmp").exists()
