"""Discrete tokenizers for token targets: k-means codebooks over a teacher's features, and BEiT v2's VQ-KD.

* :mod:`semmim.tokenizers.kmeans`: k-means in plain torch (k-means++, cosine or l2, dead-centroid re-seeding).
* :mod:`semmim.tokenizers.codebook`: a codebook and its safetensors file (centroids + metadata).
* :mod:`semmim.tokenizers.build`: ``semmim codebook``: a codebook from a run config's teacher and data.
* :mod:`semmim.tokenizers.vqkd`: the VQ-KD tokenizer of BEiT v2 from its released checkpoints.
"""

from semmim.tokenizers.codebook import Codebook, teacher_fingerprint
from semmim.tokenizers.kmeans import KMeansResult, code_usage, kmeans
from semmim.tokenizers.vqkd import VQKD_URLS, VQKDTokenizer, read_checkpoint

__all__ = [
    "VQKD_URLS",
    "Codebook",
    "KMeansResult",
    "VQKDTokenizer",
    "code_usage",
    "kmeans",
    "read_checkpoint",
    "teacher_fingerprint",
]
