"""Token targets: a frozen tokenizer's discrete code ids, predicted with cross-entropy (``method.loss=ce``).

* ``codebook``: a frozen teacher's patch tokens (the ``teacher`` section, as the ``teacher_features`` target),
  mapped to their nearest centroid of a codebook file built by ``semmim codebook`` (k-means over the teacher's
  tokens of a dataset). The file records the teacher it was built with; another teacher is refused.
* ``vq``: the codes of a pretrained VQ tokenizer: BEiT v2's VQ-KD (Peng et al. 2022, arXiv:2208.06366) from a
  checkpoint file or by name (downloaded once).

Both give ``TargetOutput(tokens=(N, L) int64 ids in [0, vocab_size))`` on the student's patch grid and have
``out_dim == vocab_size``, so the method's decoder predicts one logit per code.
"""

from __future__ import annotations

import json

import torch
from torch import Tensor, nn

from semmim.registry import TARGETS
from semmim.targets.base import TargetOutput
from semmim.teachers.base import Teacher
from semmim.tokenizers.codebook import Codebook, describe_teacher, teacher_fingerprint
from semmim.tokenizers.vqkd import VQKD_URLS, VQKDTokenizer, download_checkpoint, read_checkpoint


def _grid(img_size: int, patch_size: int) -> tuple[int, int]:
    return (img_size // patch_size, img_size // patch_size)


def _teacher_label(record: dict[str, object]) -> str:
    config = record.get("config")
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if v not in (None, {}, [])}
    return f"{record.get('description', '?')} (teacher config {json.dumps(config, sort_keys=True)})"


@TARGETS.register("codebook")
class CodebookTarget(nn.Module):
    """A frozen teacher's patch tokens as ids of their nearest codebook centroids (k-means codes).

    Args:
        teacher: a :class:`semmim.teachers.Teacher` (frozen; built from the ``teacher`` section).
        path: the codebook file (``semmim codebook --config <this config>`` writes it). Its metric (cosine | l2),
            conditioning (none | ln) and grid come from the file; its teacher must be this run's teacher (same
            weights, input size and mean/std).
        patch_size: the student's patch size (from ``model.patch_size``).
        img_size: the student's input size (from ``model.img_size``).
    """

    kind = "tokens"
    centroids: Tensor

    def __init__(self, teacher: Teacher, path: str, patch_size: int = 16, img_size: int = 224) -> None:
        super().__init__()
        self.check_args(path)
        try:
            codebook = Codebook.load(path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"method.target.path={path}: no codebook file there; build it with `semmim codebook --config <this "
                "config>` (same teacher, data and model sections)"
            ) from None
        grid = _grid(img_size, patch_size)
        if codebook.grid != grid:
            raise ValueError(
                f"path={path} was built on a {codebook.grid[0]}x{codebook.grid[1]} patch grid, but this student's "
                f"grid is {grid[0]}x{grid[1]} (model.img_size / model.patch_size): rebuild the codebook with this "
                "model section"
            )
        if int(teacher.embed_dim) != codebook.dim:
            raise ValueError(
                f"path={path} holds {codebook.dim}-d centroids but the teacher gives {teacher.embed_dim}-d tokens: "
                f"it was built with {_teacher_label(codebook.teacher)}"
            )
        if teacher_fingerprint(teacher) != codebook.teacher_sha256:
            raise ValueError(
                f"path={path} was built with another teacher: {_teacher_label(codebook.teacher)}; this run's teacher "
                f"is {describe_teacher(teacher)} (different weights, input size or mean/std). Set teacher.* to the "
                "codebook's teacher, or rebuild the codebook with `semmim codebook` for this teacher"
            )
        self.teacher = teacher
        self.codebook = codebook
        self.path = str(path)
        self.register_buffer("centroids", codebook.centroids.clone(), persistent=False)

    @staticmethod
    def check_args(path: str = "") -> None:
        """Check the keys before the teacher is built (config validation calls this)."""
        if not str(path).strip():
            raise ValueError("path must name a codebook file (semmim codebook writes one)")

    @property
    def vocab_size(self) -> int:
        return self.codebook.size

    @property
    def out_dim(self) -> int:
        """One logit per code."""
        return self.codebook.size

    @torch.no_grad()
    def forward(self, images: Tensor, grid: tuple[int, int], need_attn: bool = False) -> TargetOutput:
        """(N, C, H, W) images in [0, 1] -> ids (N, L) int64 on ``grid`` (+ the teacher's CLS attention (N, L))."""
        if tuple(grid) != self.codebook.grid:
            raise ValueError(f"the codebook was built on a {self.codebook.grid} grid, the method asks for {grid}")
        out = self.teacher(images, grid, need_attn=need_attn)
        ids = self.codebook.encode(out.tokens[:, 1:], self.centroids)
        return TargetOutput(tokens=ids, global_token=False, cls_attn=out.cls_attn)

    def extra_repr(self) -> str:
        cb = self.codebook
        return f"path={self.path}, size={cb.size}, metric={cb.metric}, norm={cb.norm}, grid={cb.grid}"


@TARGETS.register("vq")
class VQTarget(nn.Module):
    """The code ids of a pretrained VQ tokenizer (BEiT v2's VQ-KD), frozen.

    Args:
        tokenizer: a released tokenizer, downloaded once into torch hub's cache: one of
            vqkd_encoder_base_decoder_3x768x12_clip (BEiT v2's), vqkd_encoder_base_decoder_1x768x12_clip,
            vqkd_encoder_base_decoder_1x768x12_dino. Give this or path.
        path: a VQ-KD checkpoint file (.pth as released, or .safetensors) in the BEiT v2 key layout.
        image_size: the tokenizer's input size; None = the student's grid times the tokenizer's patch size (224
            for a 14x14 grid), so its token grid is the student's; images are resized to it.
        num_heads: attention heads of the tokenizer's encoder; None = its width / 64 (12 for ViT-B).
        patch_size: the student's patch size (from ``model.patch_size``).
        img_size: the student's input size (from ``model.img_size``).
    """

    kind = "tokens"

    def __init__(
        self,
        tokenizer: str | None = None,
        path: str | None = None,
        image_size: int | None = None,
        num_heads: int | None = None,
        patch_size: int = 16,
        img_size: int = 224,
    ) -> None:
        super().__init__()
        self.check_args(tokenizer, path, image_size, num_heads)
        file = download_checkpoint(tokenizer) if tokenizer is not None else path
        assert file is not None
        state = read_checkpoint(file)
        grid = _grid(img_size, patch_size)
        proj = state.get("encoder.patch_embed.proj.weight")
        size = image_size if image_size is not None or proj is None else grid[0] * int(proj.shape[-1])
        self.tokenizer = VQKDTokenizer(state, num_heads=num_heads, image_size=size)
        if self.tokenizer.grid != grid:
            raise ValueError(
                f"image_size={size} gives a {self.tokenizer.grid[0]}x{self.tokenizer.grid[1]} grid of codes, but the "
                f"student's grid is {grid[0]}x{grid[1]}: leave image_size unset (it then follows the student) or set "
                f"it to {grid[0] * self.tokenizer.patch_size}"
            )
        self.source = str(tokenizer or path)

    @staticmethod
    def check_args(
        tokenizer: str | None = None,
        path: str | None = None,
        image_size: int | None = None,
        num_heads: int | None = None,
    ) -> None:
        """Check the keys before anything is loaded (config validation calls this)."""
        if (tokenizer is None) == (path is None):
            raise ValueError(
                "give the VQ tokenizer once: tokenizer (a released one: "
                f"{', '.join(VQKD_URLS)}) or path (a checkpoint file)"
                + (f", not both (tokenizer={tokenizer!r}, path={path!r})" if tokenizer is not None else "")
            )
        if tokenizer is not None and tokenizer not in VQKD_URLS:
            raise ValueError(f"tokenizer={tokenizer!r} is not a released VQ tokenizer; known: {', '.join(VQKD_URLS)}")
        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if num_heads is not None and num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def out_dim(self) -> int:
        """One logit per code."""
        return self.tokenizer.vocab_size

    @torch.no_grad()
    def forward(self, images: Tensor, grid: tuple[int, int], need_attn: bool = False) -> TargetOutput:
        """(N, C, H, W) images in [0, 1] -> ids (N, L) int64 on the student's ``grid``."""
        if tuple(grid) != self.tokenizer.grid:
            raise ValueError(f"the VQ tokenizer gives a {self.tokenizer.grid} grid, the method asks for {grid}")
        return TargetOutput(tokens=self.tokenizer(images), global_token=False)

    def extra_repr(self) -> str:
        tk = self.tokenizer
        return f"{self.source}, vocab={self.vocab_size}, grid={tk.grid}, image_size={tk.image_size}"
