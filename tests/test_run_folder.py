"""The run folder has one writer, keeps its run, and records what a resume changed; checkpoints are verified."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from semmim.config import ConfigError, load_config
from semmim.engine import pretrain
from semmim.engine.checkpoint import CHECKSUM_KEY, CheckpointError, ChecksummedCheckpointIO, content_checksum
from semmim.engine.metrics import read_metrics
from semmim.run import LOCK, RESUME_MAY_CHANGE, RunFolderError, RunLock, resume_changes
from tests.conftest import tiny_overrides

SEMMIM = str(Path(sys.executable).with_name("semmim"))


def _cfg(*extra: str):  # type: ignore[no-untyped-def]
    return load_config(None, tiny_overrides(*extra))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("done") / "run"
    pretrain(_cfg("trainer.max_steps=4", "trainer.ckpt_every_n_steps=2"), out)
    return out


# ------------------------------------------------------------------------------------ one writer
def test_second_writer_is_refused_with_the_owner_named(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        owner = json.loads((out / LOCK).read_text())
        assert owner["pid"] == os.getpid() and owner["host"]
        with pytest.raises(RunFolderError, match=rf"being written by another semmim process \(pid {os.getpid()}"):
            pretrain(_cfg(), out)
    assert not (out / LOCK).exists()  # released
    assert not (out / "metrics.jsonl").exists()  # the refused run wrote nothing


def test_two_concurrent_cli_runs_on_one_folder(tmp_path: Path) -> None:
    """Two `semmim pretrain` on the same --out: one trains, the other exits 2 naming the first."""
    out = tmp_path / "run"
    steps = tiny_overrides("trainer.max_steps=3000", "trainer.log_every_n_steps=100", "trainer.ckpt_every_n_steps=500")
    args = [SEMMIM, "pretrain", "--config", "demo/mae", "--out", str(out), *steps]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / LOCK).exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.run(args, env=env, capture_output=True, text=True)
    still_running = first.poll() is None
    _, first_err = first.communicate(timeout=600)
    assert still_running, "the first run ended before the second one started: make it longer"
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2
    assert f"pid {first.pid}" in second.stderr and "being written by another semmim process" in second.stderr
    assert [r["step"] for r in read_metrics(out)] == list(range(100, 3001, 100))  # not interleaved


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": "h", "time": 0}))  # nobody holds the flock
    pretrain(_cfg(), out)
    assert f"taking over the stale lock {out / LOCK} of process {int(dead.stdout)}" in capsys.readouterr().out
    assert not (out / LOCK).exists()


# ----------------------------------------------------------------------------- one run a folder
def test_new_run_into_a_run_folder_is_refused(finished: Path) -> None:
    before = (finished / "encoder.safetensors").read_bytes()
    with pytest.raises(
        RunFolderError, match=r"already holds a run \(logged up to step 4, finished.*--resume.*--overwrite"
    ):
        pretrain(_cfg("trainer.max_steps=1"), finished)
    assert (finished / "encoder.safetensors").read_bytes() == before
    assert [r["step"] for r in read_metrics(finished)] == [1, 2, 3, 4]


def test_a_run_that_could_not_start_leaves_the_folder_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped by a check before its first step (here: a full disk) is no run: the next start needs no
    --overwrite."""
    import shutil

    usage = shutil.disk_usage(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
        with pytest.raises(OSError, match="not enough free disk space"):
            pretrain(_cfg(), tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert pretrain(_cfg(), tmp_path / "run").steps == 3


def test_overwrite_replaces_the_run_and_its_eval_and_tensorboard(finished: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "eval" / "knn").mkdir(parents=True)
    (out / "eval" / "knn" / "metrics.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    old_events = {p.name for p in (out / "tensorboard").iterdir()}
    pretrain(_cfg("trainer.max_steps=2"), out, overwrite=True)
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert not (out / "eval").exists()
    assert not old_events & {p.name for p in (out / "tensorboard").iterdir()}
    assert (out / "notes.txt").read_text() == "mine"  # not ours: kept


def test_overwrite_keeps_the_run_when_the_new_one_cannot_start(finished: Path, tmp_path: Path) -> None:
    """--overwrite with a wrong data.root (or any setting that fails its checks): the error, and the earlier run
    is still all there; nothing is deleted before the new run has built its data and model."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    bad = _cfg("data.name=imagefolder", f"data.root={tmp_path / 'no-such-folder'}")
    with pytest.raises((FileNotFoundError, ConfigError)):
        pretrain(bad, out, overwrite=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert pretrain(_cfg("trainer.max_steps=2"), out, overwrite=True).steps == 2  # then replaced as asked
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_a_training_checkpoint_is_not_taken_for_an_encoder(finished: Path) -> None:
    from semmim.eval.common import load_encoder

    ckpt = finished / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    with pytest.raises(ValueError, match="is a training checkpoint, not an exported encoder: give the run directory"):
        load_encoder(ckpt)
    assert load_encoder(finished)[0] is not None  # the run directory itself


def test_cli_overwrite_and_resume_conflict(tmp_path: Path) -> None:
    res = subprocess.run(
        [SEMMIM, "pretrain", "--out", str(tmp_path), "--config", "demo/mae", "--resume", "--overwrite"],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "contradict" in res.stderr


# ------------------------------------------------------------------------ what a resume may change
@pytest.mark.parametrize(
    "override", ["optim.lr=0.5", "trainer.seed=1", "data.batch_size=4", "method.masker.mask_ratio=0.5", "model.depth=3"]
)
def test_resume_refuses_changes_that_redefine_the_run(finished: Path, override: str) -> None:
    before = (finished / "config.yaml").read_text()
    key = override.split("=")[0]
    with pytest.raises(RunFolderError, match=rf"--resume cannot change what the run is \({key}: "):
        pretrain(load_config(finished / "config.yaml", [override]), finished, resume=True)
    assert (finished / "config.yaml").read_text() == before


def test_allowed_resume_change_is_recorded(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    pretrain(load_config(out / "config.yaml", ["trainer.max_steps=6", "trainer.log_every_n_steps=2"]), out, resume=True)
    printed = capsys.readouterr().out
    assert "resuming with changed settings: trainer.log_every_n_steps 1 -> 2, trainer.max_steps 4 -> 6" in printed
    assert load_config(out / "config.yaml").trainer.max_steps == 6
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    resume = [e for e in events if e.get("event") == "resume"]
    assert resume == [
        {"event": "resume", "step": 4, "changed": {"trainer.log_every_n_steps": [1, 2], "trainer.max_steps": [4, 6]}}
    ]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 6]


def test_resume_changes_lists_every_refused_key() -> None:
    saved = {"optim": {"lr": 1.0}, "trainer": {"seed": 0, "max_steps": 3}}
    new = {"optim": {"lr": 2.0}, "trainer": {"seed": 1, "max_steps": 5}}
    with pytest.raises(RunFolderError, match=r"optim.lr: 1.0 -> 2.0; trainer.seed: 0 -> 1"):
        resume_changes(saved, new)
    assert resume_changes({"trainer": {"max_steps": 3}}, {"trainer": {"max_steps": 5}}) == {"trainer.max_steps": (3, 5)}
    assert "trainer.max_steps" in RESUME_MAY_CHANGE and "optim.lr" not in RESUME_MAY_CHANGE


# ------------------------------------------------------------------------------ zero and negative
@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("trainer.max_epochs=0", r"trainer.max_epochs must be >= 1, got 0 \(set trainer.max_steps"),
        ("trainer.max_steps=0", "trainer.max_steps must be >= 1"),
        ("trainer.ckpt_every_n_steps=0", "trainer.ckpt_every_n_steps must be >= 1, got 0"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps must be >= 1, got 0"),
        ("trainer.max_nonfinite_steps=-1", "trainer.max_nonfinite_steps must be >= 0"),
        ("data.num_workers=-1", "data.num_workers must be >= 0"),
        ("data.limit=0", "data.limit must be >= 1"),
        ("optim.effective_batch=0", "optim.effective_batch must be >= 1"),
        ("optim.warmup_steps=-2", "optim.warmup_steps must be >= 0"),
        ("optim.clip_grad=0", "optim.clip_grad must be > 0"),
        ("data.max_bad_fraction=1.5", r"data.max_bad_fraction must lie in \[0, 1\]"),
    ],
)
def test_zero_steps_and_intervals_are_rejected_up_front(override: str, needle: str) -> None:
    overrides = [o for o in tiny_overrides() if not o.startswith("trainer.max_steps")] + [override]
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)


# ------------------------------------------------------------------------------------- checkpoints
def test_flipped_bytes_in_a_checkpoint_are_an_error(finished: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    ckpt = out / "checkpoints" / "last.ckpt"
    raw = bytearray(ckpt.read_bytes())
    # flip 50 bytes inside the stored tensors: the zip and the pickle stay readable, the numbers change
    state = torch.load(ckpt, weights_only=True)
    needle = state["model"]["encoder.pos_embed"].reshape(-1)[100:108].numpy().tobytes()
    at = bytes(raw).index(needle)
    for i in range(50):
        raw[at + i] ^= 0x5A
    ckpt.write_bytes(bytes(raw))
    cfg = load_config(out / "config.yaml", ["trainer.max_steps=6"])
    with pytest.raises(CheckpointError, match=r"--resume: the checkpoint .*last\.ckpt is damaged"):
        pretrain(cfg, out, resume=True)


def test_checkpoint_without_step_names_file_and_key(finished: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    ckpt = out / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    del state["step"]
    state[CHECKSUM_KEY] = content_checksum(state)
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match=r"last\.ckpt lacks 'step'"):
        pretrain(load_config(out / "config.yaml", ["trainer.max_steps=6"]), out, resume=True)


def test_checkpoint_is_written_in_place_not_in_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is staged in $TMPDIR (whose free space the run's check does not look at)."""
    import tempfile

    def no_temp(*a: object, **k: object) -> None:
        raise AssertionError("a checkpoint was staged in the temporary folder")

    monkeypatch.setattr(tempfile, "mkstemp", no_temp)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_temp)
    io = ChecksummedCheckpointIO()
    io.save_checkpoint({"step": 3, "w": torch.ones(4)}, tmp_path / "c.ckpt")
    assert io.load_checkpoint(tmp_path / "c.ckpt")["step"] == 3
    pretrain(_cfg("trainer.max_steps=2", "trainer.ckpt_every_n_steps=1"), tmp_path / "run")


def test_a_saved_run_that_predates_a_default_loads_as_it_trained(
    tmp_path: Path, tiny_teacher_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A MILAN run saved before decoder.prompt_norm existed was trained with pre-normed prompts: reading it
    back (eval, export, resume) builds that decoder, with a note, not today's default."""
    import yaml

    from semmim.config import load_saved_config, to_dict
    from semmim.run import load_run
    from tests.conftest import method_overrides

    cfg = load_config(None, method_overrides("milan", tiny_teacher_dir))
    assert cfg.decoder["name"] == "prompting" and cfg.decoder["prompt_norm"] is False
    raw = to_dict(cfg)
    del raw["decoder"]["prompt_norm"]  # as semmim 0.1 wrote it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    run = load_run(tmp_path)
    assert run.cfg.decoder["prompt_norm"] is True
    assert "decoder.prompt_norm=True" in capsys.readouterr().err
    assert run.build_method().decoder.blocks[0].prompt_norm is True
    # a resume that reads the run's own config keeps it; an override still applies on top
    assert load_saved_config(tmp_path / "config.yaml", ["decoder.prompt_norm=false"]).decoder["prompt_norm"] is False
    # resuming it with today's default is refused rather than silently changing the decoder
    with pytest.raises(RunFolderError, match=r"decoder\.prompt_norm"):
        resume_changes(to_dict(run.cfg), to_dict(cfg))
    capsys.readouterr()
    # a current run config is read as written, without notes
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_run(tmp_path).cfg.decoder["prompt_norm"] is False
    assert "note" not in capsys.readouterr().err


def test_a_saved_rils_run_keeps_its_separate_kl_head(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """RILS runs saved before method.kl_projection existed predicted joint-space tokens themselves."""
    import yaml

    from semmim.config import to_dict
    from semmim.run import load_run
    from tests.conftest import method_overrides

    cfg = load_config(None, method_overrides("rils"))
    assert cfg.method.kl_projection == "shared"
    raw = to_dict(cfg)
    del raw["method"]["kl_projection"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    assert load_run(tmp_path).cfg.method.kl_projection == "separate"
    assert "method.kl_projection=separate" in capsys.readouterr().err
