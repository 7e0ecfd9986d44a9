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

from semmim.config import DataConfig, load_saved_config
from semmim.eval.accuracy import topk_accuracy
from semmim.eval.config import ZeroshotConfig, check_eval_config
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
    cfg = load_saved_config(cfg_path)
    model = build_method(cfg)
    if not isinstance(model, ImageTextModel):
        raise ValueError(f"{run} is a '{cfg.method.name}' run; zero-shot needs a language-aligned run (clip, rils)")
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval(), cfg


@torch.no_grad()
def zeroshot_eval(run_dir: str | os.PathLike[str], cfg: ZeroshotConfig | None = None) -> dict[str, Any]:
    """Zero-shot top-1/top-5 (in %) of a clip/rils run on a labelled dataset.

    Args:
        run_dir: the run directory of a clip or rils run.
        cfg: the protocol's settings (:class:`semmim.eval.config.ZeroshotConfig`; default: its defaults).
    """
    from semmim.data import build_dataset, build_loader
    from semmim.data.captions import TEMPLATES, class_prompts

    cfg = check_eval_config(cfg or ZeroshotConfig())
    model, run_cfg = load_image_text_model(run_dir)
    mean, std = run_cfg.data.mean, run_cfg.data.std
    dcfg = DataConfig(name=cfg.data, root=cfg.root, split=cfg.split, limit=cfg.limit, mean=mean, std=std)
    dataset = build_dataset(dcfg, img_size=run_cfg.model.img_size, in_chans=run_cfg.model.in_chans, train=False)
    classes = list(getattr(dataset, "classes", []) or [])
    if not classes:
        raise ValueError(f"zero-shot needs class names, and dataset '{cfg.data}' has none")
    dev = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    weights = model.zero_shot_weights(class_prompts(classes, cfg.templates or TEMPLATES), dev)  # (K, E)
    loader = build_loader(
        dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=False, sampler=None, drop_last=False
    )
    metrics = topk_accuracy(lambda x: F.normalize(model.embed_image(x), dim=-1) @ weights.T, loader, dev)
    return {"protocol": "zeroshot", **metrics}
