"""Joint image + mask augmentation of the segmentation recipe (:mod:`semmim.data.seg_transforms`)."""

from __future__ import annotations

import colorsys
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors

from semmim.data.seg_transforms import (
    PadTo,
    PhotoMetricDistortion,
    RandomCatCrop,
    RandomRescale,
    SegPipeline,
    _scale_saturation,
    rescale_size,
    train_transform,
)

LEVELS = (0, 10, 20, 30, 40)
"""Label values, far apart: an interpolated label would fall between them."""


def _blocks(h: int = 40, w: int = 56, block: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A blocky (3, H, W) image and its mask, the mask a function of the image: gray = label / 40."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(LEVELS), (h // block, w // block), generator=g)
    mask = torch.tensor(LEVELS)[idx].repeat_interleave(block, 0).repeat_interleave(block, 1)
    image = (mask.float() / 40.0).expand(3, -1, -1).contiguous()
    return image, mask


def _label_of(image: torch.Tensor) -> torch.Tensor:
    return (image[0] * 4).round().long() * 10


def test_rescale_size_keeps_the_ratio_inside_the_box() -> None:
    assert rescale_size(375, 500, (2048, 512)) == (512, 683)  # the short side binds
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # the long side binds
    assert rescale_size(28, 28, (112, 28)) == (28, 28) and rescale_size(28, 28, (56, 14)) == (14, 14)


def test_flip_and_crop_keep_image_and_mask_exactly_aligned() -> None:
    image, mask = _blocks()
    t = train_transform(32, scale=(56, 40), ratio_range=(1.0, 1.0), cat_max_ratio=0.75, flip_prob=0.5,
                        photometric=False, fill=[0.0, 0.0, 0.0])  # fmt: skip
    flipped = 0
    for seed in range(12):
        torch.manual_seed(seed)
        img, msk = t(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert img.shape == (3, 32, 32) and msk.shape == (32, 32) and msk.dtype == torch.int64
        assert torch.equal(msk, _label_of(img))  # no resize at ratio 1: exact
        # the crop is a window of the original or of its mirror image
        flipped += int(
            not any(torch.equal(msk, mask[t0 : t0 + 32, l0 : l0 + 32]) for t0 in range(9) for l0 in range(25))
        )
    assert 0 < flipped < 12


def test_rescale_never_interpolates_labels_and_keeps_them_aligned() -> None:
    image, mask = _blocks()
    t = train_transform(32, scale=(56, 40), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, flip_prob=0.5,
                        photometric=False, fill=[0.5, 0.5, 0.5])  # fmt: skip
    misaligned: list[bool] = []
    for seed in range(12):
        torch.manual_seed(seed)
        img, msk = t(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert img.shape == (3, 32, 32) and msk.shape == (32, 32)
        assert set(msk.unique().tolist()) <= {*LEVELS, 255}  # nearest neighbours only
        labelled = msk != 255
        # away from block edges (where the bilinear image blurs) the image still says the mask's label
        m = msk.float()[None, None]
        interior = (F.max_pool2d(m, 3, 1, 1) == -F.max_pool2d(-m, 3, 1, 1))[0, 0] & labelled
        assert float((msk == _label_of(img))[interior].float().mean()) > 0.95
        assert float((msk == _label_of(img))[labelled].float().mean()) > 0.8
        assert bool((img[:, ~labelled] == 0.5).all())  # padding: the fill colour where the mask is 255
        misaligned += (msk.flip(-1) == _label_of(img))[interior].tolist()
    assert sum(misaligned) / len(misaligned) < 0.7  # the same check on a mirrored mask fails: it has teeth


def test_pad_fills_image_per_channel_and_mask_with_ignore() -> None:
    img, msk = PadTo(6, fill=[0.1, 0.2, 0.3])(
        tv_tensors.Image(torch.ones(3, 5, 4)), tv_tensors.Mask(torch.zeros(5, 4, dtype=torch.long))
    )
    assert img.shape == (3, 6, 6) and msk.shape == (6, 6)
    assert torch.equal(msk[5], torch.full((6,), 255)) and torch.equal(msk[:, 4:], torch.full((6, 2), 255))
    assert float(img[0, 5, 0]) == pytest.approx(0.1) and float(img[2, 0, 5]) == pytest.approx(0.3)
    assert bool((img[:, :5, :4] == 1).all()) and bool((msk[:5, :4] == 0).all())


def test_cat_max_ratio_redraws_crops_one_class_fills() -> None:
    # 2x2 crops of [[0, 0, 1], [0, 0, 1]]: the left crop is all class 0, the right one half and half
    mask = tv_tensors.Mask(torch.tensor([[0, 0, 1], [0, 0, 1]]))
    image = tv_tensors.Image(torch.zeros(1, 2, 3))
    left = 0
    for seed in range(20):
        torch.manual_seed(seed)
        _, m = RandomCatCrop(2, cat_max_ratio=0.75)(image, mask)
        assert 1 in m.tolist()[0]  # re-drawn until both classes are in (a 2**-11 chance to fail, fixed seeds)
        torch.manual_seed(seed)
        _, m1 = RandomCatCrop(2, cat_max_ratio=1.0)(image, mask)
        left += int(1 not in m1.tolist()[0])
    assert 0 < left < 20  # without the ratio the first draw stays
    # an image smaller than the crop is kept whole
    _, whole = RandomCatCrop(4)(image, mask)
    assert torch.equal(whole, mask)


def test_photometric_distortion_changes_the_image_only() -> None:
    image, mask = _blocks()
    image = torch.stack([image[0], image[1].flip(-1), 1 - image[2]])  # some colour
    changed = 0
    for seed in range(8):
        torch.manual_seed(seed)
        img, msk = PhotoMetricDistortion()(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert torch.equal(msk, mask) and isinstance(msk, tv_tensors.Mask)
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
        changed += int(not torch.equal(img, image))
    assert changed >= 6
    gray = torch.rand(1, 4, 4)  # saturation and hue leave one channel alone; brightness / contrast do not
    torch.manual_seed(0)
    assert PhotoMetricDistortion()(tv_tensors.Image(gray)).shape == (1, 4, 4)


@pytest.mark.parametrize("factor", [0.5, 1.3, 4.0])
def test_saturation_matches_hsv(factor: float) -> None:
    pixels = [(0.8, 0.4, 0.2), (0.1, 0.6, 0.3), (0.5, 0.5, 0.5), (0.0, 0.0, 0.0), (0.9, 0.85, 0.7)]
    img = torch.tensor(pixels).T.reshape(3, 1, len(pixels))
    out = _scale_saturation(img, factor)
    for i, (r, g, b) in enumerate(pixels):
        h, s, v = colorsys.rgb_to_hsv(r, g, b)
        expected = colorsys.hsv_to_rgb(h, min(1.0, s * factor), v)
        assert out[:, 0, i].tolist() == pytest.approx(list(expected), abs=1e-6)


class _Toy:
    num_classes = 5
    classes: ClassVar[list[str]] = [str(v) for v in LEVELS]

    def __len__(self) -> int:
        return 3

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _blocks(seed=index)


def test_pipeline_is_seeded_per_sample_and_test_keeps_the_original_mask() -> None:
    t = train_transform(32, (128, 32), (0.5, 2.0), 0.75, 0.5, True, fill=[0.5, 0.5, 0.5])
    ds = SegPipeline(_Toy(), t, seed=3)
    a, b = ds[1], ds[1]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert a["image"].shape == (3, 32, 32) and a["mask"].shape == (32, 32) and type(a["mask"]) is torch.Tensor
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["image"], a["image"])
    state = torch.get_rng_state()
    ds[0]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    test = SegPipeline(_Toy(), scale=(128, 20))
    item = test[0]
    assert item["image"].shape == (3, 20, 28) and item["mask"].shape == (40, 56)  # rescaled image, original mask
    with pytest.raises(ValueError, match="transform or a test scale"):
        SegPipeline(_Toy())


def test_random_rescale_draws_the_ratio() -> None:
    image, mask = _blocks()
    sizes = set()
    for seed in range(6):
        torch.manual_seed(seed)
        img, msk = RandomRescale((112, 40), (0.5, 2.0))(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert img.shape[-2:] == msk.shape[-2:]
        h, w = img.shape[-2:]
        assert 20 <= h <= 80 and abs(w / h - 56 / 40) < 0.05
        sizes.add((h, w))
    assert len(sizes) == 6
