"""The ``semmim`` command line: entry points, each command group, and what ``semmim eval`` records."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from semmim.cli import build_parser, default_eval_out, main
from semmim.cli.eval import eval_config_from_args, provenance


def test_python_dash_m_semmim_runs_the_command_line() -> None:
    for module in ("semmim", "semmim.cli"):
        proc = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "semmim 0.1.0" in proc.stdout, (module, proc.stderr)


def test_every_command_has_a_parser() -> None:
    parser = build_parser()
    for argv in (["pretrain", "--out", "x"], ["list"], ["report", "r", "--out", "o"], ["demo"]):
        assert callable(parser.parse_args(argv).func), argv
    args = parser.parse_args(["data", "shards", "--src", "fashion_mnist", "--out", "shards"])
    assert args.shard_size == 1000 and callable(args.func)
    assert main(["eval"]) == 2  # a group without its subcommand prints help


def test_eval_output_defaults_to_the_run(tiny_teacher_dir: Path) -> None:
    assert default_eval_out(str(tiny_teacher_dir), "knn") == str(tiny_teacher_dir / "eval" / "knn")
    assert default_eval_out(f"random:{tiny_teacher_dir}", "knn") == str(tiny_teacher_dir / "eval" / "knn_random")
    assert default_eval_out(str(tiny_teacher_dir / "encoder.safetensors"), "knn") is None


def test_eval_cli_protocols_write_into_the_run(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """Every `semmim eval` protocol runs from the command line and writes RUN/eval/<protocol>/metrics.json."""
    run = tmp_path / "run"
    shutil.copytree(tiny_teacher_dir, run)
    common = ["--encoder", str(run), "--data", "synthetic", "--train-limit", "64", "--test-limit", "32"]
    common += ["--num-workers", "0", "--cache-dir", str(tmp_path / "cache")]
    quick_ft = ["--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--rand-augment", "none"]
    cases = {
        "knn": ["--pool", "both"],
        "linear": ["--epochs", "2", "--optimizer", "sgd"],
        "lowshot": ["--epochs", "2", "--seeds", "0", "1", "--fractions", "0.1"],
        "finetune": quick_ft,
    }
    for protocol, extra in cases.items():
        assert main(["eval", protocol, *common, *extra]) == 0, protocol
        metrics = json.loads((run / "eval" / protocol / "metrics.json").read_text())
        assert metrics["protocol"] == protocol
        measured = metrics["measured_on"]  # what the numbers were measured on
        assert measured["encoder"] == str(run) and measured["encoder_path"] == str(run.resolve())
        assert measured["data"] == "synthetic" and measured["root"] is None
        assert measured["train_limit"] == 64 and measured["test_limit"] == 32
        settings = metrics["settings"]  # every option that can change the numbers, none that cannot
        assert "batch_size" in settings and not {"out", "num_workers", "cache_dir", "device"} & settings.keys()
        assert ("seed" in settings) == (protocol in ("linear", "finetune"))  # lowshot has seeds, knn none
        assert not set(measured) & settings.keys()
        for option, value in (("--pool", "pool"), ("--epochs", "epochs"), ("--max-steps", "max_steps")):
            if option in extra:
                assert str(settings[value]) == extra[extra.index(option) + 1], (protocol, option)
    assert (run / "eval" / "finetune" / "classifier.safetensors").is_file()
    assert json.loads((run / "eval" / "lowshot" / "metrics.json").read_text())["seeds"] == [0, 1]


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist",
)
def test_eval_seg_cli(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "seg"
    args = ["eval", "seg", "--encoder", str(tiny_teacher_dir), "--head", "upernet", "--channels", "16"]
    args += ["--train-limit", "32", "--test-limit", "16", "--max-steps", "2", "--num-workers", "0", "--out", str(out)]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["head"] == "upernet" and 0 <= metrics["miou"] <= 100 and metrics["num_classes"] == 11


def test_report_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from semmim.config import load_config
    from semmim.engine import pretrain
    from tests.conftest import tiny_overrides

    run = tmp_path / "mae"
    pretrain(load_config(None, tiny_overrides("method.name=mae")), run)
    assert main(["report", str(run), "--out", str(tmp_path / "report"), "--num-images", "2"]) == 0
    assert (tmp_path / "report" / "report.html").is_file() and (
        tmp_path / "report" / "mae_reconstruction.png"
    ).is_file()
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 2
    assert "run directory not found" in capsys.readouterr().err


PROTOCOL_ARGS = {
    "knn": ["--encoder", "RUN"],
    "linear": ["--encoder", "RUN"],
    "finetune": ["--encoder", "RUN"],
    "lowshot": ["--encoder", "RUN"],
    "seg": ["--encoder", "RUN"],
    "classify": ["--model", "RUN"],
    "zeroshot": ["--model", "RUN"],
}


@pytest.mark.parametrize("protocol", sorted(PROTOCOL_ARGS))
def test_eval_root_without_data_is_a_one_line_error(
    protocol: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--root DIR`` without ``--data`` names no dataset: refused before anything is loaded."""
    import semmim.eval.common as common

    def no_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nothing may be loaded")

    monkeypatch.setattr(common, "load_encoder", no_work)
    argv = ["eval", protocol, *PROTOCOL_ARGS[protocol], "--root", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "semmim eval: error: --root needs --data " in err and str(tmp_path) in err
    assert ("ade20k" if protocol == "seg" else "imagefolder") in err


def test_eval_records_an_absolute_root_and_the_given_data() -> None:
    args = build_parser().parse_args(
        ["eval", "knn", "--encoder", "random:runs/x", "--data", "imagefolder", "--root", "data/in1k", "--k", "10"]
    )
    rec = provenance(eval_config_from_args(args), args.encoder)
    assert rec["measured_on"]["data"] == "imagefolder"
    assert rec["measured_on"]["root"] == str(Path("data/in1k").resolve())
    assert rec["measured_on"]["encoder"] == "random:runs/x"
    assert rec["measured_on"]["encoder_path"] == "random:" + str(Path("runs/x").resolve())
    assert rec["settings"]["k"] == 10 and rec["settings"]["temperature"] == 0.07
    args = build_parser().parse_args(["eval", "zeroshot", "--model", "m", "--split", "train", "--limit", "5"])
    rec = provenance(eval_config_from_args(args), args.model, "model")
    assert rec["measured_on"]["split"] == "train" and rec["measured_on"]["limit"] == 5
    assert rec["measured_on"]["model"] == "m" and rec["measured_on"]["data"] == "fashion_mnist"  # the default


def test_eval_of_a_random_init_baseline_is_saved_and_reported(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    from semmim.report import load_run, metrics_table
    from semmim.run import CONFIG

    run = tmp_path / "run"
    shutil.copytree(tiny_teacher_dir, run)
    (run / CONFIG).write_text("method:\n  name: mae\n")  # enough of a run for the report
    common = ["--data", "synthetic", "--train-limit", "32", "--test-limit", "16", "--num-workers", "0"]
    common += ["--cache-dir", ""]
    assert main(["eval", "knn", "--encoder", str(run), *common]) == 0
    assert main(["eval", "knn", "--encoder", f"random:{run}", *common]) == 0
    baseline = json.loads((run / "eval" / "knn_random" / "metrics.json").read_text())
    trained = json.loads((run / "eval" / "knn" / "metrics.json").read_text())
    assert baseline["measured_on"]["encoder"] == f"random:{run}" and trained["measured_on"]["encoder"] == str(run)
    header, rows = metrics_table([load_run(run)])
    column = next(i for i, h in enumerate(header) if "knn_random" in h)
    assert float(rows[0][column]) == pytest.approx(baseline["top1"], abs=0.051)


def test_eval_recipes_run_side_by_side_and_the_report_names_them(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    from semmim.report import load_run, metrics_table
    from semmim.run import CONFIG

    run = tmp_path / "run"
    shutil.copytree(tiny_teacher_dir, run)
    (run / CONFIG).write_text("method:\n  name: milan\n")
    common = ["--data", "synthetic", "--train-limit", "16", "--test-limit", "8", "--num-workers", "0"]
    common += ["--cache-dir", str(tmp_path / "cache"), "--epochs", "1"]
    assert main(["eval", "linear", "--encoder", str(run), *common]) == 0
    assert main(["eval", "linear", "--encoder", str(run), "--recipe", "milan", *common]) == 0
    ft = ["--max-steps", "1", "--rand-augment", "none"]
    assert main(["eval", "finetune", "--encoder", str(run), "--recipe", "maskdistill", *common, *ft]) == 0
    milan = json.loads((run / "eval" / "linear_milan" / "metrics.json").read_text())
    assert milan["augment"] == "rrc_flip" and milan["images_encoded"] == 16 and milan["settings"]["base_lr"] == 0.05
    assert json.loads((run / "eval" / "linear" / "metrics.json").read_text())["augment"] == "none"
    maskdistill = json.loads((run / "eval" / "finetune_maskdistill" / "metrics.json").read_text())
    assert maskdistill["settings"]["reprob"] == 0.25 and maskdistill["recipe"] == "maskdistill"
    assert maskdistill["lr"] == pytest.approx(1.25e-4 * 16 / 256)  # the batch is capped at the 16 images
    header, rows = metrics_table([load_run(run)])
    columns = ("linear top-1 (default recipe)", "linear top-1 (milan recipe)", "fine-tune top-1 (maskdistill recipe)")
    for column in columns:
        assert rows[0][header.index(column)] != "–", column
