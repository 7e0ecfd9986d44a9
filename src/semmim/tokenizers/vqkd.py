"""BEiT v2's VQ-KD visual tokenizer (encoder and quantizer only), loaded from its released checkpoints.

Peng et al. 2022, "BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers", arXiv:2208.06366.
The tokenizer maps an image to one code per 16x16 patch:

1. the image in [0, 1] is rescaled to [-1, 1] (the checkpoints' ``process_type="default"``);
2. a ViT-B/16 encoder (BEiT layout: separate ``q_bias`` / ``v_bias``, no bias on k; LayerNorm eps 1e-6; mean
   pooling, so its final norm is ``fc_norm``, applied to the patch tokens) gives (N, L, 768) patch features;
3. the task layer ``Linear(768, 768) -> Tanh -> Linear(768, 32)`` projects them;
4. each projected feature is l2-normalised and assigned to its nearest code (squared l2 distance) in the
   8192 x 32 codebook (``quantize.embedding.weight``, l2-normalised by its EMA updates).

The checkpoint keys (``{"model": state}``) follow ``modeling_vqkd.VQKD``: ``encoder.*``, ``encode_task_layer.*``,
``quantize.embedding.weight``; the decoder (``decoder.*``, ``decode_task_layer.*``) and the quantizer's EMA
statistics are not needed to tokenize and are dropped. The encoder is rebuilt as a timm ``VisionTransformer``
(``qkv.bias = cat(q_bias, 0, v_bias)``).
"""

from __future__ import annotations

import argparse
import os
import re
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VQKD_URLS: dict[str, str] = {
    "vqkd_encoder_base_decoder_3x768x12_clip": "https://github.com/addf400/files/releases/download/BEiT-v2/"
    "vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth",
    "vqkd_encoder_base_decoder_1x768x12_clip": "https://github.com/addf400/files/releases/download/BEiT-v2/"
    "vqkd_encoder_base_decoder_1x768x12_clip-d93179da.pth",
    "vqkd_encoder_base_decoder_1x768x12_dino": "https://github.com/addf400/files/releases/download/BEiT-v2/"
    "vqkd_encoder_base_decoder_1x768x12_dino-663c55d7.pth",
}
"""The tokenizers released with BEiT v2 (microsoft/unilm, beit2/TOKENIZER.md): name -> URL. The 3-layer-decoder
CLIP one is the tokenizer BEiT v2 pretrains with; the hash prefix in each file name is checked on download."""

_DROPPED: tuple[str, ...] = (
    "decoder.",
    "decode_task_layer.",
    "quantize.embedding.cluster_size",
    "quantize.embedding.embed_avg",
    "quantize.embedding.initted",
    "quantize.cluster_size",
    "loss",
    "teacher",
    "scaling_layer",
)
"""Checkpoint keys a tokenizer does not need: the decoder, the quantizer's EMA statistics, training leftovers."""
_BLOCK = re.compile(r"^encoder\.blocks\.(\d+)\.")


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The state dict of a VQ-KD checkpoint (``.pth`` with ``{"model": ...}`` or ``{"state_dict": ...}``, or a
    ``.safetensors`` file), unpickled with ``weights_only=True`` (an ``argparse.Namespace`` of training arguments
    is allowed, nothing else).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, or not a state dict.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"VQ tokenizer checkpoint not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p))
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read the VQ tokenizer checkpoint {p}: {type(e).__name__}: {e}") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{p} does not hold a state dict of tensors")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def download_checkpoint(name: str) -> Path:
    """Download (once, into torch hub's cache) the released tokenizer ``name`` of :data:`VQKD_URLS`; the SHA-256
    prefix in its file name is checked."""
    if name not in VQKD_URLS:
        raise ValueError(f"unknown VQ tokenizer {name!r}; known: {', '.join(VQKD_URLS)}")
    url = VQKD_URLS[name]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / url.rsplit("/", 1)[-1]
    if not dest.is_file():
        torch.hub.download_url_to_file(url, str(dest), hash_prefix=dest.stem.rsplit("-", 1)[-1], progress=True)
    return dest


def _encoder_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """BEiT-layout ``encoder.*`` keys -> timm ``VisionTransformer`` keys, and the architecture they imply."""
    enc: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if not key.startswith("encoder."):
            continue
        rel = key.removeprefix("encoder.")
        if rel.endswith(("attn.q_bias", "attn.v_bias")):
            continue  # folded into qkv.bias below
        if rel.startswith("blocks.") and (rel.endswith(".gamma_1") or rel.endswith(".gamma_2")):
            rel = rel.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        elif not re.match(
            r"^(cls_token|pos_embed|patch_embed\.proj\.|fc_norm\.|norm\.|blocks\.\d+\.(norm1|norm2|"
            r"attn\.qkv\.weight|attn\.proj\.|mlp\.fc1\.|mlp\.fc2\.))",
            rel,
        ):
            unknown.append(key)
            continue
        enc[rel] = value
    if unknown:
        raise ValueError(f"encoder keys this loader does not know (relative position bias?): {unknown[:8]}")
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in enc:
            raise ValueError(f"missing encoder.{key} (not a VQ-KD checkpoint?)")
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    width = int(enc["cls_token"].shape[-1])
    for i in range(depth):
        q = state.get(f"encoder.blocks.{i}.attn.q_bias")
        v = state.get(f"encoder.blocks.{i}.attn.v_bias")
        zeros = torch.zeros(width, dtype=enc[f"blocks.{i}.attn.qkv.weight"].dtype)
        enc[f"blocks.{i}.attn.qkv.bias"] = torch.cat([zeros if q is None else q, zeros, zeros if v is None else v])
    proj = enc["patch_embed.proj.weight"]
    num_tokens = int(enc["pos_embed"].shape[1]) - 1
    side = round(num_tokens**0.5)
    if side * side != num_tokens:
        raise ValueError(f"encoder.pos_embed holds {num_tokens} patch positions, not a square grid")
    arch = {
        "embed_dim": width,
        "depth": depth,
        "patch_size": int(proj.shape[-1]),
        "in_chans": int(proj.shape[1]),
        "img_size": side * int(proj.shape[-1]),
        "mlp_ratio": float(enc["blocks.0.mlp.fc1.weight"].shape[0]) / width if depth else 4.0,
        "layer_scale": "blocks.0.ls1.gamma" in enc,
        "mean_pooling": "fc_norm.weight" in enc,
    }
    return enc, arch


class VQKDTokenizer(nn.Module):
    """A frozen VQ-KD tokenizer: images -> (N, h*w) code ids; always in eval mode.

    Args:
        state: a VQ-KD state dict (:func:`read_checkpoint`).
        num_heads: attention heads of the encoder; None = embed_dim // 64 (BEiT's head width, 12 for ViT-B).
        image_size: input size it runs at; None = the size of its position embeddings (224). Another size
            resamples the position embeddings (timm ``set_input_size``).
    """

    codebook: Tensor

    def __init__(self, state: dict[str, Tensor], num_heads: int | None = None, image_size: int | None = None) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        kept = {k: v for k, v in state.items() if not k.startswith(_DROPPED)}
        enc, arch = _encoder_state(kept)
        if "quantize.embedding.weight" not in kept:
            raise ValueError("missing quantize.embedding.weight (the codebook): not a VQ-KD checkpoint?")
        heads = num_heads if num_heads is not None else max(1, arch["embed_dim"] // 64)
        if arch["embed_dim"] % heads:
            raise ValueError(f"num_heads={heads} does not divide the encoder width {arch['embed_dim']}")
        encoder = VisionTransformer(
            img_size=arch["img_size"],
            patch_size=arch["patch_size"],
            in_chans=arch["in_chans"],
            num_classes=0,
            global_pool="avg" if arch["mean_pooling"] else "token",
            embed_dim=arch["embed_dim"],
            depth=arch["depth"],
            num_heads=heads,
            mlp_ratio=arch["mlp_ratio"],
            qkv_bias=True,
            init_values=1.0 if arch["layer_scale"] else None,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        missing, unexpected = encoder.load_state_dict(enc, strict=False)
        if missing or unexpected:
            raise ValueError(f"the encoder does not fit: missing {missing[:8]}, unexpected {unexpected[:8]}")
        if image_size is not None and image_size != arch["img_size"]:
            encoder.set_input_size(img_size=(image_size, image_size))
        self.encoder = encoder
        width = arch["embed_dim"]
        codebook = kept["quantize.embedding.weight"].float()
        self.task_layer = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, codebook.shape[1]))
        task = {k.removeprefix("encode_task_layer."): v for k, v in kept.items() if k.startswith("encode_task_layer.")}
        try:
            self.task_layer.load_state_dict(task, strict=True)
        except RuntimeError as e:
            raise ValueError(f"encode_task_layer does not fit Linear-Tanh-Linear: {e}") from None
        leftover = [k for k in kept if not k.startswith(("encoder.", "encode_task_layer.", "quantize.embedding."))]
        if leftover:
            raise ValueError(f"unexpected keys for a VQ-KD tokenizer: {leftover[:8]}")
        self.register_buffer("codebook", codebook, persistent=False)
        self.image_size = int(image_size or arch["img_size"])
        self.patch_size = int(arch["patch_size"])
        self.in_chans = int(arch["in_chans"])
        self.mean_pooling = bool(arch["mean_pooling"])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VQKDTokenizer:
        """Frozen: always eval mode."""
        return super().train(False)

    @property
    def vocab_size(self) -> int:
        return int(self.codebook.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        """Its token grid (h, w) at :attr:`image_size`."""
        side = self.image_size // self.patch_size
        return (side, side)

    def preprocess(self, images: Tensor) -> Tensor:
        """(N, C, H, W) in [0, 1] -> (N, in_chans, S, S) in [-1, 1] (1-channel images are repeated)."""
        x = images.float()
        if x.shape[1] != self.in_chans:
            if x.shape[1] != 1:
                raise ValueError(f"the VQ tokenizer takes {self.in_chans}-channel images, got {x.shape[1]}")
            x = x.expand(-1, self.in_chans, -1, -1)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
        return x * 2.0 - 1.0

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """(N, C, H, W) in [0, 1] -> (N, L, code_dim) l2-normalised projected patch features.

        The encoder follows any autocast in effect; the task layer runs in float32 (as ``VQKD.encode``).
        """
        tokens = self.encoder.forward_features(self.preprocess(images))
        patches = tokens[:, self.encoder.num_prefix_tokens :]
        if self.mean_pooling:
            patches = self.encoder.fc_norm(patches)
        with torch.autocast(device_type=patches.device.type, enabled=False):
            return F.normalize(self.task_layer(patches.float()), dim=-1)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """(N, C, H, W) in [0, 1] -> (N, L) int64 ids of the nearest codes (squared l2 distance, float32)."""
        z = self.features(images)
        with torch.autocast(device_type=z.device.type, enabled=False):
            e = self.codebook.float()
            d = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2.0 * z @ e.T
            return d.argmin(dim=-1)
