"""Property tests of the maskers (random, block, semantic)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semmim.masking import (
    BlockMasker,
    RandomMasker,
    SemanticMasker,
    block_masking,
    mask_from_bool,
    num_visible,
    random_masking,
    semantic_masking,
)


def _check_partition(m, n: int, length: int, keep: int) -> None:
    assert m.mask.shape == (n, length) and m.mask.dtype == torch.bool
    assert m.ids_keep.shape == (n, keep) and m.ids_mask.shape == (n, length - keep)
    for i in range(n):
        k, h = set(m.ids_keep[i].tolist()), set(m.ids_mask[i].tolist())
        assert not k & h, "visible and masked patches overlap"
        assert k | h == set(range(length)), "visible + masked must cover every patch"
        assert not m.mask[i, m.ids_keep[i]].any() and m.mask[i, m.ids_mask[i]].all()
    restored = torch.gather(torch.cat([m.ids_keep, m.ids_mask], 1), 1, m.ids_restore)
    assert torch.equal(restored, torch.arange(length).expand(n, -1))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), length=st.integers(2, 200), ratio=st.floats(0.01, 0.99))
def test_random_masking_exact_count_and_partition(n: int, length: int, ratio: float) -> None:
    m = random_masking(n, length, ratio)
    keep = max(1, min(length - 1, round(length * (1 - ratio))))
    assert num_visible(length, ratio) == keep
    _check_partition(m, n, length, keep)
    assert (m.mask.sum(1) == length - keep).all()


def test_random_masking_mae_numbers_and_uniformity() -> None:
    m = random_masking(4, 196, 0.75)
    assert m.ids_keep.shape == (4, 49)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(16)
    for _ in range(2000):
        counts += random_masking(1, 16, 0.75, generator=g).mask[0].float()
    freq = counts / 2000
    assert torch.allclose(freq, torch.full((16,), 0.75), atol=0.05)


def test_random_masking_is_reproducible_with_generator() -> None:
    a = random_masking(3, 49, 0.75, generator=torch.Generator().manual_seed(1))
    b = random_masking(3, 49, 0.75, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_bad_ratio_is_an_error(ratio: float) -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        RandomMasker(ratio)


def test_semantic_masking_partition_and_count() -> None:
    imp = torch.rand(5, 49).softmax(-1)
    m = semantic_masking(imp, 0.75)
    _check_partition(m, 5, 49, 12)


def test_semantic_masking_keeps_attended_patches_more_often() -> None:
    """High-attention patches stay visible more often than low ones (measured over many draws)."""
    length = 16
    imp = torch.linspace(0.01, 1.0, length)
    imp = (imp / imp.sum()).expand(4000, -1)
    m = semantic_masking(imp, 0.75, generator=torch.Generator().manual_seed(0))
    visible_freq = (~m.mask).float().mean(0)
    # monotone on average: the top quarter is kept far more often than the bottom quarter
    assert visible_freq[-4:].mean() > 2.5 * visible_freq[:4].mean()
    corr = torch.corrcoef(torch.stack([visible_freq, imp[0]]))[0, 1]
    assert corr > 0.95
    # still stochastic: the least attended patch is sometimes visible (unlike top-k)
    assert visible_freq[0] > 0


def test_semantic_masking_handles_zero_attention() -> None:
    imp = torch.zeros(2, 16)
    imp[:, 3] = 1.0
    m = semantic_masking(imp, 0.5)
    assert (~m.mask[:, 3]).all()
    _check_partition(m, 2, 16, 8)


def test_semantic_masker_needs_scores() -> None:
    with pytest.raises(ValueError, match="attention"):
        SemanticMasker(0.75)(2, (4, 4))


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 24),
    w=st.integers(1, 24),
    ratio=st.floats(0.01, 0.99),
    min_patches=st.sampled_from([1, 4, 16]),
    seed=st.integers(0, 10_000),
)
def test_block_masking_hides_exactly_the_target_count(
    h: int, w: int, ratio: float, min_patches: int, seed: int
) -> None:
    """Every mask hides exactly round(L * ratio) patches (BEiT v2's generator), on any grid, ratio and block size."""
    g = torch.Generator().manual_seed(seed)
    m = block_masking(4, (h, w), ratio, min_patches=min_patches, generator=g)
    target = round(h * w * ratio)
    assert m.mask.shape == (4, h * w)
    assert (m.mask.sum(1) == target).all()
    # equal counts: the index tensors exist and partition the patches
    _check_partition(m, 4, h * w, h * w - target)


def _components(grid: torch.Tensor) -> list[int]:
    """Sizes of the 4-connected components of a (h, w) bool grid."""
    h, w = grid.shape
    seen = torch.zeros_like(grid)
    sizes = []
    for r in range(h):
        for c in range(w):
            if grid[r, c] and not seen[r, c]:
                stack, size = [(r, c)], 0
                seen[r, c] = True
                while stack:
                    y, x = stack.pop()
                    size += 1
                    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < h and 0 <= xx < w and grid[yy, xx] and not seen[yy, xx]:
                            seen[yy, xx] = True
                            stack.append((yy, xx))
                sizes.append(size)
    return sizes


def test_block_masking_uses_blocks_of_at_least_16_patches() -> None:
    """On a 14x14 grid the mask is blocks of >= 16 patches plus a few single patches that make up the count."""
    g = torch.Generator().manual_seed(0)
    m = block_masking(64, (14, 14), 0.4, generator=g)
    assert (m.mask.sum(1) == 78).all()  # round(196 * 0.4), exactly
    topped_up = []
    for grid in m.mask.view(64, 14, 14):
        small = sum(s for s in _components(grid) if s < 16)  # only single patches added at the end
        assert small <= 16
        topped_up.append(small)
    assert sum(topped_up) / 64 < 4  # on average the blocks come within a few patches of the count


def test_block_masking_single_block_is_a_rectangle_with_bounded_aspect() -> None:
    """With a target of exactly one block, the mask is one rectangle with aspect in [0.3, 1/0.3]."""
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        m = block_masking(1, (14, 14), 16 / 196, min_patches=16, generator=g).mask.view(14, 14)
        rows = m.any(1).nonzero().flatten()
        cols = m.any(0).nonzero().flatten()
        if len(rows) == 0:
            continue
        hh, ww = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert int(m.sum()) == hh * ww, "a single block must be a filled rectangle"
        assert 0.3 - 0.2 <= hh / ww <= 1 / 0.3 + 1.5  # rounding of h and w on a coarse grid


def test_block_masker_small_grid_still_masks() -> None:
    m = BlockMasker(0.4)(8, (7, 7))
    assert (m.mask.sum(1) == 20).all()  # round(49 * 0.4)


def test_mask_from_bool_fills_ids_when_counts_match() -> None:
    mask = torch.tensor([[True, False, True, False], [False, True, True, False]])
    m = mask_from_bool(mask)
    assert m.ids_keep is not None
    _check_partition(m, 2, 4, 2)
    ragged = mask_from_bool(torch.tensor([[True, False, False], [True, True, False]]))
    assert ragged.ids_keep is None
    with pytest.raises(ValueError, match="mask-token encoder"):
        ragged.require_ids("the visible-only encoder")
