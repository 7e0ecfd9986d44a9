"""Evaluation protocols on frozen or fine-tuned encoders."""

from semmim.eval.knn import extract_features, knn_classify

__all__ = ["extract_features", "knn_classify"]
