"""The student encoder: a ViT built from timm's blocks, with timm's exact parameter names.

Two forward paths share one set of weights:

* ``forward_visible`` (MAE style): masked patches are dropped, the transformer sees only
  ``1 + L_keep`` tokens. He et al. 2021, arXiv:2111.06377.
* ``forward_masked`` (BEiT style): masked patches are replaced by a learnable mask token and the
  transformer sees all ``1 + L`` tokens. Bao et al. 2021, arXiv:2106.08254.

Positions are fixed 2D sin-cos embeddings (MAE), BEiT's learnable relative position bias
(``rel_pos_bias``: one table shared by all blocks as in BEiT pretraining, or one per block), or both.
With a relative position bias the blocks are timm's BEiT blocks (separate q / v biases and no k bias,
LayerScale ``gamma_1`` / ``gamma_2``), the bias enters fused attention as its ``attn_mask``, and the
visible-only path gathers the bias rows and columns of the tokens it keeps.

:meth:`ViTEncoder.timm_state_dict` loads into
``timm.create_model(timm_name, num_classes=0, **encoder.timm_kwargs())`` with no missing or
unexpected keys (timm's ``VisionTransformer``, or ``Beit`` with a relative position bias: a shared
table is copied into every block, as BEiT does for fine-tuning), so every encoder semmim trains is a
timm model with the same features.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models.beit import Block as BeitBlock
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from semmim.masking.base import MaskOutput
from semmim.models.pos_embed import sincos_pos_embed_2d
from semmim.models.rel_pos import RelativePositionBias, relative_position_index, select_index, token_positions
from semmim.registry import ENCODERS

LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)
"""LayerNorm with eps 1e-6, as in MAE and timm's ViTs."""

REL_POS_BIAS = ("none", "shared", "per_block")
"""Values of ``rel_pos_bias``: no relative position bias, one table for all blocks (BEiT pretraining), one per block."""

ABS_POS = ("sincos", "none")
"""Values of ``abs_pos``: fixed 2D sin-cos position embeddings added to the tokens (MAE), or none (BEiT)."""


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
    """Vision Transformer encoder with sin-cos positions and/or a relative position bias, optional mask token.

    Args:
        img_size: input side in pixels (square images).
        patch_size: patch side; must divide ``img_size``.
        in_chans: input channels (1 for Fashion-MNIST, 3 for RGB).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: ViT shape.
        drop_path: stochastic depth rate of the last block (linearly increasing).
        layer_scale_init: LayerScale init value (BEiT uses 0.1); None disables it.
        mask_token: create the learnable mask token used by ``forward_masked``.
        timm_name: the timm architecture the weights load into (a ``beit*`` name with a relative position bias).
        rel_pos_bias: ``none``, ``shared`` (one BEiT table for all blocks) or ``per_block``.
        abs_pos: ``sincos`` (fixed 2D sin-cos embeddings added to the tokens) or ``none``.

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
        rel_pos_bias: str = "none",
        abs_pos: str = "sincos",
    ) -> None:
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"patch_size={patch_size} does not divide img_size={img_size}")
        if rel_pos_bias not in REL_POS_BIAS:
            raise ValueError(f"rel_pos_bias must be one of {', '.join(REL_POS_BIAS)}, got {rel_pos_bias!r}")
        if abs_pos not in ABS_POS:
            raise ValueError(f"abs_pos must be one of {', '.join(ABS_POS)}, got {abs_pos!r}")
        if rel_pos_bias == "none" and abs_pos == "none":
            raise ValueError("abs_pos='none' with rel_pos_bias='none' leaves the encoder without positions")
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
        self.rel_pos_bias_kind = rel_pos_bias
        self.abs_pos = abs_pos
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid_size: tuple[int, int] = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed: nn.Parameter | None = None
        if abs_pos == "sincos":
            table = sincos_pos_embed_2d(embed_dim, self.grid_size).unsqueeze(0)
            self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
        # relative position bias: the (1 + L, 1 + L) table index, and one table (shared) or one per block
        self.rel_pos_bias: RelativePositionBias | None = None
        self.block_rel_pos_bias: nn.ModuleList | None = None
        if rel_pos_bias != "none":
            self.register_buffer("rel_pos_index", relative_position_index(self.grid_size), persistent=False)
        if rel_pos_bias == "shared":
            self.rel_pos_bias = RelativePositionBias(self.grid_size, num_heads)
        elif rel_pos_bias == "per_block":
            self.block_rel_pos_bias = nn.ModuleList(
                [RelativePositionBias(self.grid_size, num_heads) for _ in range(depth)]
            )
        dpr = torch.linspace(0, drop_path, depth).tolist() if depth > 1 else [drop_path] * depth
        block_cls: Any = Block if rel_pos_bias == "none" else BeitBlock
        self.blocks = nn.ModuleList(
            [
                block_cls(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    init_values=layer_scale_init,
                    drop_path=dpr[i],
                    norm_layer=LayerNorm6,
                )
                for i in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    @property
    def beit_style(self) -> bool:
        """Whether the encoder uses a relative position bias (BEiT blocks, exported as timm's ``Beit``)."""
        return self.rel_pos_bias_kind != "none"

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
                ls: Any = blk
                gammas = (ls.gamma_1, ls.gamma_2) if self.beit_style else (ls.ls1.gamma, ls.ls2.gamma)
                for gamma in gammas:
                    nn.init.constant_(gamma, self.layer_scale_init)

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
        return self._add_pos(self.patch_embed(x))

    def _add_pos(self, tokens: Tensor) -> Tensor:
        """(N, L, D) patch tokens plus their absolute position embeddings (none with ``abs_pos='none'``)."""
        return tokens if self.pos_embed is None else tokens + self.pos_embed[:, 1:, :]

    def _with_cls(self, x: Tensor) -> Tensor:
        cls = self.cls_token if self.pos_embed is None else self.cls_token + self.pos_embed[:, :1, :]
        return torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)

    def rel_pos_biases(self, positions: Tensor | None = None) -> list[Tensor] | None:
        """The attention bias of every block, or None without a relative position bias.

        Args:
            positions: (N, T) token positions present (0 = CLS, 1 + l = patch l), None = all 1 + L tokens.

        Returns:
            One (1, H, T, T) tensor per block (N, H, T, T with ``positions``); a shared table gives the same
            tensor for every block.
        """
        if not self.beit_style:
            return None
        index = select_index(self.rel_pos_index, positions)  # type: ignore[arg-type]
        if self.rel_pos_bias is not None:
            return [self.rel_pos_bias(index)] * self.depth
        assert self.block_rel_pos_bias is not None
        return [table(index) for table in self.block_rel_pos_bias]

    def _transformer(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        biases = self.rel_pos_biases(positions)
        if biases is None:
            for blk in self.blocks:
                x = blk(x)
        else:
            for blk, bias in zip(self.blocks, biases, strict=True):
                x = blk(x, shared_rel_pos_bias=bias)
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
        positions = token_positions(ids_keep) if self.beit_style else None
        return self._transformer(self._with_cls(tokens), positions)

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
        return self._transformer(self._with_cls(self._add_pos(tokens)))

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
        """Keyword arguments that make ``timm.create_model(self.timm_name, ...)`` match this encoder.

        With a relative position bias they describe timm's ``Beit``: per-block tables
        (``use_rel_pos_bias``), its absolute embedding only with ``abs_pos='sincos'``, LayerScale given
        explicitly (0 = none: ``timm.create_model`` drops a ``None`` and BEiT's names default to 0.1), and
        ``global_pool='token'`` so that the final norm is kept and ``forward_features`` ends with it.
        """
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
        if self.beit_style:
            kw.update(
                init_values=self.layer_scale_init if self.layer_scale_init is not None else 0.0,
                use_abs_pos_emb=self.pos_embed is not None,
                use_rel_pos_bias=True,
                use_shared_rel_pos_bias=False,
                global_pool="token",
            )
        elif self.layer_scale_init is not None:
            kw["init_values"] = self.layer_scale_init
        return kw

    def timm_state_dict(self) -> dict[str, Tensor]:
        """State dict with timm's keys only (the mask token is a pretraining-only parameter).

        With a relative position bias the keys are those of timm's ``Beit`` with a table in every block
        (``blocks.i.attn.relative_position_bias_table``): a shared table is copied into each block, as
        BEiT's fine-tuning does with a shared-bias checkpoint.
        """
        state = {k: v for k, v in self.state_dict().items() if k != "mask_token"}
        if not self.beit_style:
            return state
        out = {k: v for k, v in state.items() if not k.startswith(("rel_pos_bias.", "block_rel_pos_bias."))}
        for i in range(self.depth):
            source = "rel_pos_bias" if self.rel_pos_bias is not None else f"block_rel_pos_bias.{i}"
            table = state[f"{source}.relative_position_bias_table"]
            out[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()  # a file stores no shared memory
        return out
