"""What every method shares: input normalisation, the frozen-teacher bookkeeping, building parts.

A method is an ``nn.Module`` whose ``forward(batch)`` returns ``{"loss": scalar, ...logs}``; the
engine knows nothing else, except for a method that declares ``grad_cache`` (a contrastive loss over the
batch), whose loss the engine computes over the whole effective batch (:class:`GradCachePass`).
``batch["image"]`` is (N, C, H, W) float in [0, 1]; each method
normalises on the device (the student with ``data.mean/std``, a teacher with its own statistics, or
with ``data.mean/std`` too under ``teacher.input_norm=data``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypedDict

import torch
from torch import Tensor, nn

from semmim.config import Config, ConfigError, MethodConfig, ModelConfig
from semmim.models.vit import ViTEncoder
from semmim.parts import SLOT_KEY, SLOT_REGISTRY, Lazy, build_part, factory_params
from semmim.registry import DECODERS, ENCODERS, LOSSES, MASKERS, TARGETS, TEACHERS


class MethodOutput(TypedDict, total=False):
    """What every method's ``forward(batch)`` returns (a dict, so ``torch.compile`` passes it through).

    Keys:
        loss: the scalar to minimise.
        pred: (N, T, D) predictions, detached (absent for methods that predict no tokens).
        target: (N, T, D) what ``pred`` is compared with, detached.
        mask: (N, L) bool, True = masked patch.
        logs: named scalars to log (``target_explained``, ``acc``, ...), detached.
        reps: a GradCache forward's representations (see :class:`GradCachePass`).
    """

    loss: Tensor
    pred: Tensor
    target: Tensor
    mask: Tensor
    logs: dict[str, Tensor]
    reps: dict[str, Tensor]


@dataclass
class GradCachePass:
    """What the engine hands a grad-cache method's ``forward(batch, grad_cache=...)`` (GradCache, Gao et al.
    2021, arXiv:2101.06983: a contrastive loss over a batch larger than one forward holds, exactly).

    With gradient accumulation, one optimizer step's micro-batches run twice, each under its own seed:

    1. no gradient, ``context`` None: the forward returns ``{"reps": method.embed-like dict}``;
    2. the engine joins all micro-batches' reps (rows concatenated, 0-dim shared entries taken once) into
       leaf tensors and calls :meth:`Method.batch_loss` on them (the effective batch; across ranks the method
       gathers with gradient as usual), which gives d loss / d rep and the ``context`` of pass 2;
    3. with gradient, same seed (same dropout, drop path, masks): the forward returns the same ``reps`` and,
       optionally, a per-micro-batch ``loss`` (and ``logs``) whose gradient flows as usual. The engine
       back-propagates the cached rep gradients plus that loss; local losses and their logs add up over the
       micro-batches, so a method normalises them over the effective batch (``context`` can say by what).

    Attributes:
        index: the micro-batch's position in the optimizer step.
        start: its first row in the effective (this rank's) batch.
        context: detached tensors from :meth:`Method.batch_loss`; None in pass 1.
    """

    index: int
    start: int
    context: dict[str, Tensor] | None = field(default=None)


def method_output(
    loss: Tensor,
    pred: Tensor | None = None,
    target: Tensor | None = None,
    mask: Tensor | None = None,
    **logs: Tensor,
) -> MethodOutput:
    """Build a :class:`MethodOutput`, leaving out what a method does not have."""
    out = MethodOutput(loss=loss, logs={k: v.detach() for k, v in logs.items()})
    if pred is not None:
        out["pred"] = pred.detach()
    if target is not None:
        out["target"] = target.detach()
    if mask is not None:
        out["mask"] = mask
    return out


def _refuse(method: str, slot: str, name: str, why: str, ok: list[str]) -> ConfigError:
    allowed = f"; allowed here: {', '.join(ok)}" if ok else ""
    return ConfigError(f"{SLOT_KEY[slot]}={name!r} cannot be used by method '{method}': {why}{allowed}")


def takes_teacher(target: Any) -> bool:
    """Whether a registered target (class or factory) is built with a ``teacher`` (from the ``teacher`` section)."""
    return "teacher" in factory_params(target)


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

    frozen_prefixes: tuple[str, ...] = ("target.teacher.", "target.tokenizer.")

    # ------------------------------------------------------------------ what the method declares
    Options: ClassVar[type[MethodConfig]] = MethodConfig
    """The dataclass of the ``method`` section for this method (its own keys on top of MethodConfig's)."""
    slots: ClassVar[tuple[str, ...]] = ()
    """The swappable parts it composes, among masker, decoder, target, loss."""
    encoder_kind: ClassVar[str] = "visible"
    """Its encoder: "visible" (MAE style, visible patches only: maskers must keep the same count per image,
    decoders take visible tokens), "mask_token" (BEiT style: any masker, per-token heads) or "full"."""
    target_kinds: ClassVar[tuple[str, ...]] = ()
    """Kinds of target it reconstructs (a target class's ``kind``: "pixels", "features" or "tokens": discrete code
    ids, predicted with a token loss such as ``ce``)."""
    masker_scores: ClassVar[bool] = False
    """It hands the target's CLS attention to the masker (so a masker with ``needs_scores`` works)."""
    multi_mask: ClassVar[bool] = False
    """It accepts ``method.num_masks`` > 1."""
    native_grid: ClassVar[bool] = False
    """It pools its predictions to a teacher's own grid (a feature target's ``grid=native``)."""
    needs_text: ClassVar[bool] = False
    """It reads the ``text`` section (a text tower)."""
    grad_cache: ClassVar[bool] = False
    """Its loss couples the samples of a batch (a contrastive loss): with ``optim.accumulate`` > 1 the engine
    computes it over the whole effective batch with GradCache (:class:`GradCachePass`), for which the method's
    ``forward`` takes ``grad_cache=GradCachePass(...)`` and it implements :meth:`batch_loss`."""
    data_keys: ClassVar[tuple[str, ...]] = ()
    """Keys of its ``method`` section that, left unset, are taken from the data by :meth:`data_context`
    (supmim: ``num_classes``); a resume that leaves them unset keeps the values the run recorded."""

    @classmethod
    def default_parts(cls, model: ModelConfig, nodes: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """The default node of each slot; ``nodes`` are the user's (unresolved) nodes, for defaults that
        depend on them (supmim's loss follows its target)."""
        return {}

    @classmethod
    def part_problem(cls, slot: str, part: Any, parts: Mapping[str, Any]) -> str | None:
        """Why the registered part class ``part`` cannot fill ``slot`` (None = it can).

        ``parts`` are the resolved nodes of the other slots. Capabilities are class attributes of the parts:
        a masker's ``uniform_count`` / ``needs_scores``, a decoder's ``input``, a target's ``kind``, a loss's
        ``kind`` (a part without the attribute gets the permissive default). A target that takes a ``teacher``
        gives the teacher's CLS attention; a token target pairs with a token loss (``kind == "tokens"``), every
        other target with a reconstruction loss.
        """
        target_node = parts.get("target")
        target = TARGETS.get(target_node["name"]) if target_node else None
        if slot == "masker":
            if cls.encoder_kind == "visible" and not getattr(part, "uniform_count", True):
                return "it hides a different number of patches per image, which a visible-only encoder cannot batch"
            gives_attention = cls.masker_scores and target is not None and takes_teacher(target)
            if getattr(part, "needs_scores", False) and not gives_attention:
                return "it needs a teacher's CLS attention, which this method does not give its masker"
        elif slot == "decoder":
            want = "tokens" if cls.encoder_kind == "mask_token" else "visible"
            have = getattr(part, "input", "visible")
            if have != want:
                return (
                    f"it takes {'every token (a per-token head)' if have == 'tokens' else 'the visible tokens only'}, "
                    f"but this method's encoder gives {'every token' if want == 'tokens' else 'visible tokens only'}"
                )
        elif slot == "target":
            kind = getattr(part, "kind", "features")
            if kind not in cls.target_kinds:
                return f"it is a {kind} target; this method reconstructs {' or '.join(cls.target_kinds)}"
        elif slot == "loss":
            kind = getattr(part, "kind", "reconstruction")
            tokens = target is not None and getattr(target, "kind", "features") == "tokens"
            named = f"{SLOT_KEY['target']}={target_node['name']!r}" if target_node else "the target"
            if kind == "tokens" and not tokens:
                return f"it is a cross-entropy over token ids, but {named} gives continuous values"
            if kind not in ("tokens", "reconstruction"):
                return f"it is a {kind} loss; this method needs a (pred, target, mask) reconstruction loss"
            if kind == "reconstruction" and tokens:
                return f"it regresses continuous values, but {named} gives discrete token ids"
        return None

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse parts this method cannot compose (called by config validation, before any work).

        Raises:
            ConfigError: names the node, why, and the registered parts that fit.
        """
        parts = {
            "masker": cfg.method.masker,
            "target": cfg.method.target,
            "loss": cfg.method.loss,
            "decoder": cfg.decoder,
        }
        for slot in sorted(cls.slots, key=("target", "loss", "decoder", "masker").index):  # what, then how
            node = parts[slot]
            registry = SLOT_REGISTRY[slot]
            why = cls.part_problem(slot, registry.get(node["name"]), parts)
            if why is not None:
                ok = [n for n in registry.names() if cls.part_problem(slot, registry.get(n), parts) is None]
                raise _refuse(cfg.method.name, slot, node["name"], why, ok)
        target = cfg.method.target
        if target is not None and target.get("grid", "student") != "student" and not cls.native_grid:
            raise ConfigError(
                f"method.target.grid={target['grid']!r}: method '{cfg.method.name}' compares masked patches on the "
                "student's grid (only milan pools its predictions to the teacher's grid): remove it"
            )
        if cfg.teacher.cache is not None:
            cls.check_teacher_cache(cfg)

    @classmethod
    def check_teacher_cache(cls, cfg: Config) -> None:
        """Refuse ``teacher.cache`` where the cached maps cannot stand for the teacher (before any work).

        Raises:
            ConfigError: the method or target does not read a cache, or the augmentation moves pixels in ways a
                crop box and a flip cannot describe (RandAugment), or the data has no stable index (webdataset).
        """
        where = f"teacher.cache={cfg.teacher.cache}"
        target = cfg.method.target
        if not cls.reads_teacher_cache:
            raise ConfigError(
                f"{where}: method '{cfg.method.name}' does not read a teacher cache (milan and maskdistill do)"
            )
        if target is None or target["name"] != "teacher_features":
            name = None if target is None else target["name"]
            raise ConfigError(f"{where}: only method.target=teacher_features reads a teacher cache, not {name!r}")
        if cfg.data.rand_augment:
            raise ConfigError(
                f"{where} and data.rand_augment={cfg.data.rand_augment}: RandAugment rotates, shears and translates "
                "the view, which the cached maps cannot follow (only a crop box and a flip): unset one"
            )
        if cfg.data.name == "webdataset":
            raise ConfigError(f"{where}: a cache is read by dataset index, which data.name=webdataset streams lack")

    @classmethod
    def uses_teacher(cls, cfg: Config) -> bool:
        """Whether the ``teacher`` section is read (its target takes a teacher: teacher features, a codebook)."""
        target = cfg.method.target
        return target is not None and takes_teacher(TARGETS.get(target["name"]))

    @classmethod
    def uses_text(cls, cfg: Config) -> bool:
        """Whether the ``text`` section is read."""
        return cls.needs_text

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

    reads_teacher_cache = False
    """Its forward takes its target through :meth:`teacher_targets`, which follows ``teacher.cache``."""

    def teacher_targets(self, batch: Mapping[str, Any], images: Tensor, need_attn: bool) -> Any:
        """The target's output for a batch: the teacher run on ``images`` (N, C, H, W), or with ``teacher.cache``
        cut from the cached maps to each item's crop box and flip (:mod:`semmim.teachers.cache`)."""
        target: Any = self.target
        if getattr(target, "cache", None) is not None:
            from semmim.teachers.cache import crop_batch_of

            return target(images, self.grid, need_attn=need_attn, geometry=crop_batch_of(batch))
        return target(images, self.grid, need_attn=need_attn)

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

    def forward(self, batch: Mapping[str, Any]) -> MethodOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def batch_loss(
        self, reps: dict[str, Tensor], batches: Sequence[Mapping[str, Any]]
    ) -> tuple[MethodOutput, dict[str, Tensor]]:  # pragma: no cover - abstract
        """A grad-cache method's loss over the effective batch (:class:`GradCachePass`).

        Args:
            reps: every micro-batch's reps joined (rows in micro-batch order; 0-dim entries shared), leaf
                tensors that require gradient. The loss may depend on parameters only through ``reps``.
            batches: the micro-batches themselves (for non-tensor data such as captions).

        Returns:
            (``{"loss", "logs"}`` of the effective batch, the detached ``context`` handed to pass 2).
        """
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg: Config, teacher: nn.Module | None = None, **context: Any) -> Method:  # pragma: no cover
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
    """The student encoder ``model.name`` from the ``model`` section; ``mask_token`` for BEiT-style methods."""
    m = cfg.model
    encoder_cls = ENCODERS.get(m.name)
    return encoder_cls(  # type: ignore[no-any-return]
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
        rel_pos_bias=m.rel_pos_bias,
        abs_pos=m.abs_pos,
    )


def build_masker(cfg: Config) -> Any:
    """The masker of ``method.masker``."""
    return build_part(MASKERS, cfg.method.masker, "method.masker")


def build_decoder(cfg: Config, encoder: ViTEncoder, out_dim: int) -> nn.Module:
    """The decoder of the ``decoder`` node, fed by ``encoder`` and predicting ``out_dim`` values per token."""
    return build_part(
        DECODERS,
        cfg.decoder,
        "decoder",
        grid_size=encoder.grid_size,
        encoder_dim=encoder.embed_dim,
        out_dim=out_dim,
    )


def build_loss(cfg: Config) -> nn.Module:
    """The loss of ``method.loss``."""
    return build_part(LOSSES, cfg.method.loss, "method.loss")


def build_target(cfg: Config, teacher: nn.Module | None = None) -> Any:
    """The target of ``method.target``; a teacher is built (from ``cfg.teacher`` or the one given) only if the
    target takes one."""
    return build_part(
        TARGETS,
        cfg.method.target,
        "method.target",
        patch_size=cfg.model.patch_size,
        img_size=cfg.model.img_size,
        in_chans=cfg.model.in_chans,
        mean=list(cfg.data.mean),
        std=list(cfg.data.std),
        teacher=Lazy(lambda: build_teacher(cfg, teacher)) if cfg.teacher.cache is None else None,
        teacher_cache=cfg.teacher.cache,
    )


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


def masked_token_accuracy(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """Top-1 accuracy of (N, L, V) ``logits`` against (N, L) token ``ids`` over the masked tokens (no host sync).

    Examples:
        >>> logits = torch.tensor([[[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]]])
        >>> float(masked_token_accuracy(logits, torch.tensor([[0, 1, 1]]), torch.tensor([[True, True, False]])))
        0.5
    """
    with torch.no_grad():
        hit = (logits.argmax(-1) == ids) & mask
        return hit.sum().float() / mask.sum().clamp_min(1).float()


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
            f"method.masker=semantic needs the teacher's CLS attention, but the teacher {what} gives none"
            f"{module_hint}: use method.masker=random"
        )


def build_teacher(cfg: Config, teacher: nn.Module | None = None) -> nn.Module:
    """The teacher passed from Python, or the one ``cfg.teacher`` describes."""
    from semmim.teachers.base import Teacher

    t = cfg.teacher
    if teacher is not None:
        if not isinstance(teacher, Teacher):
            raise TypeError(
                "a teacher passed from Python must be a semmim.teachers.Teacher; wrap a plain nn.Module "
                "with semmim.teachers.ModuleTeacher(module, embed_dim=..., image_size=..., mean=..., std=...)"
            )
        if t.input_norm == "data":
            raise ConfigError(
                "teacher.input_norm=data does not reach a teacher passed from Python, which normalises with the "
                f"statistics it was built with: build it with mean={list(cfg.data.mean)}, std={list(cfg.data.std)} "
                "(data.mean/std) and unset teacher.input_norm"
            )
        return teacher
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
    choice = {} if t.tokens is None else {"tokens": t.tokens}  # CLIP teachers only (checked with the config)
    try:
        return TEACHERS.build(
            t.name,
            model=t.model,
            pretrained=t.pretrained,
            path=t.path,
            image_size=t.image_size,
            mean=list(cfg.data.mean) if t.input_norm == "data" else t.mean,
            std=list(cfg.data.std) if t.input_norm == "data" else t.std,
            **choice,
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
