"""Config loading: defaults, YAML, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from semmim.config import ConfigError, configs_dir, load_config, shipped_configs, to_yaml


def test_overrides_are_typed() -> None:
    cfg = load_config(None, ["model.embed_dim=192", "optim.betas=[0.9,0.99]", "teacher.path=null", "data.root=/x"])
    assert cfg.model.embed_dim == 192 and cfg.optim.betas == [0.9, 0.99] and cfg.teacher.path is None
    assert cfg.data.root == "/x"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("model.embd_dim=3", "model.embd_dim"),
        ("trainer.max_step=3", "Did you mean 'max_steps'"),
        ("nosection.x=1", "nosection"),
        ("model.embed_dim=abc", "model.embed_dim"),
        ("method.masker.mask_ratio=1.2", "method.masker.mask_ratio"),
        ("model.patch_size=5", "model.patch_size"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("noequals", "key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_unknown_key_in_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  embed_dim: 64\n  num_head: 4\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown config key 'model.num_head'"):
        load_config(p)


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_config("nope.yaml")


def test_resolved_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.embed_dim=96", "model.num_heads=3"])
    p = tmp_path / "config.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(p) == cfg


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_loads(name: str) -> None:
    cfg = load_config(configs_dir() / name)
    assert cfg.method.name


def test_paper_recipes() -> None:
    for method in ("mae", "milan"):
        cfg = load_config(configs_dir() / method / "vit_base_p16_in1k.yaml")
        assert cfg.trainer.max_epochs == 400 and cfg.optim.warmup_epochs == 40
        assert cfg.optim.base_lr == 1.5e-4 and cfg.optim.effective_batch == 4096
        assert cfg.method.masker["mask_ratio"] == 0.75 and (cfg.decoder["depth"], cfg.decoder["embed_dim"]) == (8, 512)
    milan = load_config(configs_dir() / "milan" / "vit_base_p16_in1k.yaml")
    assert (milan.teacher.name, milan.teacher.model, milan.teacher.pretrained) == (
        "open_clip",
        "ViT-B-16",
        "openai",
    )
    assert milan.method.masker["name"] == "semantic" and milan.decoder["name"] == "prompting"
    # as MILAN's official code: raw visible tokens as the decoder's keys/values, CLIP fed the student's input
    assert milan.decoder["prompt_norm"] is False and milan.teacher.input_norm == "data"
    assert milan.method.target["norm"] == "none"  # the official code regresses raw CLIP tokens


def test_unknown_method_names_choices() -> None:
    with pytest.raises(ConfigError, match=r"method.name: unknown method 'maee'.*Did you mean 'mae'"):
        load_config(None, ["method.name=maee"])
