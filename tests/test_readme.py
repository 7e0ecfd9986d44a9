"""README.md runs as written: every fenced Python, shell and console block is executed.

How blocks are found and marked:

- A block is the text between a fence (```` ```bash ````, ```` ```python ````, ...) and its closing fence. Its id
  is the slug of the heading above it and its index under that heading (``pretraining-1``), so
  ``pytest -k pretraining`` runs one section.
- The HTML comment on the line before a fence says how the block is treated:
  ``<!-- readme-test: skip (reason) -->`` (not run; a reason is required), ``<!-- readme-test: file NAME -->``
  (the block is the file ``NAME`` that later blocks use), ``<!-- readme-test: run (note) -->`` (run; the note
  names what the test substitutes). ``bash``/``sh``/``shell``/``python``/``console`` blocks without a
  ``skip`` marker are run; :func:`test_every_block_is_run_or_skipped_with_a_reason` keeps it so.

How they run (the block's text is what a user types; only the rewrites below are applied):

- Every block runs in its own empty temporary directory, which first receives what the block expects
  to find (:data:`NEEDS`): tiny run directories made by a fast pretrain (cached per session and copied),
  a tiny image folder, a caption CSV, the files of ``file`` blocks.
- Shell commands (comments dropped, ``\\`` continuations joined) run in this process through
  ``semmim.cli.main`` (importing torch costs ~20 s per process on the CI machine); a multi-process
  command (``trainer.devices=2``) runs as ``python -m semmim.cli`` because it starts its own workers.
- ``semmim pretrain --config ...`` gets :func:`shrink` overrides APPENDED (a 2-block width-32 ViT, batch
  8, 2 steps, no workers, CPU); ``--resume`` commands get nothing. ``semmim eval ...`` gets limits
  appended (:data:`EVAL_LIMITS`); ``semmim data shards --src fashion_mnist`` gets ``--limit 64``.
- Paths of data a user has and this machine has not (:data:`DATA_PATHS`, e.g. ``/data/imagenet/train``)
  are replaced by tiny image folders; a teacher that downloads weights (``open_clip``, ``hf_clip``) is
  replaced by a tiny local ViT (appended ``teacher.*`` overrides).
- ``semmim config show`` runs ``semmim.config.explain`` on the same arguments while the CLI of this
  checkout has no ``config`` command.
- Python blocks are executed with ``semmim.config.load_config`` appending the same :func:`shrink`
  overrides; parts a block registers are unregistered afterwards.
- ``console`` blocks: each ``$ `` line is run unchanged; the lines after it are its expected output
  (``...`` matches anything) and must appear in what it prints.

Blocks that cannot run here (GPUs, a cluster) are still checked: their pretrain commands must resolve
(:func:`test_skipped_pretrain_commands_resolve`), and every ``section.key`` that README.md or docs/*.md
names must be a key of today's config (:func:`test_config_keys_the_readme_names_exist`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SRC = Path(__file__).resolve().parents[1] / "src"
RUN_LANGS = {"bash", "sh", "shell", "python", "console"}
MARKER = re.compile(r"^<!--\s*readme-test:\s*(\w+)\s*(.*?)\s*-->$")


@dataclass
class Block:
    id: str
    lang: str
    text: str
    line: int
    marker: str | None
    marker_arg: str


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def readme_blocks(path: Path = README) -> list[Block]:
    """The fenced blocks of the README, each with the ``readme-test`` marker on the line before it."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    section, index, i = "top", 0, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            section, index = _slug(line.lstrip("#")), 0
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            start = i
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            prev = lines[start - 1].strip() if start > 0 else ""
            m = MARKER.match(prev)
            index += 1
            blocks.append(
                Block(
                    id=f"{section}-{index}",
                    lang=fence.group(1) or "text",
                    text="\n".join(lines[start + 1 : j]) + "\n",
                    line=start + 1,
                    marker=m.group(1) if m else None,
                    marker_arg=m.group(2) if m else "",
                )
            )
            i = j + 1
            continue
        i += 1
    return blocks


BLOCKS = readme_blocks()
RUNNABLE = [b for b in BLOCKS if b.lang in RUN_LANGS and b.marker != "skip"]
FILES = {b.marker_arg: b.text for b in BLOCKS if b.marker == "file"}


def test_every_block_is_run_or_skipped_with_a_reason() -> None:
    assert RUNNABLE, "no runnable blocks found in README.md"
    for b in BLOCKS:
        assert b.marker in (None, "skip", "file", "run"), f"README line {b.line}: unknown marker {b.marker!r}"
        if b.marker == "skip":
            assert re.fullmatch(r"\(.+\)", b.marker_arg), f"README line {b.line}: a skip needs a (reason)"
        if b.marker == "file":
            assert b.marker_arg, f"README line {b.line}: a file block needs a name"
        if b.lang in RUN_LANGS:  # a runnable block may also be saved as a file other blocks use (my_parts.py)
            assert b.marker in (None, "skip", "run", "file"), (
                f"README line {b.line}: a {b.lang} block is run or skipped"
            )
    for b in RUNNABLE:  # a `make` line cannot run here: such blocks carry a skip marker
        assert not re.search(r"^\s*make\b", b.text, re.M), f"{b.id}: a make block must be marked skip"
    # every block the test knows about exists (a renamed section must update NEEDS)
    ids = {b.id for b in BLOCKS}
    assert set(NEEDS) <= ids, f"NEEDS names blocks the README does not have: {set(NEEDS) - ids}"


def test_skipped_pretrain_commands_resolve() -> None:
    """A block that cannot run here (GPUs, a cluster, a teacher's weights) still names keys and values its config
    accepts."""
    from semmim.config import load_config

    checked = 0
    for b in BLOCKS:
        if b.marker != "skip" or b.lang not in RUN_LANGS:
            continue
        for words in shell_commands(b.text):
            if "semmim.cli" in words:
                words = ["semmim", *words[words.index("semmim.cli") + 1 :]]
            if "semmim" not in words or "--config" not in words:
                continue
            argv = words[words.index("semmim") + 1 :]
            # commands that take a run config: pretrain, and those that prepare its data (teacher cache, codebook)
            assert argv[:1] in (["pretrain"], ["codebook"]) or argv[:2] == ["teacher", "cache"], (
                f"{b.id}: {shlex.join(words)}"
            )
            overrides = [a for a in argv if "=" in a and not a.startswith("-")]
            load_config(argv[argv.index("--config") + 1], overrides)
            checked += 1
    assert checked, "no skipped pretrain command found (the GPU block of the README)"


def _known_keys() -> set[str]:
    """Every ``section.key`` (and ``method.<slot>.key``) some method or registered part accepts."""
    import dataclasses

    from semmim.config import SECTIONS, MethodConfig
    from semmim.parts import SLOT_CONTEXT, SLOT_KEY, SLOT_REGISTRY, part_keys
    from semmim.registry import METHODS

    keys = {f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    for name in METHODS.names():
        options = getattr(METHODS.get(name), "Options", MethodConfig)
        keys |= {f"method.{f.name}" for f in dataclasses.fields(options)}
    for slot, registry in SLOT_REGISTRY.items():
        keys.add(SLOT_KEY[slot])
        for part in registry.names():
            keys |= {f"{SLOT_KEY[slot]}.{k.name}" for k in part_keys(registry, part, SLOT_CONTEXT[slot])}
            keys.add(f"{SLOT_KEY[slot]}.name")
    return keys


SHOWN_FAILING = {"trainer.max_stepz"}
"""Wrong keys the README shows failing (in a console block that the test runs)."""


def test_config_keys_the_readme_names_exist() -> None:
    """A ``section.key`` in backticks (README.md, docs/*.md) is a key of today's config, unless the text shows
    it failing or names it as moved."""
    from semmim.config import MOVED_KEYS

    known = _known_keys()
    sections = "method|model|decoder|teacher|text|data|optim|trainer"
    pattern = re.compile(rf"(?<![\w.])((?:{sections})\.[a-z_]+(?:\.[a-z_]+)*)(?=[=`\s,)]|$)", re.M)
    for doc in [README, *sorted((README.parent / "docs").glob("*.md"))]:
        text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)  # inline code only
        blocks = [b.text for b in readme_blocks(doc) if b.lang in ("bash", "console")]
        for span in re.findall(r"`([^`]+)`", text) + blocks:
            for key in pattern.findall(span):
                if key in MOVED_KEYS or key in SHOWN_FAILING or key.startswith("teacher.kwargs."):
                    continue
                assert key in known, f"{doc.name} names config key {key!r}, which no method or part accepts"


# ------------------------------------------------------------------ shrinking runs
DATA_PATHS = {"/data/imagenet/train": "tiny_imagenet/train", "/data/ADEChallengeData2016": "tiny_ade"}
"""Data paths of the README's commands -> the tiny image folder the test creates instead."""

DOWNLOADING_TEACHERS = ("open_clip", "hf_clip")

EVAL_LIMITS: dict[str, list[str]] = {
    "knn": ["--train-limit", "200", "--test-limit", "50", "--num-workers", "0"],
    "linear": ["--train-limit", "200", "--test-limit", "50", "--epochs", "1", "--num-workers", "0"],
    "finetune": [
        "--train-limit",
        "64",
        "--test-limit",
        "32",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--num-workers",
        "0",
    ],
    "lowshot": ["--train-limit", "1000", "--test-limit", "50", "--epochs", "1", "--num-workers", "0"],
    "seg": ["--train-limit", "16", "--test-limit", "8", "--epochs", "1", "--batch-size", "8", "--num-workers", "0"],
    "seg_finetune": [
        "--train-limit",
        "8",
        "--test-limit",
        "2",
        "--iters",
        "2",
        "--warmup-steps",
        "1",
        "--crop-size",
        "32",
        "--channels",
        "8",
        "--aux-channels",
        "8",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
    ],
    "zeroshot": ["--limit", "32", "--num-workers", "0"],
    "classify": ["--limit", "32", "--num-workers", "0"],
}
"""Appended to ``semmim eval <protocol>`` commands (later flags win in argparse)."""

_TINY_TEACHERS: dict[int, Path] = {}


def tiny_teacher(in_chans: int) -> Path:
    """A random 2-block ViT exported like a semmim run (``encoder.safetensors``), for ``in_chans`` channels."""
    if in_chans not in _TINY_TEACHERS:
        from semmim.export import save_encoder
        from semmim.models.vit import ViTEncoder

        torch.manual_seed(0)
        size, patch = (28, 7) if in_chans == 1 else (16, 4)
        enc = ViTEncoder(
            img_size=size,
            patch_size=patch,
            in_chans=in_chans,
            embed_dim=32,
            depth=2,
            num_heads=2,
            timm_name="vit_tiny_patch16_224",
        )
        assert CACHE is not None, "the readme_cache fixture sets the cache"
        out = CACHE / f"teacher_{in_chans}ch"
        out.mkdir(parents=True, exist_ok=True)
        save_encoder(out / "encoder.safetensors", enc.timm_state_dict(), enc.timm_name, enc.timm_kwargs())
        _TINY_TEACHERS[in_chans] = out
    return _TINY_TEACHERS[in_chans]


def shrink(config: str | None, overrides: list[str]) -> list[str]:
    """Overrides appended to a pretrain of ``config`` + ``overrides``: same recipe, a tiny model, 2 steps."""
    from semmim.config import compose, resolve

    raw = compose(config, overrides)
    data = raw.get("data") or {}
    out = ["data.batch_size=8", "data.num_workers=0", "data.pin_memory=false"]
    if data.get("name") != "webdataset":
        out.append("data.limit=64")
    out += ["model.embed_dim=32", "model.depth=2", "model.num_heads=2"]
    if (raw.get("model") or {}).get("img_size", 224) > 64:
        out += ["model.img_size=32", "model.patch_size=8"]
    teacher = raw.get("teacher") or {}
    if teacher.get("name") in DOWNLOADING_TEACHERS:
        chans = (raw.get("model") or {}).get("in_chans", 3)
        out += ["teacher.name=timm", "teacher.model=null", "teacher.pretrained=null", "teacher.tokens=null"]
        out.append(f"teacher.path={tiny_teacher(chans)}")
    try:
        decoder = resolve(raw).decoder
    except Exception:  # a teacher path that is not there yet, ...: keep the decoder as it is
        decoder = None
    if decoder is not None and {"embed_dim", "depth", "num_heads"} <= set(decoder):
        out += ["decoder.embed_dim=32", "decoder.depth=1", "decoder.num_heads=2"]
    out += ["optim.effective_batch=null", "optim.warmup_steps=1"]
    out += ["trainer.max_steps=2", "trainer.log_every_n_steps=1", "trainer.progress_bar=false"]
    out += ["trainer.compile=false", "trainer.accelerator=cpu"]
    if not any(o.startswith("trainer.devices=") for o in overrides):
        out.append("trainer.devices=1")
    return out


# ------------------------------------------------------------------ fixtures a block expects to find
CACHE: Path | None = None
"""The session's fixture cache (set by the ``readme_cache`` fixture)."""


def _jpeg(path: Path, seed: int, size: int = 40) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_images(root: Path) -> None:
    """``root/{train,val}/{cat,dog}/N.jpg``: 8 training and 4 validation images per class."""
    for c, cls in enumerate(("cat", "dog")):
        for i in range(8):
            _jpeg(root / "train" / cls / f"{i:04d}.jpg", 100 * c + i)
        for i in range(4):
            _jpeg(root / "val" / cls / f"{i}.jpg", 1000 + 100 * c + i)


def make_ade(root: Path) -> None:
    """``root`` in the ADEChallengeData2016 layout: 6 training and 3 validation images with label maps."""
    from PIL import Image

    for split, n in (("training", 6), ("validation", 3)):
        for i in range(n):
            _jpeg(root / "images" / split / f"ADE_{i}.jpg", 700 + i)
            g = torch.Generator().manual_seed(800 + i)
            labels = torch.randint(0, 151, (40, 40), generator=g).to(torch.uint8).numpy()
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(labels).save(root / "annotations" / split / f"ADE_{i}.png")


def make_captions(cwd: Path) -> None:
    """``my_captions.csv`` with ``image`` and ``caption`` columns, images under ``pics/``."""
    rows = ["image,caption"]
    for i in range(12):
        _jpeg(cwd / "pics" / f"{i}.jpg", 500 + i)
        rows.append(f"pics/{i}.jpg,a photo number {i}")
    (cwd / "my_captions.csv").write_text("\n".join(rows) + "\n")


def cli(argv: list[str]) -> int:
    """``semmim ARGV`` in this process; the exit status."""
    from semmim.cli import main

    try:
        return int(main(argv))
    except SystemExit as e:
        return int(e.code or 0)


def _pretrain_run(config: str, extra: tuple[str, ...] = ()) -> Callable[[Path], None]:
    def make(dest: Path) -> None:
        overrides = [o.replace("{teacher1}", str(tiny_teacher(1))) for o in extra]
        rc = cli(["pretrain", "--config", config, "--out", str(dest), *overrides, *shrink(config, overrides)])
        assert rc == 0, f"fixture run {config} failed"

    return make


RUNS: dict[str, Callable[[Path], None]] = {
    "mae": _pretrain_run("demo/mae"),
    "milan": _pretrain_run("demo/milan", ("teacher.path={teacher1}",)),
    "clip": _pretrain_run("demo/clip"),
    "supmim": _pretrain_run("demo/supmim"),
}
"""Tiny runs a block reads, by kind."""


def _make_need(kind: str, dest: Path, cwd: Path) -> None:
    if kind in RUNS:
        RUNS[kind](dest)
    elif kind == "teacher1":
        shutil.copytree(tiny_teacher(1), dest)
    elif kind == "images":
        make_images(dest)
    elif kind == "ade":
        make_ade(dest)
    elif kind == "captions":
        make_captions(cwd)
    elif kind.startswith("file:"):
        dest.write_text(FILES[kind.removeprefix("file:")])
    elif kind.startswith("recipe:"):  # a run of a README recipe file (made next to its images)
        name = kind.removeprefix("recipe:")
        with _chdir(cwd):
            assert cli(["pretrain", "--config", name, "--out", str(dest), *shrink(name, [])]) == 0
    else:
        raise AssertionError(f"unknown fixture kind {kind}")


NEEDS: dict[str, dict[str, str]] = {
    "your-own-images-3": {"my_images": "images", "my_recipe.yaml": "file:my_recipe.yaml"},
    "your-own-images-4": {
        "my_images": "images",
        "my_recipe.yaml": "file:my_recipe.yaml",
        "runs/my_mae": "recipe:my_recipe.yaml",
    },
    "pretraining-1": {"tiny_imagenet": "images"},
    "pretraining-2": {"runs/mae_b16": "mae"},
    "evaluation-1": {"runs/mae": "mae", "runs/milan": "milan", "runs/clip": "clip", "runs/supmim": "supmim"},
    "evaluation-2": {"runs/mae": "mae", "tiny_ade": "ade"},
    "evaluation-4": {"my_eval.yaml": "file:my_eval.yaml", "runs/mae": "mae"},
    "evaluation-5": {"runs/mae": "mae", "runs/milan": "milan"},
    "image-text-data-1": {"my_captions.csv": "captions"},
    "python-api-1": {"runs/teacher": "teacher1"},
    "python-api-3": {"columns.yaml": "file:columns.yaml"},
    "python-api-4": {"columns.yaml": "file:columns.yaml", "my_parts.py": "file:my_parts.py"},
    "python-api-5": {"columns.yaml": "file:columns.yaml", "my_parts.py": "file:my_parts.py"},
}
"""What each block expects in its directory: path -> fixture kind (order matters: files before runs)."""


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _provide(block: Block, cwd: Path) -> None:
    assert CACHE is not None
    for rel, kind in NEEDS.get(block.id, {}).items():
        key = re.sub(r"[^\w.-]+", "_", f"{kind}")
        cached = CACHE / "needs" / key
        if kind.startswith("file:"):
            (cwd / rel).write_text(FILES[kind.removeprefix("file:")])
            continue
        if kind == "captions":
            make_captions(cwd)
            continue
        if not cached.exists():
            work = CACHE / "work" / key
            work.mkdir(parents=True, exist_ok=True)
            # a recipe run reads its files and data from the directory it runs in
            for rel2, kind2 in NEEDS[block.id].items():
                if rel2 == rel:
                    break
                if kind2.startswith("file:"):
                    (work / rel2).write_text(FILES[kind2.removeprefix("file:")])
                elif kind2 == "images" and not (work / rel2).exists():
                    make_images(work / rel2)
            _make_need(kind, work / "made", work)
            shutil.move(str(work / "made"), cached)
        dest = cwd / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(cached, dest)


# ------------------------------------------------------------------ running blocks
def shell_commands(text: str) -> list[list[str]]:
    """The commands of a shell block: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def _has_cli_command(name: str) -> bool:
    from semmim.cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return name in action.choices
    return False


def rewrite(words: list[str], cwd: Path) -> tuple[str, list[str]]:
    """A README command -> (how to run it, argv): ``("cli", argv)``, ``("subprocess", argv)``, ``("show", argv)``."""
    assert words[0] == "semmim", f"only semmim commands run here, got {words}"
    argv = [DATA_PATHS.get(w, w) for w in words[1:]]
    argv = [re.sub(r"^data\.root=(/data/\S+)$", lambda m: f"data.root={DATA_PATHS[m.group(1)]}", a) for a in argv]
    if argv[:1] == ["pretrain"] and "--resume" not in argv and "--config" in argv:
        config = argv[argv.index("--config") + 1]
        overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
        with _chdir(cwd):
            argv += shrink(config, overrides)
        if any(a.startswith("trainer.devices=") and a != "trainer.devices=1" for a in overrides):
            return "subprocess", argv
    if argv[:1] == ["eval"] and argv[1] in EVAL_LIMITS:
        finetune_seg = argv[1] == "seg" and "finetune" in argv  # --mode finetune reads other keys
        argv += EVAL_LIMITS["seg_finetune" if finetune_seg else argv[1]]
        if "ade20k" in argv and not finetune_seg:
            argv += ["--img-size", "32"]
        if "--cache-dir" not in argv and argv[1] in ("knn", "linear", "lowshot"):
            argv += ["--cache-dir", str(cwd / "feature_cache")]
    if argv[:1] == ["data"] and argv[1] == "shards" and "fashion_mnist" in argv:
        argv += ["--limit", "64"]
    if argv[:2] == ["config", "show"] and not _has_cli_command("config"):
        return "show", argv
    return "cli", argv


def run_shell(block: Block, cwd: Path) -> None:
    from semmim.parts import SLOT_REGISTRY
    from semmim.registry import load_builtins

    load_builtins()  # the built-in parts stay registered; only what a block adds is undone
    before = {slot: set(reg._items) for slot, reg in SLOT_REGISTRY.items()}
    _forget_user_modules()
    try:
        _run_shell(block, cwd)
    finally:  # parts a command's --import registered are forgotten, as in a fresh process
        for slot, reg in SLOT_REGISTRY.items():
            for name in set(reg._items) - before[slot]:
                reg._items.pop(name)
                reg._help.pop(name, None)
        _forget_user_modules()


def _run_shell(block: Block, cwd: Path) -> None:
    for words in shell_commands(block.text):
        start = time.perf_counter()
        how, argv = rewrite(words, cwd)
        with _chdir(cwd):
            if how == "subprocess":
                env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
                proc = subprocess.run([sys.executable, "-m", "semmim.cli", *argv], env=env, timeout=600)
                rc = proc.returncode
            elif how == "show":
                from semmim.config import explain, load_config

                config = argv[argv.index("--config") + 1]
                overrides = [a for a in argv[2:] if "=" in a]
                print(explain(load_config(config, overrides)))
                rc = 0
            else:
                rc = cli(argv)
        assert rc == 0, f"{block.id}: `{shlex.join(words)}` exited with {rc} (ran as {how}: {shlex.join(argv)})"
        print(f"[readme] {time.perf_counter() - start:6.1f} s  {shlex.join(words)}", file=sys.__stderr__)


def run_console(block: Block, cwd: Path) -> None:
    entries: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            entries.append((line[2:], []))
        elif line.strip():
            assert entries, f"{block.id}: output before the first $ line"
            entries[-1][1].append(line)
    for command, expected in entries:
        words = shlex.split(command)
        assert words[0] == "semmim"
        out, err = io.StringIO(), io.StringIO()
        with _chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli(words[1:])
        printed = out.getvalue() + err.getvalue()
        for want in expected:
            pattern = ".*".join(re.escape(part) for part in want.split("..."))
            assert re.search(pattern, printed), f"{block.id}: `{command}` printed\n{printed}\nnot\n{want}"


def _forget_user_modules() -> None:
    """Drop the README's own modules (``my_parts``) from ``sys.modules``: each block imports them afresh from its
    directory, so their parts are registered again after the previous block's registrations were undone."""
    for name in [f.removesuffix(".py") for f in FILES if f.endswith(".py")]:
        sys.modules.pop(name, None)


def run_python(block: Block, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import semmim.config
    from semmim.parts import SLOT_REGISTRY
    from semmim.registry import load_builtins

    load_builtins()
    real = semmim.config.load_config

    def small_load_config(path: Any = None, overrides: Any = ()) -> Any:
        overrides = list(overrides)
        return real(path, [*overrides, *shrink(path, overrides)])

    monkeypatch.setattr(semmim.config, "load_config", small_load_config)
    monkeypatch.syspath_prepend(str(cwd))
    _forget_user_modules()
    before = {slot: set(reg._items) for slot, reg in SLOT_REGISTRY.items()}
    try:
        with _chdir(cwd):
            code = compile(block.text, f"README.md:{block.line}", "exec")
            exec(code, {"__name__": "__main__"})
    finally:
        for slot, reg in SLOT_REGISTRY.items():
            for name in set(reg._items) - before[slot]:
                reg._items.pop(name)
                reg._help.pop(name, None)
        _forget_user_modules()


SLOW = {"several-gpus-and-nodes-2", "evaluation-1"}
"""Blocks that take over 20 s on 2 CPU cores: two processes that each import torch; eight evaluations."""


@pytest.fixture(scope="session")
def readme_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    global CACHE
    old = CACHE
    CACHE = tmp_path_factory.mktemp("readme_cache")
    _TINY_TEACHERS.clear()
    yield CACHE
    CACHE = old
    _TINY_TEACHERS.clear()


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if b.id in SLOW else []) for b in RUNNABLE],
)
def test_readme_block_runs(block: Block, readme_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    _provide(block, cwd)
    if block.lang == "python":
        run_python(block, cwd, monkeypatch)
    elif block.lang == "console":
        run_console(block, cwd)
    else:
        run_shell(block, cwd)
