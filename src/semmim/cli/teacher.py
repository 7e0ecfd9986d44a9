"""``semmim teacher cache``: run a config's teacher once over its training images and store the token maps.

Argument parsing only; the teacher and the data load when the command runs (:mod:`semmim.teachers.cache_writer`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def cmd_teacher_cache(args: argparse.Namespace) -> int:
    """Write (or complete) the cache; prints a JSON summary (directory, images, chunks written/skipped, size)."""
    from semmim.cli.codebook import default_device
    from semmim.config import ConfigError, find_config, load_config
    from semmim.teachers.cache_writer import write_cache

    overrides = [*args.overrides, "teacher.cache=null", "teacher.cache_crops=nearest"]  # it may point at the cache
    cfg = load_config(find_config(args.config) if args.config is not None else None, overrides)
    if cfg.teacher.name in (None, "none"):
        raise ConfigError("semmim teacher cache runs the config's teacher: set teacher.name (and its weights)")
    device = default_device(args.device)
    report = write_cache(
        cfg,
        args.out,
        size=args.size,
        dtype=args.dtype,
        chunk_size=args.chunk_size,
        rank=args.rank,
        world=args.world,
        batch_size=args.batch_size,
        device=device,
        attn=True if args.attn else None,
        crops=args.crops,
        crop_side=args.crop_side,
        pca=args.pca,
        pca_fit=args.pca_fit,
        random_crops=args.random_crops,
    )
    print(json.dumps(report.as_dict()))
    return 0


def add_teacher_parser(sub: Any) -> None:
    """Add ``teacher`` (with ``cache``) to an ``argparse`` subparsers object.

    Examples:
        >>> parser = argparse.ArgumentParser(prog="semmim")
        >>> add_teacher_parser(parser.add_subparsers(dest="command"))
        >>> args = parser.parse_args(["teacher", "cache", "--config", "run.yaml", "--out", "cache"])
        >>> args.dtype, args.chunk_size, args.size
        ('float16', 1024, None)
    """
    p = sub.add_parser(
        "teacher",
        help="teacher tools: cache its token maps",
        description="`semmim teacher cache --config run.yaml --out DIR`, then train with teacher.cache=DIR.",
    )
    inner = p.add_subparsers(dest="teacher_command", metavar="subcommand")
    c = inner.add_parser(
        "cache",
        help="run the teacher once per training image and store its token maps (for teacher.cache)",
        description="Resize every image of the config's training data (data.*) whole to --size and run the config's "
        "teacher (teacher.*) on it once (and on --crops fixed crops of it); store its token map (float16, or int8 "
        "with a scale per token), its global token and, when method.masker needs it, its CLS attention map, in "
        "chunked safetensors files with a cache.json. Chunks are written atomically and a rerun skips those done; "
        "rank r of W writes chunks r::W. Train with teacher.cache=DIR: each view's target is then cut from its "
        "image's map (RoIAlign to its crop box, then its flip) and no teacher runs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("--config", default=None, help="YAML config of the run (a path, or a shipped name)")
    c.add_argument("--out", required=True, help="cache directory (created; a rerun completes it)")
    c.add_argument("--size", type=int, default=None, help="images are resized to SIZE x SIZE; unset = the teacher's")
    c.add_argument("--dtype", choices=["float16", "int8"], default="float16", help="how token maps are stored")
    c.add_argument("--chunk-size", type=int, default=1024, help="images per chunk file")
    c.add_argument("--batch-size", type=int, default=None, help="teacher batch; unset = data.batch_size")
    c.add_argument("--rank", type=int, default=None, help="this writer's rank; unset = $RANK or 0")
    c.add_argument("--world", type=int, default=None, help="number of writers; unset = $WORLD_SIZE or 1")
    c.add_argument(
        "--attn", action="store_true", help="store the CLS attention maps even if the config's masker needs none"
    )
    c.add_argument(
        "--crops",
        type=int,
        choices=[0, 5, 9],
        default=0,
        help="also store the maps of fixed crops of every image (5: corners + centre, 9: a 3x3 grid); a training "
        "view takes its global token and the map inside the stored view nearest it (largest IoU), so targets follow "
        "the crop more closely, for K more teacher passes and K times the storage",
    )
    c.add_argument(
        "--crop-side",
        type=float,
        default=None,
        help="the crops' width and height, a fraction of the image's; unset = 0.8",
    )
    c.add_argument(
        "--random-crops",
        type=int,
        default=0,
        help="instead of --crops, store K random resized crops per image, drawn as training draws them "
        "(data.crop_scale, data.hflip), with their boxes and flips; train with teacher.cache_crops=stored to use "
        "exactly these views, so each view's target is its own teacher output (each image then has only K views "
        "over the whole run), or with the default teacher.cache_crops=nearest to use them as nearest views",
    )
    c.add_argument(
        "--pca",
        type=int,
        default=None,
        help="store the map tokens as coordinates on this many principal directions (fitted on --pca-fit images, "
        "saved as pca.safetensors); training maps them back to the teacher's width. Unset: the full width",
    )
    c.add_argument(
        "--pca-fit", type=int, default=None, help="images the PCA is fitted on, spread over the data; unset = 4096"
    )
    c.add_argument("--device", default=None, help="where the teacher runs; unset = cuda if available, else cpu")
    c.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.limit=5000 teacher.path=RUN_DIR")
    c.set_defaults(func=cmd_teacher_cache)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
