"""Losses and targets against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from semmim.losses import CosineLoss, MaskedMSE, cosine_loss, masked_mse
from semmim.targets import PixelTarget, normalize_patches, patchify, unpatchify


def test_masked_mse_hand_computation() -> None:
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, 3.0]]])
    target = torch.tensor([[[0.0, 0.0], [5.0, 5.0], [1.0, 1.0]]])
    mask = torch.tensor([[True, False, True]])
    # token 0: (1 + 4) / 2 = 2.5; token 2: (4 + 4) / 2 = 4; token 1 is visible and ignored
    assert masked_mse(pred, target, mask).item() == pytest.approx((2.5 + 4.0) / 2)
    assert MaskedMSE()(pred, target, mask).item() == pytest.approx(3.25)
    # without a mask: all tokens, (2.5 + 25 + 4) / 3
    assert masked_mse(pred, target, None).item() == pytest.approx(31.5 / 3)


def test_masked_mse_ignores_visible_tokens_gradient() -> None:
    pred = torch.randn(2, 4, 3, requires_grad=True)
    mask = torch.tensor([[True, False, False, True], [False, False, True, False]])
    masked_mse(pred, torch.zeros(2, 4, 3), mask).backward()
    assert torch.all(pred.grad[~mask] == 0) and torch.all(pred.grad[mask] != 0)


def test_cosine_loss_hand_computation() -> None:
    pred = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, -1.0]]])
    # cos = 1, 1/sqrt(2), -1 -> losses 0, 2 - sqrt(2), 4
    expected = (0.0 + (2 - math.sqrt(2)) + 4.0) / 3
    assert cosine_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)
    assert CosineLoss()(pred, target, None).item() == pytest.approx(expected, rel=1e-6)
    # scale invariance and range [0, 4]
    assert cosine_loss(3 * pred, 0.5 * target).item() == pytest.approx(expected, rel=1e-6)
    rnd = cosine_loss(torch.randn(4, 10, 8), torch.randn(4, 10, 8)).item()
    assert 0.0 <= rnd <= 4.0


def test_cosine_loss_averages_over_the_tokens_passed() -> None:
    pred = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    # a mask restricts the mean to the masked tokens (MaskDistill); no mask = every token (MILAN)
    assert CosineLoss()(pred, target, torch.tensor([[False, True]])).item() == pytest.approx(2.0)
    assert CosineLoss()(pred, target, torch.tensor([[True, False]])).item() == pytest.approx(0.0)
    assert CosineLoss()(pred, target, None).item() == pytest.approx(1.0)


def test_shape_mismatch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="prediction shape"):
        masked_mse(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), None)


def test_patchify_round_trip_and_layout() -> None:
    imgs = torch.randn(2, 3, 8, 12)
    x = patchify(imgs, 4)
    assert x.shape == (2, 6, 48)
    # patch (row 1, col 2) is token 1*3+2 = 5, flattened as (p, p, C)
    torch.testing.assert_close(x[0, 5], imgs[0, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1))
    torch.testing.assert_close(unpatchify(x, 4, (2, 3), 3), imgs)


def test_norm_pix_target() -> None:
    imgs = torch.rand(2, 1, 8, 8)
    out = PixelTarget(4, in_chans=1, norm_pix=True)(imgs)
    assert not out.global_token and out.cls_attn is None
    t = out.tokens
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    raw = patchify(imgs, 4)
    torch.testing.assert_close(t, (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, keepdim=True) + 1e-6).sqrt())
    torch.testing.assert_close(normalize_patches(raw), t)
    torch.testing.assert_close(PixelTarget(4, in_chans=1, norm_pix=False)(imgs).tokens, raw)
    # the target is taken of the student-normalised image
    norm = PixelTarget(4, in_chans=1, mean=[0.5], std=[0.25], norm_pix=False)(imgs).tokens
    torch.testing.assert_close(norm, patchify((imgs - 0.5) / 0.25, 4))
