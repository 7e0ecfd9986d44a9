"""One-line descriptions of datasets (shared by the loaders and the shard writer)."""

from __future__ import annotations

from typing import Any

from semmim.data.datasets import SeededDataset, SubsetDataset

__all__ = ["describe", "unwrap_dataset"]


def unwrap_dataset(dataset: Any) -> Any:
    """The dataset under any :class:`SeededDataset` / :class:`SubsetDataset` wrappers."""
    while isinstance(dataset, (SeededDataset, SubsetDataset)):
        dataset = dataset.dataset
    return dataset


def describe(dataset: Any) -> str:
    """One line about a dataset: name, root, split, size and classes.

    Examples:
        >>> from semmim.data import SyntheticDataset
        >>> describe(SyntheticDataset(16, img_size=8, num_classes=2))
        'synthetic: 16 images, 2 classes (class_0, class_1)'
    """
    inner = unwrap_dataset(dataset)
    name = getattr(inner, "name", None) or type(inner).__name__
    where = []
    if getattr(inner, "root", None):
        where.append(f"root={inner.root}")
    if getattr(inner, "split", None):
        where.append(f"split={inner.split}")
    head = f"{name} ({', '.join(where)})" if where else name
    size = f"{len(dataset)} images"
    if len(dataset) != len(inner):
        size += f" (first {len(dataset)} of {len(inner)})"
    classes = list(getattr(inner, "classes", []) or [])
    if classes:
        shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
        cls = f"{len(classes)} classes ({shown})"
    else:
        cls = "unlabelled"
    return f"{head}: {size}, {cls}"
