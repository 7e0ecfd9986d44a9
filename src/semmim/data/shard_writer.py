"""Writing a dataset as WebDataset shards in the img2dataset layout (:func:`write_shards`).

Sample ``KEY`` of a shard is ``KEY.jpg`` (or ``.png`` / ``.webp``), ``KEY.txt`` (the caption, UTF-8) and, for
labelled data, ``KEY.cls`` (the integer label as text); :data:`SHARD_MANIFEST` next to the shards lists them
with their sample counts. :class:`semmim.data.ShardStream` reads them back.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from semmim.data.captions import has_captions
from semmim.data.datasets import bad_of_last_load
from semmim.data.summary import describe

__all__ = ["SHARD_MANIFEST", "write_shards"]

SHARD_MANIFEST = "manifest.json"
"""Name of the file :func:`write_shards` writes next to the shards."""

_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _unwrap_source(source: Any) -> Any:
    ds = source
    while not hasattr(ds, "load") and hasattr(ds, "dataset"):
        ds = ds.dataset  # e.g. a SeededDataset: write the undecorated images
    if not hasattr(ds, "load"):
        raise TypeError(f"write_shards needs a dataset with load(i) -> (PIL.Image, label), got {type(source).__name__}")
    return ds


def _encode_image(img: Image.Image, fmt: str, quality: int) -> bytes:
    if fmt in ("jpg", "webp") and img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format=_FORMATS[fmt], quality=quality)
    return buf.getvalue()


def _describe_source(ds: Any) -> str:
    try:
        return describe(ds)
    except Exception:  # describing is best effort, writing must not fail over it
        return type(ds).__name__


def write_shards(
    source: Any,
    out_dir: str | os.PathLike[str],
    shard_size: int = 1000,
    prefix: str = "shard",
    image_format: str = "jpg",
    quality: int = 95,
    progress: bool = True,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write a dataset as WebDataset shards in the img2dataset layout, plus ``manifest.json``.

    Sample ``i`` of ``source`` becomes ``KEY.jpg`` (``image_format``), ``KEY.txt`` (``source.caption(i)``,
    or ``""`` when the dataset has no captions: wrap a labelled dataset in
    :class:`semmim.data.ClassCaptions` for template captions) and, when its label is ``>= 0``,
    ``KEY.cls``; ``KEY`` is ``i`` zero-padded to 9 digits, so :class:`ShardStream` gives it back as
    ``index``. Shards are ``out_dir/{prefix}-000000.tar``, ... with ``shard_size`` samples each (the
    last may hold fewer); each is written to a temporary name and renamed when complete. An unreadable image
    file of the source (which ``source.load`` replaces by a substitute) is left out, not written as a duplicate
    of another sample: a warning names the files and the manifest lists them under ``skipped``.
    ``manifest.json`` holds ``num_samples`` (written), ``num_shards``, ``shards`` (``[{"file", "num_samples"}]``),
    ``classes``, ``image_format`` and a description of the source.

    Args:
        source: a dataset with ``load(i) -> (PIL.Image, label)`` and ``len`` (a
            :class:`semmim.data.SeededDataset` is unwrapped: images are stored without augmentation).
        out_dir: output folder (created if needed).
        shard_size: samples per shard.
        prefix: shard file name prefix.
        image_format: ``"jpg"``, ``"png"`` (lossless) or ``"webp"``.
        quality: JPEG / WebP quality (1-100).
        progress: show a tqdm progress bar.
        overwrite: replace existing ``{prefix}-NNNNNN.tar`` shards in ``out_dir`` (otherwise an error).

    Returns:
        The shard paths, in order.

    Raises:
        FileExistsError: ``out_dir`` already holds shards with this prefix and ``overwrite`` is false.
        ValueError: an empty source or a bad argument.
    """
    from tqdm.auto import tqdm
    from webdataset import TarWriter

    ds = _unwrap_source(source)
    n = len(ds)
    if n == 0:
        raise ValueError("the source dataset is empty; there is nothing to write")
    fmt = image_format.lower().lstrip(".")
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in ("jpg", "png", "webp"):
        raise ValueError(f"image_format must be jpg, png or webp, got {image_format!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must lie in [1, 100], got {quality}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
        raise ValueError(f"prefix may only hold letters, digits, '_', '.' and '-', got {prefix!r}")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    shard_name = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")
    existing = sorted(p for p in out.iterdir() if shard_name.fullmatch(p.name))
    if existing:
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds {len(existing)} shard(s) named {prefix}-NNNNNN.tar; pass overwrite=True "
                f"(--overwrite) or choose another folder or prefix"
            )
        for p in existing:
            p.unlink()

    captioned = has_captions(ds)
    width = max(9, len(str(n - 1)))
    paths: list[Path] = []
    records: list[dict[str, Any]] = []
    skipped: list[str] = []  # "<path>: <reason>" of the unreadable files left out
    tmp: Path | None = None
    bar = tqdm(total=n, unit="img", desc="writing shards", disable=not progress, dynamic_ncols=True)
    state: dict[str, Any] = {"file": None, "writer": None, "count": 0}

    def close_shard() -> None:
        nonlocal tmp
        if state["writer"] is None:
            return
        state["writer"].close()
        state["file"].close()
        path = out / f"{prefix}-{len(paths):06d}.tar"
        assert tmp is not None
        os.replace(tmp, path)
        tmp = None
        paths.append(path)
        records.append({"file": path.name, "num_samples": state["count"]})
        state.update(file=None, writer=None, count=0)
        bar.set_postfix_str(f"{len(paths)} shards", refresh=False)

    try:
        for i in range(n):
            img, label = ds.load(i)
            was_skipped, bad = bad_of_last_load(ds)
            bar.update(1)
            if was_skipped:  # ds.load served a substitute: leave the unreadable file out instead of a duplicate
                skipped.append(bad)
                continue
            if state["writer"] is None:
                tmp = out / f"{prefix}-{len(paths):06d}.tar.tmp"
                state["file"] = open(tmp, "wb")  # noqa: SIM115 (closed in close_shard)
                state["writer"] = TarWriter(state["file"], encoder=False)
            sample: dict[str, Any] = {
                "__key__": f"{i:0{width}d}",
                fmt: _encode_image(img, fmt, quality),
                "txt": (str(ds.caption(i)) if captioned else "").encode("utf-8"),
            }
            if int(label) >= 0:
                sample["cls"] = str(int(label)).encode("ascii")
            state["writer"].write(sample)
            state["count"] += 1
            if state["count"] == shard_size:
                close_shard()
        close_shard()
    finally:
        bar.close()
        if state["file"] is not None:
            state["file"].close()
        if tmp is not None and tmp.exists():
            tmp.unlink()
    if skipped:
        shown = "; ".join(skipped[:3]) + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        warnings.warn(
            f"left out {len(skipped)} unreadable image(s) of {n} (listed in {SHARD_MANIFEST} under 'skipped'): {shown}",
            RuntimeWarning,
            stacklevel=2,
        )
    meta = {
        "format": "webdataset",
        "layout": "img2dataset",
        "created_by": "semmim",
        "num_samples": sum(r["num_samples"] for r in records),
        "num_shards": len(paths),
        "shard_size": shard_size,
        "image_format": fmt,
        "captions": captioned,
        "classes": [str(c) for c in getattr(ds, "classes", []) or []],
        "source": _describe_source(ds),
        "shards": records,
        "skipped": skipped,
    }
    manifest = out / SHARD_MANIFEST
    tmp_manifest = manifest.with_name(manifest.name + ".tmp")
    tmp_manifest.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_manifest, manifest)
    return paths
