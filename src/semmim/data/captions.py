"""Image–text data: captions from manifest files or from class-name templates.

A dataset that yields captions has, next to ``load(i) -> (PIL.Image, label)``, a method
``caption(i) -> str``. :class:`semmim.data.SeededDataset` adds ``"caption": str`` to the items of
such a dataset (the default collate turns the captions of a batch into a ``list[str]``); items keep
``"label"`` (``-1`` when unlabelled) and ``"index"``.

Two sources of captions live here:

* :class:`ManifestDataset` (registered as ``manifest``): a CSV / TSV / JSONL file listing image
  paths and captions, with an optional label column;
* :class:`ClassCaptions`: wraps a labelled dataset (Fashion-MNIST, an image folder, ...) and
  captions item ``i`` with a prompt template filled with its class name, e.g.
  ``"a blurry photo of a t-shirt or top."``. The template is chosen from ``(seed, epoch, i)``.

:func:`class_prompts` gives every template for every class, for CLIP-style zero-shot
classification.

Examples:
    >>> from semmim.data import SyntheticDataset
    >>> ds = ClassCaptions(SyntheticDataset(4, img_size=8, num_classes=2), ["cat", "dog"], seed=0)
    >>> ds.caption(0) in class_prompts(["cat", "dog"])[ds.load(0)[1]]
    True
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from semmim.data.datasets import (
    DEFAULT_MAX_IMAGE_PIXELS,
    Decoded,
    ImageDataset,
    Sample,
    SkipsBadFiles,
    SubsetDataset,
    Transform,
    apply_transform,
    check_index,
    file_decoder,
    image_mode_for,
    sample_seed,
)
from semmim.registry import DATASETS

__all__ = [
    "MANIFEST_SUFFIXES",
    "TEMPLATES",
    "CaptionSubset",
    "ClassCaptions",
    "ManifestDataset",
    "caption_class_name",
    "class_prompts",
    "has_captions",
    "subset_keeping_captions",
]

TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a black and white photo of the {c}.",
    "a low resolution photo of a {c}.",
    "a photo of the small {c}.",
    "a close-up photo of a {c}.",
    "a cropped photo of the {c}.",
    "a bright photo of a {c}.",
)
"""Caption templates; ``{c}`` (or ``{}``) is replaced by the class name."""

MANIFEST_SUFFIXES: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
"""Manifest file suffixes and the format each one is read as (``.json`` must hold JSON lines)."""

LABEL_KEY = "label"
"""The optional label column / key of a manifest."""


def has_captions(dataset: Any) -> bool:
    """Whether ``dataset`` provides ``caption(i) -> str``."""
    return callable(getattr(dataset, "caption", None))


def caption_class_name(name: str) -> str:
    """A class name as it reads in a sentence: lower case, ``_`` -> space, ``/`` -> " or ".

    Examples:
        >>> caption_class_name("T-shirt/top"), caption_class_name("Ankle boot"), caption_class_name("golden_retriever")
        ('t-shirt or top', 'ankle boot', 'golden retriever')
    """
    text = str(name).replace("_", " ").replace("/", " or ")
    return " ".join(text.split()).lower()


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    out = tuple(templates)
    if not out:
        raise ValueError("templates is empty; give at least one template such as 'a photo of a {c}.'")
    for t in out:
        if "{c}" not in t and "{}" not in t:
            raise ValueError(f"template {t!r} has no '{{c}}' (or '{{}}') placeholder for the class name")
    return out


def _fill(template: str, name: str) -> str:
    # unused positional/keyword arguments are ignored by str.format, so "{}" and "{c}" both work
    return template.format(name, c=name)


def class_prompts(
    classes: Sequence[str], templates: Sequence[str] = TEMPLATES, *, normalize: bool = True
) -> list[list[str]]:
    """Every template filled with every class name, for zero-shot classification.

    Args:
        classes: class names (e.g. ``dataset.classes``).
        templates: templates with a ``{c}`` placeholder.
        normalize: pass the names through :func:`caption_class_name` first (as :class:`ClassCaptions` does).

    Returns:
        ``prompts[k][t]`` = template ``t`` filled with class ``k``: ``len(classes)`` lists of
        ``len(templates)`` strings.

    Examples:
        >>> class_prompts(["Ankle boot"], ["a photo of a {c}.", "a {c}."])
        [['a photo of a ankle boot.', 'a ankle boot.']]
    """
    tpl = _check_templates(templates)
    names = [caption_class_name(c) if normalize else str(c) for c in classes]
    return [[_fill(t, n) for t in tpl] for n in names]


# --------------------------------------------------------------------------------------------------
# Manifest files
# --------------------------------------------------------------------------------------------------


def _manifest_format(path: Path) -> str:
    fmt = MANIFEST_SUFFIXES.get(path.suffix.lower())
    if fmt is not None:
        return fmt
    with path.open("r", encoding="utf-8-sig") as f:
        head = f.read(4096).lstrip()
    return "jsonl" if head.startswith("{") else "csv"


def _missing_columns(path: Path, missing: list[str], found: Iterable[str], where: str = "") -> ValueError:
    found_list = ", ".join(repr(c) for c in found) or "none"
    return ValueError(
        f"{path}{where}: missing column(s) {', '.join(repr(c) for c in missing)}; found columns: {found_list}. "
        f"Name the right ones with image_key=/caption_key= (data.manifest_image_key / data.manifest_caption_key)"
    )


def _read_rows(path: Path, fmt: str, needed: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` pairs; raises when a needed column or key is absent."""
    rows: list[tuple[int, dict[str, Any]]] = []
    if fmt in ("csv", "tsv"):
        with path.open("r", encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",")
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: the manifest is empty (expected a header row naming the columns)")
            header = [h.strip() for h in header]
            missing = [k for k in needed if k not in header]
            if missing:
                raise _missing_columns(path, missing, header)
            for values in reader:
                if not any(v.strip() for v in values):
                    continue  # blank line
                values = values + [""] * (len(header) - len(values))  # a short row: empty trailing fields
                rows.append((reader.line_num, dict(zip(header, values, strict=False))))
        return rows
    with path.open("r", encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({err})") from err
            if not isinstance(rec, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object per line, got {type(rec).__name__}")
            missing = [k for k in needed if k not in rec]
            if missing:
                raise _missing_columns(path, missing, rec, where=f", line {lineno}")
            rows.append((lineno, rec))
    return rows


def _parse_labels(path: Path, raw: list[tuple[int, Any]]) -> tuple[list[int], list[str]]:
    """Integer labels (``-1`` for empty) and class names when the labels are names, not numbers."""

    def as_int(v: Any) -> int | None:
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, str):
            s = v.strip()
            if s.lstrip("-").isdigit():
                return int(s)
        return None

    present = [(n, v) for n, v in raw if v is not None and str(v).strip() != ""]
    numbers = [as_int(v) for _, v in raw]
    if all(as_int(v) is not None for _, v in present):
        return [-1 if x is None else x for x in numbers], []
    for n, v in present:
        if not isinstance(v, str | int):
            raise ValueError(f"{path}, line {n}: label must be an integer or a class name, got {v!r}")
    classes = sorted({str(v).strip() for _, v in present})
    lookup = {c: k for k, c in enumerate(classes)}
    labels = [-1 if v is None or str(v).strip() == "" else lookup[str(v).strip()] for _, v in raw]
    return labels, classes


@DATASETS.register("manifest", help="Images and captions listed in a CSV / TSV / JSONL manifest (data.root = the file)")
class ManifestDataset(SkipsBadFiles, ImageDataset):
    """Image–caption pairs listed in a manifest file.

    The manifest is a CSV (or TSV) file with a header row, or a JSONL file with one object per line.
    Each row names an image (``image_key``) and its caption (``caption_key``); an optional ``label``
    column holds an integer label or a class name (class names become ``classes``, sorted). Relative
    image paths are resolved against ``root`` or, by default, the manifest's folder. Empty labels
    are ``-1``.

    Images listed but missing on disk are skipped with one warning that counts them. Like
    :class:`semmim.data.ImageFolderDataset`, a file that fails to decode is skipped at load time
    (a deterministic substitute is returned, with its own caption, and the item names the broken file in
    ``"bad"``; the trainer applies ``max_bad_fraction`` to the distinct broken files of each epoch). More
    than ``max(1, max_bad_fraction * rows)`` missing files stop at construction with ``FileNotFoundError``.

    Args:
        path: the manifest file (``.csv``, ``.tsv``, ``.jsonl`` / ``.ndjson``; another suffix is sniffed).
        root: folder against which relative image paths are resolved (default: the manifest's folder).
        image_key: column / key holding the image path.
        caption_key: column / key holding the caption.
        transform: callable on a PIL image returning a (C, H, W) tensor; ``None`` = plain conversion.
        in_chans: 3 decodes to RGB, 1 to grayscale.
        max_bad_fraction: tolerated fraction of missing or undecodable images.
        max_image_pixels: larger images (width x height, from the header) are undecodable files.
        decode: "pil" (PIL images) or "torchvision" (uint8 tensors, see :mod:`semmim.data.tensor_decode`).

    Raises:
        FileNotFoundError: the manifest does not exist, or (too many of) its images are missing.
        ValueError: a needed column is absent (the message lists the columns found), a JSONL line is
            not a JSON object, the manifest is empty, or a row has no image path.

    Examples:
        >>> ds = ManifestDataset("/data/cc3m/train.csv", image_key="filepath", caption_key="title")  # doctest: +SKIP
        >>> ds.load(0)[0].size, ds.caption(0)  # doctest: +SKIP
        ((500, 375), 'a dog running on the beach')
    """

    name = "manifest"

    def __init__(
        self,
        path: str | os.PathLike[str],
        root: str | os.PathLike[str] | None = None,
        image_key: str = "image",
        caption_key: str = "caption",
        transform: Transform | None = None,
        in_chans: int = 3,
        max_bad_fraction: float = 0.01,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        decode: str = "pil",
    ) -> None:
        super().__init__(transform)
        file_decoder(decode)  # an unknown value fails here, not at the first load
        self.decode = decode
        mpath = Path(path).expanduser()
        if not mpath.exists():
            raise FileNotFoundError(f"manifest file not found: {mpath}")
        if mpath.is_dir():
            raise IsADirectoryError(f"manifest path is a directory, expected a .csv or .jsonl file: {mpath}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction}")
        self.path = str(mpath)
        self.root = str(mpath)
        base = Path(root).expanduser() if root is not None else mpath.parent
        self.image_root = str(base)
        self.mode = image_mode_for(in_chans)
        self.in_chans = in_chans
        self.image_key = image_key
        self.caption_key = caption_key
        self.max_bad_fraction = float(max_bad_fraction)
        self.max_image_pixels = max_image_pixels
        self.format = _manifest_format(mpath)

        rows = _read_rows(mpath, self.format, [image_key, caption_key])
        if not rows:
            raise ValueError(f"{mpath}: the manifest lists no images")
        labels, classes = _parse_labels(mpath, [(n, rec.get(LABEL_KEY)) for n, rec in rows])
        self.classes = classes
        self.total_rows = len(rows)

        samples: list[tuple[str, int]] = []
        captions: list[str] = []
        missing: list[str] = []
        for (lineno, rec), label in zip(rows, labels, strict=True):
            rel = rec[image_key]
            if not isinstance(rel, str) or not rel.strip():
                raise ValueError(f"{mpath}, line {lineno}: empty or non-string image path {rel!r} in '{image_key}'")
            cap = rec[caption_key]
            if cap is None:
                cap = ""
            elif not isinstance(cap, str | int | float):
                raise ValueError(
                    f"{mpath}, line {lineno}: caption '{caption_key}' must be a string, got {type(cap).__name__}"
                )
            p = Path(rel.strip()).expanduser()
            full = p if p.is_absolute() else base / p
            if not full.is_file():
                missing.append(str(full))
                continue
            samples.append((str(full), int(label)))
            captions.append(str(cap))
        self.samples = samples
        self.captions = captions
        self.targets = [t for _, t in samples]
        self.missing_files = missing
        self.bad_files: list[str] = list(missing)
        self._bad_index: dict[int, str] = {}
        if not samples:
            shown = ", ".join(missing[:3])
            raise FileNotFoundError(
                f"{mpath}: none of the {len(rows)} listed images exist (e.g. {shown}); relative paths are "
                f"resolved against {base} (pass root= / data.root for another folder)"
            )
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            warnings.warn(
                f"{mpath}: skipping {len(missing)} of {len(rows)} listed images that do not exist ({shown})",
                RuntimeWarning,
                stacklevel=2,
            )
            if len(missing) > self.max_bad_files:
                raise FileNotFoundError(
                    f"{mpath}: {len(missing)} of {len(rows)} listed images do not exist, more than "
                    f"max_bad_fraction={self.max_bad_fraction} allows ({self.max_bad_files}): {shown}"
                )

    def __len__(self) -> int:
        return len(self.samples)

    def _bad_total(self) -> int:
        return self.total_rows

    def _source(self) -> str:
        return str(self.path)

    def load(self, index: int) -> tuple[Decoded, int]:
        """Decode sample ``index`` (or the next decodable one if it is broken).

        Returns:
            ``(image, label)``: a PIL image in mode "RGB" (or "L"), or a uint8 tensor (C, H, W) with
            ``decode="torchvision"``, and the label or ``-1``.
        """
        image, label, _ = self.decode_first_good(check_index(index, len(self)))
        return image, label

    def caption(self, index: int) -> str:
        """The caption of sample ``index`` (of the sample :meth:`load` served for it)."""
        return self.captions[self.served_index(check_index(index, len(self)))]

    def __getitem__(self, index: int) -> Sample:
        """``{"image", "label", "index", "caption"}`` without seeded augmentation."""
        item = super().__getitem__(index)
        item["caption"] = self.caption(item["index"])
        return item


# --------------------------------------------------------------------------------------------------
# Captions from class names
# --------------------------------------------------------------------------------------------------


def _peek_label(dataset: Any, index: int) -> int:
    """The label of ``dataset[index]`` without decoding the image when the dataset allows it."""
    while isinstance(dataset, SubsetDataset):
        index = dataset.indices[index]
        dataset = dataset.dataset
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return int(targets[index])
    return int(dataset.load(index)[1])


class ClassCaptions(ImageDataset):
    """Captions a labelled dataset with class-name templates: ``caption(i)`` = "a photo of a {class}.".

    The template of item ``i`` in epoch ``e`` is ``templates[sample_seed(seed, e, i) % len(templates)]``,
    so it is deterministic, and usually changes from one epoch to the next (call :meth:`set_epoch`;
    :class:`semmim.data.SeededDataset` forwards its epoch). Class names pass through
    :func:`caption_class_name` ("T-shirt/top" -> "t-shirt or top") unless ``normalize=False``.
    Unlabelled items (label ``-1``) get an empty caption.

    ``load``, ``classes``, ``root``, ``name`` and ``transform`` are those of the wrapped dataset. The
    label of the most recent :meth:`load` is remembered, so a ``load(i)`` followed by ``caption(i)``
    decodes once, and an image folder that replaced a broken file by the next one captions the
    image it actually served.

    Args:
        dataset: a labelled dataset with ``load(i) -> (PIL.Image, label)``.
        classes: class names indexed by label (defaults to ``dataset.classes``).
        templates: caption templates with a ``{c}`` placeholder.
        seed: base seed of the template choice.
        normalize: write class names as in a sentence (see :func:`caption_class_name`).

    Raises:
        ValueError: there are no class names, or a template lacks the placeholder.
    """

    def __init__(
        self,
        dataset: Any,
        classes: Sequence[str] | None = None,
        templates: Sequence[str] = TEMPLATES,
        seed: int = 0,
        *,
        normalize: bool = True,
    ) -> None:
        super().__init__(getattr(dataset, "transform", None))
        if not hasattr(dataset, "load"):
            raise TypeError(f"ClassCaptions needs a dataset with a load(i) method, got {type(dataset).__name__}")
        names = list(classes if classes is not None else getattr(dataset, "classes", []) or [])
        if not names:
            raise ValueError(
                f"captions from class-name templates need class names, but {getattr(dataset, 'name', 'the dataset')} "
                f"({type(dataset).__name__}) has none (unlabelled data); pass classes= or use a labelled dataset"
            )
        self.dataset = dataset
        self.classes = [str(c) for c in names]
        self.class_names = [caption_class_name(c) if normalize else str(c) for c in self.classes]
        self.templates = _check_templates(templates)
        self.seed = int(seed)
        self.epoch = 0
        self.name = getattr(dataset, "name", "dataset")
        self.root = getattr(dataset, "root", None)
        self.split = getattr(dataset, "split", None)
        self._last: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose templates :meth:`caption` returns (forwarded to the wrapped dataset)."""
        self.epoch = int(epoch)
        inner: Callable[[int], None] | None = getattr(self.dataset, "set_epoch", None)
        if callable(inner):
            inner(self.epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> tuple[Decoded, int]:
        """The wrapped dataset's ``load(index)``."""
        index = check_index(index, len(self))
        img, label = self.dataset.load(index)
        self._last = (index, int(label))
        return img, int(label)

    def label(self, index: int) -> int:
        """The label of item ``index`` (decoding only when the dataset has no ``targets``)."""
        index = check_index(index, len(self))
        if self._last is not None and self._last[0] == index:
            return self._last[1]
        return _peek_label(self.dataset, index)

    def template_index(self, index: int, epoch: int | None = None) -> int:
        """Which template item ``index`` uses in ``epoch`` (default: the current epoch)."""
        e = self.epoch if epoch is None else int(epoch)
        return sample_seed(self.seed, e, index) % len(self.templates)

    def caption(self, index: int) -> str:
        """A template filled with the class name of item ``index`` (``""`` when it is unlabelled)."""
        index = check_index(index, len(self))
        label = self.label(index)
        if label < 0:
            return ""
        if label >= len(self.class_names):
            raise IndexError(f"label {label} of item {index} has no class name (there are {len(self.class_names)})")
        return _fill(self.templates[self.template_index(index)], self.class_names[label])

    def __getitem__(self, index: int) -> Sample:
        """``{"image", "label", "index", "caption"}`` without seeded augmentation."""
        index = check_index(index, len(self))
        img, label = self.load(index)
        return {
            "image": apply_transform(self.transform, img),
            "label": label,
            "index": index,
            "caption": self.caption(index),
        }


class CaptionSubset(SubsetDataset):
    """A :class:`semmim.data.SubsetDataset` that keeps the wrapped dataset's ``caption`` and ``set_epoch``."""

    def caption(self, index: int) -> str:
        """The caption of ``dataset[indices[index]]``."""
        return str(self.dataset.caption(self.indices[check_index(index, len(self))]))  # type: ignore[attr-defined]

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the wrapped dataset, if it has epochs."""
        inner = getattr(self.dataset, "set_epoch", None)
        if callable(inner):
            inner(int(epoch))

    def __getitem__(self, index: int) -> Sample:
        item = super().__getitem__(index)
        item["caption"] = self.caption(item["index"])
        return item


def subset_keeping_captions(dataset: Any, indices: Sequence[int]) -> SubsetDataset:
    """A :class:`semmim.data.SubsetDataset` of ``dataset``; a :class:`CaptionSubset` when it has captions."""
    return CaptionSubset(dataset, indices) if has_captions(dataset) else SubsetDataset(dataset, indices)
