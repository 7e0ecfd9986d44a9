"""RILS as published: a jointly trained CLIP text transformer, the KL through the shared image projection,
the retrieval gate by index or by caption, and the config errors around them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from semmim.config import ConfigError, load_config
from semmim.methods import build_method
from semmim.methods.rils import RILS, caption_rows, retrieval_correct
from tests.conftest import tiny_overrides

TINY_TOWER = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
"""A CLIP text transformer of RILS's shape but tiny: width 32, 2 layers, context 77, CLIP's BPE vocabulary."""


def write_tiny_open_clip(directory: Path) -> str:
    """An open_clip model directory without weights (``local-dir:``): the tower is randomly initialised."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_TOWER}))
    return f"local-dir:{directory}"


def faithful_overrides(tower: str, *extra: str) -> list[str]:
    """The tiny config with the published RILS choices: a trainable random CLIP text tower, shared projection."""
    return tiny_overrides(
        "method.name=rils",
        "method.embed_dim=16",
        "data.captions=templates",
        "text.name=open_clip",
        f"text.model={tower}",
        "text.locked=false",
        "method.text_head=none",
        *extra,
    )


def _batch(n: int = 8) -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    animals = ["cat", "dog", "car", "ship", "frog", "bird", "horse", "truck"]
    return {"image": torch.rand(n, 3, 16, 16, generator=g), "caption": [f"a photo of a {a}." for a in animals[:n]]}


# -- the shipped configs -------------------------------------------------------------------------------
def test_faithful_config_resolves_to_the_published_choices() -> None:
    import open_clip

    cfg = load_config("rils/vit_base_p16_in1k")
    t, m = cfg.text, cfg.method
    assert (t.name, t.model, t.pretrained, t.path, t.max_length, t.locked) == (
        "open_clip",
        "ViT-B-16-quickgelu",
        None,
        None,
        None,
        False,
    )
    assert (m.kl_projection, m.caption_match, m.gate_correct, m.kl_weight) == ("shared", "caption", True, 0.5)
    assert m.text_head == "none" and open_clip.get_model_config(t.model)["embed_dim"] == m.embed_dim
    assert (m.teacher_temperature, m.student_temperature, m.embed_dim) == (0.04, 0.1, 512)
    text_cfg = open_clip.get_model_config(t.model)["text_cfg"]
    assert {k: text_cfg[k] for k in ("width", "layers", "heads", "context_length", "vocab_size")} == {
        "width": 512,
        "layers": 12,
        "heads": 8,
        "context_length": 77,
        "vocab_size": 49408,
    }
    assert open_clip.get_model_config(t.model)["quick_gelu"] is True  # as the official text transformer
    locked = load_config("rils/vit_base_p16_in1k_locked")
    assert (locked.text.name, locked.text.locked, locked.text.max_length) == ("hf", True, 64)
    # the text tower (and the linear head its 768 values need) is its only deviation
    assert locked.method.text_head == "linear"
    assert dataclasses.replace(locked.method, text_head="none") == m


@pytest.mark.slow
def test_faithful_text_tower_builds_with_context_77() -> None:
    """The full-size tower of the shipped config: random, trainable, context 77 (text.max_length=null)."""
    from semmim.methods.clip import build_text_tower

    tower = build_text_tower(load_config("rils/vit_base_p16_in1k"))
    assert tower.max_length == 77 and tower.embed_dim == 512 and not tower.locked
    assert tower.tokenize(["a photo of a dog."])["input_ids"].shape == (1, 77)
    assert all(p.requires_grad for p in tower.parameters())


# -- config errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            ["text.pretrained=openai", "text.max_length=64", "text.locked=true"],
            r"text\.max_length=64: the pretrained open_clip tower 'ViT-B-16' takes a context of exactly 77",
        ),
        (["text.locked=true"], r"text\.locked=true .* would stay at its random initialisation"),
        (["text.locked=false", "text.max_length=0"], r"text\.max_length must be >= 1"),
        (["text.locked=false", "method.kl_projection=both"], r"method\.kl_projection='both' is not one of shared"),
        (["text.locked=false", "method.caption_match=string"], r"method\.caption_match='string' is not one of"),
        (["text.locked=false", "method.text_head=nothing"], r"method\.text_head='nothing' is not one of linear, none"),
        (
            ["text.locked=false", "method.text_head=none"],
            r"text_head=none: the open_clip tower 'ViT-B-16' gives 512 values .* set method\.embed_dim=512",
        ),
    ],
)
def test_config_errors(overrides: list[str], match: str) -> None:
    base = ["method.name=rils", "method.embed_dim=16", "text.name=open_clip", "text.model=ViT-B-16"]
    with pytest.raises(ConfigError, match=match):
        load_config(None, tiny_overrides(*base, *overrides))


def test_random_open_clip_tower_takes_the_context_asked_for(tmp_path: Path) -> None:
    """A tower trained from scratch is built with text.max_length as its context (a config, not an error)."""
    from semmim.methods.clip import build_text_tower

    cfg = load_config(None, faithful_overrides(write_tiny_open_clip(tmp_path / "tower")))
    assert build_text_tower(cfg).max_length == 77
    cfg = load_config(None, faithful_overrides("ViT-B-16", "text.max_length=64", "method.text_head=linear"))
    tower = build_text_tower(cfg)
    assert tower.max_length == 64 and tower.model.positional_embedding.shape[0] == 64


def test_text_head_none_takes_the_towers_output_as_it_is(tmp_path: Path) -> None:
    """No linear map after a tower whose output has the joint width; a tower of another width is refused."""
    cfg = load_config(None, faithful_overrides(write_tiny_open_clip(tmp_path / "tower")))
    method = build_method(cfg)
    assert isinstance(method.text_proj, torch.nn.Identity)
    captions = ["a photo of a cat.", "a dog."]
    torch.testing.assert_close(method.embed_text(captions, torch.device("cpu")), method.text_encoder(captions))
    minilm = ["method.name=rils", "method.embed_dim=16", "method.text_head=none", "text.name=minilm"]
    with pytest.raises(ConfigError, match=r"text tower gives 384 values per caption, but method\.embed_dim=16"):
        build_method(load_config(None, tiny_overrides(*minilm)))


def test_hf_max_length_beyond_the_model_is_a_clear_error() -> None:
    from semmim.text import build_text_encoder

    with pytest.raises(ValueError, match=r"max_length=1000 is more tokens than the model takes \(512\)"):
        build_text_encoder("minilm", max_length=1000)


# -- training with the jointly trained text tower ---------------------------------------------------------
def test_tiny_faithful_rils_learns_a_fixed_batch_and_trains_its_text_tower(tmp_path: Path) -> None:
    cfg = load_config(None, faithful_overrides(write_tiny_open_clip(tmp_path / "tower")))
    torch.manual_seed(0)
    method = build_method(cfg)
    assert isinstance(method, RILS) and method.kl_projection == "shared" and not method.locked_text
    assert method.text_encoder.max_length == 77
    method.train()
    before = {n: p.detach().clone() for n, p in method.text_encoder.named_parameters()}
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=2e-3)
    batch, losses = _batch(), []
    for step in range(12):
        torch.manual_seed(step)  # the same masks in every run of the test, a new one each step
        out = method(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[-1] < 0.8 * losses[0], losses
    changed = [n for n, p in method.text_encoder.named_parameters() if not torch.equal(p, before[n])]
    assert "model.token_embedding.weight" in changed and "model.text_projection" in changed
    assert any(n.startswith("model.transformer.resblocks.1.") for n in changed)
    state = method.state_dict()
    assert any(k.startswith("text_encoder.model.transformer.") for k in state), "a trained tower is checkpointed"


@pytest.mark.parametrize("kl_projection", ["shared", "separate"])
def test_kl_alone_trains_the_image_projection_only_when_shared(kl_projection: str, tmp_path: Path) -> None:
    """The KL's own gradient (loss with kl_weight 1 minus loss with kl_weight 0, same masks) reaches
    ``image_proj`` through the masked predictions when shared, and not at all when separate."""
    cfg = load_config(
        None, faithful_overrides(write_tiny_open_clip(tmp_path / "tower"), f"method.kl_projection={kl_projection}")
    )
    torch.manual_seed(0)
    method = build_method(cfg)
    assert isinstance(method, RILS)
    method.gate_correct = False  # every sample's KL counts (a random model retrieves few captions right)
    want_out = cfg.model.embed_dim if kl_projection == "shared" else cfg.method.embed_dim
    grads = {}
    for weight in (0.0, 1.0):
        method.kl_weight = weight
        method.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = method(_batch())
        assert out["pred"].shape[-1] == 16 and float(out["logs"]["kl"]) > 0
        out["loss"].backward()
        grads[weight] = method.image_proj.weight.grad.clone()
    assert method.decoder.out_dim == want_out  # encoder width when projected, the joint width when not
    kl_grad = grads[1.0] - grads[0.0]
    if kl_projection == "shared":
        assert kl_grad.abs().max() > 1e-6
    else:
        assert torch.equal(grads[1.0], grads[0.0])


# -- the retrieval gate and the prototypes ----------------------------------------------------------------
def test_caption_rows_mark_identical_captions() -> None:
    assert caption_rows(["a", "b", "c"]) is None
    assert caption_rows(["a", "b", "a", "c", "b"]) == [0, 1, 0, 3, 1]


def test_gate_by_index_and_by_caption_on_a_hand_made_batch() -> None:
    # images 0 and 1 both point at caption row 0; row 1 reads the same as row 0
    image = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    own = torch.arange(4)
    duplicates = ["a bag.", "a bag.", "a coat.", "a shoe."]
    by_caption = retrieval_correct(image, text, own, torch.tensor(caption_rows(duplicates)))
    by_index = retrieval_correct(image, text, own)
    # image 1 retrieves row 0 (a tie with its own row 1, broken towards the first): the same caption
    assert by_caption.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert by_index.tolist() == [1.0, 0.0, 1.0, 0.0]
    # unique captions: the two rules agree
    assert caption_rows(["a bag.", "a red bag.", "a coat.", "a shoe."]) is None


@pytest.mark.parametrize("duplicates", [True, False])
def test_method_prototypes_and_gate_follow_caption_match(duplicates: bool, tmp_path: Path) -> None:
    cfg = load_config(None, faithful_overrides(write_tiny_open_clip(tmp_path / "tower")))
    method = build_method(cfg)
    assert isinstance(method, RILS)
    image = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    captions = ["a bag.", "a bag." if duplicates else "a red bag.", "a coat.", "a shoe."]
    got = {}
    for mode in ("caption", "index"):
        method.caption_match = mode
        got[mode] = method.prototypes_and_gate(image, text, captions)
    (proto_c, gate_c), (proto_i, gate_i) = got["caption"], got["index"]
    assert torch.equal(proto_i, text)  # index: every row is a prototype, as the official code
    if duplicates:
        assert torch.equal(proto_c, text[[0, 2, 3]])  # one prototype per distinct caption
        assert gate_c.tolist() == [1.0, 1.0, 1.0, 0.0] and gate_i.tolist() == [1.0, 0.0, 1.0, 0.0]
    else:
        assert torch.equal(proto_c, proto_i) and torch.equal(gate_c, gate_i)
    method.gate_correct = False
    assert method.prototypes_and_gate(image, text, captions)[1] is None


@pytest.mark.slow
def test_faithful_rils_run_checkpoints_its_text_tower_and_evaluates_zero_shot(tmp_path: Path) -> None:
    """Through the engine: the trained tower is in the checkpoint and the export, and zero-shot rebuilds it."""
    from semmim.engine import pretrain
    from semmim.eval.config import ZeroshotConfig
    from semmim.eval.zeroshot import zeroshot_eval

    out = tmp_path / "run"
    pretrain(load_config(None, faithful_overrides(write_tiny_open_clip(tmp_path / "tower"))), out)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert any(k.startswith("text_encoder.model.transformer.") for k in ckpt["model"])
    assert not any(k.startswith("text_proj.") for k in ckpt["model"])  # method.text_head=none
    metrics = zeroshot_eval(out, ZeroshotConfig(data="synthetic", limit=40, num_workers=0))
    assert metrics["n_test"] == 40 and 0 <= metrics["top1"] <= 100
