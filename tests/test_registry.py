"""One behavioural test per registered part, parametrized over every name (timm style): a part added to a
registry is held to the same contract as the built-in ones."""

from __future__ import annotations

import pytest
import torch

from semmim.masking.base import MaskOutput
from semmim.parts import SLOT_CONTEXT, build_part, part_keys, resolve_part
from semmim.registry import DECODERS, LOSSES, MASKERS

GRID = (4, 4)
L = GRID[0] * GRID[1]


@pytest.mark.parametrize("name", MASKERS.names())
def test_every_masker_hides_about_its_ratio(name: str) -> None:
    masker = build_part(MASKERS, {"name": name}, "method.masker")
    n = 64
    scores = torch.softmax(torch.randn(n, L), dim=-1) if getattr(masker, "needs_scores", False) else None
    out = masker(n, GRID, generator=torch.Generator().manual_seed(0), scores=scores)
    assert isinstance(out, MaskOutput) and out.mask.shape == (n, L) and out.mask.dtype == torch.bool
    ratio = float(masker.mask_ratio)
    frac = out.mask.float().mean().item()
    assert abs(frac - ratio) < 0.1, f"{name}: hides {frac:.2f}, asked {ratio}"
    if getattr(masker, "uniform_count", True):  # the same visible count in every image, ids consistent
        assert out.ids_keep is not None and len(set(out.mask.sum(1).tolist())) == 1
        kept = torch.zeros(n, L, dtype=torch.bool).scatter_(1, out.ids_keep, True)
        assert torch.equal(kept, ~out.mask)


@pytest.mark.parametrize(
    "name", [n for n in LOSSES.names() if getattr(LOSSES.get(n), "kind", "reconstruction") == "reconstruction"]
)
def test_every_reconstruction_loss_is_zero_at_the_target_and_ignores_visible_tokens(name: str) -> None:
    loss = build_part(LOSSES, {"name": name}, "method.loss")
    torch.manual_seed(0)
    target = torch.randn(3, L, 8)
    mask = torch.rand(3, L) < 0.5
    assert loss(target.clone(), target, mask).item() == pytest.approx(0.0, abs=1e-5)
    pred = torch.randn(3, L, 8, requires_grad=True)
    value = loss(pred, target, mask)
    assert value.item() > 0
    value.backward()
    assert torch.all(pred.grad[~mask] == 0) and pred.grad[mask].abs().sum() > 0


@pytest.mark.parametrize("name", DECODERS.names())
def test_every_decoder_predicts_every_position(name: str) -> None:
    decoder = build_part(DECODERS, {"name": name}, "decoder", grid_size=GRID, encoder_dim=16, out_dim=5)
    n = 2
    if getattr(decoder, "input", "visible") == "visible":
        mask = MASKERS.get("random")(0.75)(n, GRID, generator=torch.Generator().manual_seed(0))
        latent = torch.randn(n, 1 + mask.num_keep, 16)
    else:
        mask = None
        latent = torch.randn(n, 1 + L, 16)
    assert decoder(latent, mask).shape == (n, 1 + L, 5)


@pytest.mark.parametrize(
    ("registry", "slot"),
    [(MASKERS, "masker"), (DECODERS, "decoder"), (LOSSES, "loss")],
    ids=["masker", "decoder", "loss"],
)
def test_every_part_resolves_from_its_defaults_and_documents_its_keys(registry, slot: str) -> None:
    for name in registry.names():
        node = resolve_part(registry, {"name": name}, slot, SLOT_CONTEXT[slot])
        keys = part_keys(registry, name, SLOT_CONTEXT[slot])
        assert set(node) == {"name", *(k.name for k in keys)}
        undocumented = [k.name for k in keys if not k.help]
        assert not undocumented, f"{slot} '{name}': keys without help in its Args: {undocumented}"
