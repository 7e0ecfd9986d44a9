"""kNN (DINO protocol) on cases with known answers, and the feature cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from semmim.eval import features
from semmim.eval.common import load_encoder
from semmim.eval.config import KnnConfig
from semmim.eval.features import extract_features
from semmim.eval.knn import knn_classify, knn_eval


def _clusters(n_per_class: int, classes: int, dim: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(classes, dim)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=g), labels


def test_separable_features_give_100_percent() -> None:
    xtr, ytr = _clusters(50, 10, 32, 0.05, 0)
    xte, yte = _clusters(20, 10, 32, 0.05, 1)
    res = knn_classify(xtr, ytr, xte, yte, k=20, temperature=0.07)
    assert res["top1"] == 100.0 and res["top5"] == 100.0 and res["n_test"] == 200


def test_random_features_give_chance() -> None:
    g = torch.Generator().manual_seed(0)
    xtr, ytr = torch.randn(5000, 64, generator=g), torch.randint(0, 10, (5000,), generator=g)
    xte, yte = torch.randn(3000, 64, generator=g), torch.randint(0, 10, (3000,), generator=g)
    res = knn_classify(xtr, ytr, xte, yte)
    assert abs(res["top1"] - 10.0) < 2.5 and abs(res["top5"] - 50.0) < 4.0


def test_weighted_vote_by_hand() -> None:
    """Two neighbours of class 0 at cos 0.6 outvote nothing; one of class 1 at cos 1.0 wins with T = 0.07."""
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([1, 0, 0])
    test = torch.tensor([[1.0, 0.0]])
    # class 1: exp(1/0.07) vs class 0: 2 * exp(0.6/0.07): 1.6e6 vs 1.0e4 -> class 1
    assert math.exp(1 / 0.07) > 2 * math.exp(0.6 / 0.07)
    assert knn_classify(train, labels, test, torch.tensor([1]), k=3)["top1"] == 100.0
    # with a hot temperature the two class-0 neighbours win: exp(1) < 2 exp(0.6)
    assert knn_classify(train, labels, test, torch.tensor([1]), k=3, temperature=1.0)["top1"] == 0.0


def test_extract_features_pools_and_leaves_the_encoder_alone(tiny_teacher_dir: Path) -> None:
    model, mean, std = load_encoder(tiny_teacher_dir)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(6, 3, 16, 16)
    loader = [{"image": images[:4], "label": torch.arange(4)}, {"image": images[4:], "label": torch.arange(2)}]
    feats, labels = extract_features(model, loader, mean, std, pool="both")
    x = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(x)
    torch.testing.assert_close(feats["cls"], tokens[:, 0])
    torch.testing.assert_close(feats["mean"], tokens[:, 1:].mean(1))
    assert labels.tolist() == [0, 1, 2, 3, 0, 1]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="pool must be"):
        extract_features(model, loader, mean, std, pool="max")
    shown, _ = extract_features(model, loader, mean, std, pool="both", progress=True)  # a bar, same numbers
    assert all(torch.equal(shown[p], feats[p]) for p in feats)


def test_feature_extraction_shows_progress_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Stderr:
        def __init__(self, tty: bool) -> None:
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    monkeypatch.setattr(features.sys, "stderr", Stderr(True))
    assert features.show_progress(10_000) and not features.show_progress(100)  # tiny sets: no bar
    monkeypatch.setattr(features.sys, "stderr", Stderr(False))
    assert not features.show_progress(10_000)


def test_knn_eval_caches_features(tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tiny_teacher_dir / "encoder.safetensors"
    before = load_file(str(weights))
    kw = {"data": "synthetic", "train_limit": 64, "test_limit": 32, "num_workers": 0, "cache_dir": str(tmp_path)}
    first = knn_eval(tiny_teacher_dir, KnnConfig(pool="both", **kw))
    assert {"top1", "top1_cls", "top1_mean", "n_train"} <= set(first)
    assert len(list(tmp_path.glob("*.pt"))) == 2  # train and test splits

    def no_extraction(*args: object, **kwargs: object) -> None:
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(features, "extract_features", no_extraction)
    again = knn_eval(tiny_teacher_dir, KnnConfig(pool="mean", **kw))  # another pooling: same cache entry
    assert again["top1"] == first["top1_mean"]
    after = load_file(str(weights))
    assert all(torch.equal(before[k], after[k]) for k in before)
