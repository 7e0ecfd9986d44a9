"""Analytic FLOPs of one training step of the semmim methods, per image.

Convention
----------
One multiply-add counts as **2 FLOPs**. Only matrix products are counted: linear layers, the
patch-embedding convolution and the two attention products (QK^T and AV). LayerNorm, softmax, GELU,
the losses, masking and the optimizer update are left out: they cost O(T*D) per layer against the
O(T*D^2) of the matrix products. ``torch.utils.flop_counter.FlopCounterMode`` uses the same convention
(it counts matmuls, convolutions and attention only), so the two can be compared directly.

Building blocks (T tokens of width D, MLP ratio r = 4, forward pass)
--------------------------------------------------------------------
* ViT block::

      F_block(T, D) = 2*T*(4 + 2r)*D^2 + 2*2*T^2*D  =  24*T*D^2 + 4*T^2*D      (r = 4)

  QKV (3*D^2) + output projection (D^2) + MLP (2*r*D^2 = 8*D^2) multiply-adds per token; QK^T and
  AV cost T^2*D multiply-adds each.
* MILAN prompting block, Q mask-token queries attending to all T = 1 + L tokens (keys/values)::

      F_prompt(Q, T, D) = 2*(Q*D^2 [q] + 2*T*D^2 [kv] + Q*D^2 [proj] + 2*r*Q*D^2 [MLP]) + 2*2*Q*T*D
                        = 4*D^2*(T + (1 + r)*Q) + 4*Q*T*D

* Patch embedding of L patches of p x p x C pixels: ``F_pe = 2*L*(p*p*C)*D``.
* Linear map of n tokens from width a to width b: ``F_lin = 2*n*a*b``.

Training = forward + backward. The backward of a matrix product costs twice its forward (gradient
of the input and of the weight), so a trainable part costs **3x** its forward. The patch embedding
and RILS's text projection see inputs that need no gradient (pixels, cached caption features): 2x.
The frozen teacher and detached branches run forward only: 1x. Per method, with L patches,
L_v = round(L*(1 - mask_ratio)) visible ones, L_m = L - L_v masked ones, T = 1 + L, T_v = 1 + L_v,
encoder width D and depth d, decoder width D_dec and depth d_dec, teacher width D_t, depth d_t,
projection width E_t:

* MAE:         3*[d*F_block(T_v, D) + F_lin(T_v, D, D_dec) + d_dec*F_block(T, D_dec) + F_lin(T, D_dec, p*p*C)]
               + 2*F_pe
* MILAN:       teacher 1*[F_pe_t + d_t*F_block(T, D_t) + F_lin(T, D_t, E_t) + CLS-attention row
               (2*D_t^2 + 2*T*D_t^2 + 2*T*D_t)]
               + 3*[d*F_block(T_v, D) + F_lin(T_v, D, D_dec) + d_dec*F_prompt(L_m, T, D_dec)
               + F_lin(T, D_dec, E_t)] + 2*F_pe
* MaskDistill: teacher 1*[F_pe_t + d_t*F_block(T, D_t) + F_lin(T, D_t, E_t)]
               + 3*[d*F_block(T, D) + F_lin(L, D, E_t)] + 2*F_pe           (mask-token path: all tokens)
* RILS:        unmasked pass 3*d*F_block(T, D) + 2*F_pe, masked pass 3*d*F_block(T_v, D) + 2*F_pe,
               decoder (1 block of width D) 3*[F_lin(T_v, D, D) + F_block(T, D) + F_lin(T, D, D)]
               and its L predictions through the image projection 3*F_lin(L, D, E)
               (``kl_projection="shared"``; ``"separate"``: the decoder's head is F_lin(T, D, E) instead),
               projections / InfoNCE / KL over M captions (see :func:`rils_terms`); a locked text
               tower's embeddings are cached per caption (0 FLOPs per step; a trained tower is not counted).
* supmim:      unmasked pass 3*d*F_block(T, D) + 2*F_pe + 3*F_lin(1, D, K), masked pass as MAE's
               encoder + MAE decoder of d_dec blocks.

With ``method.num_masks = M`` (MAE, MILAN, MaskDistill: M masked views per loaded image, one teacher
pass) every student term is multiplied by M and the teacher's by 1; FLOPs stay per *loaded* image.

FlashAttention kernels recompute QK^T in the backward, so a counter that follows the kernel (as
FlopCounterMode does on CUDA) reports 2.5x instead of 2x for the attention backward.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

TRAINABLE = 3
"""Forward + backward (input and weight gradients) of a trainable part."""
NO_INPUT_GRAD = 2
"""Forward + weight gradient only: the input needs no gradient (pixels, cached text features)."""
FROZEN = 1
"""Forward only: the frozen teacher, detached branches."""


def multi_mask(method: str) -> bool:
    """Whether ``method`` declares support for ``method.num_masks > 1`` (asks the method itself)."""
    from semmim.registry import METHODS

    return bool(getattr(METHODS.get(method), "multi_mask", False))


# ---------------------------------------------------------------------------------------------- blocks
def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """Forward FLOPs of a linear layer on ``tokens`` rows: 2*n*a*b."""
    return 2 * tokens * d_in * d_out


def patch_embed_flops(num_patches: int, patch_size: int, in_chans: int, dim: int) -> int:
    """Forward FLOPs of the patch embedding: 2*L*(p*p*C)*D."""
    return linear_flops(num_patches, patch_size * patch_size * in_chans, dim)


def vit_block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs of a pre-norm ViT block: 2*T*(4 + 2r)*D^2 + 4*T^2*D (24*T*D^2 + 4*T^2*D for r = 4)."""
    hidden = int(dim * mlp_ratio)
    dense = 2 * tokens * (4 * dim * dim + 2 * dim * hidden)
    attention = 2 * 2 * tokens * tokens * dim
    return dense + attention


def prompting_block_flops(queries: int, tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs of MILAN's prompting block: ``queries`` mask tokens attend to all ``tokens``.

    ``4*D^2*(T + (1 + r)*Q) + 4*Q*T*D``: q, proj and MLP on the Q queries, k and v on all T tokens,
    attention Q x T.
    """
    hidden = int(dim * mlp_ratio)
    dense = 2 * (queries * dim * dim + tokens * 2 * dim * dim + queries * dim * dim + queries * 2 * dim * hidden)
    attention = 2 * 2 * queries * tokens * dim
    return dense + attention


def vit_encoder_flops(tokens: int, dim: int, depth: int, mlp_ratio: float = 4.0) -> int:
    """Forward FLOPs of ``depth`` ViT blocks on ``tokens`` tokens (no patch embedding)."""
    return depth * vit_block_flops(tokens, dim, mlp_ratio)


# ---------------------------------------------------------------------------------------------- accounting
@dataclass(frozen=True)
class FlopTerm:
    """One part of a training step: its forward FLOPs and how many forward-equivalents training costs."""

    name: str
    forward: int
    passes: int = TRAINABLE

    @property
    def train(self) -> int:
        return self.forward * self.passes


@dataclass
class FlopBreakdown:
    """The terms of one method's training step, per image."""

    terms: list[FlopTerm] = field(default_factory=list)

    def add(self, name: str, forward: float, passes: int = TRAINABLE) -> None:
        self.terms.append(FlopTerm(name, int(forward), passes))

    def extend(self, terms: Iterable[FlopTerm]) -> None:
        self.terms.extend(terms)

    @property
    def forward(self) -> int:
        """FLOPs of ``method(batch)`` (student, teacher and heads, forward only)."""
        return sum(t.forward for t in self.terms)

    @property
    def train(self) -> int:
        """FLOPs of forward + backward of a training step."""
        return sum(t.train for t in self.terms)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {t.name: {"forward": t.forward, "train": t.train, "passes": t.passes} for t in self.terms}


@dataclass(frozen=True)
class ViTShape:
    """The shape of a ViT (student encoder or teacher)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 16
    mlp_ratio: float = 4.0
    proj_dim: int | None = None
    """Width of a projection applied to every output token (CLIP's ``proj``); None = no projection."""

    @property
    def out_dim(self) -> int:
        return self.proj_dim or self.embed_dim


@dataclass(frozen=True)
class StepShape:
    """Everything the analytic count needs about one method's training step.

    Attributes:
        method: mae | milan | maskdistill | rils | supmim.
        encoder: the student ViT.
        img_size: input side in pixels (square).
        in_chans: input channels.
        mask_ratio: fraction of masked patches.
        decoder_dim, decoder_depth: decoder shape (MAE / prompting decoders).
        teacher: the frozen teacher (MILAN, MaskDistill), running at ``img_size``.
        text_dim: width of the (cached) text features (RILS).
        embed_dim: width of RILS's joint image-text space.
        captions: captions per batch (the batch size: RILS's prototypes and InfoNCE negatives).
        kl_projection: RILS's ``method.kl_projection`` (shared: predictions of width D through the projection).
        text_head: RILS's linear map from the text features to the joint space (``method.text_head=linear``).
        num_classes: supmim's classifier outputs.
        num_masks: masked views per image (``method.num_masks``; MAE, MILAN, MaskDistill).
    """

    method: str
    encoder: ViTShape
    img_size: int
    in_chans: int = 3
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    teacher: ViTShape | None = None
    text_dim: int = 384
    embed_dim: int = 512
    captions: int = 1
    kl_projection: str = "shared"
    text_head: bool = True
    num_classes: int = 1000
    num_masks: int = 1

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.encoder.patch_size) ** 2

    @property
    def num_visible(self) -> int:
        """``round(L * (1 - mask_ratio))`` clamped to [1, L - 1], as semmim's maskers."""
        n = self.num_patches
        return max(1, min(n - 1, round(n * (1.0 - self.mask_ratio))))


def _encoder_terms(s: StepShape, tokens: int, label: str) -> list[FlopTerm]:
    e = s.encoder
    return [
        FlopTerm(f"{label}.patch_embed", patch_embed_flops(s.num_patches, e.patch_size, s.in_chans, e.embed_dim), 2),
        FlopTerm(f"{label}.blocks", vit_encoder_flops(tokens, e.embed_dim, e.depth, e.mlp_ratio)),
    ]


def teacher_terms(s: StepShape, cls_attention: bool) -> list[FlopTerm]:
    """The frozen teacher's forward at the student's resolution (plus the CLS-attention row for MILAN)."""
    t = s.teacher
    if t is None:
        raise ValueError(f"method '{s.method}' needs a teacher shape")
    lt = (s.img_size // t.patch_size) ** 2
    tt = 1 + lt
    terms = [
        FlopTerm("teacher.patch_embed", patch_embed_flops(lt, t.patch_size, s.in_chans, t.embed_dim), FROZEN),
        FlopTerm("teacher.blocks", vit_encoder_flops(tt, t.embed_dim, t.depth, t.mlp_ratio), FROZEN),
    ]
    if t.proj_dim:
        terms.append(FlopTerm("teacher.proj", linear_flops(tt, t.embed_dim, t.proj_dim), FROZEN))
    if cls_attention:  # q of the CLS token, k of all tokens, one row of logits
        d = t.embed_dim
        row = linear_flops(1, d, d) + linear_flops(tt, d, d) + 2 * tt * d
        terms.append(FlopTerm("teacher.cls_attention", row, FROZEN))
    return terms


def _mae_decoder_terms(s: StepShape, out_dim: int, dim: int, depth: int) -> list[FlopTerm]:
    t, tv, e = 1 + s.num_patches, 1 + s.num_visible, s.encoder.embed_dim
    return [
        FlopTerm("decoder.embed", linear_flops(tv, e, dim)),
        FlopTerm("decoder.blocks", depth * vit_block_flops(t, dim)),
        FlopTerm("decoder.pred", linear_flops(t, dim, out_dim)),
    ]


def rils_terms(s: StepShape) -> list[FlopTerm]:
    """RILS's projections and losses over M = ``captions`` caption embeddings of width E."""
    e, d, m, length = s.embed_dim, s.encoder.embed_dim, s.captions, s.num_patches
    text_head = [FlopTerm("text_proj", linear_flops(1, s.text_dim, e), NO_INPUT_GRAD)] if s.text_head else []
    return [
        FlopTerm("image_proj.pooled", linear_flops(1, d, e)),
        FlopTerm("image_proj.patches", linear_flops(length, d, e), FROZEN),  # detached KL target
        *text_head,
        FlopTerm("info_nce", 2 * linear_flops(1, e, m)),  # image->text and text->image logits
        FlopTerm("retrieval", linear_flops(1, e, m), FROZEN),
        FlopTerm("kl.student", linear_flops(length, e, m), NO_INPUT_GRAD),  # prototypes are detached
        FlopTerm("kl.teacher", linear_flops(length, e, m), FROZEN),
    ]


def method_flops(s: StepShape) -> FlopBreakdown:
    """Per-image FLOPs of one training step of ``s.method`` (see the module docstring)."""
    out = FlopBreakdown()
    p2c = s.encoder.patch_size**2 * s.in_chans
    t, tv = 1 + s.num_patches, 1 + s.num_visible
    if s.method == "mae":
        out.extend(_encoder_terms(s, tv, "encoder"))
        out.extend(_mae_decoder_terms(s, p2c, s.decoder_dim, s.decoder_depth))
    elif s.method == "milan":
        assert s.teacher is not None, "milan needs a teacher shape"
        out.extend(teacher_terms(s, cls_attention=True))
        out.extend(_encoder_terms(s, tv, "encoder"))
        dd, lm = s.decoder_dim, s.num_patches - s.num_visible
        out.add("decoder.embed", linear_flops(tv, s.encoder.embed_dim, dd))
        out.add("decoder.blocks", s.decoder_depth * prompting_block_flops(lm, t, dd))
        out.add("decoder.pred", linear_flops(t, dd, s.teacher.out_dim))
    elif s.method == "maskdistill":
        assert s.teacher is not None, "maskdistill needs a teacher shape"
        out.extend(teacher_terms(s, cls_attention=False))
        out.extend(_encoder_terms(s, t, "encoder"))
        out.add("head", linear_flops(s.num_patches, s.encoder.embed_dim, s.teacher.out_dim))
    elif s.method == "rils":
        out.extend(_encoder_terms(s, t, "encoder.unmasked"))
        out.extend(_encoder_terms(s, tv, "encoder.masked"))
        shared = s.kl_projection == "shared"
        out.extend(_mae_decoder_terms(s, s.encoder.embed_dim if shared else s.embed_dim, s.encoder.embed_dim, 1))
        if shared:  # the masked pass's predictions through the image projection (trained by the KL)
            out.add("image_proj.predictions", linear_flops(s.num_patches, s.encoder.embed_dim, s.embed_dim))
        out.extend(rils_terms(s))
    elif s.method == "supmim":
        out.extend(_encoder_terms(s, t, "encoder.unmasked"))
        out.add("head", linear_flops(1, s.encoder.embed_dim, s.num_classes))
        out.extend(_encoder_terms(s, tv, "encoder.masked"))
        out.extend(_mae_decoder_terms(s, p2c, s.decoder_dim, s.decoder_depth))
    else:
        raise ValueError(f"no FLOP formula for method '{s.method}'")
    if s.num_masks > 1:  # the student runs on N * M views, the teacher once per image
        if not multi_mask(s.method):
            raise ValueError(f"method '{s.method}' has no num_masks > 1")
        out.terms = [
            t if t.name.startswith("teacher.") else FlopTerm(t.name, t.forward * s.num_masks, t.passes)
            for t in out.terms
        ]
    return out


def encoder_step_flops(encoder: ViTShape, img_size: int, tokens: int, in_chans: int = 3) -> FlopBreakdown:
    """Forward + backward of the encoder alone on ``tokens`` tokens (visible-only or dense path)."""
    s = StepShape("encoder", encoder, img_size, in_chans)
    return FlopBreakdown(_encoder_terms(s, tokens, "encoder"))
