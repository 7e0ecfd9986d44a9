"""Encoder paths, timm compatibility, decoders (the prompting decoder keeps visible tokens fixed)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from semmim.export import load_timm_model, read_timm_config, save_encoder
from semmim.masking import random_masking
from semmim.models import MAEDecoder, PromptingDecoder, ViTEncoder, sincos_pos_embed_2d
from semmim.registry import ENCODERS


def tiny_encoder(**kw) -> ViTEncoder:
    args = dict(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    args.update(kw)
    return ViTEncoder(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("patch", [4, 7])
def test_visible_and_mask_token_paths_shapes(patch: int) -> None:
    enc = tiny_encoder(patch_size=patch, mask_token=True)
    length = (28 // patch) ** 2
    x = torch.randn(3, 1, 28, 28)
    m = random_masking(3, length, 0.75)
    keep = m.ids_keep.shape[1]
    assert enc.forward_visible(x, m.ids_keep).shape == (3, 1 + keep, 32)
    assert enc.forward_masked(x, m.mask).shape == (3, 1 + length, 32)
    assert enc.forward_features(x).shape == (3, 1 + length, 32)
    assert enc(x, m).shape == (3, 1 + keep, 32)
    assert enc(x, m, dense=True).shape == (3, 1 + length, 32)


def test_visible_path_equals_dense_path_without_masking_on_kept_tokens() -> None:
    """With no masked patch the BEiT path equals the plain forward; the MAE path is a gather of inputs."""
    enc = tiny_encoder(mask_token=True).eval()
    x = torch.randn(2, 1, 28, 28)
    none_masked = torch.zeros(2, 16, dtype=torch.bool)
    torch.testing.assert_close(enc.forward_masked(x, none_masked), enc.forward_features(x))
    ids_all = torch.arange(16).expand(2, -1)
    torch.testing.assert_close(enc.forward_visible(x, ids_all), enc.forward_features(x))


def test_mask_token_replaces_masked_patches() -> None:
    enc = tiny_encoder(mask_token=True).eval()
    x1, x2 = torch.randn(1, 1, 28, 28), torch.randn(1, 1, 28, 28)
    mask = torch.ones(1, 16, dtype=torch.bool)
    # everything masked: the output no longer depends on the image
    torch.testing.assert_close(enc.forward_masked(x1, mask), enc.forward_masked(x2, mask))


def test_wrong_image_shape_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        tiny_encoder().forward_features(torch.randn(1, 3, 28, 28))


def test_sincos_table() -> None:
    t = sincos_pos_embed_2d(16, (3, 4))
    assert t.shape == (13, 16) and torch.all(t[0] == 0)
    assert t.abs().max() <= 1.0
    assert len({tuple(r.tolist()) for r in t[1:]}) == 12  # every position distinct


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"patch_size": 4},
        {"img_size": 32, "patch_size": 8, "in_chans": 3, "layer_scale_init": 0.1},
    ],
)
def test_timm_round_trip(tmp_path, kw) -> None:
    enc = tiny_encoder(mask_token=True, **kw).eval()
    path = save_encoder(tmp_path / "encoder.safetensors", enc.timm_state_dict(), enc.timm_name, enc.timm_kwargs())
    name, kwargs = read_timm_config(path)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    missing, unexpected = model.load_state_dict(enc.timm_state_dict(), strict=True), None
    assert not missing.missing_keys and not missing.unexpected_keys and unexpected is None
    model.eval()
    x = torch.randn(2, enc.in_chans, enc.img_size, enc.img_size)
    torch.testing.assert_close(model.forward_features(x), enc.forward_features(x), atol=1e-5, rtol=1e-5)
    # pooled features of timm's default head are the CLS token
    torch.testing.assert_close(model(x), enc.forward_features(x)[:, 0], atol=1e-5, rtol=1e-5)
    reloaded = load_timm_model(tmp_path)
    torch.testing.assert_close(reloaded.forward_features(x), model.forward_features(x))


def test_timm_load_with_classifier_head(tmp_path) -> None:
    enc = tiny_encoder()
    save_encoder(tmp_path / "encoder.safetensors", enc.timm_state_dict(), enc.timm_name, enc.timm_kwargs())
    model = load_timm_model(tmp_path, num_classes=10)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_mae_decoder_output_order() -> None:
    dec = MAEDecoder((4, 4), encoder_dim=32, out_dim=7, embed_dim=16, depth=1, num_heads=2)
    m = random_masking(2, 16, 0.75)
    latent = torch.randn(2, 1 + m.ids_keep.shape[1], 32)
    assert dec(latent, m).shape == (2, 17, 7)


def test_prompting_decoder_keeps_visible_tokens_fixed() -> None:
    """Visible tokens leave the decoder exactly as the embedding made them; only mask tokens change."""
    torch.manual_seed(0)
    dec = PromptingDecoder((4, 4), encoder_dim=32, out_dim=8, embed_dim=16, depth=3, num_heads=2)
    m = random_masking(2, 16, 0.75)
    latent = torch.randn(2, 1 + m.ids_keep.shape[1], 32, requires_grad=True)
    tokens = dec.forward_tokens(latent, m)
    embedded = dec.decoder_embed(latent)
    pos = dec.pos_embed[0]
    # identity: CLS and every visible patch equal embedding + position, untouched by the blocks
    torch.testing.assert_close(tokens[:, 0], embedded[:, 0] + pos[0])
    for n in range(2):
        for j, patch in enumerate(m.ids_keep[n].tolist()):
            torch.testing.assert_close(tokens[n, 1 + patch], embedded[n, 1 + j] + pos[1 + patch])
    # gradient: visible outputs do not depend on the mask token or on any block's weights
    visible_rows = 1 + m.ids_keep[0]
    out_visible = tokens[0, visible_rows].sum() + tokens[0, 0].sum()
    grads = torch.autograd.grad(
        out_visible, [dec.mask_token, dec.blocks[0].q.weight], allow_unused=True, retain_graph=True
    )
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    # but mask-token outputs do depend on the visible tokens (they are the keys/values)
    masked_rows = 1 + m.ids_mask[0]
    g = torch.autograd.grad(tokens[0, masked_rows].sum(), latent)[0]
    assert g[0, 1:].abs().sum() > 0


def test_prompting_decoder_mask_tokens_do_not_change_visible_when_perturbed() -> None:
    dec = PromptingDecoder((4, 4), encoder_dim=32, out_dim=8, embed_dim=16, depth=2, num_heads=2).eval()
    m = random_masking(1, 16, 0.5)
    latent = torch.randn(1, 9, 32)
    a = dec(latent, m)
    with torch.no_grad():
        dec.mask_token.add_(torch.randn_like(dec.mask_token))
    b = dec(latent, m)
    vis = torch.cat([torch.zeros(1, dtype=torch.long), 1 + m.ids_keep[0]])
    torch.testing.assert_close(a[0, vis], b[0, vis])
    assert not torch.allclose(a[0, 1 + m.ids_mask[0]], b[0, 1 + m.ids_mask[0]])


def _official_milan_decoder(dec: PromptingDecoder, latent: torch.Tensor, m, prompt_norm: bool) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """MILAN's decoder written out as its official code computes it (github.com/zejiangh/MILAN,
    ``models_milan.py``, also mmpretrain's ``MILANPretrainDecoder``), with the weights of ``dec``.

    The whole sequence is embedded and given positions in patch order; CLS + visible tokens are then
    fixed. In each block the mask tokens go through ``norm1`` and are the queries; keys/values are the
    sequence in patch order: the fixed CLS, the fixed visible tokens (un-normalised; ``prompt_norm``:
    through ``norm1`` as well) and the normed mask tokens. Final norm and head on every token.
    """

    def ln(norm: torch.nn.LayerNorm, t: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(t, (t.shape[-1],), norm.weight, norm.bias, eps=1e-6)

    def gather(t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.gather(t, 1, ids.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    n, d = latent.shape[0], dec.embed_dim
    length, keep = m.ids_restore.shape[1], m.ids_keep.shape[1]
    x = F.linear(latent, dec.decoder_embed.weight, dec.decoder_embed.bias)
    patches = gather(torch.cat([x[:, 1:], dec.mask_token.expand(n, length - keep, d)], 1), m.ids_restore)
    full = torch.cat([x[:, :1], patches], 1) + dec.pos_embed
    fixed = torch.cat([full[:, :1], gather(full[:, 1:], m.ids_keep)], 1)
    tokens = gather(full[:, 1:], m.ids_mask)
    for blk in dec.blocks:
        heads = blk.num_heads
        hd = d // heads
        h = ln(blk.norm1, tokens)
        prompts = ln(blk.norm1, fixed) if prompt_norm else fixed
        context = torch.cat([prompts[:, :1], gather(torch.cat([prompts[:, 1:], h], 1), m.ids_restore)], 1)
        q = F.linear(h, blk.q.weight, blk.q.bias).reshape(n, -1, heads, hd).transpose(1, 2)
        k, v = F.linear(context, blk.kv.weight, blk.kv.bias).reshape(n, 1 + length, 2, heads, hd).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * hd**-0.5).softmax(dim=-1)
        tokens = tokens + F.linear((attn @ v).transpose(1, 2).reshape(n, -1, d), blk.proj.weight, blk.proj.bias)
        hidden = F.gelu(F.linear(ln(blk.norm2, tokens), blk.mlp.fc1.weight, blk.mlp.fc1.bias))
        tokens = tokens + F.linear(hidden, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    out = torch.cat([fixed[:, :1], gather(torch.cat([fixed[:, 1:], tokens], 1), m.ids_restore)], 1)
    return F.linear(ln(dec.norm, out), dec.pred.weight, dec.pred.bias)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("prompt_norm", [False, True], ids=["raw-prompts", "normed-prompts"])
def test_prompting_decoder_matches_the_official_formula(prompt_norm: bool, fused: bool) -> None:
    torch.manual_seed(0)
    dec = PromptingDecoder(
        (4, 5), encoder_dim=24, out_dim=7, embed_dim=16, depth=3, num_heads=4, prompt_norm=prompt_norm
    ).double()
    with torch.no_grad():  # every weight random (norms and biases too), so each one's place is checked
        for prm in dec.parameters():
            prm.add_(0.3 * torch.randn_like(prm))
    for blk in dec.blocks:
        blk.fused_attn = fused
    m = random_masking(3, 20, 0.75)
    latent = torch.randn(3, 1 + m.ids_keep.shape[1], 24, dtype=torch.float64)
    ours = dec(latent, m)
    torch.testing.assert_close(ours, _official_milan_decoder(dec, latent, m, prompt_norm), atol=1e-10, rtol=1e-9)
    # and the two forms really differ (the reference tells them apart)
    other = _official_milan_decoder(dec, latent, m, not prompt_norm)
    assert (ours - other).norm() > 1e-3 * ours.norm()


def test_prompting_decoder_prompt_norm_is_a_config_key() -> None:
    from semmim.config import ConfigError, load_config
    from semmim.methods.base import build_decoder, build_encoder

    over = ["model.embed_dim=32", "model.num_heads=2", "model.depth=1", "model.img_size=16", "model.patch_size=4"]
    for value, expected in (("false", False), ("true", True)):
        cfg = load_config(None, [*over, "method.name=mae", "decoder=prompting", f"decoder.prompt_norm={value}"])
        dec = build_decoder(cfg, build_encoder(cfg), 8)
        assert all(blk.prompt_norm is expected for blk in dec.blocks)
    cfg = load_config(None, [*over, "method.name=mae", "decoder=prompting"])
    assert cfg.decoder["prompt_norm"] is False  # the official form unless asked
    with pytest.raises(ConfigError, match=r"decoder.prompt_norm: decoder 'mae' has no key 'prompt_norm'"):
        load_config(None, [*over, "method.name=mae", "decoder.prompt_norm=true"])


def test_model_name_selects_a_registered_encoder() -> None:
    from semmim.config import ConfigError, load_config
    from semmim.methods.base import build_encoder

    calls = []

    @ENCODERS.register("test_recording_vit")
    class RecordingViT(ViTEncoder):
        def __init__(self, **kwargs: object) -> None:
            calls.append(kwargs["embed_dim"])
            super().__init__(**kwargs)  # type: ignore[arg-type]

    try:
        over = ["model.name=test_recording_vit", "model.embed_dim=32", "model.num_heads=2", "model.depth=1"]
        cfg = load_config(None, over)
        assert isinstance(build_encoder(cfg), RecordingViT) and calls == [32]
    finally:
        ENCODERS._items.pop("test_recording_vit")
    with pytest.raises(ConfigError, match=r"model\.name"):
        load_config(None, ["model.name=vitt"])


def test_export_sets_timm_pretrained_cfg(tmp_path) -> None:
    """``timm.data.resolve_data_config`` on a loaded export gives the run's input size, mean, std and resize."""
    import timm.data

    from semmim.export import load_timm_model, save_encoder
    from semmim.models.vit import ViTEncoder

    enc = ViTEncoder(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    extra = {"mean": "[0.286]", "std": "[0.353]"}
    save_encoder(tmp_path / "encoder.safetensors", enc.timm_state_dict(), enc.timm_name, enc.timm_kwargs(), extra)
    cfg = timm.data.resolve_data_config({}, model=load_timm_model(tmp_path))
    assert cfg["input_size"] == (1, 28, 28) and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 1.0
    assert cfg["mean"] == (0.286,) and cfg["std"] == (0.353,)
