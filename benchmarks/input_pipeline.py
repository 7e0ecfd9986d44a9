"""Can the input pipeline feed a GPU? Images/s per CPU core of the full training input, three ways.

At ViT-B, MAE trains at about 5,000 images/s per GPU; JPEG decoding and the random resized crop of
ImageNet-size images on the CPU are the usual bottleneck. This script builds an ImageFolder of a few
hundred real photos at ImageNet size (about 500 x 375, JPEG quality 90), made by random crops, flips
and colour changes of the photos that ship with installed packages (scikit-learn's ``china.jpg`` and
``flower.jpg``, matplotlib's ``grace_hopper.jpg``; ``--photos`` adds others), and times one epoch of
the whole training input (read, decode, random resized crop to 224, flip, to tensor, collate into a
batch) in one process with one thread and ``num_workers=0``, i.e. per CPU core, for:

* ``torchvision``: the baseline, ``torchvision.datasets.ImageFolder`` + ``RandomResizedCrop(224)`` +
  ``RandomHorizontalFlip`` + ``ToTensor`` + ``DataLoader`` (bilinear, torchvision's default);
* ``semmim-pil``: semmim's default path (``data.decode=pil``: PIL decode, seeded PIL transforms,
  bicubic), float and ``data.uint8=true``;
* ``semmim-tv``: ``data.decode=torchvision`` (``decode_jpeg`` into uint8, crop then resize on uint8
  tensors, bicubic by default, bilinear as a variant), float and uint8.

All arms run the same crop scale (``--crop-scale``, semmim's MAE default 0.2-1). The arms alternate in
rounds in the same process (the order rotates each round) and the report gives medians, the ratio to
the baseline and the CPU cores one GPU at ``--target`` images/s would need. A second table times the
stages of one image (read, decode, crop+resize, flip, to tensor) and, unless ``--workers 0``, a third
runs the baseline and the fast path with ``--workers`` DataLoader workers. Writes ``results.json`` and
``results.md`` into ``--out``.

    python benchmarks/input_pipeline.py                               # 300 photos x 5 rounds
    python benchmarks/input_pipeline.py --images 32 --rounds 1 --workers 0 --out /tmp/ip   # quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import io
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageEnhance, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from semmim.config import DataConfig  # noqa: E402
from semmim.data import TensorPretrainTransform, build_dataset, build_loader  # noqa: E402

PACKAGE_PHOTOS = (
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)
"""Photos that ship with installed packages: (package, path inside it)."""

ARMS = (
    "torchvision",
    "semmim-pil",
    "semmim-pil-uint8",
    "semmim-tv",
    "semmim-tv-uint8",
    "semmim-tv-uint8-bilinear",
)
BASELINE = "torchvision"


def log(msg: str) -> None:
    print(f"[input_pipeline] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ data
def package_photos() -> list[Path]:
    """The photos of :data:`PACKAGE_PHOTOS` that are installed."""
    found = []
    for package, rel in PACKAGE_PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(next(iter(spec.submodule_search_locations))) / rel
        if path.is_file():
            found.append(path)
    return found


def variant(src: Image.Image, rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A random crop (35-100% of the area, the aspect of ``size``), flip and colour change of ``src``, resized."""
    w, h = src.size
    out_w, out_h = size
    aspect = out_w / out_h
    area = rng.uniform(0.35, 1.0) * w * h
    cw = min(w, round(math.sqrt(area * aspect)))
    ch = min(h, round(cw / aspect))
    cw = min(w, round(ch * aspect))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = src.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
    return ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))


def make_photo_folder(
    root: Path, n: int, photos: Sequence[Path], seed: int = 0, quality: int = 90, classes: int = 10
) -> dict[str, Any]:
    """Write ``n`` distinct JPEGs (500 x 375, one in five portrait 375 x 500) to ``root/class_k/`` from ``photos``."""
    if not photos:
        raise FileNotFoundError(
            "no source photos found: install scikit-learn or matplotlib (they ship sample photos) or pass --photos"
        )
    sources = [Image.open(p).convert("RGB") for p in photos]
    rng = random.Random(seed)
    sizes = []
    for i in range(n):
        size = (375, 500) if rng.random() < 0.2 else (500, 375)
        img = variant(sources[i % len(sources)], rng, size)
        path = root / f"class_{i % classes:02d}" / f"img_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, "JPEG", quality=quality)
        sizes.append(path.stat().st_size)
    return {
        "images": n,
        "sources": [str(p) for p in photos],
        "quality": quality,
        "mean_file_kb": round(statistics.fmean(sizes) / 1024, 1),
    }


def ensure_data(args: argparse.Namespace, tmp: Path) -> tuple[Path, dict[str, Any]]:
    """The ImageFolder to read: ``--data`` (made there if it holds no images) or a temporary one."""
    root = args.data if args.data is not None else tmp / "photos"
    existing = sorted(root.rglob("*.jpg")) if root.is_dir() else []
    if len(existing) >= args.images:
        sizes = [p.stat().st_size for p in existing]
        return root, {"images": len(existing), "sources": ["(existing folder)"], "quality": None,
                      "mean_file_kb": round(statistics.fmean(sizes) / 1024, 1)}  # fmt: skip
    photos = [*package_photos(), *args.photos]
    log(f"writing {args.images} photos from {len(photos)} source photo(s) to {root}")
    return root, make_photo_folder(root, args.images, photos, seed=args.seed, quality=args.quality)


# ------------------------------------------------------------------------------------------------ arms
def torchvision_loader(root: Path, args: argparse.Namespace, workers: int) -> Iterable[Any]:
    """The baseline: torchvision ImageFolder + RandomResizedCrop + RandomHorizontalFlip + ToTensor + DataLoader."""
    from torchvision import datasets
    from torchvision import transforms as T

    transform = T.Compose(
        [T.RandomResizedCrop(args.img_size, scale=tuple(args.crop_scale)), T.RandomHorizontalFlip(), T.ToTensor()]
    )
    ds = datasets.ImageFolder(str(root), transform=transform)
    return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=workers)


def semmim_loader(root: Path, args: argparse.Namespace, workers: int, arm: str) -> Iterable[Any]:
    """semmim's own training input: build_dataset (seeded transforms) + build_loader, in a shuffled order."""
    cfg = DataConfig(
        name="imagefolder",
        root=str(root),
        decode="torchvision" if arm.startswith("semmim-tv") else "pil",
        uint8="uint8" in arm,
        crop_scale=list(args.crop_scale),
    )
    ds = build_dataset(cfg, img_size=args.img_size, in_chans=3, train=True, seed=args.seed)
    if arm.endswith("-bilinear"):
        ds.transform = TensorPretrainTransform(
            args.img_size, crop_scale=args.crop_scale, uint8=cfg.uint8, interpolation="bilinear"
        )
    sampler = torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(args.seed))
    return build_loader(
        ds, batch_size=args.batch_size, num_workers=workers, pin_memory=False, sampler=sampler, drop_last=False
    )


def make_loader(arm: str, root: Path, args: argparse.Namespace, workers: int = 0) -> Iterable[Any]:
    return torchvision_loader(root, args, workers) if arm == BASELINE else semmim_loader(root, args, workers, arm)


def images_of(batch: Any) -> torch.Tensor:
    return batch["image"] if isinstance(batch, dict) else batch[0]


def time_epoch(loader: Iterable[Any], skip_first: bool = False) -> tuple[float, int]:
    """Seconds and images of one pass over ``loader`` (from the first batch on with ``skip_first``)."""
    start = time.perf_counter()
    n = 0
    for b, batch in enumerate(loader):
        if skip_first and b == 0:
            start = time.perf_counter()
            continue
        n += int(images_of(batch).shape[0])
    return time.perf_counter() - start, n


def run_rounds(
    arms: Sequence[str], root: Path, args: argparse.Namespace, rounds: int, workers: int
) -> dict[str, list[float]]:
    """Images/s of every arm in every round; the arm order rotates each round."""
    rates: dict[str, list[float]] = {a: [] for a in arms}
    loaders = {a: make_loader(a, root, args, workers) for a in arms}
    for arm in arms:  # warm-up: page cache, lazy imports, kernel dispatch
        it = iter(loaders[arm])
        next(it)
        del it
    for r in range(rounds):
        order = list(arms[r % len(arms) :]) + list(arms[: r % len(arms)])
        for arm in order:
            seconds, n = time_epoch(loaders[arm], skip_first=workers > 0)
            rates[arm].append(n / seconds)
        log(f"round {r + 1}/{rounds} (workers={workers}): " + ", ".join(f"{a} {rates[a][-1]:.0f}" for a in arms))
    return rates


# ---------------------------------------------------------------------------------------------- stages
def time_per_image(fn: Callable[[Any], Any], items: Sequence[Any], repeats: int = 3) -> float:
    """Median over ``repeats`` passes of the mean milliseconds of ``fn`` per item."""
    per = []
    for _ in range(repeats):
        start = time.perf_counter()
        for x in items:
            fn(x)
        per.append((time.perf_counter() - start) * 1e3 / len(items))
    return statistics.median(per)


def stage_times(root: Path, args: argparse.Namespace) -> dict[str, float]:
    """Milliseconds per image of each stage, on up to 100 of the photos."""
    import warnings

    from torchvision import transforms as T
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import InterpolationMode

    from semmim.data.seeding import seeded
    from semmim.data.tensor_transforms import resize_uint8

    paths = sorted(root.rglob("*.jpg"))[:100]
    blobs = [p.read_bytes() for p in paths]
    warnings.simplefilter("ignore", DeprecationWarning)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    tv = [decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB) for b in blobs]
    rng = random.Random(0)
    boxes = [T.RandomResizedCrop.get_params(t, list(args.crop_scale), [3 / 4, 4 / 3]) for t in tv]
    rng.shuffle(boxes)
    size = [args.img_size, args.img_size]
    crops_pil = [T.functional.resized_crop(im, *b, size) for im, b in zip(pil, boxes, strict=True)]
    out: dict[str, float] = {}
    out["read file"] = time_per_image(lambda p: p.read_bytes(), paths)
    out["header (PIL Image.open, lazy)"] = time_per_image(lambda b: Image.open(io.BytesIO(b)).size, blobs)
    out["decode: PIL (open + convert RGB)"] = time_per_image(lambda b: Image.open(io.BytesIO(b)).convert("RGB"), blobs)
    out["decode: torchvision decode_jpeg"] = time_per_image(
        lambda b: decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB), blobs
    )
    for name, mode in (("bilinear", InterpolationMode.BILINEAR), ("bicubic", InterpolationMode.BICUBIC)):
        out[f"crop+resize: PIL {name}"] = time_per_image(
            lambda ib, m=mode: T.functional.resized_crop(ib[0], *ib[1], size, interpolation=m),
            list(zip(pil, boxes, strict=True)),
        )
    for name in ("bilinear", "bicubic"):
        out[f"crop+resize: uint8 tensor {name} (antialias)"] = time_per_image(
            lambda ib, m=name: resize_uint8(
                ib[0][:, ib[1][0] : ib[1][0] + ib[1][2], ib[1][1] : ib[1][1] + ib[1][3]], (size[0], size[1]), m
            ),
            list(zip(tv, boxes, strict=True)),
        )
    out["crop+resize: float tensor bilinear (torchvision v2, antialias)"] = time_per_image(
        lambda ib: T.functional.resized_crop(ib[0].float(), *ib[1], size, antialias=True),
        list(zip(tv[:30], boxes[:30], strict=True)),
    )
    out["flip: PIL 224"] = time_per_image(ImageOps.mirror, crops_pil)
    tensors = [T.functional.pil_to_tensor(c) for c in crops_pil]
    out["flip: uint8 tensor 224"] = time_per_image(lambda t: t.flip(-1), tensors)
    out["to tensor: ToTensor (float)"] = time_per_image(T.ToTensor(), crops_pil)
    out["to tensor: PILToTensor (uint8)"] = time_per_image(T.PILToTensor(), crops_pil)

    def enter_and_leave(i: int) -> None:
        with seeded(0, 0, i):
            pass

    out["seeded() scope (semmim)"] = time_per_image(enter_and_leave, list(range(100)))
    return {k: round(v, 4) for k, v in out.items()}


# --------------------------------------------------------------------------------------------- report
def env_info() -> dict[str, Any]:
    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    import torchvision
    from PIL import features

    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": Image.__version__,
        "libjpeg_turbo": features.check_feature("libjpeg_turbo"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def summarize(rates: dict[str, list[float]], target: float) -> list[dict[str, Any]]:
    base = statistics.median(rates[BASELINE]) if BASELINE in rates else None
    rows = []
    for arm, values in rates.items():
        med = statistics.median(values)
        paired = [v / b for v, b in zip(values, rates[BASELINE], strict=True)] if BASELINE in rates else []
        rows.append(
            {
                "arm": arm,
                "img_per_s": round(med, 1),
                "rounds": [round(v, 1) for v in values],
                "ms_per_img": round(1e3 / med, 3),
                "vs_baseline": round(med / base, 3) if base else None,
                "vs_baseline_paired": round(statistics.median(paired), 3) if paired else None,
                "vs_baseline_rounds": [round(p, 2) for p in paired],
                "cores_for_target": math.ceil(target / med),
            }
        )
    return rows


ARM_TEXT = {
    "torchvision": "torchvision ImageFolder, PIL decode, RandomResizedCrop (bilinear) + flip + ToTensor",
    "semmim-pil": "data.decode=pil (PIL decode, seeded PIL crop bicubic + flip, float)",
    "semmim-pil-uint8": "data.decode=pil, data.uint8=true",
    "semmim-tv": "data.decode=torchvision (decode_jpeg, uint8 crop+resize bicubic, float out)",
    "semmim-tv-uint8": "data.decode=torchvision, data.uint8=true",
    "semmim-tv-uint8-bilinear": "data.decode=torchvision, data.uint8=true, bilinear resize",
}


def table(rows: Sequence[dict[str, Any]], target: float, per: str) -> list[str]:
    lines = [
        f"| arm | what | img/s {per} (median) | ms/img | vs torchvision | paired | cores for {target:.0f} img/s "
        "| img/s by round |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = f"{r['vs_baseline']:.2f}x" if r["vs_baseline"] is not None else "n/a"
        paired = f"{r['vs_baseline_paired']:.2f}x" if r["vs_baseline_paired"] is not None else "n/a"
        rounds = ", ".join(f"{v:.0f}" for v in r["rounds"])
        lines.append(
            f"| {r['arm']} | {ARM_TEXT.get(r['arm'], '')} | {r['img_per_s']:.0f} | {r['ms_per_img']:.2f} | {ratio} "
            f"| {paired} | {r['cores_for_target']} | {rounds} |"
        )
    return lines


def write_markdown(report: dict[str, Any], path: Path) -> None:
    env, cfg, data = report["env"], report["config"], report["data"]
    target = cfg["target"]
    lines = [
        "# Input pipeline: images/s per CPU core",
        "",
        f"torch {env['torch']}, torchvision {env['torchvision']}, Pillow {env['pillow']} (libjpeg-turbo: "
        f"{env['libjpeg_turbo']}), {env['cpu_count']} CPUs, {env['date']}, commit {env['git_commit']}"
        f"{' (dirty)' if env['git_dirty'] else ''}; load average at start {env['loadavg_at_start']}, at end "
        f"{report['loadavg_at_end']}; {report['elapsed_s']:.0f} s in all.",
        f"Data: {data['images']} JPEGs (quality {data['quality']}, about 500 x 375, mean {data['mean_file_kb']} KB) "
        f"made from {', '.join(Path(s).name for s in data['sources'])}. Each arm: one epoch of read, decode, random "
        f"resized crop to {cfg['img_size']} (scale {cfg['crop_scale'][0]}-{cfg['crop_scale'][1]}), flip, to tensor "
        f"and collate (batch {cfg['batch_size']}); {cfg['rounds']} rounds, arms alternating, medians.",
        "",
        "## Per CPU core (one process, torch.set_num_threads(1), num_workers=0)",
        "",
        *table(report["per_core"], target, "per core", ),
        "",
        f"Goal of issue #15: >= 1.5x the torchvision baseline per core. vs torchvision = ratio of the medians; "
        f"paired = median over rounds of the ratio within a round (the arms of a round ran back to back, so this "
        f"cancels slow drifts in the machine's load). Cores for {target:.0f} img/s = ceil({target:.0f} / img/s per "
        f"core), the CPU cores one GPU training MAE ViT-B would need.",
    ]  # fmt: skip
    if report.get("workers"):
        lines += [
            "",
            f"## {cfg['workers']} DataLoader workers (total img/s, worker start-up excluded)",
            "",
            *table(report["workers"], target, "total"),
        ]
    lines += [
        "",
        "## Stages of one image (ms, median of 3 passes over up to 100 images)",
        "",
        "| stage | ms |",
        "|---|---:|",
        *[f"| {k} | {v:.3f} |" for k, v in report["stages"].items()],
        "",
    ]
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="ImageFolder to read; made there if it has too few JPEGs (default: temp)")
    p.add_argument("--photos", type=Path, nargs="*", default=[], help="more source photos")
    p.add_argument("--images", type=int, default=300, help="photos to write (default 300)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--crop-scale", type=float, nargs=2, default=[0.2, 1.0])
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the written photos")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the extra table (0 = skip it)")
    p.add_argument("--target", type=float, default=5000.0, help="images/s one GPU consumes (MAE ViT-B)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage table")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "input_pipeline")
    args = p.parse_args(argv)
    if BASELINE not in args.arms:
        args.arms = [BASELINE, *args.arms]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    env = env_info()
    with tempfile.TemporaryDirectory(prefix="semmim-input-") as tmp:
        root, data = ensure_data(args, Path(tmp))
        per_core = run_rounds(args.arms, root, args, args.rounds, workers=0)
        workers = {}
        if args.workers > 0:
            workers = run_rounds([BASELINE, "semmim-tv-uint8"], root, args, args.rounds, workers=args.workers)
        stages = {} if args.no_stages else stage_times(root, args)
    report = {
        "env": env,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "photos"},
        "data": data,
        "per_core": summarize(per_core, args.target),
        "workers": summarize(workers, args.target) if workers else [],
        "stages": stages,
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out / "results.md")
    for row in report["per_core"]:
        log(f"{row['arm']:>26}: {row['img_per_s']:7.1f} img/s per core, {row['vs_baseline']}x baseline")
    log(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return report


if __name__ == "__main__":
    main()
