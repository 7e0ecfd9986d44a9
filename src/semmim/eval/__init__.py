"""Evaluation protocols on frozen or fine-tuned encoders.

kNN (:mod:`semmim.eval.protocols`, :mod:`semmim.eval.knn`), linear probe (:mod:`semmim.eval.linear`),
fine-tuning (:mod:`semmim.eval.finetune`), low-shot (:mod:`semmim.eval.lowshot`), segmentation
(:mod:`semmim.eval.seg`), zero-shot (:mod:`semmim.eval.zeroshot`) and classifier accuracy
(:mod:`semmim.eval.classify`). Each ``*_eval`` function takes a run directory, an
``encoder.safetensors`` or ``random:RUN`` and returns a metrics dict.
"""

from semmim.eval.knn import extract_features, knn_classify

__all__ = ["extract_features", "knn_classify"]
