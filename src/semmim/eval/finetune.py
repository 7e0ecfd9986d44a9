"""End-to-end fine-tuning of an exported encoder: the BEiT / MAE recipe on timm's ViT.

The recipe (Bao et al. 2021, arXiv:2106.08254; He et al. 2021, arXiv:2111.06377): the whole
network is trained with AdamW on layer-wise decayed learning rates (:func:`layer_decay_groups`),
a per-step linear warmup + cosine schedule, stochastic depth, RandAugment, random erasing (Zhong et
al. 2017, arXiv:1708.04896, as DeiT and MAE use it), mixup / cutmix with label smoothing, and an optional
EMA of the weights. Every piece that timm implements is timm's: the model (``timm.create_model``),
``Mixup``, ``SoftTargetCrossEntropy``, ``LabelSmoothingCrossEntropy``, ``ModelEmaV3``, ``RandomErasing``
and RandAugment. Each paper's settings are a recipe (:mod:`semmim.eval.recipes`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from semmim.engine.optim import layer_decay_groups
from semmim.eval.accuracy import topk_accuracy
from semmim.eval.common import IMAGENET_MEAN, IMAGENET_STD, encoder_geometry, eval_loader, labelled_split
from semmim.eval.config import FinetuneConfig, check_eval_config
from semmim.export import read_normalization, read_timm_config, resolve_encoder_file

__all__ = ["finetune_eval", "layer_decay_groups", "train_inputs"]

log = logging.getLogger(__name__)

HEAD_INIT_STD = 2e-5
"""Standard deviation of the classifier head's truncated-normal initialisation (MAE)."""


def _restrict(dataset: Any, indices: Sequence[int]) -> Any:
    """A :class:`SeededDataset` over ``indices`` of another one (same seed and transform)."""
    from semmim.data.datasets import SeededDataset, SubsetDataset

    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("train_indices is empty")
    bad = [i for i in idx if not 0 <= i < len(dataset)]
    if bad:
        raise IndexError(f"train_indices {bad[:5]} out of range for a train split of {len(dataset)} images")
    return SeededDataset(SubsetDataset(dataset.dataset, idx), seed=dataset.seed, transform=dataset.transform)


def _build_model(
    encoder: str | os.PathLike[str], global_pool: str, drop_path: float, seed: int
) -> tuple[nn.Module, str, dict[str, Any], list[float], list[float]]:
    """The timm ViT (no head yet) with the export's weights, its timm name and kwargs, and the input mean/std."""
    import timm
    from safetensors.torch import load_file

    text = str(encoder)
    random_init = text.startswith("random:")
    weights = resolve_encoder_file(text.removeprefix("random:"))
    name, kwargs = read_timm_config(weights)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("num_classes", "drop_path_rate")}
    kwargs["global_pool"] = global_pool
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=drop_path, **kwargs)
    if not random_init:
        state = load_file(str(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        bad_missing = [k for k in missing if not k.startswith(("head.", "fc_norm."))]
        # avg pooling replaces the final norm by a fresh fc_norm (timm, as MAE): the pretrained norm is dropped
        norm_dropped = isinstance(getattr(model, "norm", None), nn.Identity)
        bad_unexpected = [k for k in unexpected if not (norm_dropped and k.startswith("norm."))]
        if bad_missing or bad_unexpected:
            raise ValueError(
                f"{weights} does not match timm '{name}' with global_pool={global_pool!r}: missing "
                f"{bad_missing}, unexpected {bad_unexpected} (only head.* / fc_norm.* may be missing)"
            )
    norm = read_normalization(weights)
    in_chans = encoder_geometry(model)[1]
    mean, std = norm if norm else (IMAGENET_MEAN[:in_chans], IMAGENET_STD[:in_chans])
    return model, name, kwargs, list(mean), list(std)


def _add_head(model: nn.Module, num_classes: int) -> None:
    """Give ``model`` a fresh linear head for ``num_classes``, initialised trunc-normal (std 2e-5, MAE)."""
    reset: Any = getattr(model, "reset_classifier", None)
    if not callable(reset):
        raise ValueError(f"{type(model).__name__} has no reset_classifier(): not a timm classifier")
    reset(num_classes)
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear classifier head (got {type(head).__name__})")
    with torch.no_grad():
        nn.init.trunc_normal_(head.weight, std=HEAD_INIT_STD)
        if head.bias is not None:
            head.bias.zero_()


def train_inputs(
    mean: Sequence[float], std: Sequence[float], reprob: float, device: torch.device | str
) -> Callable[[Tensor], Tensor]:
    """The device side of the fine-tuning input pipeline: normalisation, then random erasing.

    As in timm's ``create_transform`` (MAE, DeiT), random erasing comes after normalisation, so its pixel
    mode fills the box with N(0, 1) noise in normalised units; mixup / cutmix come after it. Each image is
    erased with probability ``reprob`` (one box of 2-33% of the image, aspect ratio 0.3-3.3), drawn with
    Python's ``random`` and torch's generator of ``device``.

    Args:
        mean, std: the input normalisation, one value per channel.
        reprob: random-erasing probability (0 = off).
        device: where the batch is moved and processed.

    Returns:
        A function mapping images (N, C, H, W) in [0, 1] to the model's input (N, C, H, W) on ``device``.
    """
    from timm.data.random_erasing import RandomErasing

    m = torch.tensor(list(mean), device=device).view(1, -1, 1, 1)
    s = torch.tensor(list(std), device=device).view(1, -1, 1, 1)
    erase = RandomErasing(probability=reprob, mode="pixel", max_count=1, device=str(device)) if reprob > 0 else None

    def prepare(images: Tensor) -> Tensor:
        x = (images.to(device, non_blocking=True) - m) / s
        return erase(x) if erase is not None else x

    return prepare


def finetune_eval(
    encoder: str | os.PathLike[str],
    cfg: FinetuneConfig | None = None,
    *,
    train_indices: Sequence[int] | None = None,
    out: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Fine-tune an exported encoder end to end on a labelled dataset and report test accuracy.

    The model is ``timm.create_model(name, num_classes=K, global_pool=..., drop_path_rate=...)`` built
    from the export's metadata, with the export's weights (``random:RUN`` keeps random weights); only
    ``head.*`` / ``fc_norm.*`` may be missing (with ``global_pool="avg"`` timm replaces the final
    ``norm`` by a fresh ``fc_norm``, and the pretrained ``norm`` is dropped, as in MAE). The head is
    initialised trunc-normal with std 2e-5. Training: AdamW (0.9, 0.999) on :func:`layer_decay_groups`,
    peak lr ``base_lr * batch / 256`` with per-step warmup + cosine to ``min_lr`` (each group at
    ``lr * lr_scale``), timm Mixup + SoftTargetCrossEntropy when ``mixup`` or ``cutmix`` > 0, else
    label-smoothed (or plain) cross-entropy, random resized crop + flip + RandAugment. Inputs are
    normalised on the device with the export's mean/std, then randomly erased (``reprob``,
    :func:`train_inputs`), then mixed. The run is seeded: the same seed gives the same numbers (on the
    CPU; CUDA kernels may differ in the last bits).

    Args:
        encoder: run directory, ``encoder.safetensors``, or ``"random:<run>"``.
        cfg: the protocol's settings (:class:`semmim.eval.config.FinetuneConfig`, each key documented
            there; default: its defaults). ``batch_size`` is capped at the training set size (and made
            even with mixup / cutmix); ``warmup_epochs`` is clamped to ``epochs``; ``max_steps`` compresses
            the schedule to fit.
        train_indices: train on these positions of the (limited) train split only (low-shot).
        out: when set, write ``out/classifier.safetensors`` (readable by
            :func:`semmim.eval.classify.load_classifier`).

    Returns:
        ``{"protocol": "finetune", "top1", "top5", "n_train", "n_test", "epochs", "steps", "lr",
        "batch_size", "num_classes", "train_loss", ...}`` (accuracies in %), plus ``"top1_ema"`` /
        ``"top5_ema"`` with ``ema`` and ``"classifier"`` with ``out``.

    Raises:
        RuntimeError: the loss became NaN / inf (the message names the epoch and step).
    """
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    from semmim.data import build_loader
    from semmim.engine.optim import cosine_lr, scaled_lr, set_lr
    from semmim.eval.classify import CLASSIFIER_FILE
    from semmim.export import save_encoder

    cfg = check_eval_config(cfg or FinetuneConfig())
    data, root, train_limit, test_limit = cfg.data, cfg.root, cfg.train_limit, cfg.test_limit
    epochs, batch_size, num_workers, device, seed = cfg.epochs, cfg.batch_size, cfg.num_workers, cfg.device, cfg.seed
    base_lr, min_lr, weight_decay, warmup_epochs = cfg.base_lr, cfg.min_lr, cfg.weight_decay, cfg.warmup_epochs
    layer_decay, drop_path, clip_grad, max_steps = cfg.layer_decay, cfg.drop_path, cfg.clip_grad, cfg.max_steps
    mixup, cutmix, label_smoothing, rand_augment = cfg.mixup, cfg.cutmix, cfg.label_smoothing, cfg.rand_augment
    global_pool, ema, ema_decay, reprob = cfg.global_pool, cfg.ema, cfg.ema_decay, cfg.reprob
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if global_pool not in ("avg", "token"):
        raise ValueError(f"global_pool must be 'avg' or 'token', got {global_pool!r}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    model, name, kwargs, mean, std = _build_model(encoder, global_pool, drop_path, seed)
    img_size, in_chans = encoder_geometry(model)
    split_kw: dict[str, Any] = {"img_size": img_size, "in_chans": in_chans, "mean": mean, "std": std, "seed": seed}
    train_ds = labelled_split(
        data, root, "train", limit=train_limit, train_transform=True, rand_augment=rand_augment, **split_kw
    )
    test_ds = labelled_split(data, root, "test", limit=test_limit, **split_kw)
    if isinstance(train_ds, torch.utils.data.IterableDataset):
        raise ValueError(f"fine-tuning needs a map-style dataset, '{data}' gives {type(train_ds).__name__}")
    if train_indices is not None:
        train_ds = _restrict(train_ds, train_indices)
    classes = list(getattr(train_ds, "classes", []) or [])
    if not classes:
        raise ValueError(f"fine-tuning needs a labelled dataset, but '{data}' has no classes")
    num_classes = len(classes)
    n_train = len(train_ds)
    torch.manual_seed(seed + 1)
    _add_head(model, num_classes)
    model.to(dev)

    mixup_on = mixup > 0 or cutmix > 0
    batch = min(batch_size, n_train)
    if mixup_on:
        batch -= batch % 2  # timm's batch-mode Mixup flips the batch and needs an even size
    if batch < 1:
        raise ValueError(f"{n_train} training image(s) are too few for mixup / cutmix: set mixup=cutmix=0")
    steps_per_epoch = n_train // batch
    total_steps = epochs * steps_per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    warmup_steps = round(min(max(float(warmup_epochs), 0.0), float(epochs)) / epochs * total_steps)
    lr = scaled_lr(base_lr, batch)

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    groups = layer_decay_groups(model, lr, weight_decay, layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))  # type: ignore[arg-type]
    mixup_fn = None
    criterion: nn.Module
    if mixup_on:
        mixup_fn = Mixup(
            mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes
        )
        criterion = SoftTargetCrossEntropy()
    elif label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    ema_model = None
    if ema:
        from timm.utils import ModelEmaV3

        ema_model = ModelEmaV3(model, decay=ema_decay)

    sampler = torch.utils.data.RandomSampler(train_ds, generator=torch.Generator().manual_seed(seed))
    loader = build_loader(
        train_ds, batch_size=batch, num_workers=num_workers, pin_memory=True, sampler=sampler, drop_last=True
    )
    prepare = train_inputs(mean, std, reprob, dev)
    m = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
    s = torch.tensor(std, device=dev).view(1, -1, 1, 1)
    use_amp = dev.type == "cuda"

    step = 0
    epoch = 0
    loss_sum, loss_n = 0.0, 0
    t0 = time.perf_counter()
    while step < total_steps:
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)
        model.train()
        loss_sum, loss_n = 0.0, 0
        for batch_data in loader:
            if step >= total_steps:
                break
            set_lr(optimizer, cosine_lr(step, total_steps, warmup_steps, lr, min_lr))
            peak = max(g["lr"] for g in optimizer.param_groups)
            x = prepare(batch_data["image"])
            y = batch_data["label"].to(dev, non_blocking=True)
            if int(y.min()) < 0 or int(y.max()) >= num_classes:
                raise ValueError(f"labels outside 0..{num_classes - 1} in the training data")
            target: Tensor = y
            if mixup_fn is not None:
                x, target = mixup_fn(x, y)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)
            loss = criterion(logits.float(), target)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise RuntimeError(f"fine-tuning loss is {value} at epoch {epoch}, step {step} (lr {peak:.3g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            if ema_model is not None:
                ema_model.update(model, step=step)
            step += 1
            loss_sum += value
            loss_n += 1
        log.info("finetune epoch %d: loss %.4f, %d steps", epoch, loss_sum / max(1, loss_n), step)
        epoch += 1
    train_time = time.perf_counter() - t0

    test_loader = eval_loader(test_ds, batch_size=max(batch, 64), num_workers=num_workers)

    def evaluate(net: nn.Module) -> dict[str, float]:
        net.eval()

        def logits_of(x: Tensor) -> Tensor:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                return net((x - m) / s).float()

        return topk_accuracy(logits_of, test_loader, dev)

    result: dict[str, Any] = {"protocol": "finetune", **evaluate(model)}
    if ema_model is not None:
        res_ema = evaluate(ema_model.module)
        result.update({"top1_ema": res_ema["top1"], "top5_ema": res_ema["top5"]})
    result.update(
        {
            "n_train": n_train,
            "epochs": epochs,
            "epochs_run": epoch,
            "steps": step,
            "lr": lr,
            "batch_size": batch,
            "num_classes": num_classes,
            "train_loss": loss_sum / max(1, loss_n),
            "layer_decay": layer_decay,
            "global_pool": global_pool,
            "reprob": reprob,
            "recipe": cfg.recipe,
            "train_time_s": train_time,
        }
    )
    if out is not None:
        path = save_encoder(
            Path(out) / CLASSIFIER_FILE,
            model.state_dict(),
            name,
            kwargs,
            extra={
                "num_classes": str(num_classes),
                "mean": json.dumps(mean),
                "std": json.dumps(std),
                "method": "finetune",
                "encoder": str(encoder),
                "steps": str(step),
            },
        )
        result["classifier"] = str(path)
    return result
