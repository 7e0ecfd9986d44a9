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


def test_maskdistill_recipe_is_the_published_one() -> None:
    """BEiT's shared relative position bias without absolute positions, CLIP's last-block tokens, min lr 1e-5."""
    cfg = load_config(configs_dir() / "maskdistill" / "vit_base_p16_in1k.yaml")
    m = cfg.model
    assert (m.rel_pos_bias, m.abs_pos, m.timm_name) == ("shared", "none", "beit_base_patch16_224")
    assert (m.layer_scale_init, m.drop_path) == (0.1, 0.1)
    assert (cfg.teacher.name, cfg.teacher.model, cfg.teacher.pretrained) == ("open_clip", "ViT-B-16", "openai")
    assert cfg.teacher.tokens == "last_block"
    o = cfg.optim
    assert (o.min_lr, o.betas, o.clip_grad, o.warmup_epochs, o.weight_decay) == (1e-5, [0.9, 0.999], 3.0, 10, 0.05)
    assert o.base_lr * o.effective_batch / 256 == pytest.approx(1.5e-3) and cfg.trainer.max_epochs == 300
    assert cfg.method.masker == {"name": "block", "mask_ratio": 0.4, "min_patches": 16, "min_aspect": 0.3}


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["model.rel_pos_bias=global"], r"model.rel_pos_bias='global' is not one of none, shared, per_block"),
        (["model.abs_pos=learned"], r"model.abs_pos='learned' is not one of sincos, none"),
        (["model.abs_pos=none"], r"model.abs_pos=none with model.rel_pos_bias=none .* set model.abs_pos=sincos"),
        (["model.rel_pos_bias=shared"], r"model.rel_pos_bias=shared exports to timm's BEiT.* model.timm_name=beit_"),
        (["model.timm_name=beit_base_patch16_224"], r"is a BEiT architecture.* set model.rel_pos_bias=shared"),
        (["model.timm_name=vit_nonexistent"], r"model.timm_name='vit_nonexistent' is not a timm architecture"),
    ],
)
def test_position_settings_are_checked(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, overrides)


def test_rel_pos_bias_settings_build_that_encoder() -> None:
    from semmim.methods.base import build_encoder

    beit = ["model.timm_name=beit_base_patch16_224", "model.embed_dim=32", "model.depth=2", "model.num_heads=2"]
    enc = build_encoder(load_config(None, [*beit, "model.rel_pos_bias=per_block", "model.abs_pos=none"]))
    assert enc.rel_pos_bias_kind == "per_block" and enc.pos_embed is None and enc.block_rel_pos_bias is not None
    enc = build_encoder(load_config(None, [*beit, "model.rel_pos_bias=shared"]))
    assert enc.rel_pos_bias is not None and enc.pos_embed is not None  # both: BEiT allows it


def test_unknown_method_names_choices() -> None:
    with pytest.raises(ConfigError, match=r"method.name: unknown method 'maee'.*Did you mean 'mae'"):
        load_config(None, ["method.name=maee"])
