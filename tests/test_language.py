"""Language in the loop: InfoNCE, the RILS loss (by hand, with gating), clip/rils runs, clip teachers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from semmim.cli import main
from semmim.config import load_config
from semmim.engine.metrics import read_metrics
from semmim.losses import info_nce, patch_text_kl
from semmim.methods.rils import caption_rows, retrieval_correct
from tests.conftest import tiny_overrides

LANG = ("data.captions=templates", "method.embed_dim=16", "text.name=minilm", "text.locked=true")


def test_info_nce_symmetric_and_values() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    assert info_nce(a, b, 10.0).item() == pytest.approx(info_nce(b, a, 10.0).item(), rel=1e-6)
    aligned = info_nce(torch.eye(6), torch.eye(6), 100.0).item()
    assert aligned < 1e-3
    # with a zero temperature scale every logit is equal: the loss is exactly log(N)
    assert info_nce(a, b, 0.0).item() == pytest.approx(math.log(6), rel=1e-6)
    assert info_nce(a, b, 10.0).item() > aligned


def test_info_nce_hand_computation() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    s = 2.0
    t = F.normalize(txt, dim=-1)
    logits = s * img @ t.T  # [[s/sqrt2, 0], [s/sqrt2, s]]
    i2t = -(torch.log_softmax(logits, 1)[0, 0] + torch.log_softmax(logits, 1)[1, 1]) / 2
    t2i = -(torch.log_softmax(logits.T, 1)[0, 0] + torch.log_softmax(logits.T, 1)[1, 1]) / 2
    assert info_nce(img, txt, s).item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-6)


def test_rils_kl_hand_computation_with_gating() -> None:
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # two captions
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 0.0]]])  # (N=2, L=2, E=2)
    student = torch.tensor([[[0.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[True, False], [True, True]])
    gate = torch.tensor([1.0, 0.0])  # sample 1 was retrieved wrongly: excluded
    tt, st = 0.04, 0.1

    def dist(x: torch.Tensor, temp: float) -> torch.Tensor:
        return torch.softmax(F.normalize(x, dim=-1) @ text.T / temp, dim=-1)

    # only sample 0, patch 0 counts: KL(p_t || p_s)
    p_t = dist(teacher[0, 0], tt)
    p_s = dist(student[0, 0], st)
    expected = float((p_t * (p_t.log() - p_s.log())).sum())
    got = patch_text_kl(student, teacher, text, mask, st, tt, gate).item()
    assert got == pytest.approx(expected, rel=1e-5)
    # without gating: mean over the 3 masked patches
    kls = []
    for n, l_ in ((0, 0), (1, 0), (1, 1)):
        pt, ps = dist(teacher[n, l_], tt), dist(student[n, l_], st)
        kls.append(float((pt * (pt.log() - ps.log())).sum()))
    assert patch_text_kl(student, teacher, text, mask, st, tt, None).item() == pytest.approx(sum(kls) / 3, rel=1e-5)
    # identical distributions give zero, and the teacher side gets no gradient
    s = teacher.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    loss = patch_text_kl(s, t, text, mask, 0.04, 0.04, None)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert t.grad is None or torch.count_nonzero(t.grad) == 0


def test_retrieval_gate_compares_caption_text() -> None:
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.0]])
    caps = ["a photo of a bag.", "a photo of a bag.", "a photo of a coat."]
    same = torch.tensor(caption_rows(caps))
    gate = retrieval_correct(image, text, torch.arange(3), same)
    # image 1 retrieves caption 0, which reads the same as its own: correct; image 2 retrieves a bag: wrong
    assert gate.tolist() == [1.0, 1.0, 0.0]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["clip", "rils"])
def test_cli_three_steps(method: str, tmp_path: Path) -> None:
    out = tmp_path / method
    over = tiny_overrides(f"method.name={method}", *LANG, *(["decoder.depth=1"] if method == "rils" else []))
    assert main(["pretrain", "--config", f"demo/{method}", "--out", str(out), *over]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] is not None for r in rows)
    for f in ("encoder.safetensors", "image_projection.safetensors", "clip.safetensors"):
        assert (out / f).is_file()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert not any(k.startswith("text_encoder.") for k in ckpt["model"]), "a locked text tower is not checkpointed"


@pytest.mark.slow
def test_milan_with_a_clip_run_as_teacher_and_zeroshot(tmp_path: Path) -> None:
    from semmim.eval.config import ZeroshotConfig
    from semmim.eval.zeroshot import zeroshot_eval
    from semmim.methods import build_method

    clip_dir = tmp_path / "clip"
    clip_over = tiny_overrides("method.name=clip", *LANG)
    assert main(["pretrain", "--config", "demo/clip", "--out", str(clip_dir), *clip_over]) == 0
    over = tiny_overrides("teacher.name=timm", f"teacher.path={clip_dir}")
    cfg = load_config(None, [*over, "method.name=milan"])
    method = build_method(cfg)
    teacher = method.target.teacher
    assert teacher.embed_dim == 16 and teacher.token_proj is not None  # targets in the joint space
    assert teacher.mean.tolist() == [0.5, 0.5, 0.5]  # the clip run's own input statistics
    assert main(["pretrain", "--config", "demo/milan", "--out", str(tmp_path / "milan"), *over]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "milan")] == [1, 2, 3]
    metrics = zeroshot_eval(clip_dir, ZeroshotConfig(data="synthetic", limit=40, num_workers=0))
    assert metrics["n_test"] == 40 and 0 <= metrics["top1"] <= 100


def test_clip_without_captions_is_a_clear_error() -> None:
    from semmim.methods import build_method

    method = build_method(load_config(None, tiny_overrides("method.name=clip", "method.embed_dim=16")))
    with pytest.raises(KeyError, match="needs captions"):
        method({"image": torch.rand(2, 3, 16, 16), "label": torch.tensor([0, 1])})


@pytest.mark.slow
def test_clip_trains_from_webdataset_shards_and_resumes(tmp_path: Path) -> None:
    """`semmim data shards` output streams through the engine; a resumed run continues the stream."""
    shards = tmp_path / "shards"
    assert (
        main(
            [
                "data",
                "shards",
                "--src",
                "fashion_mnist",
                "--captions",
                "templates",
                "--limit",
                "96",
                "--shard-size",
                "24",
                "--out",
                str(shards),
                "--no-progress",
            ]
        )
        == 0
    )
    over = [
        *tiny_overrides("method.name=clip", *LANG),
        "data.name=webdataset",
        f"data.root={shards}",
        "data.captions=null",
        "data.limit=null",
        "model.img_size=28",
        "model.in_chans=1",
        "data.mean=[0.5]",
        "data.std=[0.5]",
        "trainer.max_steps=6",
        "trainer.ckpt_every_n_steps=2",
        "data.shuffle_buffer=8",
    ]
    out = tmp_path / "clip"
    assert main(["pretrain", "--config", "demo/clip", "--out", str(out), *over]) == 0
    full = {r["step"]: r["loss"] for r in read_metrics(out)}
    assert sorted(full) == [1, 2, 3, 4, 5, 6]  # 96 samples / batch 8 = 12 batches per epoch
    # resume from the step-4 checkpoint of a copy: the remaining steps match
    import shutil

    from semmim.engine import pretrain

    cfg = load_config(out / "config.yaml")
    crashed = tmp_path / "crashed"

    def stop_at(step: int, loss: float) -> None:
        if step == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(cfg, crashed, on_step=stop_at)
    pretrain(cfg, crashed, resume=True)
    resumed = {r["step"]: r["loss"] for r in read_metrics(crashed)}
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), step
    shutil.rmtree(shards)
