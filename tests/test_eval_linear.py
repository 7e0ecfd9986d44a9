"""Linear probe, LARS and low-shot evaluation: known answers on hand-made features, and end to end."""

from __future__ import annotations

import statistics
import sys
import types
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import semmim.eval.features as features
from semmim.data.datasets import SubsetDataset, SyntheticDataset
from semmim.eval.common import load_encoder
from semmim.eval.config import FinetuneConfig, LinearConfig, LowshotConfig
from semmim.eval.linear import LARS, linear_eval, linear_probe, probe_head
from semmim.eval.lowshot import dataset_labels, fraction_tag, lowshot_eval, stratified_subset


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """The probes run thousands of tiny ops: one thread avoids sync overhead on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _separable(n: int, k: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, k, (n,), generator=gen)
    x = 0.1 * torch.randn(n, d, generator=gen)
    x[torch.arange(n), y] += 1.0
    return x, y


# --------------------------------------------------------------------------------------------------
# linear_probe
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer,base_lr", [("sgd", 0.1), ("lars", 50.0)])
def test_probe_separates_one_hot_classes(optimizer: str, base_lr: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = _separable(200, 5, 16, gen)
    xt, yt = _separable(500, 5, 16, gen)
    # LARS moves the weight by ~ lr * trust_coefficient * ||W|| a step: a small set needs a large lr
    res = linear_probe(x, y, xt, yt, epochs=30, batch_size=64, optimizer=optimizer, base_lr=base_lr, device="cpu")
    assert res["top1"] == 100.0 and res["top5"] == 100.0
    assert res["n_train"] == 200 and res["n_test"] == 500 and res["optimizer"] == optimizer
    assert res["lr"] == pytest.approx(base_lr * 64 / 256)


def test_probe_is_reproducible_and_clamps_the_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    x, y = _separable(40, 3, 8, gen)
    xt, yt = _separable(30, 3, 8, gen)
    a = linear_probe(x, y, xt, yt, epochs=3, batch_size=1000, seed=4, device="cpu")
    b = linear_probe(x, y, xt, yt, epochs=3, batch_size=1000, seed=4, device="cpu")
    assert a == b
    assert a["batch_size"] == 40 and a["lr"] == pytest.approx(0.1 * 40 / 256)
    assert a["top5"] == 100.0  # top-K with K = 3 < 5 classes


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_probe_on_random_labels_is_at_chance(optimizer: str) -> None:
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(1000, 32, generator=gen), torch.randint(0, 10, (1000,), generator=gen)
    xt, yt = torch.randn(2000, 32, generator=gen), torch.randint(0, 10, (2000,), generator=gen)
    res = linear_probe(x, y, xt, yt, epochs=10, batch_size=128, optimizer=optimizer, base_lr=1.0, device="cpu")
    assert 5.0 <= res["top1"] <= 15.0
    assert 40.0 <= res["top5"] <= 60.0


def test_probe_rejects_bad_inputs() -> None:
    x, y = torch.randn(8, 4), torch.arange(8) % 2
    with pytest.raises(ValueError, match="widths"):
        linear_probe(x, y, torch.randn(3, 5), y[:3])
    with pytest.raises(ValueError, match="labels must be"):
        linear_probe(x, y[:7], x, y)
    with pytest.raises(ValueError, match="no train"):
        linear_probe(x[:0], y[:0], x, y)
    with pytest.raises(ValueError, match=">= 0"):
        linear_probe(x, y - 1, x, y)
    with pytest.raises(ValueError, match="at least 2"):
        linear_probe(x[:1], y[:1], x, y)
    with pytest.raises(ValueError, match="num_classes"):
        linear_probe(x, y, x, y + 1, num_classes=2)
    with pytest.raises(ValueError, match="optimizer"):
        linear_probe(x, y, x, y, optimizer="adam")


def test_probe_head_is_the_mae_head() -> None:
    head = probe_head(6, 4, generator=torch.Generator().manual_seed(0))
    bn, fc = head[0], head[1]
    assert isinstance(bn, nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert isinstance(fc, nn.Linear) and fc.bias.abs().sum() == 0 and 0 < fc.weight.std() < 0.03


# --------------------------------------------------------------------------------------------------
# LARS
# --------------------------------------------------------------------------------------------------


def test_lars_step_matches_hand_computation() -> None:
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = LARS([w, b], lr=0.5, weight_decay=0.5, momentum=0.9, trust_coefficient=0.6)
    w.grad = torch.tensor([[-0.6, 0.0]])
    b.grad = torch.tensor([0.5, 0.25])
    opt.step()
    # d = g + wd * w = [0.9, 2.0]; q = 0.6 * 5 / ||d||
    d = torch.tensor([[0.9, 2.0]])
    q = 0.6 * 5.0 / d.norm()
    w1 = torch.tensor([[3.0, 4.0]]) - 0.5 * q * d
    assert torch.allclose(w.data, w1)
    # the 1-D parameter takes a plain SGD step: no weight decay, no trust ratio
    assert torch.allclose(b.data, torch.tensor([1.0 - 0.25, -2.0 - 0.125]))
    # second step: momentum buffer mu = 0.9 mu + current update
    w.grad = torch.zeros_like(w)
    b.grad = torch.zeros_like(b)
    opt.step()
    d2 = 0.5 * w1
    mu = 0.9 * q * d + 0.6 * w1.norm() / d2.norm() * d2
    assert torch.allclose(w.data, w1 - 0.5 * mu)
    assert torch.allclose(b.data, torch.tensor([0.75, -2.125]) - 0.5 * 0.9 * torch.tensor([0.5, 0.25]))


def test_lars_trust_ratio_is_one_for_zero_norms() -> None:
    w = nn.Parameter(torch.zeros(2, 2))
    opt = LARS([w], lr=0.1, momentum=0.0)
    w.grad = torch.ones(2, 2)
    opt.step()  # ||w|| = 0: plain step
    assert torch.allclose(w.data, torch.full((2, 2), -0.1))
    with pytest.raises(ValueError):
        LARS([w], lr=-1.0)


# --------------------------------------------------------------------------------------------------
# stratified subsets and labels
# --------------------------------------------------------------------------------------------------


def test_stratified_subset_counts_and_seeds() -> None:
    labels = torch.tensor([0] * 50 + [1] * 7 + [2] * 120 + [3] * 1 + [4] * 33)[torch.randperm(211)]
    counts = torch.bincount(labels)
    for f in (0.01, 0.1, 0.25):
        idx = stratified_subset(labels, f, seed=0)
        assert torch.equal(idx, idx.sort().values) and idx.dtype == torch.long
        assert len(set(idx.tolist())) == len(idx)
        got = torch.bincount(labels[idx], minlength=5)
        assert got.tolist() == [max(1, round(f * int(n))) for n in counts]
        assert torch.equal(idx, stratified_subset(labels, f, seed=0))
        assert not torch.equal(idx, stratified_subset(labels, f, seed=1))
    assert torch.equal(stratified_subset(labels, 1.0, seed=3), torch.arange(211))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            stratified_subset(labels, bad, seed=0)
    with pytest.raises(ValueError, match=">= 0"):
        stratified_subset(labels - 1, 0.5, seed=0)


def test_dataset_labels_reads_targets_through_wrappers() -> None:
    class Labelled(SyntheticDataset):
        def __init__(self) -> None:
            super().__init__(size=20, img_size=4, num_classes=3)
            self.targets = [self.load(i)[1] for i in range(20)]

        def load(self, index: int) -> Any:
            if hasattr(self, "targets"):
                raise AssertionError("labels must come from targets, not from decoding")
            return super().load(index)

    base = Labelled()
    expected = torch.tensor(base.targets)
    view = SubsetDataset(base, [5, 2, 9])
    assert torch.equal(dataset_labels(view), expected[[5, 2, 9]])
    # no targets anywhere: every item is loaded once
    synth = SyntheticDataset(size=12, img_size=4, num_classes=3)
    assert dataset_labels(synth).tolist() == [synth.load(i)[1] for i in range(12)]


def test_fraction_tag() -> None:
    assert [fraction_tag(f) for f in (0.01, 0.1, 0.005, 1.0)] == ["1", "10", "0p5", "100"]


# --------------------------------------------------------------------------------------------------
# end to end on the tiny exported encoder (synthetic images: 10 classes, labels from the seed)
# --------------------------------------------------------------------------------------------------


def test_linear_eval_is_frozen_and_cached(
    tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tiny_teacher_dir / "encoder.safetensors"
    before = load_file(weights)
    kw: dict[str, Any] = {
        "data": "synthetic",
        "train_limit": 48,
        "test_limit": 32,
        "epochs": 3,
        "batch_size": 16,
        "num_workers": 0,
        "device": "cpu",
        "cache_dir": str(tmp_path),
    }
    res = linear_eval(tiny_teacher_dir, LinearConfig(pool="both", **kw))
    assert res["protocol"] == "linear" and res["n_train"] == 48 and res["n_test"] == 32
    assert res["top1"] == res["top1_cls"] and {"top1_mean", "top5_mean", "top5_cls"} <= res.keys()
    after = load_file(weights)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    def no_extraction(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(features, "extract_features", no_extraction)
    again = linear_eval(tiny_teacher_dir, LinearConfig(pool="cls", **kw))
    assert again["top1"] == res["top1"] and again["top5"] == res["top5"]


def test_linear_eval_leaves_an_module_encoder_unchanged(tiny_teacher_dir: Path) -> None:
    model, mean, std = load_encoder(tiny_teacher_dir)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    res = linear_eval(
        model,
        LinearConfig(data="synthetic", train_limit=24, test_limit=16, epochs=2, num_workers=0, mean=mean, std=std),
    )
    assert res["n_train"] == 24
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}


def test_lowshot_linear_end_to_end(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    res = lowshot_eval(
        tiny_teacher_dir,
        LowshotConfig(
            data="synthetic",
            fractions=[0.1, 0.5],
            seeds=[0, 1],
            train_limit=64,
            test_limit=32,
            epochs=3,
            batch_size=16,
            num_workers=0,
            device="cpu",
            cache_dir=str(tmp_path),
        ),
    )
    assert res["protocol"] == "lowshot" and res["mode"] == "linear" and res["n_test"] == 32
    assert set(res["results"]) == {"10%", "50%"}
    labels = torch.tensor([SyntheticDataset(64, img_size=16).load(i)[1] for i in range(64)])
    counts = torch.bincount(labels)
    for f, name, tag in ((0.1, "10%", "10"), (0.5, "50%", "50")):
        r = res["results"][name]
        assert len(r["top1_per_seed"]) == 2 and all(0 <= t <= 100 for t in r["top1_per_seed"])
        assert r["top1_mean"] == pytest.approx(statistics.fmean(r["top1_per_seed"]))
        assert r["top1_std"] == pytest.approx(statistics.stdev(r["top1_per_seed"]))
        assert r["n_train_per_seed"] == [sum(max(1, round(f * int(n))) for n in counts if n > 0)] * 2
        assert res[f"top1_{tag}pct"] == r["top1_mean"] and res[f"top1_{tag}pct_std"] == r["top1_std"]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        lowshot_eval(tiny_teacher_dir, LowshotConfig(data="synthetic", fractions=[0.0]))


def test_lowshot_finetune_passes_stratified_indices(tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def fake_finetune(encoder: Any, cfg: FinetuneConfig, train_indices: list[int]) -> dict[str, Any]:
        calls.append({"encoder": encoder, **asdict(cfg), "train_indices": train_indices})
        return {"top1": 50.0 + cfg.seed, "top5": 90.0, "n_test": 7}

    fake = types.ModuleType("semmim.eval.finetune")
    fake.finetune_eval = fake_finetune  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "semmim.eval.finetune", fake)
    res = lowshot_eval(
        tiny_teacher_dir,
        LowshotConfig(
            data="synthetic",
            fractions=[0.25],
            seeds=[0, 3, 5],
            mode="finetune",
            train_limit=40,
            test_limit=8,
            num_workers=0,
            epochs=1,
            max_steps=2,
            base_lr=1e-3,
        ),
    )
    labels = torch.tensor([SyntheticDataset(40, img_size=16).load(i)[1] for i in range(40)])
    assert [c["seed"] for c in calls] == [0, 3, 5]
    for c in calls:
        assert c["train_indices"] == stratified_subset(labels, 0.25, c["seed"]).tolist()
        assert c["data"] == "synthetic" and c["train_limit"] == 40 and c["test_limit"] == 8
        assert c["epochs"] == 1 and c["max_steps"] == 2 and c["encoder"] == tiny_teacher_dir
        assert c["base_lr"] == 1e-3 and c["num_workers"] == 0  # the shared schedule and data keys go along
    r = res["results"]["25%"]
    assert r["top1_per_seed"] == [50.0, 53.0, 55.0] and res["top1_25pct"] == pytest.approx(52.666666, abs=1e-4)
    assert r["top1_std"] == pytest.approx(statistics.stdev([50.0, 53.0, 55.0])) and res["n_test"] == 7


# --------------------------------------------------------------------------------------------------
# the augmented probe (augment=rrc_flip): new crops every epoch, the frozen encoder re-run on them
# --------------------------------------------------------------------------------------------------


class _Recorder(nn.Module):
    """Wraps an encoder and records what each forward_features call sees."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.patch_embed = inner.get_submodule("patch_embed")
        self.calls: list[dict[str, Any]] = []

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append({"x": x.detach().clone(), "grad": torch.is_grad_enabled(), "training": self.training})
        return self.inner.forward_features(x)  # type: ignore[operator,no-any-return]


def _recorder(tiny_teacher_dir: Path) -> tuple[_Recorder, list[float], list[float]]:
    model, mean, std = load_encoder(tiny_teacher_dir)
    return _Recorder(model), mean, std


def _probe_cfg(mean: list[float], std: list[float], **kw: Any) -> LinearConfig:
    base: dict[str, Any] = {
        "data": "synthetic",
        "train_limit": 8,
        "test_limit": 8,
        "batch_size": 8,
        "encoder_batch_size": 8,
        "num_workers": 0,
        "device": "cpu",
        "optimizer": "sgd",
        "mean": mean,
        "std": std,
    }
    return LinearConfig(**{**base, **kw})


def test_augmented_probe_reruns_the_frozen_encoder_on_new_crops_each_epoch(tiny_teacher_dir: Path) -> None:
    rec, mean, std = _recorder(tiny_teacher_dir)
    rec.train()
    state = {k: v.clone() for k, v in rec.state_dict().items()}
    grads = {n: p.requires_grad for n, p in rec.named_parameters()}
    res = linear_eval(rec, _probe_cfg(mean, std, augment="rrc_flip", epochs=3))
    assert res["augment"] == "rrc_flip" and res["images_encoded"] == 3 * 8 and res["n_train"] == 8
    train_calls = rec.calls[1:]  # first: the test split's centre crops
    assert len(rec.calls) == 1 + 3 and all(c["x"].shape[0] == 8 for c in rec.calls)
    assert all(not c["grad"] and not c["training"] for c in rec.calls)  # eval mode, no gradient
    assert rec.training and grads == {n: p.requires_grad for n, p in rec.named_parameters()}
    assert all(torch.equal(state[k], v) for k, v in rec.state_dict().items())  # frozen
    # the same 8 images each epoch, newly cropped and flipped: per-image sums (order-free) differ between epochs
    sums = [sorted(c["x"].sum((1, 2, 3)).tolist()) for c in train_calls]
    assert sums[0] != sums[1] and sums[1] != sums[2]
    # and the training inputs are not the centre crops the test split (and the cached probe) sees
    centre = rec.calls[0]["x"]
    assert not torch.allclose(train_calls[0]["x"].sort(0).values, centre.sort(0).values)


def test_cached_probe_runs_the_encoder_once_whatever_the_epochs(tiny_teacher_dir: Path) -> None:
    calls = []
    for epochs in (1, 4):
        rec, mean, std = _recorder(tiny_teacher_dir)
        linear_eval(rec, _probe_cfg(mean, std, epochs=epochs))
        calls.append(len(rec.calls))
    assert calls == [2, 2]  # one extraction batch per split, none per epoch


def test_augmented_probe_is_seeded_and_trains_every_pooling(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    kw: dict[str, Any] = {
        "data": "synthetic",
        "train_limit": 24,
        "test_limit": 16,
        "epochs": 2,
        "batch_size": 8,
        "encoder_batch_size": 5,  # chunks that do not divide the batch: features are held over
        "num_workers": 0,
        "device": "cpu",
        "cache_dir": str(tmp_path),
        "augment": "rrc_flip",
        "pool": "both",
    }
    a = linear_eval(tiny_teacher_dir, LinearConfig(**kw))
    b = linear_eval(tiny_teacher_dir, LinearConfig(**kw))
    assert {k: v for k, v in a.items() if k != "train_time_s"} == {k: v for k, v in b.items() if k != "train_time_s"}
    assert {"top1_cls", "top1_mean", "top5_cls", "top5_mean"} <= a.keys() and a["top1"] == a["top1_cls"]
    assert a["images_encoded"] == 2 * 24 and a["batch_size"] == 8
    c = linear_eval(tiny_teacher_dir, LinearConfig(**{**kw, "seed": 1}))
    assert (c["top1_cls"], c["top1_mean"], c["top5_cls"]) != (a["top1_cls"], a["top1_mean"], a["top5_cls"])


def test_augmented_probe_needs_a_map_style_dataset(tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import semmim.eval.linear as linear

    class Stream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
        def __iter__(self) -> Any:
            return iter(())

    monkeypatch.setattr(linear, "labelled_split", lambda *a, **kw: Stream())
    with pytest.raises(ValueError, match="augment=rrc_flip needs a map-style dataset"):
        linear_eval(tiny_teacher_dir, LinearConfig(data="webdataset", augment="rrc_flip", num_workers=0))
