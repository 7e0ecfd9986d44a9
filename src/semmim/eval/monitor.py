"""The online kNN monitor: weighted 20-NN top-1 of the encoder being trained, every few steps.

The protocol is :func:`semmim.eval.knn.knn_eval`'s (DINO: cosine, k = 20, T = 0.07, CLS
token) on fixed subsets: the first ``train_limit`` images of the labelled dataset's train split as
the memory bank and the first ``test_limit`` of its test split as queries, with the eval transform.
So ``knn_top1`` logged at the last step equals ``semmim eval knn RUN --train-limit N --test-limit M``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from semmim.eval.common import eval_loader, labelled_split
from semmim.eval.features import extract_features
from semmim.eval.knn import knn_classify


class KnnMonitor:
    """kNN top-1 of an encoder on fixed labelled subsets, for logging during training.

    The subsets are built (and checked to carry labels) when the monitor is made, so a wrong dataset
    fails before the first step.

    Args:
        data: registered dataset name (``fashion_mnist``, ``imagefolder`` with ``train/`` and ``val/``, ...).
        root: its root.
        img_size, in_chans: the encoder's input.
        mean, std: the encoder's input normalisation.
        train_limit, test_limit: sizes of the memory bank and the queries.
        batch_size, num_workers: feature extraction loader.
        k, temperature: the kNN vote.
    """

    def __init__(
        self,
        data: str,
        root: str | None,
        *,
        img_size: int,
        in_chans: int,
        mean: list[float],
        std: list[float],
        train_limit: int,
        test_limit: int,
        batch_size: int = 256,
        num_workers: int = 0,
        k: int = 20,
        temperature: float = 0.07,
    ) -> None:
        self.mean, self.std = list(mean), list(std)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.k, self.temperature = k, temperature
        self.splits: list[Any] = []
        for split, limit in (("train", train_limit), ("test", test_limit)):
            ds = labelled_split(
                data, root, split, img_size=img_size, in_chans=in_chans, mean=mean, std=std, limit=limit
            )
            if len(ds) == 0:
                raise ValueError(f"kNN monitor: the {split} split of '{data}' (root {root}) is empty")
            label = ds[0].get("label", -1)
            if int(label) < 0:
                raise ValueError(
                    f"kNN monitor: '{data}' (root {root}) has no labels; set trainer.knn_data/knn_root to a labelled "
                    "dataset or trainer.knn_every_n_steps=0"
                )
            self.splits.append(ds)
        self.description = f"{data} (train {len(self.splits[0])}, test {len(self.splits[1])})"

    @torch.no_grad()
    def __call__(self, encoder: nn.Module, device: torch.device | str = "cpu") -> float:
        """Top-1 (%) of ``encoder`` (with ``forward_features``); its train/eval mode is restored."""
        feats = []
        for ds in self.splits:
            loader = eval_loader(ds, self.batch_size, self.num_workers)
            f, y = extract_features(encoder, loader, self.mean, self.std, pool="cls", device=device)
            feats.append((f["cls"], y))
        (f_train, y_train), (f_test, y_test) = feats
        res = knn_classify(f_train, y_train, f_test, y_test, k=self.k, temperature=self.temperature)
        return float(res["top1"])
