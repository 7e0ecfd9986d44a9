"""The student encoder: a ViT built from timm's blocks, with timm's exact parameter names.

Two forward paths share one set of weights:

* ``forward_visible`` (MAE style): masked patches are dropped, the transformer sees only
  ``1 + L_keep`` tokens. He et al. 2021, arXiv:2111.06377.
* ``forward_masked`` (BEiT style): masked patches are replaced by a learnable mask token and the
  transformer sees all ``1 + L`` tokens. Bao et al. 2021, arXiv:2106.08254.

The state dict (without ``mask_token``) loads into
``timm.create_model(timm_name, num_classes=0, **encoder.timm_kwargs())`` with no missing or
unexpected keys, so every encoder semmim trains is a timm model.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from semmim.masking.base import MaskOutput
from semmim.models.pos_embed import sincos_pos_embed_2d
from semmim.registry import ENCODERS

LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)
"""LayerNorm with eps 1e-6, as in MAE and timm's ViTs."""


def set_fused_attention(module: nn.Module, enabled: bool) -> int:
    """Switch every attention layer under ``module`` (timm ``Attention``, our prompting blocks) between
    ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels) and the plain softmax formula.

    Returns:
        The number of attention layers switched.
    """
    n = 0
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            setattr(m, "fused_attn", enabled)  # noqa: B010 (an attribute nn.Module does not declare)
            n += 1
    return n


def init_weights_mae(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


@ENCODERS.register("vit")
class ViTEncoder(nn.Module):
    """Vision Transformer encoder with fixed sin-cos positions and optional mask token.

    Args:
        img_size: input side in pixels (square images).
        patch_size: patch side; must divide ``img_size``.
        in_chans: input channels (1 for Fashion-MNIST, 3 for RGB).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: ViT shape.
        drop_path: stochastic depth rate of the last block (linearly increasing).
        layer_scale_init: LayerScale init value (BEiT uses 0.1); None disables it.
        mask_token: create the learnable mask token used by ``forward_masked``.
        timm_name: the timm architecture the weights load into.

    Examples:
        >>> enc = ViTEncoder(img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2)
        >>> enc.forward_features(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 17, 32])
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layer_scale_init: float | None = None,
        mask_token: bool = False,
        timm_name: str = "vit_base_patch16_224",
    ) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"patch_size={patch_size} does not divide img_size={img_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.layer_scale_init = layer_scale_init
        self.timm_name = timm_name
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size: tuple[int, int] = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, self.grid_size).unsqueeze(0), requires_grad=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        dpr = torch.linspace(0, drop_path, depth).tolist() if depth > 1 else [drop_path] * depth
        self.blocks = nn.ModuleList(
            [
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    init_values=layer_scale_init,
                    drop_path=dpr[i],
                    norm_layer=LayerNorm6,  # type: ignore[arg-type]
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)
        self.blocks.apply(init_weights_mae)
        init_weights_mae(self.norm)
        if self.layer_scale_init is not None:
            for blk in self.blocks:
                for ls in (blk.ls1, blk.ls2):
                    nn.init.constant_(ls.gamma, self.layer_scale_init)  # type: ignore[union-attr,arg-type]

    # ------------------------------------------------------------------ embedding
    def embed_patches(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, L, D) patch embeddings with position embeddings added."""
        if x.shape[1:] != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(
                f"encoder expects images of shape (N, {self.in_chans}, {self.img_size}, {self.img_size}), "
                f"got {tuple(x.shape)}"
            )
        if x.is_cuda:  # channels-last lets cuDNN run the patch convolution as an NHWC GEMM
            x = x.contiguous(memory_format=torch.channels_last)
        return self.patch_embed(x) + self.pos_embed[:, 1:, :]

    def _with_cls(self, x: Tensor) -> Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def _transformer(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    # ------------------------------------------------------------------ forward paths
    def forward_visible(self, x: Tensor, ids_keep: Tensor) -> Tensor:
        """MAE path: encode only the visible patches.

        Args:
            x: (N, C, H, W) normalised images.
            ids_keep: (N, L_keep) indices of the visible patches.

        Returns:
            (N, 1 + L_keep, D): CLS then the visible tokens in ``ids_keep`` order.
        """
        tokens = self.embed_patches(x)
        tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self._transformer(self._with_cls(tokens))

    def forward_masked(self, x: Tensor, mask: Tensor) -> Tensor:
        """BEiT path: replace masked patches by the mask token and encode all tokens.

        Args:
            x: (N, C, H, W) normalised images.
            mask: (N, L) bool, True = masked.

        Returns:
            (N, 1 + L, D) in patch order.
        """
        if self.mask_token is None:
            raise ValueError("this encoder was built without a mask token (mask_token=True is needed)")
        tokens = self.patch_embed(x)
        w = mask.unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w
        tokens = tokens + self.pos_embed[:, 1:, :]
        return self._transformer(self._with_cls(tokens))

    def forward_features(self, x: Tensor) -> Tensor:
        """Unmasked forward, as timm's ``forward_features``: (N, C, H, W) -> (N, 1 + L, D)."""
        return self._transformer(self._with_cls(self.embed_patches(x)))

    def forward(self, x: Tensor, mask: MaskOutput | None = None, dense: bool = False) -> Tensor:
        if mask is None:
            return self.forward_features(x)
        if dense:
            return self.forward_masked(x, mask.mask)
        ids_keep, _, _ = mask.require_ids("the visible-only encoder")
        return self.forward_visible(x, ids_keep)

    # ------------------------------------------------------------------ timm interop
    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that make ``timm.create_model(self.timm_name, ...)`` match this encoder."""
        kw: dict[str, Any] = {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "qkv_bias": self.qkv_bias,
        }
        if self.layer_scale_init is not None:
            kw["init_values"] = self.layer_scale_init
        return kw

    def timm_state_dict(self) -> dict[str, Tensor]:
        """State dict with timm's keys only (the mask token is a pretraining-only parameter)."""
        return {k: v for k, v in self.state_dict().items() if k != "mask_token"}
