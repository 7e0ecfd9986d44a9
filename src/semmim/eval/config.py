"""Typed evaluation configs: one dataclass per protocol, loaded like a pretraining config.

Each protocol (``knn``, ``linear``, ``finetune``, ``lowshot``, ``seg``, ``classify``, ``zeroshot``) is a
flat dataclass whose keys are the protocol's options, with today's defaults and each key's help as its
attribute docstring. They share :class:`EvalDataConfig` (which dataset, how it is loaded) and, for the
protocols that train on a train split and score on a test split, :class:`SplitsConfig`.

:func:`load_eval_config` reads them on the same mechanism as :func:`semmim.config.load_config`: a YAML
file (a path or a shipped name, with ``base:`` files underneath), then ``key=value`` overrides, typed
against the dataclass (an unknown key or a wrong type is a one-line :class:`ConfigError` naming the key,
with a close match), then :func:`check_eval_config` refuses impossible values before any work.
``finetune`` and ``linear`` also have a ``recipe``: a paper's settings, merged under everything else
(:mod:`semmim.eval.recipes`).

Examples:
    >>> cfg = load_eval_config("knn", None, ["k=10", "pool=both"])
    >>> cfg.k, cfg.pool, cfg.data
    (10, 'both', 'fashion_mnist')
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf

from semmim.config import compose, deep_merge, field_docs
from semmim.errors import ConfigError
from semmim.eval.recipes import DEFAULT_RECIPE, RECIPE_KEY, check_recipe, recipe_overrides, recipe_raw
from semmim.parts import merge_checked

DEFAULT_DATA = "fashion_mnist"
"""The dataset an evaluation reads when ``data`` is not set."""

CLASSIFICATION_DATA = ("imagefolder", "fashion_mnist")
"""Labelled datasets named in the help (any registered labelled dataset works, e.g. ``synthetic``)."""
SEGMENTATION_DATA = ("ade20k", "fashion_mnist")
"""Datasets of the segmentation protocol (:func:`semmim.data.segmentation.build_seg_dataset`)."""

RAND_AUGMENT_OFF = ("", "none")
"""``rand_augment`` values meaning "no RandAugment" (besides ``null``)."""


# ------------------------------------------------------------------ the configs
@dataclass
class EvalDataConfig:
    """Which labelled dataset an evaluation reads and how it is loaded (shared by every protocol)."""

    data: str = DEFAULT_DATA
    """Dataset name (imagefolder | fashion_mnist | any registered labelled dataset)."""
    root: str | None = None
    """Dataset root (imagefolder: a folder holding train/ and val/); needs data."""
    batch_size: int = 256
    """Images per batch."""
    num_workers: int = 2
    """Data-loading worker processes."""
    device: str | None = None
    """cpu, cuda, cuda:1, ...; null = CUDA when available."""


@dataclass
class SplitsConfig(EvalDataConfig):
    """A protocol that learns on the train split and scores on the test split (``val/`` of an image folder)."""

    train_limit: int | None = None
    """Use the first N training images."""
    test_limit: int | None = None
    """Use the first N test images."""


@dataclass
class FrozenFeatures:
    """Frozen features, extracted once per encoder + dataset and cached."""

    mean: list[float] | None = None
    """Input normalisation mean; null = the one recorded in the export (else ImageNet's)."""
    std: list[float] | None = None
    """Input normalisation std; null = the one recorded in the export (else ImageNet's)."""
    cache_dir: str | None = None
    """Feature cache (null = ~/.cache/semmim/features; '' = off)."""


@dataclass
class KnnConfig(FrozenFeatures, SplitsConfig):
    """``knn``: weighted kNN top-1 on frozen features (DINO protocol)."""

    k: int = 20
    """Neighbours that vote."""
    temperature: float = 0.07
    """Vote weight exp(similarity / temperature)."""
    pool: str = "cls"
    """cls (CLS token) | mean (mean of patches) | both."""


@dataclass
class ProbeSchedule:
    """A linear probe's training (MAE protocol: BatchNorm + linear head, warmup + cosine)."""

    optimizer: str = "lars"
    """lars | sgd."""
    epochs: int = 90
    """Training epochs."""
    base_lr: float = 0.1
    """lr = base_lr x batch / 256."""
    weight_decay: float = 0.0
    """Weight decay."""
    warmup_epochs: int = 10
    """Linear warmup epochs."""


@dataclass
class LinearConfig(FrozenFeatures, ProbeSchedule, SplitsConfig):
    """``linear``: linear probe on frozen features (MAE protocol: BatchNorm + linear, LARS)."""

    pool: str = "cls"
    """cls | mean | both (one probe per pooling; CLS gives the headline numbers)."""
    augment: str = "none"
    """none (cached centre-crop features) | rrc_flip (random-resized crop + flip of every training image each
    epoch, the frozen encoder re-run on each batch: about `epochs` times the encoder cost of the cached probe)."""
    encoder_batch_size: int | None = None
    """Images per frozen-encoder forward pass (speed and memory only); null = min(batch_size, 256)."""
    seed: int = 0
    """Seed of the probe's initialisation, batch order and (rrc_flip) augmentation."""
    recipe: str = DEFAULT_RECIPE
    """Paper preset under every other setting: default (these defaults) | mae | milan."""


@dataclass
class FinetuneRecipe:
    """The fine-tuning recipe's regularisation (MAE / BEiT fine-tuning)."""

    min_lr: float = 1e-6
    """Floor of the cosine schedule."""
    layer_decay: float = 0.65
    """Layer-wise lr decay (0.65 for ViT-B)."""
    drop_path: float = 0.1
    """Stochastic-depth rate."""
    mixup: float = 0.8
    """timm Mixup alpha (0 = off)."""
    cutmix: float = 1.0
    """timm CutMix alpha (0 = off)."""
    label_smoothing: float = 0.1
    """Label smoothing of the loss (or of the mixup targets)."""
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm RandAugment spec ('none' or null = off)."""
    reprob: float = 0.0
    """Random-erasing probability per training image (timm RandomErasing after normalisation: pixel mode,
    one box of 2-33% of the image; 0 = off)."""
    global_pool: str = "avg"
    """avg (patch-token mean + fc_norm) | token (CLS token after norm)."""
    ema: bool = False
    """Also evaluate an EMA of the weights (timm ModelEmaV3)."""
    ema_decay: float = 0.9999
    """EMA decay per step."""
    clip_grad: float | None = None
    """Gradient-norm clipping threshold (null = off)."""
    max_steps: int | None = None
    """Stop after N optimiser steps (the schedule is compressed to fit; smoke tests)."""


@dataclass
class FinetuneConfig(FinetuneRecipe, SplitsConfig):
    """``finetune``: end-to-end fine-tuning (layer decay, drop path, mixup/cutmix, RandAugment)."""

    batch_size: int = 64
    """Images per step (capped at the training set size)."""
    epochs: int = 100
    """Training epochs."""
    base_lr: float = 5e-4
    """lr = base_lr x batch / 256."""
    weight_decay: float = 0.05
    """AdamW weight decay (not on biases, norms, tokens and position embedding)."""
    warmup_epochs: float = 5.0
    """Linear warmup epochs (clamped to epochs)."""
    seed: int = 0
    """Seed of the initialisation, data order, augmentation, random erasing, mixup and stochastic depth."""
    recipe: str = DEFAULT_RECIPE
    """Paper preset under every other setting: default (these defaults) | mae | milan | maskdistill."""


@dataclass
class LowshotConfig(FinetuneRecipe, FrozenFeatures, ProbeSchedule, SplitsConfig):
    """``lowshot``: linear probe or fine-tuning on class-balanced fractions of the labels, several seeds.

    ``epochs``, ``base_lr``, ``weight_decay``, ``warmup_epochs`` and ``batch_size`` apply to whichever
    ``mode`` runs; the recipe keys (``layer_decay``, ``mixup``, ...) only to ``mode: finetune``, and
    ``pool``, ``optimizer``, ``mean``, ``std``, ``cache_dir`` only to ``mode: linear``.
    """

    mode: str = "linear"
    """linear (probe on cached frozen features) | finetune (fine-tune per subset)."""
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])
    """Label fractions per class, each in (0, 1]."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """One subset and one run per seed."""
    pool: str = "cls"
    """cls | mean."""
    optimizer: str = "sgd"
    """lars | sgd (LARS barely moves a head trained on a few hundred samples)."""


@dataclass
class SegConfig(SplitsConfig):
    """``seg``: semantic segmentation, mIoU: a quick frozen-encoder protocol or the fine-tuned UperNet recipe.

    ``mode: frozen`` (the default, quick) trains a linear or UperNet head on a frozen encoder for a few
    epochs. ``mode: finetune`` is BEiT / MAE's ADE20K recipe (UperNet 160k, mmseg-free): the encoder is
    trained end to end with layer-wise lr decay, an auxiliary FCN head, the ADE20K augmentation, poly
    schedule and sliding-window inference; its defaults are the recipe's numbers (sources in the comments).
    A key of the other mode is an error (:data:`SEG_MODE_KEYS`).
    """

    # Sources of the finetune defaults. [mae]: mmseg configs/mae/upernet_mae-base_fp16_8x2_512x512_160k_ade20k.py
    # (MAE's ADE20K setting, He et al. 2021, arXiv:2111.06377, run with BEiT's code); [beit]: unilm
    # beit/semantic_segmentation/configs/beit/upernet/upernet_beit_base_12_512_slide_160k_ade20k_pt.py (Bao et al.
    # 2021, arXiv:2106.08254); [ade]: mmseg configs/_base_/datasets/ade20k.py; [160k]: mmseg schedule_160k.py.

    data: str = DEFAULT_DATA
    """fashion_mnist (derived pixel classes) | ade20k."""
    root: str | None = None
    """Dataset root (ade20k: the ADEChallengeData2016 folder); needs data."""
    batch_size: int = 16  # [mae], [beit]: 8 GPUs x 2 images
    """Images per step (at least 2: BatchNorm in the head)."""
    mode: str = "frozen"
    """frozen (quick: frozen encoder + head) | finetune (the fine-tuned UperNet 160k recipe)."""
    head: str = "linear"
    """(frozen) linear | upernet; mode=finetune always trains UperNet + the auxiliary FCN head."""
    epochs: int = 10
    """(frozen) Passes over the training split (with max_steps set, 0 = run max_steps steps)."""
    img_size: int | None = None
    """(frozen) Input size; null = the encoder's."""
    max_steps: int | None = None
    """(frozen) Stop training after N optimiser steps."""
    iters: int = 160000  # [160k], [mae], [beit]
    """(finetune) Training iterations (the 160k schedule)."""
    lr: float | None = None  # [mae]: 1e-4 ([beit] uses 7e-4 with relative position bias)
    """Peak lr; null = 1e-3 (frozen head) or 1e-4 (finetune, MAE's ADE20K setting)."""
    weight_decay: float = 0.05  # [mae], [beit]
    """AdamW weight decay (not on biases, norms, tokens)."""
    warmup_steps: int | None = None  # [mae], [beit]: warmup_iters=1500, linear from 1e-6 x lr
    """Linear warmup steps; null = 10% of the steps, at most 1500 (frozen) or 1500 (finetune)."""
    channels: int | None = None  # [mae], [beit]: UPerHead channels=768 for ViT-B (mmseg's base: 512)
    """UperNet width; null = 256 (frozen) or the encoder's width (finetune: 768 for ViT-B, as BEiT / MAE)."""
    layer_decay: float = 0.65  # [mae], [beit]: layer_decay_rate=0.65
    """(finetune) Layer-wise lr decay of the encoder."""
    drop_path: float = 0.1  # [mae], [beit]: drop_path_rate=0.1
    """(finetune) Stochastic-depth rate of the encoder (linear over the blocks)."""
    aux_weight: float = 0.4  # [mae], [beit]: FCNHead in_index=2, loss_weight=0.4
    """(finetune) Loss weight of the auxiliary FCN head on the third pyramid level (0 = no auxiliary head)."""
    aux_channels: int = 256  # [mae], [beit]: FCNHead channels=256, num_convs=1
    """(finetune) Width of the auxiliary FCN head."""
    poly_power: float = 1.0  # [mae], [beit]: policy=poly, power=1.0
    """(finetune) Power of the poly lr decay."""
    min_lr: float = 0.0  # [mae], [beit]
    """(finetune) lr at the end of the poly decay."""
    crop_size: int = 512  # [ade], [mae], [beit]
    """(finetune) Training crop and sliding window (the encoder is resized to it; a multiple of the patch size)."""
    scale: list[int] | None = None  # [ade]: (2048, 512) for crop 512 (mmseg: (2560, 640) for crop 640)
    """(finetune) Resize box [long, short] (keep ratio); null = [4 x crop_size, crop_size] ([2048, 512])."""
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # [ade]
    """(finetune) Training rescale: the box scale is multiplied by r ~ U(ratio_range)."""
    cat_max_ratio: float = 0.75  # [ade]
    """(finetune) Re-draw a crop (up to 10 times) while one class fills this fraction of it (1 = off)."""
    flip_prob: float = 0.5  # [ade]
    """(finetune) Probability of a horizontal flip."""
    photometric: bool = True  # [ade]: PhotoMetricDistortion with its defaults
    """(finetune) Photometric distortion (brightness, contrast, saturation, hue; mmseg's)."""
    slide_stride: int | None = None  # [mae], [beit]: slide 512 / stride 341 (640 / 426)
    """(finetune) Sliding-window stride at test time; null = crop_size * 2 // 3 (341 for 512)."""
    seed: int = 0
    """Seed of everything random."""
    mean: list[float] | None = None
    """Input normalisation mean; null = the one recorded in the export (else ImageNet's)."""
    std: list[float] | None = None
    """Input normalisation std; null = the one recorded in the export (else ImageNet's)."""


SEG_MODES = ("frozen", "finetune")
"""``seg`` modes: the quick frozen protocol and the fine-tuned UperNet recipe."""

SEG_MODE_KEYS: dict[str, tuple[str, ...]] = {
    "frozen": ("head", "epochs", "img_size", "max_steps"),
    "finetune": (
        "iters",
        "layer_decay",
        "drop_path",
        "aux_weight",
        "aux_channels",
        "poly_power",
        "min_lr",
        "crop_size",
        "scale",
        "ratio_range",
        "cat_max_ratio",
        "flip_prob",
        "photometric",
        "slide_stride",
    ),
}
"""``seg`` keys that only one mode reads; setting one under the other mode is a :class:`ConfigError`."""

_SEG_INSTEAD = {"epochs": "iters", "max_steps": "iters", "img_size": "crop_size", "iters": "epochs or max_steps"}

SEG_RECIPE_WARMUP = 1500
"""Warmup iterations of the fine-tuned recipe (BEiT / MAE: ``warmup_iters=1500``, linear from 1e-6 x lr)."""


def unused_keys(cfg: EvalDataConfig) -> frozenset[str]:
    """Keys of ``cfg`` that its run does not read (``seg``: the other mode's keys); left out of ``settings``."""
    if not isinstance(cfg, SegConfig):
        return frozenset()
    return frozenset(k for mode, keys in SEG_MODE_KEYS.items() if mode != cfg.mode for k in keys)


@dataclass
class SplitEvalConfig(EvalDataConfig):
    """A model scored on one split of a labelled dataset."""

    root: str | None = None
    """Dataset root (imagefolder: the evaluation folder); needs data."""
    split: str = "test"
    """Split to score on."""
    limit: int | None = None
    """Use the first N images."""


@dataclass
class ClassifyConfig(SplitEvalConfig):
    """``classify``: top-1/top-5 of an exported classifier (supmim's or finetune's classifier.safetensors)."""


@dataclass
class ZeroshotConfig(SplitEvalConfig):
    """``zeroshot``: zero-shot top-1 of a language-aligned run (clip, rils) with class prompts."""

    templates: list[str] | None = None
    """Prompt templates with {c} (or {}) where the class name goes; null = the built-in ones."""


EVAL_CONFIGS: dict[str, type[EvalDataConfig]] = {
    "knn": KnnConfig,
    "linear": LinearConfig,
    "finetune": FinetuneConfig,
    "lowshot": LowshotConfig,
    "seg": SegConfig,
    "classify": ClassifyConfig,
    "zeroshot": ZeroshotConfig,
}
"""Each protocol's config class."""

CHOICES: dict[str, tuple[str, ...]] = {
    "pool": ("cls", "mean", "both"),
    "optimizer": ("lars", "sgd"),
    "global_pool": ("avg", "token"),
    "augment": ("none", "rrc_flip"),
    "mode": ("linear", "finetune"),
    "head": ("linear", "upernet"),
}
"""Keys with a fixed set of values (``lowshot`` pools one of cls | mean)."""


def choices_of(cls: type, key: str) -> tuple[str, ...] | None:
    """The values ``key`` of config class ``cls`` may take, or None for a free value."""
    if key == "pool" and cls is LowshotConfig:
        return ("cls", "mean")
    if key == "mode" and cls is SegConfig:
        return SEG_MODES
    return CHOICES.get(key)


def data_choices(cls: type) -> tuple[str, ...]:
    """The datasets named in a protocol's ``--root needs --data`` message."""
    return SEGMENTATION_DATA if cls is SegConfig else CLASSIFICATION_DATA


# ------------------------------------------------------------------ checking
C = TypeVar("C", bound=EvalDataConfig)


def _close(value: str, allowed: Sequence[str] | Mapping[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(value, list(allowed), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _at_least(cfg: Any, key: str, low: float, strict: bool = False) -> None:
    value = getattr(cfg, key, None)
    if value is None or isinstance(value, bool):
        return
    if value < low or (strict and value == low):
        raise ConfigError(f"{key} must be {'>' if strict else '>='} {low:g}, got {value}")


def _in_range(cfg: Any, key: str, low: float, high: float, open_low: bool = False, open_high: bool = False) -> None:
    value = getattr(cfg, key, None)
    if value is None:
        return
    ok = (low < value if open_low else low <= value) and (value < high if open_high else value <= high)
    if not ok:
        span = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ConfigError(f"{key} must lie in {span}, got {value}")


_COUNTS_AT_LEAST: dict[str, int] = {
    "batch_size": 1,
    "num_workers": 0,
    "train_limit": 1,
    "test_limit": 1,
    "limit": 1,
    "k": 1,
    "epochs": 1,
    "warmup_epochs": 0,
    "max_steps": 1,
    "warmup_steps": 0,
    "img_size": 1,
    "channels": 1,
    "encoder_batch_size": 1,
    "iters": 1,
    "aux_channels": 1,
    "crop_size": 1,
    "slide_stride": 1,
}
_NON_NEGATIVE = ("weight_decay", "mixup", "cutmix", "min_lr", "aux_weight")
_POSITIVE = ("temperature", "base_lr", "lr", "clip_grad", "poly_power")


def _check_seg(cfg: SegConfig, given: Collection[str]) -> None:
    """``seg``: no key of the other mode (given, or changed from its default), and a possible recipe."""
    defaults = SegConfig()
    changed = {k for keys in SEG_MODE_KEYS.values() for k in keys if getattr(cfg, k) != getattr(defaults, k)}
    for mode, keys in SEG_MODE_KEYS.items():
        if mode == cfg.mode:
            continue
        for key in keys:
            if key in given or key in changed:
                instead = f" (mode={cfg.mode} uses {_SEG_INSTEAD[key]})" if key in _SEG_INSTEAD else ""
                raise ConfigError(
                    f"{key} is a mode={mode} key that seg mode={cfg.mode} does not read{instead}: drop it"
                )
    if cfg.mode != "finetune":
        return
    for key, n in (("scale", 2), ("ratio_range", 2)):
        value = getattr(cfg, key)
        if value is not None and (len(value) != n or any(v <= 0 for v in value)):
            raise ConfigError(f"{key} must be {n} positive numbers, got {value}")
    if cfg.ratio_range[0] > cfg.ratio_range[1]:
        raise ConfigError(f"ratio_range must be [low, high] with low <= high, got {cfg.ratio_range}")
    _in_range(cfg, "cat_max_ratio", 0.0, 1.0, open_low=True)
    _in_range(cfg, "flip_prob", 0.0, 1.0)
    if cfg.slide_stride is not None and cfg.slide_stride > cfg.crop_size:
        raise ConfigError(
            f"slide_stride={cfg.slide_stride} is larger than crop_size={cfg.crop_size}: windows would leave gaps"
        )
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else SEG_RECIPE_WARMUP
    if warmup >= cfg.iters:
        raise ConfigError(
            f"warmup_steps={warmup} covers the whole run of iters={cfg.iters}: set warmup_steps below iters"
        )


def check_eval_config(cfg: C, given: Collection[str] = ()) -> C:
    """Refuse impossible values of an evaluation config before any work; returns ``cfg`` normalised.

    ``rand_augment: none`` (or ``''``) becomes ``None``. ``given``: the keys the user set (a file, flags,
    overrides); a ``seg`` key of the other mode is refused when given or changed from its default.

    Raises:
        ConfigError: one line naming the first wrong key and what it may be.
    """
    names = {f.name for f in fields(cfg)}
    if not cfg.data:
        raise ConfigError("data must name a dataset")
    for key, low in _COUNTS_AT_LEAST.items():
        if key == "epochs" and isinstance(cfg, SegConfig) and cfg.max_steps is not None:
            low = 0  # segmentation may run max_steps steps whatever the epochs
        if key in names:
            _at_least(cfg, key, low)
    for key in _NON_NEGATIVE:
        if key in names:
            _at_least(cfg, key, 0)
    for key in _POSITIVE:
        if key in names:
            _at_least(cfg, key, 0, strict=True)
    for key in names:
        allowed = choices_of(type(cfg), key)
        value = getattr(cfg, key)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}.{_close(str(value), allowed)}")
    if isinstance(cfg, SegConfig) and cfg.batch_size < 2:
        raise ConfigError(f"batch_size must be >= 2 (BatchNorm in the head), got {cfg.batch_size}")
    if isinstance(cfg, SegConfig) and cfg.data not in SEGMENTATION_DATA:
        raise ConfigError(
            f"data='{cfg.data}' is not a segmentation dataset: choose one of {', '.join(SEGMENTATION_DATA)}."
            f"{_close(cfg.data, SEGMENTATION_DATA)}"
        )
    if isinstance(cfg, SegConfig):
        _check_seg(cfg, given)
    if "layer_decay" in names:
        _in_range(cfg, "layer_decay", 0.0, 1.0, open_low=True)
    if "drop_path" in names:
        _in_range(cfg, "drop_path", 0.0, 1.0, open_high=True)
    if "label_smoothing" in names:
        _in_range(cfg, "label_smoothing", 0.0, 1.0, open_high=True)
    if "reprob" in names:
        _in_range(cfg, "reprob", 0.0, 1.0)
    if "ema_decay" in names:
        _in_range(cfg, "ema_decay", 0.0, 1.0, open_low=True, open_high=True)
    if isinstance(cfg, LowshotConfig):
        if not cfg.fractions:
            raise ConfigError("fractions must list at least one label fraction")
        if not cfg.seeds:
            raise ConfigError("seeds must list at least one seed")
        for f in cfg.fractions:
            if not 0.0 < f <= 1.0:
                raise ConfigError(f"fractions: each label fraction must lie in (0, 1], got {f}")
    mean, std = getattr(cfg, "mean", None), getattr(cfg, "std", None)
    if (mean is None) != (std is None):
        raise ConfigError("mean and std go together: set both or neither")
    if mean is not None and std is not None:
        if not mean or len(mean) != len(std):
            raise ConfigError(f"mean and std need one value per input channel each, got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ConfigError(f"std values must be > 0, got {std}")
    rand_augment = getattr(cfg, "rand_augment", None)
    if (
        isinstance(cfg, FinetuneRecipe)
        and rand_augment is not None
        and rand_augment.strip().lower() in RAND_AUGMENT_OFF
    ):
        cfg.rand_augment = None
    if isinstance(cfg, ZeroshotConfig) and cfg.templates is not None:
        if not cfg.templates:
            raise ConfigError("templates must list at least one prompt template (or be null for the built-in ones)")
        for t in cfg.templates:
            if "{}" not in t and "{c}" not in t:
                raise ConfigError(f"templates: '{t}' has no {{c}} (or {{}}) where the class name goes")
    if RECIPE_KEY in names:
        check_recipe(cfg, protocol_of(cfg))
    return cfg


def protocol_of(cfg: EvalDataConfig) -> str:
    """The protocol whose config class ``cfg`` is (``"linear"`` for a :class:`LinearConfig`)."""
    for name, cls in EVAL_CONFIGS.items():
        if type(cfg) is cls:
            return name
    raise TypeError(f"{type(cfg).__name__} is not an evaluation config class")


def encoder_batch(cfg: Any) -> int:
    """Images per frozen-encoder forward pass: ``encoder_batch_size``, else min(batch_size, 256) for a
    config that has the key, else ``batch_size``."""
    if not hasattr(cfg, "encoder_batch_size"):
        return int(cfg.batch_size)
    return int(cfg.encoder_batch_size or min(cfg.batch_size, 256))


# ------------------------------------------------------------------ loading
def eval_config_class(protocol: str) -> type[EvalDataConfig]:
    """The config class of ``protocol``.

    Raises:
        ConfigError: an unknown protocol (with the known ones and a close match).
    """
    try:
        return EVAL_CONFIGS[protocol]
    except KeyError:
        raise ConfigError(
            f"unknown evaluation protocol '{protocol}': choose one of {', '.join(EVAL_CONFIGS)}."
            f"{_close(protocol, EVAL_CONFIGS)}"
        ) from None


def resolve_eval_config(protocol: str, raw: Mapping[str, Any], where: str = "eval config") -> EvalDataConfig:
    """Type and check a raw eval config (from :func:`semmim.config.compose`) against ``protocol``'s class.

    ``root`` without ``data`` is refused (a root alone names no dataset; the evaluation would read
    Fashion-MNIST). For a protocol with recipes, the recipe ``raw`` names (``recipe``; default
    ``default``) is merged underneath ``raw``: every key ``raw`` sets wins over the recipe.

    Raises:
        ConfigError: one line naming the first unknown key (with a close match), wrong type or impossible value.
    """
    cls = eval_config_class(protocol)
    raw = dict(raw or {})
    if raw.get("root") is not None and raw.get("data") is None:
        names = "|".join(data_choices(cls))
        raise ConfigError(
            f"--root needs --data {names} (config keys root, data): say which dataset {raw['root']} holds "
            f"(without data the evaluation would run on {DEFAULT_DATA})"
        )
    if "data" in raw and raw["data"] is None:
        raw.pop("data")
    if cls is SegConfig and "finetune" in raw:
        raise ConfigError(
            f"{where}: seg has no key 'finetune' any more: mode=finetune runs the fine-tuned UperNet recipe "
            "(mode=frozen, the default, the quick frozen protocol)"
        )
    if RECIPE_KEY in {f.name for f in fields(cls)}:
        name = raw.get(RECIPE_KEY)
        name = DEFAULT_RECIPE if name is None else name
        if not isinstance(name, str):
            raise ConfigError(f"{where}: bad value for '{RECIPE_KEY}': a recipe name, got {name!r}")
        try:
            preset = recipe_raw(protocol, name)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        raw = deep_merge(preset, {**raw, RECIPE_KEY: name})
    merged = merge_checked(OmegaConf.structured(cls), raw, where)
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, EvalDataConfig)
    try:
        return check_eval_config(cfg, given=raw.keys())
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_eval_config(
    protocol: str,
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
    *,
    recipe: str | None = None,
) -> EvalDataConfig:
    """The typed config of an evaluation protocol: defaults, the recipe (``finetune``, ``linear``), a YAML
    file (with its ``base:`` files), ``extra`` (already parsed values, e.g. command-line flags), then
    ``key=value`` overrides.

    Args:
        protocol: knn | linear | finetune | lowshot | seg | classify | zeroshot.
        path: a YAML file or a shipped config name; its keys are the protocol's (top level).
        overrides: ``key=value`` strings, values parsed as YAML (``k=10``, ``fractions=[0.01,0.1]``).
        extra: values merged between the file and the overrides.
        recipe: the recipe (:mod:`semmim.eval.recipes`), as if set right after the file; a ``recipe`` key in
            ``extra`` or ``overrides`` still wins. Its values lie under every other layer.

    Raises:
        ConfigError: unknown key, wrong type, impossible value or unknown recipe (one line naming it).
        FileNotFoundError: the file does not exist.

    Examples:
        >>> cfg = load_eval_config("finetune", recipe="milan", overrides=["epochs=3"])
        >>> cfg.recipe, cfg.base_lr, cfg.reprob, cfg.epochs
        ('milan', 0.0001, 0.25, 3)
    """
    where = str(path) if path is not None else "eval config"
    raw = compose(path, ())
    if recipe is not None:
        raw = deep_merge(raw, {RECIPE_KEY: recipe})
    if extra:
        raw = deep_merge(raw, dict(extra))
    raw = deep_merge(raw, compose(None, overrides))
    return resolve_eval_config(protocol, raw, where)


def eval_config_dict(cfg: EvalDataConfig) -> dict[str, Any]:
    """The config as plain Python data (what a YAML file for :func:`load_eval_config` may hold)."""
    return asdict(cfg)


RANDOM_PREFIX = "random:"
"""``random:RUN``: the architecture of RUN's encoder at random init."""

PLUMBING = frozenset({"num_workers", "cache_dir", "device", "encoder_batch_size"})
"""Config keys that say how fast results come, never what they are: recorded in neither part of
:func:`provenance`."""

MEASURED_ON = ("data", "root", "train_limit", "test_limit", "split", "limit")
"""Config keys recorded under ``measured_on`` (with the encoder) rather than ``settings``."""


def absolute_spec(spec: str | os.PathLike[str] | None) -> str | None:
    """An encoder spec with an absolute path (``random:`` kept)."""
    if spec is None:
        return None
    text = str(spec)
    random_init = text.startswith(RANDOM_PREFIX)
    path = os.path.abspath(text.removeprefix(RANDOM_PREFIX))
    return (RANDOM_PREFIX if random_init else "") + path


def provenance(cfg: EvalDataConfig, encoder: str | os.PathLike[str], key: str = "encoder") -> dict[str, Any]:
    """What an evaluation was measured on and with which settings, from its config.

    Args:
        cfg: the resolved protocol config.
        encoder: the encoder (or model) spec as given.
        key: ``"encoder"``, or ``"model"`` for ``classify`` / ``zeroshot``.

    Returns:
        {"measured_on": {key (as given), key + "_path" (absolute), "data", "root" (absolute or None),
        "train_limit", "test_limit" or "split", "limit"}, "settings": every other config key that can
        change the result (all but :data:`PLUMBING` and :func:`unused_keys`), sorted}; for a protocol with
        recipes also "recipe_overrides": the settings whose values depart from the recipe's ``{key: value}``.
    """
    values = eval_config_dict(cfg)
    measured: dict[str, Any] = {key: str(encoder), f"{key}_path": absolute_spec(encoder)}
    for name in MEASURED_ON:
        if name in values:
            measured[name] = values[name]
    if measured.get("root") is not None:
        measured["root"] = os.path.abspath(measured["root"])
    skip = PLUMBING | set(MEASURED_ON) | unused_keys(cfg)
    settings = {k: v for k, v in sorted(values.items()) if k not in skip}
    out: dict[str, Any] = {"measured_on": measured, "settings": settings}
    if RECIPE_KEY in values:
        departed = recipe_overrides(cfg, protocol_of(cfg))
        out["recipe_overrides"] = {k: v for k, v in departed.items() if k in settings}
    return out


def explain_eval_config(cfg: EvalDataConfig) -> str:
    """The config as YAML, each key followed by its help (``semmim eval <protocol> --show``); keys the run
    does not read (:func:`unused_keys`) are left out."""
    import yaml

    docs = field_docs(type(cfg))
    lines = []
    unused = unused_keys(cfg)
    for f in fields(cfg):
        if f.name in unused:
            continue
        value = yaml.safe_dump(getattr(cfg, f.name), default_flow_style=True, width=1000)
        text = f"{f.name}: {value.strip().removesuffix('...').strip()}"
        doc = docs.get(f.name, "")
        lines.append(f"{text:<48} # {doc}" if doc else text)
    return "\n".join(lines) + "\n"
