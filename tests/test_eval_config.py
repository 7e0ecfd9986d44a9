"""Typed evaluation configs (:mod:`semmim.eval.config`): loading, checking, and ``semmim eval``'s use of them."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import pytest

import semmim.cli.eval as cli_eval
from semmim.cli import build_parser, main
from semmim.cli.eval import PROTOCOLS, eval_config_from_args
from semmim.config import field_docs, shipped_configs
from semmim.errors import ConfigError
from semmim.eval.config import (
    EVAL_CONFIGS,
    PLUMBING,
    FinetuneConfig,
    KnnConfig,
    LinearConfig,
    LowshotConfig,
    SegConfig,
    load_eval_config,
    unused_keys,
)
from semmim.eval.lowshot import finetune_config
from semmim.eval.recipes import RECIPE_PROTOCOLS, recipe_names, recipe_path

PROTOCOL_NAMES = sorted(EVAL_CONFIGS)

# one key each protocol has of its own, as a flag and as key=value (and the value both give)
OWN_KEY: dict[str, tuple[list[str], list[str], str, Any]] = {
    "knn": (["--k", "5", "--pool", "both"], ["k=5", "pool=both"], "k", 5),
    "linear": (["--optimizer", "sgd", "--base-lr", "0.5"], ["optimizer=sgd", "base_lr=0.5"], "base_lr", 0.5),
    "finetune": (["--ema", "--rand-augment", "none"], ["ema=true", "rand_augment=none"], "ema", True),
    "lowshot": (
        ["--fractions", "0.2", "0.5", "--mode", "finetune"],
        ["fractions=[0.2,0.5]", "mode=finetune"],
        "fractions",
        [0.2, 0.5],
    ),
    "seg": (
        ["--mode", "finetune", "--crop-size", "64", "--lr", "0.01"],
        ["mode=finetune", "crop_size=64", "lr=0.01"],
        "crop_size",
        64,
    ),
    "classify": (["--split", "train", "--limit", "7"], ["split=train", "limit=7"], "limit", 7),
    "zeroshot": (
        ["--templates", "a {c}.", "the {c}"],
        ["templates=['a {c}.', 'the {c}']"],
        "templates",
        ["a {c}.", "the {c}"],
    ),
}


def _data(protocol: str) -> str:
    return "fashion_mnist" if protocol == "seg" else "synthetic"


def _target(protocol: str) -> list[str]:
    return [f"--{PROTOCOLS[protocol][1]}", "RUN"]


def test_every_protocol_has_a_config_with_help_for_every_key() -> None:
    assert (
        set(EVAL_CONFIGS) == set(PROTOCOLS) == {"knn", "linear", "finetune", "lowshot", "seg", "classify", "zeroshot"}
    )
    for protocol, cls in EVAL_CONFIGS.items():
        docs = field_docs(cls)
        missing = [f.name for f in fields(cls) if not docs.get(f.name)]
        assert not missing, (protocol, missing)
        assert load_eval_config(protocol) == cls()  # the defaults load as they are


def test_defaults_are_the_protocols_own() -> None:
    assert (KnnConfig().k, KnnConfig().temperature, KnnConfig().batch_size) == (20, 0.07, 256)
    ft = FinetuneConfig()
    assert (ft.batch_size, ft.epochs, ft.base_lr, ft.layer_decay, ft.warmup_epochs) == (64, 100, 5e-4, 0.65, 5.0)
    low = LowshotConfig()
    assert (low.optimizer, low.fractions, low.seeds, low.mode) == ("sgd", [0.01, 0.1], [0, 1, 2], "linear")
    assert (SegConfig().batch_size, SegConfig().epochs, SegConfig().head) == (16, 10, "linear")


@pytest.mark.parametrize("protocol", PROTOCOL_NAMES)
def test_unknown_key_is_a_one_line_error_naming_it(protocol: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_eval_config(protocol, None, ["batch_sise=3"])
    text = str(err.value)
    assert len(text.splitlines()) == 1 and "'batch_sise'" in text and "Did you mean 'batch_size'?" in text
    assert main(["eval", protocol, *_target(protocol), "batch_sise=3"]) == 2  # the CLI: the same line
    err_text = capsys.readouterr().err.strip()
    assert len(err_text.splitlines()) == 1 and "batch_sise" in err_text and err_text.startswith("semmim eval: error:")


@pytest.mark.parametrize("protocol", PROTOCOL_NAMES)
def test_base_files_and_overrides_compose(protocol: str, tmp_path: Path) -> None:
    (tmp_path / "common.yaml").write_text(f"data: {_data(protocol)}\nbatch_size: 8\nnum_workers: 0\n")
    (tmp_path / "eval.yaml").write_text("base: common.yaml\nbatch_size: 12\n")
    cfg = load_eval_config(protocol, tmp_path / "eval.yaml", ["num_workers=1"])
    assert isinstance(cfg, EVAL_CONFIGS[protocol])
    assert (cfg.data, cfg.batch_size, cfg.num_workers) == (_data(protocol), 12, 1)  # base < file < override
    _, overrides, key, value = OWN_KEY[protocol]
    cfg = load_eval_config(protocol, tmp_path / "eval.yaml", overrides)
    assert getattr(cfg, key) == value
    with pytest.raises(ConfigError, match="bad value for 'batch_size'"):
        load_eval_config(protocol, tmp_path / "eval.yaml", ["batch_size=many"])


@pytest.mark.parametrize("protocol", PROTOCOL_NAMES)
def test_flag_shorthand_and_key_value_give_the_same_config(protocol: str) -> None:
    flags, overrides, key, value = OWN_KEY[protocol]
    root_data = ["--data", "ade20k" if protocol == "seg" else "imagefolder", "--root", "data/x"]
    by_flags = build_parser().parse_args(
        ["eval", protocol, *_target(protocol), *root_data, "--batch-size", "4", *flags]
    )
    data = "ade20k" if protocol == "seg" else "imagefolder"
    by_keys = build_parser().parse_args(
        ["eval", protocol, *_target(protocol), f"data={data}", "root=data/x", "batch_size=4", *overrides]
    )
    a, b = eval_config_from_args(by_flags), eval_config_from_args(by_keys)
    assert a == b and getattr(a, key) == value and a.batch_size == 4
    # key=value words may also follow the flags, even a flag taking several values
    mixed = build_parser().parse_args(["eval", protocol, *_target(protocol), *flags, f"data={data}", "root=data/x"])
    mixed_cfg = eval_config_from_args(mixed)
    assert getattr(mixed_cfg, key) == value and mixed_cfg.root == "data/x"
    # the key=value form wins over a flag, a flag over the file
    later = build_parser().parse_args(["eval", protocol, *_target(protocol), "--batch-size", "4", "batch_size=6"])
    assert eval_config_from_args(later).batch_size == 6


@pytest.mark.parametrize("protocol", PROTOCOL_NAMES)
def test_metrics_json_records_the_config(
    protocol: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: dict[str, Any] = {}

    def fake_run(name: str, target: str, cfg: Any, out: str | None) -> dict[str, Any]:
        seen.update(protocol=name, target=target, cfg=cfg)
        return {"protocol": name, "top1": 1.0}

    monkeypatch.setattr(cli_eval, "_run", fake_run)
    (tmp_path / "eval.yaml").write_text(f"data: {_data(protocol)}\nnum_workers: 0\n")
    flags, _, key, value = OWN_KEY[protocol]
    out = tmp_path / "out"
    argv = ["eval", protocol, *_target(protocol), "--config", str(tmp_path / "eval.yaml"), "--out", str(out), *flags]
    assert main(argv) == 0
    cfg = seen["cfg"]
    assert isinstance(cfg, EVAL_CONFIGS[protocol]) and getattr(cfg, key) == value and cfg.data == _data(protocol)
    metrics = json.loads((out / "metrics.json").read_text())
    recorded = {**metrics["measured_on"], **metrics["settings"]}
    config = {k: v for k, v in asdict(cfg).items() if k not in unused_keys(cfg)}  # seg: the other mode's keys
    assert {k: v for k, v in config.items() if k not in PLUMBING} == {
        k: recorded[k] for k in config if k not in PLUMBING
    }
    assert not PLUMBING & metrics["settings"].keys() and not metrics["measured_on"].keys() & metrics["settings"].keys()
    target_key = PROTOCOLS[protocol][1]
    assert metrics["measured_on"][target_key] == "RUN" and metrics["measured_on"][f"{target_key}_path"].endswith("RUN")


@pytest.mark.parametrize(
    ("protocol", "override", "message"),
    [
        ("knn", "k=0", "k must be >= 1"),
        ("knn", "train_limit=-5", "train_limit must be >= 1"),
        ("knn", "temperature=0", "temperature must be > 0"),
        ("knn", "pool=men", "Did you mean 'mean'"),
        ("linear", "epochs=0", "epochs must be >= 1"),
        ("linear", "optimizer=adam", "optimizer='adam' is not one of lars, sgd"),
        ("finetune", "layer_decay=1.5", r"layer_decay must lie in \(0, 1\]"),
        ("finetune", "max_steps=0", "max_steps must be >= 1"),
        ("lowshot", "fractions=[0.5,0]", r"\(0, 1\]"),
        ("lowshot", "seeds=[]", "at least one seed"),
        ("lowshot", "pool=both", "pool='both' is not one of cls, mean"),
        ("seg", "batch_size=1", "BatchNorm"),
        ("seg", "data=imagefolder", "not a segmentation dataset"),
        ("classify", "limit=0", "limit must be >= 1"),
        ("zeroshot", "templates=['a photo']", "where the class name goes"),
        ("knn", "mean=[0.5]", "mean and std go together"),
    ],
)
def test_impossible_values_fail_before_any_work(
    protocol: str, override: str, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nothing may run")

    monkeypatch.setattr(cli_eval, "_run", no_work)
    with pytest.raises(ConfigError, match=message):
        load_eval_config(protocol, None, [override])
    assert main(["eval", protocol, *_target(protocol), override]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_python_api_checks_its_config_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import semmim.eval.common as common
    from semmim.eval.knn import knn_eval

    def no_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nothing may be loaded")

    monkeypatch.setattr(common, "load_encoder", no_work)
    with pytest.raises(ConfigError, match="k must be >= 1"):
        knn_eval("RUN", KnnConfig(k=0))


def test_root_without_data_in_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "eval.yaml").write_text(f"root: {tmp_path}\n")
    with pytest.raises(ConfigError, match="--root needs --data imagefolder"):
        load_eval_config("knn", tmp_path / "eval.yaml")
    assert load_eval_config("knn", tmp_path / "eval.yaml", ["data=imagefolder"]).root == str(tmp_path)


def test_lowshot_finetune_settings_carry_the_shared_keys() -> None:
    low = load_eval_config("lowshot", None, ["mode=finetune", "epochs=3", "layer_decay=0.5", "data=synthetic"])
    assert isinstance(low, LowshotConfig)
    ft = finetune_config(low, seed=4)
    assert (ft.epochs, ft.layer_decay, ft.data, ft.seed, ft.batch_size) == (3, 0.5, "synthetic", 4, low.batch_size)


def test_help_shows_every_default_and_show_prints_the_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    for protocol in PROTOCOL_NAMES:
        with pytest.raises(SystemExit):
            main(["eval", protocol, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for f in fields(EVAL_CONFIGS[protocol]):
            assert f"--{f.name.replace('_', '-')}" in text, (protocol, f.name)
        assert "(default: fashion_mnist)" in text
    with pytest.raises(SystemExit):
        main(["eval", "knn", "--help"])
    assert "(default: 20)" in capsys.readouterr().out
    assert main(["eval", "knn", "--show", "--k", "7", "pool=both"]) == 0  # no --encoder needed
    shown = capsys.readouterr().out
    assert "k: 7" in shown and "pool: both" in shown and "# Neighbours that vote." in shown


def test_an_encoder_is_required_to_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "knn"]) == 2
    assert "--encoder is required" in capsys.readouterr().err


def test_old_flags_that_set_nothing_are_accepted_with_a_note(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(cli_eval, "_run", lambda *a: {"protocol": "knn"})
    assert main(["eval", "knn", "--encoder", "RUN", "--seed", "3", "--out", str(tmp_path)]) == 0
    assert "--seed has no effect" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# recipes: each paper's settings as a preset under every other layer
# --------------------------------------------------------------------------------------------------

PAPER_VALUES: dict[tuple[str, str], dict[str, Any]] = {
    # MAE FINETUNE.md (ViT-B): batch 1024, blr 5e-4, layer decay 0.65, drop path 0.1, reprob 0.25, ...
    ("finetune", "mae"): {
        "batch_size": 1024,
        "epochs": 100,
        "base_lr": 5e-4,
        "layer_decay": 0.65,
        "weight_decay": 0.05,
        "drop_path": 0.1,
        "mixup": 0.8,
        "cutmix": 1.0,
        "label_smoothing": 0.1,
        "reprob": 0.25,
        "warmup_epochs": 5,
        "rand_augment": "rand-m9-mstd0.5-inc1",
    },
    # MILAN FINETUNE.sh: blr 1e-4 (MAE 5e-4), reprob 0.25
    ("finetune", "milan"): {"batch_size": 1024, "epochs": 100, "base_lr": 1e-4, "layer_decay": 0.65, "reprob": 0.25},
    # BEiT v2 README (300-epoch models): peak lr 5e-4 at batch 1024, warmup 20, layer decay 0.65
    ("finetune", "maskdistill"): {"batch_size": 1024, "warmup_epochs": 20, "layer_decay": 0.65, "reprob": 0.25},
    # MAE linear probing: LARS, blr 0.1, batch 16384, 90 epochs, RRC + flip
    ("linear", "mae"): {
        "batch_size": 16384,
        "epochs": 90,
        "base_lr": 0.1,
        "optimizer": "lars",
        "warmup_epochs": 10,
        "weight_decay": 0.0,
        "augment": "rrc_flip",
        "pool": "cls",
    },
    # MILAN linear probing: blr 0.05, 100 epochs, batch 16384, RRC + flip
    ("linear", "milan"): {"batch_size": 16384, "epochs": 100, "base_lr": 0.05, "augment": "rrc_flip"},
}


@pytest.mark.parametrize(("protocol", "recipe"), sorted(PAPER_VALUES))
def test_each_recipe_loads_and_matches_its_paper(protocol: str, recipe: str) -> None:
    cfg = load_eval_config(protocol, recipe=recipe)
    assert isinstance(cfg, EVAL_CONFIGS[protocol]) and cfg.recipe == recipe  # type: ignore[attr-defined]
    for key, value in PAPER_VALUES[(protocol, recipe)].items():
        assert getattr(cfg, key) == pytest.approx(value) if isinstance(value, float) else getattr(cfg, key) == value
    assert load_eval_config(protocol, None, [f"recipe={recipe}"]) == cfg  # the key and the argument agree


def test_maskdistill_peak_lr_is_beit_v2s_unscaled_lr() -> None:
    cfg = load_eval_config("finetune", recipe="maskdistill")
    assert isinstance(cfg, FinetuneConfig)
    assert cfg.base_lr * cfg.batch_size / 256 == pytest.approx(5e-4)  # beit2 uses --lr 5e-4 as is at batch 1024


def test_recipe_names_files_and_sources() -> None:
    assert recipe_names("finetune") == ("default", "mae", "maskdistill", "milan")
    assert recipe_names("linear") == ("default", "mae", "milan") and recipe_names("knn") == ()
    assert not [c for c in shipped_configs() if c.startswith("eval/")]  # not pretraining configs
    for protocol in RECIPE_PROTOCOLS:
        assert load_eval_config(protocol) == EVAL_CONFIGS[protocol]()  # default = the class defaults
        for name in recipe_names(protocol)[1:]:
            path = recipe_path(protocol, name)
            assert path is not None
            keys = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
            unsourced = [ln for ln in keys if "#" not in ln and not ln.startswith("recipe:")]
            assert not unsourced, (path, unsourced)  # every number says where it comes from


def test_overrides_win_over_the_recipe(tmp_path: Path) -> None:
    cfg = load_eval_config("finetune", None, ["epochs=3", "reprob=0.1"], recipe="milan")
    assert isinstance(cfg, FinetuneConfig)
    assert (cfg.epochs, cfg.reprob, cfg.base_lr, cfg.batch_size) == (3, 0.1, 1e-4, 1024)
    # a file naming the recipe: recipe < file < flags < key=value
    (tmp_path / "ft.yaml").write_text("recipe: maskdistill\nepochs: 7\nlayer_decay: 0.6\n")
    args = build_parser().parse_args(
        ["eval", "finetune", "--encoder", "RUN", "--config", str(tmp_path / "ft.yaml"), "--layer-decay", "0.7"]
    )
    by_file = eval_config_from_args(args)
    assert isinstance(by_file, FinetuneConfig)
    assert (by_file.recipe, by_file.epochs, by_file.layer_decay, by_file.warmup_epochs) == ("maskdistill", 7, 0.7, 20)
    later = build_parser().parse_args(["eval", "linear", "--encoder", "RUN", "--recipe", "mae", "augment=none"])
    lin = eval_config_from_args(later)
    assert isinstance(lin, LinearConfig) and (lin.recipe, lin.augment, lin.batch_size) == ("mae", "none", 16384)


@pytest.mark.parametrize(
    ("protocol", "recipe", "message"),
    [
        ("finetune", "mlian", "choose one of default, mae, maskdistill, milan. Did you mean 'milan'?"),
        ("linear", "maskdistill", r"publishes no linear-probe protocol.*: choose one of default, mae, milan"),
    ],
)
def test_an_unknown_recipe_lists_the_available_ones(
    protocol: str, recipe: str, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli_eval, "_run", lambda *a: pytest.fail("nothing may run"))
    with pytest.raises(ConfigError, match=message):
        load_eval_config(protocol, recipe=recipe)
    assert main(["eval", protocol, "--encoder", "RUN", "--recipe", recipe]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"has no recipe '{recipe}'" in err
    with pytest.raises(ConfigError, match="unknown config key 'recipe'"):
        load_eval_config("knn", None, ["recipe=mae"])  # protocols without recipes have no such key


def test_a_recipe_that_is_only_a_label_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import semmim.eval.finetune as finetune

    monkeypatch.setattr(finetune, "_build_model", lambda *a: pytest.fail("nothing may be loaded"))
    with pytest.raises(ConfigError, match=r"recipe 'milan' is not in effect: .*base_lr=0.0001"):
        finetune.finetune_eval("RUN", FinetuneConfig(recipe="milan"))  # built by hand: the defaults, not MILAN's
    with pytest.raises(ConfigError, match="recipe 'mae' is not in effect"):  # every value of its own overridden
        load_eval_config("finetune", None, ["batch_size=64", "reprob=0"], recipe="mae")
    kept = load_eval_config("finetune", None, ["batch_size=64"], recipe="mae")  # one of its own values left
    assert isinstance(kept, FinetuneConfig) and kept.reprob == 0.25


def test_metrics_json_records_the_recipe_and_what_departs_from_it(
    tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    monkeypatch.setattr(cli_eval, "_run", lambda name, *a: {"protocol": name, "top1": 1.0})
    run = tmp_path / "run"
    shutil.copytree(tiny_teacher_dir, run)
    assert main(["eval", "linear", "--encoder", str(run), "--recipe", "milan", "epochs=3", "data=synthetic"]) == 0
    metrics = json.loads((run / "eval" / "linear_milan" / "metrics.json").read_text())  # recipes side by side
    assert metrics["settings"]["recipe"] == "milan" and metrics["settings"]["base_lr"] == 0.05
    assert metrics["recipe_overrides"] == {"epochs": 3}  # data is in measured_on
    assert main(["eval", "linear", "--encoder", f"random:{run}", "--recipe", "milan"]) == 0
    assert (run / "eval" / "linear_milan_random" / "metrics.json").is_file()
    assert main(["eval", "finetune", "--encoder", str(run)]) == 0  # the default recipe keeps its folder
    default = json.loads((run / "eval" / "finetune" / "metrics.json").read_text())
    assert default["settings"]["recipe"] == "default" and default["recipe_overrides"] == {}
    capsys.readouterr()
    assert main(["list"]) == 0
    assert "linear             default, mae, milan" in capsys.readouterr().out
