"""A codebook over a frozen teacher's patch features, and its file.

A codebook turns a teacher's patch tokens into discrete ids: each token, conditioned (``none`` or ``ln``: the
stateless conditionings of :mod:`semmim.targets.conditioning`), goes to its nearest centroid under the
codebook's metric (``cosine`` or ``l2``). ``semmim codebook`` builds one with k-means
(:mod:`semmim.tokenizers.build`); the ``codebook`` target (:class:`semmim.targets.CodebookTarget`) reads it.

The file is a safetensors file with one tensor, ``centroids`` (K, D) float32, and string metadata:

==================  ============================================================================================
``format``          ``semmim-codebook``, ``version`` ``1``
``metric``          ``cosine`` | ``l2``
``norm``            conditioning of the teacher tokens before the assignment: ``none`` | ``ln``
``grid``            the student patch grid the teacher tokens were resampled to, ``HxW`` (``7x7``)
``teacher``         JSON: the ``teacher`` config section it was built with and the teacher's own description
``teacher_sha256``  :func:`teacher_fingerprint` of that teacher (weights, input size, mean/std): the identity
                    a run's teacher must match
``layer``           which teacher tokens: ``output`` (its final tokens, as the ``teacher_features`` target)
others              how it was built (k, iters, init, seed, tokens, images, data) and its code usage/perplexity
==================  ============================================================================================
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semmim.tokenizers.kmeans import METRICS, assign, prepare

CODEBOOK_FORMAT = "semmim-codebook"
CODEBOOK_VERSION = "1"
CODEBOOK_NORMS = ("none", "ln")
"""Conditionings a codebook can apply: stateless ones (running statistics would have to live in the file)."""


def condition(tokens: Tensor, norm: str) -> Tensor:
    """Condition (..., D) teacher tokens as float32: ``none`` as they are, ``ln`` LayerNorm without affine."""
    if norm not in CODEBOOK_NORMS:
        raise ValueError(f"codebook norm must be one of {', '.join(CODEBOOK_NORMS)}, got {norm!r}")
    t = tokens.float()
    return F.layer_norm(t, (t.shape[-1],), eps=1e-6) if norm == "ln" else t


def teacher_fingerprint(teacher: nn.Module) -> str:
    """SHA-256 (hex) of what decides a teacher's tokens: every state tensor (name, dtype, shape, bytes), its
    input size, channels and mean/std. Two teachers with the same fingerprint give the same tokens."""
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        data = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    for attr in ("image_size", "in_chans"):
        h.update(f"{attr}={getattr(teacher, attr, None)}|".encode())
    for attr in ("mean", "std"):
        value = getattr(teacher, attr, None)
        h.update(f"{attr}={value.tolist() if isinstance(value, Tensor) else value}|".encode())
    return h.hexdigest()


def describe_teacher(teacher: nn.Module) -> str:
    """The teacher's one-line description (its ``describe()``, else its class name)."""
    describe = getattr(teacher, "describe", None)
    return str(describe()) if callable(describe) else type(teacher).__name__


@dataclass
class Codebook:
    """Centroids and how teacher tokens are mapped onto them.

    Attributes:
        centroids: (K, D) float32 (unit norm for ``cosine``).
        metric: "cosine" or "l2".
        norm: conditioning of the teacher tokens: "none" or "ln".
        grid: (h, w) student patch grid the teacher tokens are resampled to.
        teacher: the teacher config section and description it was built with.
        teacher_sha256: :func:`teacher_fingerprint` of that teacher.
        info: how it was built and its usage statistics (strings).
    """

    centroids: Tensor
    metric: str
    norm: str
    grid: tuple[int, int]
    teacher: dict[str, Any]
    teacher_sha256: str
    info: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"codebook metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.norm not in CODEBOOK_NORMS:
            raise ValueError(f"codebook norm must be one of {', '.join(CODEBOOK_NORMS)}, got {self.norm!r}")
        if self.centroids.dim() != 2 or self.centroids.shape[0] < 1:
            raise ValueError(f"centroids must be (K, D) with K >= 1, got {tuple(self.centroids.shape)}")

    @property
    def size(self) -> int:
        """K, the vocabulary size."""
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        """D, the teacher width."""
        return int(self.centroids.shape[1])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the safetensors file (atomically: a temporary file, then renamed)."""
        from safetensors.torch import save_file

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            **self.info,
            "format": CODEBOOK_FORMAT,
            "version": CODEBOOK_VERSION,
            "metric": self.metric,
            "norm": self.norm,
            "grid": f"{self.grid[0]}x{self.grid[1]}",
            "layer": "output",
            "teacher": json.dumps(self.teacher, sort_keys=True),
            "teacher_sha256": self.teacher_sha256,
            "size": str(self.size),
            "dim": str(self.dim),
        }
        tmp = p.with_name(p.name + ".tmp")
        save_file({"centroids": self.centroids.float().contiguous()}, str(tmp), metadata=meta)
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Codebook:
        """Read a file written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a semmim codebook (names the file and what is wrong).
        """
        from safetensors import safe_open

        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"codebook file not found: {p}")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
                if "centroids" not in f.keys():  # noqa: SIM118 - safe_open has keys(), not __contains__
                    raise ValueError("it holds no 'centroids' tensor")
                centroids = f.get_tensor("centroids").float()
        except ValueError as e:
            raise ValueError(f"{p} is not a semmim codebook: {e}") from None
        except Exception as e:  # safetensors raises its own errors for files of another format
            raise ValueError(f"{p} is not a semmim codebook (not a safetensors file: {e})") from None
        if meta.get("format") != CODEBOOK_FORMAT:
            raise ValueError(f"{p} is not a semmim codebook (metadata format={meta.get('format')!r})")
        if meta.get("version") != CODEBOOK_VERSION:
            raise ValueError(f"{p}: codebook version {meta.get('version')!r}, this semmim reads {CODEBOOK_VERSION}")
        try:
            h, w = (int(v) for v in meta["grid"].split("x"))
            teacher = json.loads(meta["teacher"])
            known = ("format", "version", "metric", "norm", "grid", "layer", "teacher", "teacher_sha256")
            return cls(
                centroids=centroids,
                metric=meta["metric"],
                norm=meta["norm"],
                grid=(h, w),
                teacher=teacher,
                teacher_sha256=meta["teacher_sha256"],
                info={k: v for k, v in meta.items() if k not in known},
            )
        except (KeyError, ValueError) as e:
            raise ValueError(f"{p}: damaged codebook metadata ({type(e).__name__}: {e})") from None

    def prepare(self, tokens: Tensor) -> Tensor:
        """(..., D) teacher tokens -> conditioned float32 points in the codebook's space (unit norm for cosine)."""
        if tokens.shape[-1] != self.dim:
            raise ValueError(f"codebook of width {self.dim} got teacher tokens of width {tokens.shape[-1]}")
        return prepare(condition(tokens, self.norm).reshape(-1, self.dim), self.metric).view(*tokens.shape)

    def encode(self, tokens: Tensor, centroids: Tensor | None = None) -> Tensor:
        """(N, L, D) teacher patch tokens -> (N, L) int64 ids of their nearest centroids.

        ``centroids`` replaces :attr:`centroids` (the same values on another device).
        """
        c = self.centroids if centroids is None else centroids
        with torch.autocast(device_type=tokens.device.type, enabled=False):  # float32 distances: no bf16 ties
            points = self.prepare(tokens).reshape(-1, self.dim)
            ids, _ = assign(points, c.to(points.device, torch.float32))
        return ids.view(*tokens.shape[:-1])
