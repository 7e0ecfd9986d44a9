"""Top-1 / top-5 of an exported classifier (e.g. supmim's ``classifier.safetensors``) on a test split."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semmim.config import DataConfig
from semmim.eval.accuracy import topk_accuracy
from semmim.eval.config import ClassifyConfig, check_eval_config
from semmim.export import read_metadata, read_normalization, read_timm_config, resolve_run_file

CLASSIFIER_FILE = "classifier.safetensors"


def resolve_classifier_file(path: str | os.PathLike[str]) -> Path:
    """A supmim run directory or ``classifier.safetensors`` -> the classifier file."""
    return resolve_run_file(path, CLASSIFIER_FILE)


def load_classifier(path: str | os.PathLike[str]) -> tuple[nn.Module, list[float], list[float]]:
    """A timm ViT classifier with its head, and its input normalisation."""
    import timm
    from safetensors.torch import load_file

    p = resolve_classifier_file(path)
    name, kwargs = read_timm_config(p)
    meta = read_metadata(p)
    if "num_classes" not in meta:
        raise ValueError(f"{p} has no num_classes metadata: it is not a semmim classifier export")
    model = timm.create_model(name, pretrained=False, num_classes=int(meta["num_classes"]), **kwargs)
    model.load_state_dict(load_file(str(p)), strict=True)
    norm = read_normalization(p)
    if norm is None:
        raise ValueError(f"{p} records no input mean/std")
    return model, norm[0], norm[1]


@torch.no_grad()
def classify_eval(model: str | os.PathLike[str], cfg: ClassifyConfig | None = None) -> dict[str, Any]:
    """Accuracy of a classifier export on a labelled dataset's split (top-1 and top-5, in %).

    Args:
        model: a run directory holding ``classifier.safetensors`` (supmim, ``semmim eval finetune``) or the file.
        cfg: the protocol's settings (:class:`semmim.eval.config.ClassifyConfig`; default: its defaults).
    """
    from semmim.data import build_dataset, build_loader

    cfg = check_eval_config(cfg or ClassifyConfig())

    net, mean, std = load_classifier(model)
    img_size = int(net.get_submodule("patch_embed").img_size[0])  # type: ignore[index,arg-type]
    proj: Any = net.get_submodule("patch_embed.proj")
    dcfg = DataConfig(name=cfg.data, root=cfg.root, split=cfg.split, limit=cfg.limit, mean=mean, std=std)
    dataset = build_dataset(dcfg, img_size=img_size, in_chans=int(proj.in_channels), train=False)
    loader = build_loader(
        dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=False, sampler=None, drop_last=False
    )
    dev = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    net.eval().to(dev)
    m = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
    s = torch.tensor(std, device=dev).view(1, -1, 1, 1)
    return {"protocol": "classify", **topk_accuracy(lambda x: net((x - m) / s), loader, dev)}
