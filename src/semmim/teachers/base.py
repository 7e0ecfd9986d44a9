"""The frozen-teacher interface: per-token feature targets plus the CLS attention map.

Semantic MIM methods regress the student's tokens onto the tokens of a frozen, pretrained
"teacher" (MILAN: Hou et al. 2022, "MILAN: Masked Image Pretraining on Language Assisted
Representation", arXiv:2208.06049; MaskDistill: Peng et al. 2022, arXiv:2210.10615; RILS: Yang et
al. 2023, arXiv:2301.06958). MILAN additionally uses the attention of the teacher's CLS token to the
patch tokens in its last block to decide which patches to keep visible (semantic-aware masking).

A :class:`Teacher` takes un-normalised images in ``[0, 1]``, does its own preprocessing (channel
adaptation, resize, the mean/std it was built with: its own, or the student's under
``teacher.input_norm=data``) and returns a :class:`TeacherOutput` whose patch tokens lie on
the *student's* patch grid. Subclasses only implement :meth:`Teacher.extract`.

The CLS attention is computed from the same forward pass as the tokens: a forward pre-hook stores the
input of the last block and only the CLS query row of its attention is recomputed from the block's
own weights (see :func:`cls_attention_row`), which is exact and costs about one linear layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

CLIP_TOKENS: tuple[str, ...] = ("proj", "last_block")
"""Which tokens a CLIP teacher gives (``teacher.tokens``): every token after the final LayerNorm and the
projection (the CLIP embedding space; MILAN), or the raw output of the last transformer block (public
MaskDistill reproductions)."""

CLIP_TEACHERS: tuple[str, ...] = ("open_clip", "hf_clip")
"""Registered teachers that take ``tokens``."""


def check_clip_tokens(tokens: str) -> str:
    """``tokens`` if it is one of :data:`CLIP_TOKENS`, else a ValueError naming them."""
    if tokens not in CLIP_TOKENS:
        raise ValueError(f"CLIP teacher tokens must be one of {', '.join(CLIP_TOKENS)}, got {tokens!r}")
    return tokens


@dataclass
class TeacherOutput:
    """What a teacher returns for a batch.

    Attributes:
        tokens: (N, 1 + L, D) float32. Token 0 is the teacher's global token (its CLS token, or the mean
            of the patch tokens for models without one); then the L patch tokens on the student's patch
            grid, row-major.
        cls_attn: (N, L) float32 attention of the CLS query to every patch token in the teacher's last
            block (softmax over keys, mean over heads), resampled to the student's grid and renormalised
            to sum to 1 per sample; ``None`` when the model has no CLS attention (CNNs) or it was not
            requested.
    """

    tokens: Tensor
    cls_attn: Tensor | None = None


def to_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """``224`` or ``(224, 224)`` or ``(3, 224, 224)`` -> ``(224, 224)``."""
    if isinstance(size, int):
        return (size, size)
    vals = [int(s) for s in size]
    if len(vals) == 1:
        return (vals[0], vals[0])
    if len(vals) not in (2, 3):
        raise ValueError(f"expected an image size like 224 or (224, 224), got {size!r}")
    return (vals[-2], vals[-1])


def adapt_stats(values: Sequence[float], in_chans: int, what: str) -> list[float]:
    """Fit a per-channel mean/std to ``in_chans`` channels (3 -> 1: average; 1 -> C: repeat)."""
    vals = [float(v) for v in values]
    if len(vals) == in_chans:
        return vals
    if len(vals) == 1:
        return vals * in_chans
    if in_chans == 1:
        return [sum(vals) / len(vals)]
    raise ValueError(f"{what} has {len(vals)} values but the teacher takes {in_chans} channels")


def resample_tokens(patches: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    """Resample patch tokens from one grid to another with bilinear interpolation.

    Downsampling uses an antialiasing filter, so every source patch contributes.

    Args:
        patches: (N, h*w, D) tokens on the ``src = (h, w)`` grid, row-major.
        src: source grid (h, w).
        dst: target grid (h', w').

    Returns:
        (N, h'*w', D) tokens on the target grid.
    """
    if tuple(src) == tuple(dst):
        return patches
    n, length, d = patches.shape
    if length != src[0] * src[1]:
        raise ValueError(f"{length} tokens do not fill a {src[0]}x{src[1]} grid")
    x = patches.transpose(1, 2).reshape(n, d, src[0], src[1])
    antialias = dst[0] < src[0] or dst[1] < src[1]
    x = F.interpolate(x, size=dst, mode="bilinear", align_corners=False, antialias=antialias)
    return x.flatten(2).transpose(1, 2)


def resample_attention(attn: Tensor, src: tuple[int, int], dst: tuple[int, int]) -> Tensor:
    """Resample an (N, h*w) attention map to another grid and renormalise each row to sum to 1.

    Args:
        attn: (N, h*w) non-negative weights on the ``src`` grid.
        src: source grid (h, w).
        dst: target grid (h', w').

    Returns:
        (N, h'*w') non-negative weights summing to 1 per row.
    """
    if tuple(src) != tuple(dst):
        attn = resample_tokens(attn.unsqueeze(-1), src, dst).squeeze(-1)
    attn = attn.clamp_min(0)
    return attn / attn.sum(dim=1, keepdim=True).clamp_min(1e-12)


def infer_grid(num_tokens: int, image_size: tuple[int, int]) -> tuple[int, int]:
    """Guess the (h, w) grid of ``num_tokens`` patches for an image of ``image_size`` (H, W)."""
    height, width = image_size
    h = max(1, round(math.sqrt(num_tokens * height / width)))
    for cand in (h, h - 1, h + 1):
        if cand > 0 and num_tokens % cand == 0:
            return (cand, num_tokens // cand)
    raise ValueError(f"cannot arrange {num_tokens} tokens on a grid for a {height}x{width} image; pass grid=")


def _apply_norm(norm: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    """Apply a (possibly low-precision) norm module to float32 ``t`` and return float32."""
    params = list(norm.parameters()) if isinstance(norm, nn.Module) else []
    dtype = params[0].dtype if params else t.dtype
    return norm(t.to(dtype)).float()


def cls_attention_row(
    x: Tensor,
    q_weight: Tensor,
    q_bias: Tensor | None,
    k_weight: Tensor,
    k_bias: Tensor | None,
    num_heads: int,
    scale: float,
    q_norm: Callable[[Tensor], Tensor] | None = None,
    k_norm: Callable[[Tensor], Tensor] | None = None,
    cls_index: int = 0,
) -> Tensor:
    """Attention of one query token (the CLS token) to all tokens, mean over heads.

    Only the query row is computed: ``softmax(q_cls · K^T * scale)`` per head, then the head mean.

    Args:
        x: (N, T, D) normalised input of the attention layer (after the block's pre-attention norm).
        q_weight: (H*hd, D) query projection weight; ``q_bias`` its (H*hd,) bias or ``None``.
        k_weight: (H*hd, D) key projection weight; ``k_bias`` its (H*hd,) bias or ``None``.
        num_heads: number of heads H.
        scale: logit scale (usually ``hd ** -0.5``).
        q_norm: optional per-head norm applied to queries of shape (N, H, 1, hd).
        k_norm: optional per-head norm applied to keys of shape (N, H, T, hd).
        cls_index: position of the query token.

    Returns:
        (N, T) float32 attention weights over all T keys, each row summing to 1.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):  # exact float32 even under autocast
        x = x.float()
        n, t, _ = x.shape
        q_b = None if q_bias is None else q_bias.float()
        k_b = None if k_bias is None else k_bias.float()
        q = F.linear(x[:, cls_index : cls_index + 1], q_weight.float(), q_b)
        k = F.linear(x, k_weight.float(), k_b)
        q = q.reshape(n, 1, num_heads, -1).transpose(1, 2)  # (N, H, 1, hd)
        k = k.reshape(n, t, num_heads, -1).transpose(1, 2)  # (N, H, T, hd)
        if q_norm is not None:
            q = _apply_norm(q_norm, q)
        if k_norm is not None:
            k = _apply_norm(k_norm, k)
        logits = (q * scale) @ k.transpose(-2, -1)  # (N, H, 1, T)
        return logits.softmax(dim=-1).mean(dim=1).squeeze(1)


class InputCapture:
    """Stores the first positional (or ``hidden_states``) input of a module during one forward."""

    def __init__(self) -> None:
        self.value: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args:
            self.value = args[0]
        else:
            self.value = next((v for v in kwargs.values() if isinstance(v, Tensor)), None)


@contextmanager
def capture_input(module: nn.Module, enabled: bool = True) -> Iterator[InputCapture]:
    """Context manager that records ``module``'s input during the forward run inside it."""
    store = InputCapture()
    if not enabled:
        yield store
        return
    handle = module.register_forward_pre_hook(store, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


def looks_like_path(name: str) -> bool:
    """True for strings that are clearly file-system paths rather than hub ids like ``org/name``."""
    p = Path(name).expanduser()
    return (
        p.is_absolute()
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or p.suffix in {".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz"}
    )


class Teacher(nn.Module):
    """Base class of frozen feature teachers.

    Subclasses build their model, call ``super().__init__(...)`` first, set their modules, then call
    :meth:`freeze` at the end of their constructor and implement :meth:`extract`.

    Args:
        embed_dim: width D of the returned tokens.
        image_size: input size (H, W) the teacher runs at.
        mean: the teacher's own per-channel input mean (e.g. CLIP's), ``in_chans`` values.
        std: the teacher's own per-channel input std.
        in_chans: number of input channels the teacher takes.
        name: short description of the model and its source, for :meth:`describe`.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        embed_dim: int,
        image_size: int | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        in_chans: int = 3,
        name: str = "",
    ) -> None:
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.image_size = to_hw(image_size)
        self.in_chans = int(in_chans)
        self.name = name or type(self).__name__
        self.native_grid: tuple[int, int] | None = None
        """The teacher's own patch grid (h, w) if known; updated after every forward."""
        mean_t = torch.tensor(adapt_stats(mean, self.in_chans, "mean"), dtype=torch.float32)
        std_t = torch.tensor(adapt_stats(std, self.in_chans, "std"), dtype=torch.float32)
        if bool((std_t <= 0).any()):
            raise ValueError(f"teacher std must be positive, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    # -- frozen ---------------------------------------------------------------------------------
    def freeze(self) -> None:
        """Stop gradients to every parameter and switch to eval mode (for good: see :meth:`train`)."""
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        """A teacher always stays in eval mode (dropout off, norm statistics fixed), whatever ``mode``."""
        return super().train(False)

    # -- preprocessing ----------------------------------------------------------------------------
    def preprocess(self, images: Tensor) -> Tensor:
        """Adapt channels, resize to :attr:`image_size` and normalise with the teacher's mean/std.

        Args:
            images: (N, C, H, W) float images in [0, 1] (uint8 in [0, 255] is accepted too).

        Returns:
            (N, in_chans, *image_size) float32 normalised images.
        """
        if images.dim() != 4:
            raise ValueError(f"teacher expects images of shape (N, C, H, W), got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        c = x.shape[1]
        if c != self.in_chans:
            if c == 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            elif self.in_chans == 1:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise ValueError(f"{self.name} takes {self.in_chans}-channel images, got {c} channels")
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0.0, 1.0)
        mean = self.mean.to(x.device).view(1, -1, 1, 1)
        std = self.std.to(x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, images: Tensor, grid: tuple[int, int] | None, need_attn: bool = False) -> TeacherOutput:
        """Compute feature targets (and the CLS attention) for a batch.

        Args:
            images: (N, C, H, W) un-normalised images in [0, 1]; C = 1 or 3.
            grid: the student's patch grid (h, w); ``None`` keeps the teacher's own grid.
            need_attn: also return the CLS attention map (from the same forward pass).

        Returns:
            :class:`TeacherOutput` with tokens (N, 1 + h*w, D) and cls_attn (N, h*w) or ``None``.
        """
        with torch.no_grad():
            x = self.preprocess(images)
            if x.is_cuda:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    tokens, attn, own_grid = self.extract(x, need_attn)
            else:
                tokens, attn, own_grid = self.extract(x, need_attn)
            own_grid = (int(own_grid[0]), int(own_grid[1]))
            self.native_grid = own_grid
            tokens = tokens.float()
            if tokens.dim() != 3 or tokens.shape[1] != 1 + own_grid[0] * own_grid[1]:
                raise RuntimeError(
                    f"{self.name}: extract() returned tokens of shape {tuple(tokens.shape)}, expected "
                    f"(N, 1 + {own_grid[0]}*{own_grid[1]}, D)"
                )
            dst = own_grid if grid is None else (int(grid[0]), int(grid[1]))
            patches = resample_tokens(tokens[:, 1:], own_grid, dst)
            tokens = torch.cat([tokens[:, :1], patches], dim=1)
            cls_attn = None
            if need_attn and attn is not None:
                cls_attn = resample_attention(attn.float(), own_grid, dst)
        return TeacherOutput(tokens=tokens, cls_attn=cls_attn)

    def extract(self, x: Tensor, need_attn: bool) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        """Subclass hook: run the model on preprocessed images.

        Args:
            x: (N, in_chans, *image_size) normalised images.
            need_attn: whether the CLS attention is wanted.

        Returns:
            tokens (N, 1 + h*w, D) with the global token first, the CLS attention (N, h*w) over the patch
            tokens (or ``None``), and the teacher's own grid (h, w).
        """
        raise NotImplementedError

    def describe(self) -> str:
        """One line for logs: model/source, width D, grid and input size."""
        grid = f"{self.native_grid[0]}x{self.native_grid[1]}" if self.native_grid else "?"
        size = f"{self.image_size[0]}x{self.image_size[1]}"
        return f"{self.name}: D={self.embed_dim}, grid {grid} at {size}, in_chans={self.in_chans}"

    def extra_repr(self) -> str:
        return self.describe()


# ------------------------------------------------------------------ conflicting teacher keys
_NO = ("false", "0", "no")

INPUT_NORMS = ("own", "data")
"""Values of ``teacher.input_norm``: the teacher's own statistics, or the student's ``data.mean/std``."""


def _recorded_architecture(path: str) -> str | None:
    """The timm architecture a semmim run directory or export records (None: not one, or not readable yet)."""
    from semmim.export import read_metadata

    p = Path(path).expanduser()
    if not (p.is_dir() or (p.is_file() and p.suffix == ".safetensors")):
        return None
    try:
        return read_metadata(p).get("timm_model")
    except (OSError, ValueError):  # a run without its export yet: the factory reports it when it loads
        return None


def check_teacher_config(tcfg: Any) -> None:
    """Reject teacher keys that name two different teachers or two weight sources, before any work.

    ``tcfg`` is a config's ``teacher`` node (``name``, ``model``, ``pretrained``, ``path``). A key set in a
    base config (``configs/demo/milan.yaml`` sets ``teacher.path``) survives overrides on top of it, so a
    combination that the factories would resolve silently by ignoring one key is an error here:

    * ``timm``: ``pretrained`` (hub weights, a tag, a file, or ``false`` for random weights) together with
      ``path`` (weights to load): two answers to "which weights"; ``model`` together with a ``path`` that is a
      semmim run directory or export recording another architecture. ``model`` with a plain weights file
      (or an export of that same architecture) is fine: the file holds the weights of ``model``.
    * ``open_clip``: ``pretrained`` together with ``path`` (``path`` is a checkpoint for ``model``, which is fine).
    * ``hf_clip``: ``model`` and ``path`` naming different checkpoints (``pretrained=false`` with either is
      fine: random weights in that checkpoint's architecture).
    * any teacher: ``input_norm=data`` (normalise with ``data.mean/std``) together with ``mean``/``std`` (the
      teacher's own statistics), and an ``input_norm`` other than ``own`` or ``data``.
    * ``tokens`` (which tokens a CLIP teacher gives) for a teacher that is not open_clip or hf_clip.

    Raises:
        ConfigError: the message names both keys and how to keep one.
    """
    from semmim.errors import ConfigError

    input_norm = getattr(tcfg, "input_norm", "own")
    if input_norm not in INPUT_NORMS:
        raise ConfigError(f"teacher.input_norm={input_norm!r} is not one of {', '.join(INPUT_NORMS)}")
    if input_norm == "data":
        given = [f"teacher.{k}={getattr(tcfg, k)}" for k in ("mean", "std") if getattr(tcfg, k, None) is not None]
        if given:
            raise ConfigError(
                f"teacher.input_norm=data (normalise with data.mean/std) and {' and '.join(given)} (the teacher's own "
                "statistics) conflict: keep one. To feed the teacher the student's input, unset "
                f"{' and '.join(g.split('=')[0] for g in given)} (set to null); to use these statistics, set "
                "teacher.input_norm=own"
            )
    name = getattr(tcfg, "name", None)
    tokens = getattr(tcfg, "tokens", None)
    if "tokens" in (getattr(tcfg, "kwargs", None) or {}):
        raise ConfigError(
            "teacher.kwargs.tokens: the choice of a CLIP teacher's tokens is teacher.tokens; move it there"
        )
    if tokens is not None:
        if tokens not in CLIP_TOKENS:
            raise ConfigError(f"teacher.tokens={tokens!r} is not one of {', '.join(CLIP_TOKENS)}")
        if name not in CLIP_TEACHERS:
            raise ConfigError(
                f"teacher.tokens={tokens} chooses among a CLIP teacher's tokens ({', '.join(CLIP_TEACHERS)}); teacher "
                f"{name!r} gives its own (a timm model its forward_features): remove teacher.tokens"
            )
    model, pretrained, path = (getattr(tcfg, k, None) for k in ("model", "pretrained", "path"))
    if path is None or name in (None, "none", "module"):
        return
    unset = "set it to null on the command line (e.g. teacher.path=null) or remove it from the config"
    if name in ("timm", "open_clip") and pretrained is not None:
        random = str(pretrained).strip().lower() in _NO
        asks = "random weights" if random else "its own weights"
        raise ConfigError(
            f"teacher.pretrained={pretrained} ({asks}) and teacher.path={path} (weights to load) conflict: keep one. "
            f"To {'train against a randomly initialised' if random else 'use the pretrained'} teacher, unset "
            f"teacher.path ({unset}); to load {path}, unset teacher.pretrained"
        )
    if name == "timm" and model is not None:
        recorded = _recorded_architecture(str(path))
        if recorded is not None and recorded != model:
            raise ConfigError(
                f"teacher.model={model} and teacher.path={path} conflict: {path} is a semmim run/export of timm "
                f"{recorded}, which records its own architecture. To use that teacher, unset teacher.model; to "
                f"build {model}, unset teacher.path ({unset})"
            )
    if name == "hf_clip" and model is not None and str(model) != str(path):
        raise ConfigError(
            f"teacher.model={model} and teacher.path={path} name two hf_clip checkpoints: keep one (unset the other: "
            f"{unset.replace('teacher.path', 'teacher.model')}, or unset teacher.path)"
        )
