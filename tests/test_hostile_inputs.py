"""Hostile files and configs: pickles that run code, lying metadata, billion-laughs YAML, special files,
oversized and rotated images, runs of broken files. Every test is small and fast.

docs/reliability.md lists what these tests guarantee.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from semmim.config import ConfigError, load_config, parse_override
from semmim.engine.checkpoint import CheckpointError, load_verified
from semmim.export import load_timm_model, read_timm_config, save_encoder

timm = pytest.importorskip("timm")

VIT_KW: dict[str, Any] = dict(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2)
VIT_NAME = "vit_tiny_patch16_224"


# ---------------------------------------------------------------------------- pickles that run code
class _Evil:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _evil_file(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": _Evil(marker)}, path)
    return path


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("weights_only", "false"),
        ("trust_remote_code", "true"),
        ("pickle_module", "pickle"),
        ("use_safetensors", "false"),
    ],
)
def test_unsafe_loader_kwargs_in_a_config_are_refused(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=rf"^teacher\.kwargs\.{key}(=\S+)? is not allowed"):
        load_config(None, [f"teacher.kwargs.{key}={value}"])
    milan = ["method.name=milan", "teacher.name=timm", "teacher.model=vit_tiny_patch16_224"]
    assert load_config(None, [*milan, "teacher.kwargs.img_size=32"]).teacher.kwargs == {"img_size": 32}


def test_timm_teacher_weights_file_cannot_run_code(tmp_path: Path) -> None:
    from semmim.registry import TEACHERS

    marker = tmp_path / "marker"
    evil = _evil_file(tmp_path / "evil.pth", marker)
    with pytest.raises(ConfigError, match="weights_only is not allowed"):
        TEACHERS.build("timm", model=VIT_NAME, path=str(evil), weights_only=False, **VIT_KW)
    with pytest.raises(ValueError, match=f"could not read weights from {evil}"):
        TEACHERS.build("timm", model=VIT_NAME, path=str(evil), **VIT_KW)
    assert not marker.exists()


def test_open_clip_teacher_checkpoint_cannot_run_code(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    from semmim.registry import TEACHERS

    marker = tmp_path / "marker"
    evil = _evil_file(tmp_path / "evil.pt", marker)
    model_cfg = dict(
        embed_dim=8,
        vision_cfg=dict(layers=1, width=8, image_size=16, patch_size=8, head_width=8),
        text_cfg=dict(context_length=8, vocab_size=64, width=8, heads=1, layers=1),
    )
    with pytest.raises(ConfigError, match="weights_only is not allowed"):
        TEACHERS.build("open_clip", model_cfg=model_cfg, pretrained=str(evil), weights_only=False)
    with pytest.raises(ValueError, match=f"could not read weights from {evil}"):
        TEACHERS.build("open_clip", model_cfg=model_cfg, pretrained=str(evil))
    assert not marker.exists()


def test_hf_pytorch_model_bin_cannot_run_code(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from semmim.registry import TEACHERS
    from semmim.text import build_text_encoder

    marker = tmp_path / "marker"
    cfg = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    model_dir = tmp_path / "clip"
    model_dir.mkdir()
    cfg.save_pretrained(model_dir)
    _evil_file(model_dir / "pytorch_model.bin", marker)
    with pytest.raises(ConfigError, match="weights_only is not allowed"):
        TEACHERS.build("hf_clip", model=str(model_dir), weights_only=False)
    with pytest.raises(ConfigError, match="trust_remote_code is not allowed"):
        TEACHERS.build("hf_clip", model=str(model_dir), trust_remote_code=True)
    with pytest.raises(ConfigError, match="trust_remote_code is not allowed"):
        build_text_encoder("hf", model=str(model_dir), trust_remote_code=True)
    with pytest.raises(Exception) as err:  # transformers reads .bin files with weights_only=True itself
        TEACHERS.build("hf_clip", model=str(model_dir))
    assert not isinstance(err.value, ConfigError)
    assert not marker.exists()


# ---------------------------------------------------------------------------- lying export metadata
def _tiny_export(path: Path, **meta_kwargs: Any) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(VIT_NAME, num_classes=0, **VIT_KW)
    return save_encoder(path, model.state_dict(), VIT_NAME, {**VIT_KW, **meta_kwargs})


@pytest.mark.parametrize(
    ("claim", "needle"),
    [
        ({"embed_dim": 4096, "num_heads": 16, "depth": 12}, "the file holds"),
        ({"depth": 10_000_000}, "claims depth 10000000 but the file holds only"),
        ({"img_size": 64}, "pos_embed is"),
        ({"checkpoint_path": "/etc/passwd"}, "timm_kwargs.checkpoint_path is not allowed"),
    ],
)
def test_export_metadata_asking_for_another_model_fails_before_building_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, claim: dict[str, Any], needle: str
) -> None:
    path = _tiny_export(tmp_path / "encoder.safetensors", **claim)
    assert path.stat().st_size < 30_000
    real = timm.create_model
    built: list[str] = []

    def create_model(*args: Any, **kwargs: Any) -> Any:
        device = torch.empty(0).device.type  # the default device: "meta" while checking
        built.append(device)
        if device != "meta":
            raise AssertionError("a real model was built from unchecked metadata")
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    t0 = time.perf_counter()
    for load in (read_timm_config, load_timm_model):
        with pytest.raises(ValueError, match=needle) as err:
            load(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert time.perf_counter() - t0 < 3.0
    assert set(built) <= {"meta"}


def test_honest_export_still_loads(tmp_path: Path) -> None:
    path = _tiny_export(tmp_path / "encoder.safetensors")
    name, kwargs = read_timm_config(path)
    assert name == VIT_NAME and kwargs == VIT_KW
    assert load_timm_model(tmp_path).pos_embed.shape == (1, 5, 16)


def test_checkpoint_missing_a_key_names_the_file_and_the_key(tmp_path: Path) -> None:
    ckpt = tmp_path / "last.ckpt"
    torch.save({"model": {}, "epoch": 1}, ckpt)
    with pytest.raises(CheckpointError, match=rf"^the checkpoint {ckpt} lacks 'step' \(it has epoch, model\)"):
        load_verified(ckpt, required_keys=("model", "step"))
    ckpt.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=f"^cannot load the checkpoint {ckpt}"):
        load_verified(ckpt)


def test_viz_checkpoint_without_model_entry_names_file_and_key(tmp_path: Path) -> None:
    from semmim.config import to_yaml
    from semmim.viz import load_method
    from tests.conftest import tiny_overrides

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(load_config(None, tiny_overrides())))
    torch.save({"step": 3}, run / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointError, match=r"last\.ckpt lacks 'model' \(it has step\)"):
        load_method(run, torch.device("cpu"))


# ---------------------------------------------------------------------------- YAML
BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_billion_laughs_config_fails_fast_naming_the_file(tmp_path: Path) -> None:
    p = tmp_path / "lol.yaml"
    p.write_text(BILLION_LAUGHS)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"^{p}: its aliases \(\*name\) expand to more than") as err:
        load_config(p)
    assert "\n" not in str(err.value)
    deeper = "\n".join(
        BILLION_LAUGHS.splitlines()
        + [f"{c}: &{c} [{', '.join(['*' + p_] * 9)}]" for p_, c in zip("ijklmnop", "jklmnopq", strict=True)]
    )
    p.write_text(deeper)
    with pytest.raises(ConfigError, match="expand to more than"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"^override 'x': its aliases"):
        parse_override("x=" + BILLION_LAUGHS.replace("\n", ", ").join("{}"))
    assert time.perf_counter() - t0 < 1.0


def test_recursive_alias_huge_and_deep_configs_are_one_line_errors(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match=rf"^{p}: an alias refers to a node that contains it"):
        load_config(p)
    p.write_text("model:\n  embed_dim: 64\n" + "# padding\n" * 120_000)
    with pytest.raises(ConfigError, match=rf"^{p}: larger than 1048576 bytes"):
        load_config(p)
    p.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=rf"^{p}: "):
        load_config(p)
    p.write_text("anchors: &base {embed_dim: 64, depth: 2}\nmodel:\n  <<: *base\n  num_heads: 4\n")
    with pytest.raises(ConfigError, match="unknown config section 'anchors'"):  # small aliases still work
        load_config(p)


# ---------------------------------------------------------------------------- image folders
def _png(path: Path, seed: int, size: int = 8) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def _run_of_bad_files(root: Path, good: int = 48, bad: int = 7) -> list[int]:
    root.mkdir()
    for i in range(good):
        _png(root / f"img{i:03d}.png", i)
    for i in range(bad):  # sorted between img019 and img020: a run of consecutive broken files
        (root / f"img019_{i}.png").write_bytes(b"not a png" if i % 2 else b"")
    return list(range(20, 20 + bad))


def test_a_run_of_bad_files_is_counted_once_each_and_served_by_different_substitutes(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from semmim.data import ImageFolderDataset, SeededDataset

    bad = _run_of_bad_files(tmp_path / "imgs")
    folder = ImageFolderDataset(tmp_path / "imgs", max_bad_fraction=0.5)
    ds = SeededDataset(folder)
    assert len(ds) == 55
    with pytest.warns(RuntimeWarning):
        counts = [ds[i]["skipped"] for i in range(len(ds))]
    assert sum(counts) == 7 and [i for i, c in enumerate(counts) if c] == bad  # was 28 = 7 * 8 / 2
    assert sum(ds[i]["skipped"] for i in range(len(ds))) == 7  # next epoch, same worker: again once each
    served = [folder.served_index(i) for i in bad]
    assert len(set(served)) > 1 and not set(served) & set(bad)
    for i, j in zip(bad, served, strict=True):
        assert torch.equal(ds[i]["image"], ds[j]["image"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = ImageFolderDataset(tmp_path / "imgs", max_bad_fraction=0.5)
        assert [fresh.served_index(i) for i in bad] == bad  # nothing known to be broken yet
        assert torch.equal(SeededDataset(fresh)[bad[3]]["image"], ds[bad[3]]["image"])  # same substitute
        assert fresh.served_index(bad[3]) == served[3]
        # two workers: each counts the broken files of the indices it was asked for; the epoch total is exact
        loader = DataLoader(SeededDataset(fresh), batch_size=5, num_workers=2, shuffle=True)
        assert sum(int(b["skipped"].sum()) for b in loader) == 7


def test_fifo_named_like_an_image_is_not_listed_and_never_blocks(tmp_path: Path) -> None:
    import signal

    from semmim.data import ImageFolderDataset

    for i in range(3):
        _png(tmp_path / f"img{i}.png", i)
    os.mkfifo(tmp_path / "a_fifo.png")
    ds = ImageFolderDataset(tmp_path, max_bad_fraction=0.5)
    assert [Path(p).name for p, _ in ds.samples] == ["img0.png", "img1.png", "img2.png"]
    (tmp_path / "img1.png").unlink()
    os.mkfifo(tmp_path / "img1.png")  # became a FIFO after the listing: a broken file, not a hang
    signal.alarm(10)
    try:
        with pytest.warns(RuntimeWarning, match=r"img1\.png: OSError: .*img1\.png is a FIFO, not a regular file"):
            item = ds[1]
    finally:
        signal.alarm(0)
    assert ds.served_index(1) in (0, 2) and item["image"].shape == (3, 8, 8)


def test_image_over_the_pixel_budget_is_a_bad_file_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from semmim.config import DataConfig
    from semmim.data import ImageFolderDataset, ImageTooLargeError, build_dataset, decode_image

    _png(tmp_path / "a_big.png", 0, size=100)
    _png(tmp_path / "b_small.png", 1, size=8)
    real_load = Image.Image.load

    def load(self: Image.Image) -> Any:
        if self.size == (100, 100):
            raise AssertionError("the oversized image was decoded")
        return real_load(self)

    monkeypatch.setattr(Image.Image, "load", load)
    with pytest.raises(ImageTooLargeError, match=r"100x100 = 10000 pixels, more than data.max_image_pixels=5000"):
        decode_image(tmp_path / "a_big.png", max_pixels=5000)
    ds = ImageFolderDataset(tmp_path, max_bad_fraction=0.5, max_image_pixels=5000)
    with pytest.warns(RuntimeWarning, match=r"a_big\.png: 100x100 = 10000 pixels, more than data\.max_image_pixels"):
        assert ds[0]["image"].shape == (3, 8, 8)
    assert load_config(None, ["data.max_image_pixels=5000"]).data.max_image_pixels == 5000
    with pytest.raises(ConfigError, match=r"data\.max_image_pixels"):
        load_config(None, ["data.max_image_pixels=0"])
    built = build_dataset(DataConfig(root=str(tmp_path), max_image_pixels=5000), img_size=8, in_chans=3)
    assert built.dataset.max_image_pixels == 5000


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    from semmim.data import ImageFolderDataset

    arr = np.zeros((16, 32, 3), dtype=np.uint8)
    arr[:, :16, 0] = 255  # left half red
    arr[:, 16:, 2] = 255  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: turn 90 degrees clockwise to show upright
    Image.fromarray(arr).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    x = ImageFolderDataset(tmp_path, max_bad_fraction=0.0)[0]["image"]
    assert tuple(x.shape) == (3, 32, 16)  # upright: taller than wide
    top, bottom = x[:, :14], x[:, 18:]
    assert top[0].mean() > 0.8 and top[2].mean() < 0.2  # the red half is now on top
    assert bottom[2].mean() > 0.8 and bottom[0].mean() < 0.2


# ---------------------------------------------------------------------------- checkpoints and $TMPDIR
def test_fabric_default_save_stages_in_tmpdir_and_direct_io_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    from semmim.engine.checkpoint import ChecksummedCheckpointIO

    staged: list[str] = []
    real = tempfile.mkstemp

    def mkstemp(*args: Any, **kwargs: Any) -> Any:
        fd, name = real(*args, **kwargs)
        staged.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    state = {"step": 3, "w": torch.arange(4.0)}
    TorchCheckpointIO().save_checkpoint(state, tmp_path / "fabric.ckpt")
    assert staged and not staged[0].startswith(str(tmp_path))  # what the issue saw: staged in $TMPDIR
    staged.clear()
    ChecksummedCheckpointIO().save_checkpoint(state, tmp_path / "direct.ckpt")
    assert staged == []
    assert load_verified(tmp_path / "direct.ckpt", required_keys=("step",))["step"] == 3
