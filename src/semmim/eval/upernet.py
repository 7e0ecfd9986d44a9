"""UperNet for a plain ViT: the BEiT multi-level pyramid, the UPerNet decode head and the FCN auxiliary head.

A ViT has one stride (its patch size). BEiT (Bao et al. 2021, arXiv:2106.08254), whose segmentation code
MAE (He et al. 2021, arXiv:2111.06377) reuses, taps four blocks (3, 5, 7, 11 of ViT-B: depth x 1/3, 1/2,
2/3, 1) and rescales them to strides 4, 8, 16 and 32 (:class:`ViTPyramid`). UPerNet (Xiao et al. 2018,
"Unified Perceptual Parsing for Scene Understanding", arXiv:1807.10221) decodes the pyramid
(:class:`UPerHead`); training adds an FCN head on the stride-16 level (:class:`FCNHead`, weight 0.4).

Conv blocks are conv (no bias) + BatchNorm + ReLU initialised as mmcv's ``ConvModule`` (Kaiming normal,
fan-out); classifiers are 1x1 convs with weights ~ N(0, 0.01) (mmseg's ``conv_seg``); upsampling is
bilinear with ``align_corners=False``. Written from the papers and the configs, without mmseg.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FCNHead", "UPerHead", "UPerNet", "ViTPyramid", "conv_bn_relu", "resize_to"]

POOL_SCALES = (1, 2, 3, 6)
"""Output sizes of UPerNet's pyramid pooling module (PSPNet's)."""


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    """Conv (no bias, 'same' padding) + BatchNorm + ReLU, the conv Kaiming-normal (fan-out, ReLU gain)."""
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _classifier(cin: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)  # type: ignore[arg-type]
    return conv


def resize_to(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize of (N, C, h, w) to ``size`` (``align_corners=False``); a no-op at that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ViTPyramid(nn.Module):
    """Four (N, D, h, w) maps of one ViT stride -> a pyramid at 4x, 2x, 1x and 1/2x the patch grid.

    Level 0: 2x2 stride-2 deconv + BatchNorm + GELU + 2x2 stride-2 deconv; level 1: one deconv; level 2:
    identity; level 3: 2x2 max-pool (BEiT's ``fpn1``-``fpn4``). Every level keeps D channels. On a grid
    smaller than 2x2 the pooling is skipped, so tiny inputs still work.

    Args:
        dim: token width D.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.fpn4 = nn.MaxPool2d(2)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """Four (N, D, h, w) -> [(N, D, 4h, 4w), (N, D, 2h, 2w), (N, D, h, w), (N, D, h // 2, w // 2)]."""
        if len(feats) != 4:
            raise ValueError(f"the pyramid takes 4 feature maps, got {len(feats)}")
        top = feats[3]
        top = self.fpn4(top) if min(top.shape[-2:]) >= 2 else top
        return [self.fpn1(feats[0]), self.fpn2(feats[1]), feats[2], top]


class UPerHead(nn.Module):
    """UPerNet's decoder on a 4-level pyramid (finest first), all levels ``in_channels`` wide.

    A pyramid pooling module on the coarsest level (average pooling to ``pool_scales``, 1x1 conv, upsampled
    back, concatenated with the input, 3x3 bottleneck); 1x1 laterals on the other levels; a top-down path
    adding each upsampled coarser map; 3x3 convs on the three finer sums; all four maps upsampled to the
    finest, concatenated and fused by a 3x3 conv; 2-D dropout; a 1x1 classifier.

    Args:
        in_channels: width of every pyramid level.
        num_classes: K.
        channels: decoder width.
        pool_scales: PPM output sizes.
        dropout: dropout rate before the classifier.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int,
        pool_scales: tuple[int, ...] = POOL_SCALES,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.ppm = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(in_channels, channels, 1)) for s in pool_scales
        )
        self.ppm_bottleneck = conv_bn_relu(in_channels + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(conv_bn_relu(in_channels, channels, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fuse = conv_bn_relu(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, levels: list[Tensor]) -> Tensor:
        """Four (N, C_in, h_i, w_i) maps, finest first -> logits (N, K, h_0, w_0)."""
        top = levels[3]
        pooled = [top] + [resize_to(branch(top), top.shape[-2:]) for branch in self.ppm]
        lat = [conv(levels[i]) for i, conv in enumerate(self.laterals)]
        lat.append(self.ppm_bottleneck(torch.cat(pooled, 1)))
        for i in range(3, 0, -1):  # top-down path
            lat[i - 1] = lat[i - 1] + resize_to(lat[i], lat[i - 1].shape[-2:])
        outs = [conv(lat[i]) for i, conv in enumerate(self.fpn_convs)] + [lat[3]]
        fused = self.fuse(torch.cat([resize_to(o, outs[0].shape[-2:]) for o in outs], 1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head: one 3x3 conv block, 2-D dropout, a 1x1 classifier (mmseg's ``FCNHead``, one conv).

    Args:
        in_channels: input width.
        num_classes: K.
        channels: hidden width (256 in BEiT / MAE).
        dropout: dropout rate before the classifier.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, h, w) -> logits (N, K, h, w)."""
        return self.classifier(self.dropout(self.conv(x)))


class UPerNet(nn.Module):
    """A ViT segmentation head: :class:`ViTPyramid` + :class:`UPerHead` (+ :class:`FCNHead` on level 2).

    ``num_inputs = 4`` blocks are tapped (:func:`semmim.eval.seg.feature_indices`) without the final norm.

    Args:
        embed_dim: token width D.
        num_classes: K.
        channels: decoder width (768 = D for ViT-B in BEiT / MAE; the frozen protocol uses 256).
        pool_scales: PPM output sizes.
        dropout: dropout rate before each classifier.
        aux_channels: width of the auxiliary FCN head on the stride-16 level; None = no auxiliary head.
    """

    num_inputs = 4
    use_final_norm = False
    aux_level = 2
    """The pyramid level (stride 16, the identity one) the auxiliary head reads."""

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        channels: int = 256,
        pool_scales: tuple[int, ...] = POOL_SCALES,
        dropout: float = 0.1,
        aux_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.pyramid = ViTPyramid(embed_dim)
        self.decode = UPerHead(embed_dim, num_classes, channels, pool_scales, dropout)
        self.aux = FCNHead(embed_dim, num_classes, aux_channels, dropout) if aux_channels else None

    def forward(self, feats: list[Tensor], size: tuple[int, int]) -> Tensor:
        """Args: feats: four (N, D, h, w) block outputs; size: (H, W). Returns logits (N, K, H, W)."""
        return resize_to(self.decode(self.pyramid(feats)), size)

    def forward_train(self, feats: list[Tensor], size: tuple[int, int]) -> tuple[Tensor, Tensor | None]:
        """The decode logits and the auxiliary logits (None without an auxiliary head), each (N, K, H, W)."""
        levels = self.pyramid(feats)
        aux = resize_to(self.aux(levels[self.aux_level]), size) if self.aux is not None else None
        return resize_to(self.decode(levels), size), aux
