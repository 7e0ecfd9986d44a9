"""Conditioning of teacher-feature targets: what the student is asked to reconstruct.

A teacher's tokens often share a large common component: post-ReLU CNN features are non-negative,
so every token points roughly the same way (cos ≈ 0.5 to the mean token for an ImageNet CNN on
Fashion-MNIST). A cosine or L2 loss on such targets is mostly satisfied by predicting the average
token, and the student learns little of what makes the teacher good. Conditioning removes the
shared part before the loss sees the targets:

=============  ==========================================================================================
``none``       the teacher's tokens as they are (MILAN with a CLIP teacher)
``ln``         LayerNorm per token, no affine (MaskDistill, BEiT v2): per-token mean and scale removed
``center``     minus a running per-channel mean over tokens and images, as DINO centres its teacher
               (Caron et al. 2021, arXiv:2104.14294; momentum 0.9)
``center_ln``  ``center`` then ``ln``
``whiten``     ``center`` then divided by a running per-channel standard deviation
``pca``        ``center``, projected on the top ``pca_dim`` principal directions of the tokens (fitted
               on the first ``pca_fit_steps`` batches, then fixed), then ``ln``
=============  ==========================================================================================

Running statistics are buffers of the target (saved in checkpoints, so a resume is exact) and are
averaged over the ranks of a distributed run with an ``all_reduce`` (no host sync).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

TARGET_NORMS = ("none", "ln", "center", "center_ln", "whiten", "pca")


def _global_mean(x: Tensor) -> Tensor:
    """Mean over the rows of ``x`` (..., D) on this rank, averaged over ranks when distributed."""
    m = x.reshape(-1, x.shape[-1]).mean(dim=0)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        m = m.clone()
        dist.all_reduce(m)
        m /= dist.get_world_size()
    return m


class TargetConditioner(nn.Module):
    """Condition (N, T, D) teacher tokens; see the module docstring for the modes.

    Args:
        mode: one of :data:`TARGET_NORMS`.
        dim: the teacher's width D.
        pca_dim: output width of ``pca``.
        momentum: EMA momentum of the running mean and variance.
        pca_fit_steps: batches whose covariance fits the ``pca`` basis (then frozen).
        eps: numerical floor of the variance.

    Examples:
        >>> c = TargetConditioner("center", dim=4)
        >>> t = torch.randn(8, 5, 4) + 3.0
        >>> out = c(t)
        >>> bool(out.mean(dim=(0, 1)).abs().max() < 1e-5)   # the first batch is centred exactly
        True
    """

    count: Tensor
    center: Tensor
    var: Tensor
    cov: Tensor
    basis: Tensor

    def __init__(
        self,
        mode: str,
        dim: int,
        pca_dim: int | None = None,
        momentum: float = 0.9,
        pca_fit_steps: int = 20,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if mode not in TARGET_NORMS:
            raise ValueError(f"target conditioning must be one of {', '.join(TARGET_NORMS)}, got {mode!r}")
        if mode == "pca" and (pca_dim is None or not 1 <= pca_dim <= dim):
            raise ValueError(f"pca conditioning needs 1 <= pca_dim <= {dim} (the teacher width), got {pca_dim}")
        self.mode = mode
        self.dim = int(dim)
        self.pca_dim = int(pca_dim) if mode == "pca" and pca_dim is not None else None
        self.momentum = float(momentum)
        self.pca_fit_steps = int(pca_fit_steps)
        self.eps = float(eps)
        running = mode in ("center", "center_ln", "whiten", "pca")
        self.register_buffer("count", torch.zeros((), dtype=torch.long), persistent=running)
        self.register_buffer("center", torch.zeros(dim), persistent=running)
        self.register_buffer("var", torch.ones(dim), persistent=mode == "whiten")
        pca = mode == "pca"
        self.register_buffer("cov", torch.zeros(dim, dim) if pca else torch.zeros(0), persistent=pca)
        out = self.pca_dim or 0
        self.register_buffer("basis", torch.zeros(dim, out), persistent=mode == "pca")
        self._seen = 0  # training batches seen, on the host (the pca fit decides on it without a device sync)

    @property
    def out_dim(self) -> int:
        """Width of the conditioned targets."""
        return self.pca_dim if self.pca_dim is not None else self.dim

    def _ema(self, buf: Tensor, value: Tensor, first: Tensor) -> None:
        # the first batch sets the statistic, later ones move it by (1 - momentum): no branch on the host
        w = first.float() * self.momentum + (1.0 - self.momentum)
        buf.mul_(1 - w).add_(w * value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._seen = int(self.count)  # a resumed run goes on fitting (pca) where it stopped

    @torch.no_grad()
    def forward(self, tokens: Tensor) -> Tensor:
        """(N, T, D) float tokens -> (N, T, out_dim) conditioned tokens."""
        if tokens.shape[-1] != self.dim:
            raise ValueError(f"target conditioning expects width {self.dim}, got tokens {tuple(tokens.shape)}")
        t = tokens.float()
        if self.mode == "none":
            return t
        if self.mode == "ln":
            return F.layer_norm(t, (self.dim,), eps=self.eps)
        first = self.count == 0
        if self.training:
            self._ema(self.center, _global_mean(t), first)
        c = t - self.center
        if self.training:
            self.count += 1
            self._seen += 1
        if self.mode == "center":
            return c
        if self.mode == "center_ln":
            return F.layer_norm(c, (self.dim,), eps=self.eps)
        if self.mode == "whiten":
            if self.training:
                self._ema(self.var, _global_mean(c * c), first)
            return c / (self.var + self.eps).sqrt()
        # pca: fit the basis on the first batches' covariance, then keep it
        if self.training and self._seen <= self.pca_fit_steps:
            flat = c.reshape(-1, self.dim)
            cov = flat.T @ flat / flat.shape[0]
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(cov)
                cov /= dist.get_world_size()
            n = float(self._seen)
            self.cov.mul_((n - 1) / n).add_(cov / n)  # the mean over the fitting batches
            _, vecs = torch.linalg.eigh(self.cov.double())
            basis = vecs[:, -self.out_dim :].flip(-1).float()
            # a fixed sign per direction (largest entry positive), so refits do not flip targets
            sign = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
            self.basis.copy_(basis * sign)
        return F.layer_norm(c @ self.basis, (self.out_dim,), eps=self.eps)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, dim={self.dim}" + (f", pca_dim={self.pca_dim}" if self.pca_dim else "")
