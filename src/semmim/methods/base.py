"""What every method shares: input normalisation, the frozen-teacher bookkeeping, building parts.

A method is an ``nn.Module`` whose ``forward(batch)`` returns ``{"loss": scalar, ...logs}``; the
engine knows nothing else. ``batch["image"]`` is (N, C, H, W) float in [0, 1]; each method
normalises on the device (the student with ``data.mean/std``, a teacher with its own statistics).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from semmim.config import Config, ConfigError
from semmim.models.vit import ViTEncoder
from semmim.registry import DECODERS, LOSSES, MASKERS, TEACHERS


def as_float01(images: Tensor) -> Tensor:
    """uint8 images (0..255) -> float in [0, 1] on their device; float images pass through."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


class Method(nn.Module):
    """Base class of all methods.

    Frozen teacher weights are not part of the method's ``state_dict`` (checkpoints stay small and
    a teacher is rebuilt from its source on resume); loading tolerates their absence.

    Args:
        encoder: the student encoder (what gets exported).
        mean, std: per-channel statistics the student's input is normalised with.
    """

    frozen_prefixes: tuple[str, ...] = ("target.teacher.",)
    default_masking = "random"
    default_loss = "mse"
    default_decoder = "mae"

    def __init__(self, encoder: ViTEncoder, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.encoder = encoder
        c = encoder.in_chans
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean/std need {c} values (one per input channel), got {len(mean)}/{len(std)}")
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, c, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, c, 1, 1), persistent=False)
        self._register_state_dict_hook(Method._drop_frozen)
        self.register_load_state_dict_post_hook(Method._ignore_missing_frozen)

    # -------------------------------------------------------------- state dict without teachers
    @staticmethod
    def _drop_frozen(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        assert isinstance(module, Method)
        for key in list(state):
            rel = key[len(prefix) :]
            if rel.startswith(module.frozen_prefixes):
                del state[key]

    @staticmethod
    def _ignore_missing_frozen(module: nn.Module, incompatible: Any) -> None:
        assert isinstance(module, Method)
        incompatible.missing_keys[:] = [
            k for k in incompatible.missing_keys if not any(p in k for p in module.frozen_prefixes)
        ]

    # -------------------------------------------------------------- helpers
    def normalize(self, images: Tensor) -> Tensor:
        """(N, C, H, W) in [0, 1] -> student input normalised with data.mean/std."""
        if images.dim() != 4 or images.shape[1] != self.encoder.in_chans:
            raise ValueError(f"expected images of shape (N, {self.encoder.in_chans}, H, W), got {tuple(images.shape)}")
        mean: Tensor = self.pixel_mean  # type: ignore[assignment]
        std: Tensor = self.pixel_std  # type: ignore[assignment]
        return (images - mean) / std

    @staticmethod
    def images_of(batch: Mapping[str, Any] | Tensor) -> Tensor:
        """The batch's images as floats in [0, 1] (uint8 batches, ``data.uint8=true``, are converted here)."""
        if isinstance(batch, Tensor):
            return as_float01(batch)
        if "image" not in batch:
            raise KeyError(f"a batch must hold 'image' (N, C, H, W); got keys {sorted(batch)}")
        return as_float01(batch["image"])

    @property
    def grid(self) -> tuple[int, int]:
        return self.encoder.grid_size

    num_masks: int = 1
    """Masked views per image (``method.num_masks``); methods that support it call :meth:`repeat_views`."""

    def repeat_views(self, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
        """Repeat each (N, ...) tensor ``num_masks`` times along the batch: (N * M, ...), image-major.

        One data load and one teacher pass then serve M masks per image (data2vec 2.0's multi-mask
        trick, Baevski et al. 2022, arXiv:2212.07525); the masker draws a different mask for every row.
        """
        m = self.num_masks
        return tuple(t if t is None or m == 1 else t.repeat_interleave(m, dim=0) for t in tensors)

    needs_labels = False
    """True for methods that train on labels (the engine then checks the dataset has classes)."""

    def export(self, out_dir: Path, extra: dict[str, str]) -> Path:
        """Write ``encoder.safetensors`` (timm-compatible) into ``out_dir``; methods may add files."""
        from semmim.export import ENCODER_FILE, save_encoder

        return save_encoder(
            out_dir / ENCODER_FILE,
            self.encoder.timm_state_dict(),
            self.encoder.timm_name,
            self.encoder.timm_kwargs(),
            extra=extra,
        )

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg: Config, teacher: nn.Module | None = None) -> Method:  # pragma: no cover
        raise NotImplementedError

    # -------------------------------------------------------------- what the method needs from the data
    # (the engine asks these; it never looks into the dataset for a method itself)
    needs_captions = False
    """True for methods that train on captions: the training data must give every sample one."""

    @classmethod
    def data_context(cls, cfg: Config, dataset: Any) -> dict[str, Any]:
        """Check that the training ``dataset`` gives what the method trains on; return its build context.

        Called by the engine once the training dataset is built and before the method is; the returned
        values go to :func:`semmim.methods.build_method` (``build_method(cfg, teacher, **context)``), which
        passes them to :meth:`from_config`. Values that set a ``method.*`` key left unset (e.g. supmim's
        ``num_classes``) are recorded in the run's saved config; the config passed in is never changed.

        Returns:
            ``{}`` here: a method that needs nothing from its data.

        Raises:
            ConfigError: the dataset lacks what the method needs (labels, captions).
        """
        return {}


# ------------------------------------------------------------------ builders shared by methods
def build_encoder(cfg: Config, mask_token: bool = False) -> ViTEncoder:
    m = cfg.model
    return ViTEncoder(
        img_size=m.img_size,
        patch_size=m.patch_size,
        in_chans=m.in_chans,
        embed_dim=m.embed_dim,
        depth=m.depth,
        num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio,
        qkv_bias=m.qkv_bias,
        drop_path=m.drop_path,
        layer_scale_init=m.layer_scale_init,
        mask_token=mask_token,
        timm_name=m.timm_name,
    )


def build_masker(cfg: Config, default: str, default_ratio: float = 0.75) -> Any:
    name = cfg.method.masking or default
    masker_cls = MASKERS.get(name)
    ratio = cfg.method.mask_ratio if cfg.method.mask_ratio is not None else default_ratio
    kwargs: dict[str, Any] = {"mask_ratio": ratio}
    if name == "block":
        kwargs.update(min_patches=cfg.method.block_min_patches, min_aspect=cfg.method.block_min_aspect)
    return masker_cls(**kwargs)


def build_decoder(cfg: Config, encoder: ViTEncoder, out_dim: int, default: str) -> nn.Module:
    d = cfg.decoder
    return DECODERS.build(
        d.name or default,
        grid_size=encoder.grid_size,
        encoder_dim=encoder.embed_dim,
        out_dim=out_dim,
        embed_dim=d.embed_dim,
        depth=d.depth,
        num_heads=d.num_heads,
        mlp_ratio=d.mlp_ratio,
    )


def build_loss(cfg: Config, default: str) -> nn.Module:
    name = cfg.method.loss or default
    if name == "smooth_l1":
        return LOSSES.build(name, beta=cfg.method.smooth_l1_beta)
    return LOSSES.build(name)


def build_feature_target(cfg: Config, teacher: nn.Module | None, default_norm: str) -> Any:
    """The teacher-feature target of ``cfg.teacher`` (conditioning ``target_norm``, ``pca_dim``, ``grid``)."""
    from semmim.targets.features import TeacherFeatureTarget

    t = cfg.teacher
    norm = t.target_norm
    if norm is None:
        norm = default_norm if t.ln_target is None else ("ln" if t.ln_target else "none")
    return TeacherFeatureTarget(build_teacher(cfg, teacher), norm=norm, pca_dim=t.pca_dim, grid=t.grid)  # type: ignore[arg-type]


def target_explained(loss_fn: Any, loss: Tensor, target: Tensor, mask: Tensor | None, global_token: bool) -> Tensor:
    """How much of the target the prediction explains beyond the average token: ``1 - loss / loss_mean``.

    ``loss_mean`` is the same loss for a prediction equal to the batch-mean target: the mean over images
    of the global token (when ``global_token``, token 0) and the mean over images and positions of the
    patch tokens. 0 = the student predicts only the average teacher token; 1 = perfect; no host sync.

    Args:
        loss_fn: the method's loss, ``(pred, target, mask) -> scalar``.
        loss: the loss of the actual prediction.
        target: (N, T, D) targets as given to ``loss_fn``.
        mask: the mask given to ``loss_fn``.
        global_token: token 0 of ``target`` is a global token.

    Examples:
        >>> from semmim.losses.reconstruction import CosineLoss
        >>> t = torch.randn(4, 5, 8)
        >>> fn = CosineLoss()
        >>> float(target_explained(fn, fn(t, t, None), t, None, True))
        1.0
    """
    with torch.no_grad():
        t = target.detach().float()
        if global_token and t.shape[1] > 1:
            glob = t[:, :1].mean(dim=0, keepdim=True)
            patch = t[:, 1:].mean(dim=(0, 1), keepdim=True).expand(-1, t.shape[1] - 1, -1)
            base = torch.cat([glob, patch], dim=1)
        else:
            base = t.mean(dim=(0, 1), keepdim=True).expand(-1, t.shape[1], -1)
        ref = loss_fn(base.expand_as(t).contiguous(), t, mask).float()
        return 1.0 - loss.detach().float() / ref.clamp_min(1e-12)


PYTHON_TEACHER = "module"
"""``teacher.name`` recorded for a run whose teacher was passed from Python (``pretrain(..., teacher=...)``)."""


def check_teacher_attention(method: nn.Module, device: torch.device | str = "cpu") -> None:
    """Before any step: a masker that needs the teacher's CLS attention gets it (one probe on 2 blank images).

    Raises:
        ConfigError: the teacher gives no CLS attention; the message names the teacher.
    """
    masker, target = getattr(method, "masker", None), getattr(method, "target", None)
    teacher = getattr(target, "teacher", None)
    if not getattr(masker, "needs_scores", False) or teacher is None:
        return
    encoder: Any = method.encoder
    where = next(iter(teacher.buffers()), None)  # the teacher's own device (the method may not be moved yet)
    probe = torch.zeros(
        2, encoder.in_chans, encoder.img_size, encoder.img_size, device=where.device if where is not None else device
    )
    with torch.no_grad():
        attn = teacher(probe, encoder.grid_size, need_attn=True).cls_attn
    if attn is None:
        what = teacher.describe() if hasattr(teacher, "describe") else type(teacher).__name__
        module_hint = (
            " (a module teacher gives it when its module returns a dict with 'cls_attn' (N, L))"
            if type(teacher).__name__ == "ModuleTeacher"
            else " (models without a CLS token, such as CNNs, have none)"
        )
        raise ConfigError(
            f"method.masking=semantic needs the teacher's CLS attention, but the teacher {what} gives none"
            f"{module_hint}: use method.masking=random"
        )


def build_teacher(cfg: Config, teacher: nn.Module | None = None) -> nn.Module:
    """The teacher passed from Python, or the one ``cfg.teacher`` describes."""
    from semmim.teachers.base import Teacher

    if teacher is not None:
        if not isinstance(teacher, Teacher):
            raise TypeError(
                "a teacher passed from Python must be a semmim.teachers.Teacher; wrap a plain nn.Module "
                "with semmim.teachers.ModuleTeacher(module, embed_dim=..., image_size=..., mean=..., std=...)"
            )
        return teacher
    t = cfg.teacher
    if not t.name or t.name == "none":
        raise ConfigError(
            f"method '{cfg.method.name}' needs a teacher: set teacher.name (one of {', '.join(TEACHERS.names())}) "
            "and teacher.model / teacher.pretrained / teacher.path"
        )
    if t.name == PYTHON_TEACHER:
        raise ConfigError(
            "teacher.name=module is a teacher passed from Python, which a config cannot rebuild: pass the same "
            "teacher=ModuleTeacher(...) to semmim.pretrain (also with resume=True) and to semmim.report.write_report "
            "(teachers={run_dir: teacher}); from the command line use a timm, open_clip or hf_clip teacher"
        )
    try:
        return TEACHERS.build(
            t.name,
            model=t.model,
            pretrained=t.pretrained,
            path=t.path,
            image_size=t.image_size,
            mean=t.mean,
            std=t.std,
            **dict(t.kwargs),
        )
    except FileNotFoundError as e:
        hint = ""
        if t.path and "runs/demo/teacher" in str(t.path):
            hint = " The demo configs use the teacher that `make demo` trains into runs/demo/teacher."
        raise FileNotFoundError(
            f"teacher '{t.name}': {e}. Point teacher.path (or teacher.pretrained) at an existing file or run "
            f"directory.{hint}"
        ) from None
