"""Decoders: from encoder tokens to per-token predictions of the target.

* :class:`MAEDecoder`: MAE's lightweight transformer over visible tokens plus mask tokens.
  He et al. 2021, arXiv:2111.06377.
* :class:`PromptingDecoder`: MILAN's prompting decoder. The visible tokens pass the decoder
  embedding once and then stay fixed ("prompts"); in every block only the mask tokens are queries,
  attending to the whole sequence (fixed visible tokens, as they are, + current mask tokens after the
  block's pre-norm), as in the official MILAN code and mmpretrain's port.
  Hou et al. 2022, arXiv:2208.06049, Sec. 3.2.

Both return predictions for every position, CLS first: (N, 1 + L, out_dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from semmim.masking.base import MaskOutput
from semmim.models.pos_embed import sincos_pos_embed_2d
from semmim.models.vit import LayerNorm6, init_weights_mae
from semmim.registry import DECODERS


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """(N, L, D) gathered at (N, K) indices -> (N, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class _DecoderBase(nn.Module):
    def __init__(
        self,
        grid_size: tuple[int, int],
        encoder_dim: int,
        out_dim: int,
        embed_dim: int,
        num_heads: int,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"decoder embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.grid_size = grid_size
        self.num_patches = grid_size[0] * grid_size[1]
        self.embed_dim = embed_dim
        self.out_dim = out_dim
        self.decoder_embed = nn.Linear(encoder_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(embed_dim, grid_size).unsqueeze(0), requires_grad=False)
        self.norm = LayerNorm6(embed_dim)
        self.pred = nn.Linear(embed_dim, out_dim)

    def _finish_init(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(init_weights_mae)

    def _split_embed(self, latent: Tensor, mask: MaskOutput) -> tuple[Tensor, Tensor, Tensor]:
        """Embed encoder output; return (cls+visible with positions, mask tokens with positions, ids_restore)."""
        ids_keep, ids_mask, ids_restore = mask.require_ids(type(self).__name__)
        if latent.shape[1] != 1 + ids_keep.shape[1]:
            raise ValueError(
                f"decoder got {latent.shape[1]} tokens but the mask keeps {ids_keep.shape[1]} patches (+1 CLS)"
            )
        x = self.decoder_embed(latent)
        pos = self.pos_embed.expand(x.shape[0], -1, -1)
        patch_pos = pos[:, 1:, :]
        visible = torch.cat([x[:, :1] + pos[:, :1], x[:, 1:] + gather_tokens(patch_pos, ids_keep)], dim=1)
        masked = self.mask_token.to(x.dtype) + gather_tokens(patch_pos, ids_mask)
        return visible, masked, ids_restore

    @staticmethod
    def _unshuffle(visible: Tensor, masked: Tensor, ids_restore: Tensor) -> Tensor:
        """CLS + visible (keep order) and mask tokens (mask order) -> (N, 1 + L, D) in patch order."""
        patches = torch.cat([visible[:, 1:], masked], dim=1)
        return torch.cat([visible[:, :1], gather_tokens(patches, ids_restore)], dim=1)


@DECODERS.register("mae")
class MAEDecoder(_DecoderBase):
    """MAE transformer decoder (default 8 blocks x 512 wide, 16 heads).

    Args:
        grid_size: (h, w) patch grid of the encoder.
        encoder_dim: width of the encoder tokens.
        out_dim: width of each prediction (p*p*C for pixels, D_teacher for features).
        embed_dim: decoder width.
        depth: decoder blocks.
        num_heads: attention heads (must divide embed_dim).
        mlp_ratio: MLP hidden width / embed_dim.
    """

    input = "visible"

    def __init__(
        self,
        grid_size: tuple[int, int],
        encoder_dim: int,
        out_dim: int,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__(grid_size, encoder_dim, out_dim, embed_dim, num_heads)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm6) for _ in range(depth)]  # type: ignore[arg-type]
        )
        self._finish_init()

    def forward(self, latent: Tensor, mask: MaskOutput) -> Tensor:
        """Predict every position.

        Args:
            latent: (N, 1 + L_keep, D_enc) output of ``ViTEncoder.forward_visible``.
            mask: the mask the encoder was run with.

        Returns:
            (N, 1 + L, out_dim), CLS first, patches in row-major order.
        """
        visible, masked, ids_restore = self._split_embed(latent, mask)
        x = self._unshuffle(visible, masked, ids_restore)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))


class PromptingBlock(nn.Module):
    """A pre-norm transformer block whose queries are the mask tokens only.

    Keys and values come from the full sequence: the fixed CLS + visible tokens (never updated) and
    the current mask tokens after this block's ``norm1``. As in MILAN's official code, the fixed
    tokens enter the key/value projection as they are; ``prompt_norm=True`` passes them through
    ``norm1`` first (semmim 0.1's form). Only the mask tokens get the attention and MLP residual updates.

    Args:
        dim: token width D.
        num_heads: attention heads (must divide ``dim``).
        mlp_ratio: MLP hidden width / ``dim``.
        prompt_norm: apply ``norm1`` to the fixed tokens before they become keys/values.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, prompt_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.prompt_norm = bool(prompt_norm)
        self.fused_attn = True
        self.norm1 = LayerNorm6(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = LayerNorm6(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _heads(self, x: Tensor) -> Tensor:
        n, length, _ = x.shape
        return x.view(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def attend(self, queries: Tensor, prompts: Tensor) -> Tensor:
        """The attention update of the mask tokens, after the output projection: (N, L_mask, D).

        Keys/values are ``[prompts (raw, or normed with prompt_norm), norm1(queries)]``; their order does
        not change the result (no positional term inside the attention).
        """
        q_in = self.norm1(queries)
        context = torch.cat([self.norm1(prompts) if self.prompt_norm else prompts, q_in], dim=1)
        k, v = self.kv(context).chunk(2, dim=-1)
        q, k, v = self._heads(self.q(q_in)), self._heads(k), self._heads(v)
        if self.fused_attn:  # flash / memory-efficient kernels where available
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # the plain formula, kept as the reference the fused path is tested against
            out = torch.softmax((q * self.head_dim**-0.5) @ k.transpose(-2, -1), dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(queries.shape))

    def forward(self, queries: Tensor, prompts: Tensor) -> Tensor:
        """
        Args:
            queries: (N, L_mask, D) current mask tokens.
            prompts: (N, 1 + L_keep, D) fixed CLS + visible tokens.

        Returns:
            (N, L_mask, D) updated mask tokens.
        """
        x = queries + self.attend(queries, prompts)
        return x + self.mlp(self.norm2(x))


@DECODERS.register("prompting")
class PromptingDecoder(_DecoderBase):
    """MILAN's prompting decoder: visible tokens are fixed prompts, mask tokens are the queries.

    Args:
        grid_size: (h, w) patch grid of the encoder.
        encoder_dim: width of the encoder tokens.
        out_dim: width of each prediction.
        embed_dim: decoder width.
        depth: decoder blocks.
        num_heads: attention heads (must divide embed_dim).
        mlp_ratio: MLP hidden width / embed_dim.
        prompt_norm: false (MILAN's official code) = the fixed visible tokens enter every block's
            keys/values as they are; true = each block's pre-norm is applied to them first (semmim 0.1).
    """

    input = "visible"

    def __init__(
        self,
        grid_size: tuple[int, int],
        encoder_dim: int,
        out_dim: int,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        prompt_norm: bool = False,
    ) -> None:
        super().__init__(grid_size, encoder_dim, out_dim, embed_dim, num_heads)
        self.blocks = nn.ModuleList(
            [PromptingBlock(embed_dim, num_heads, mlp_ratio, prompt_norm) for _ in range(depth)]
        )
        self._finish_init()

    def forward_tokens(self, latent: Tensor, mask: MaskOutput) -> Tensor:
        """Decoder tokens before the final norm and head: (N, 1 + L, D_dec) in patch order."""
        prompts, queries, ids_restore = self._split_embed(latent, mask)
        for blk in self.blocks:
            queries = blk(queries, prompts)
        return self._unshuffle(prompts, queries, ids_restore)

    def forward(self, latent: Tensor, mask: MaskOutput) -> Tensor:
        """Predict every position: (N, 1 + L_keep, D_enc) -> (N, 1 + L, out_dim)."""
        return self.pred(self.norm(self.forward_tokens(latent, mask)))


@DECODERS.register("linear")
class LinearHead(nn.Module):
    """A single linear layer on every encoder token (MaskDistill's head on the mask-token encoder).

    Args:
        grid_size: the encoder's patch grid (kept for a uniform decoder interface).
        encoder_dim: width of the encoder tokens.
        out_dim: width of each prediction.
    """

    input = "tokens"

    def __init__(self, grid_size: tuple[int, int], encoder_dim: int, out_dim: int) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.out_dim = out_dim
        self.proj = nn.Linear(encoder_dim, out_dim)
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: Tensor, mask: MaskOutput | None = None) -> Tensor:
        """(N, T, D_enc) -> (N, T, out_dim)."""
        return self.proj(tokens)
