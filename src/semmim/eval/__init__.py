"""Evaluation protocols on frozen or fine-tuned encoders, one module each.

kNN (:mod:`semmim.eval.knn`), linear probe (:mod:`semmim.eval.linear`), fine-tuning
(:mod:`semmim.eval.finetune`), low-shot (:mod:`semmim.eval.lowshot`), segmentation
(:mod:`semmim.eval.seg`), zero-shot (:mod:`semmim.eval.zeroshot`) and classifier accuracy
(:mod:`semmim.eval.classify`). Each ``<protocol>_eval(encoder, cfg)`` takes a run directory, an
``encoder.safetensors`` or ``random:RUN`` and the protocol's typed config (:mod:`semmim.eval.config`:
``KnnConfig``, ..., loaded from YAML and ``key=value`` overrides by ``load_eval_config``) and returns a
metrics dict. Shared plumbing: loading an encoder and a labelled split (:mod:`semmim.eval.common`) and
cached frozen features (:mod:`semmim.eval.features`).

The names below load on first use, so importing one protocol does not import them all.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ClassifyConfig": "semmim.eval.config",
    "EvalDataConfig": "semmim.eval.config",
    "FinetuneConfig": "semmim.eval.config",
    "KnnConfig": "semmim.eval.config",
    "LinearConfig": "semmim.eval.config",
    "LowshotConfig": "semmim.eval.config",
    "SegConfig": "semmim.eval.config",
    "ZeroshotConfig": "semmim.eval.config",
    "load_eval_config": "semmim.eval.config",
    "classify_eval": "semmim.eval.classify",
    "cached_features": "semmim.eval.features",
    "encoder_geometry": "semmim.eval.common",
    "eval_loader": "semmim.eval.common",
    "extract_features": "semmim.eval.features",
    "finetune_eval": "semmim.eval.finetune",
    "frozen_split_features": "semmim.eval.features",
    "knn_classify": "semmim.eval.knn",
    "knn_eval": "semmim.eval.knn",
    "labelled_split": "semmim.eval.common",
    "linear_eval": "semmim.eval.linear",
    "augmented_linear_probe": "semmim.eval.linear",
    "recipe_names": "semmim.eval.recipes",
    "load_encoder": "semmim.eval.common",
    "lowshot_eval": "semmim.eval.lowshot",
    "seg_eval": "semmim.eval.seg",
    "zeroshot_eval": "semmim.eval.zeroshot",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'semmim.eval' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
