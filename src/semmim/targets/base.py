"""What every target returns: one output type, whatever it reconstructs."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class TargetOutput:
    """A target's tokens for a batch.

    Every target is called as ``target(images, grid, need_attn=False)`` with ``images`` (N, C, H, W) in
    [0, 1] and ``grid`` the student's patch grid, and returns this.

    Attributes:
        tokens: (N, T, D) float32 targets: T = L patch tokens on the grid (row-major), or 1 + L when
            ``global_token`` (token 0 is then a global token: a teacher's CLS). A token target (``kind ==
            "tokens"``) gives (N, L) int64 code ids instead, in [0, its ``vocab_size``).
        global_token: token 0 is a global token.
        cls_attn: (N, L) attention of the teacher's CLS token to each patch (semantic-aware masking), or
            None (pixel targets; not requested; no CLS attention).
    """

    tokens: Tensor
    global_token: bool = False
    cls_attn: Tensor | None = None

    @property
    def patches(self) -> Tensor:
        """(N, L, D) (or (N, L) ids): the patch tokens only."""
        return self.tokens[:, 1:] if self.global_token else self.tokens
