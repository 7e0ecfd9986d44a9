"""Zero-shot classification with a language-aligned encoder (a ``clip`` or ``rils`` run).

Each class is described by prompts built from templates ("a photo of a {class}."); the class
embedding is the normalised mean of its prompts' text embeddings; an image is assigned the class of
highest cosine similarity (Radford et al. 2021, arXiv:2103.00020, Sec. 3.1.4).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from semmim.config import DataConfig, load_config
from semmim.eval.accuracy import topk_accuracy
from semmim.export import resolve_run_file
from semmim.run import CONFIG


def load_image_text_model(run_dir: str | os.PathLike[str]) -> Any:
    """Rebuild a clip/rils run's model from ``config.yaml`` and ``clip.safetensors``."""
    from semmim.methods import build_method
    from semmim.methods.clip import CLIP_FILE, ImageTextModel

    run = Path(run_dir)
    weights = resolve_run_file(run, CLIP_FILE)
    cfg_path = weights.parent / CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"zero-shot needs the run's config: {cfg_path} is missing")
    cfg = load_config(cfg_path)
    model = build_method(cfg)
    if not isinstance(model, ImageTextModel):
        raise ValueError(f"{run} is a '{cfg.method.name}' run; zero-shot needs a language-aligned run (clip, rils)")
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval(), cfg


@torch.no_grad()
def zeroshot_eval(
    run_dir: str | os.PathLike[str],
    data: str = "fashion_mnist",
    root: str | None = None,
    split: str = "test",
    limit: int | None = None,
    templates: list[str] | None = None,
    batch_size: int = 256,
    num_workers: int = 2,
    device: str | None = None,
) -> dict[str, Any]:
    """Zero-shot top-1/top-5 (in %) of a clip/rils run on a labelled dataset."""
    from semmim.data import build_dataset, build_loader
    from semmim.data.captions import TEMPLATES, class_prompts

    model, cfg = load_image_text_model(run_dir)
    dcfg = DataConfig(name=data, root=root, split=split, limit=limit, mean=cfg.data.mean, std=cfg.data.std)
    dataset = build_dataset(dcfg, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans, train=False)
    classes = list(getattr(dataset, "classes", []) or [])
    if not classes:
        raise ValueError(f"zero-shot needs class names, and dataset '{data}' has none")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    weights = model.zero_shot_weights(class_prompts(classes, templates or TEMPLATES), dev)  # (K, E)
    loader = build_loader(
        dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=False, sampler=None, drop_last=False
    )
    metrics = topk_accuracy(lambda x: F.normalize(model.embed_image(x), dim=-1) @ weights.T, loader, dev)
    return {"protocol": "zeroshot", **metrics}
