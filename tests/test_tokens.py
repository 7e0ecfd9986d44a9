"""Token targets: the ``ce`` loss, k-means and codebook files, ``semmim codebook``, the ``codebook`` and ``vq``
targets (BEiT v2's VQ-KD checkpoint layout), and supmim / maskdistill training on token ids."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from semmim.cli import main
from semmim.config import ConfigError, load_config
from semmim.engine import pretrain
from semmim.engine.metrics import read_metrics
from semmim.export import save_encoder
from semmim.losses import MaskedCrossEntropy, masked_cross_entropy
from semmim.methods import MaskDistill, SupervisedMIM, build_method
from semmim.models.vit import ViTEncoder
from semmim.targets import CodebookTarget, VQTarget
from semmim.tokenizers import Codebook, code_usage, kmeans, read_checkpoint
from semmim.tokenizers import vqkd as vqkd_module
from semmim.tokenizers.build import build_codebook
from semmim.viz import predict
from tests.conftest import teacher_overrides, tiny_overrides

# ----------------------------------------------------------------------------------------------- the ce loss


def test_masked_cross_entropy_hand_computation() -> None:
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]])
    logits = probs.log()
    ids = torch.tensor([[0, 2, 1]])
    mask = torch.tensor([[True, True, False]])  # token 2 is visible: it must not count
    expected = (-math.log(0.7) - math.log(0.1)) / 2
    assert masked_cross_entropy(logits, ids, mask).item() == pytest.approx(expected, rel=1e-6)
    # label smoothing eps: (1 - eps) * -log p_y + eps * mean_k(-log p_k)
    eps = 0.1
    smooth = [
        (1 - eps) * -math.log(p[y]) + eps * sum(-math.log(q) for q in p) / 3
        for p, y in (
            ([0.7, 0.2, 0.1], 0),
            ([0.1, 0.8, 0.1], 2),
        )
    ]
    assert MaskedCrossEntropy(eps)(logits, ids, mask).item() == pytest.approx(sum(smooth) / 2, rel=1e-6)
    assert masked_cross_entropy(logits, ids, None).item() == pytest.approx(
        (-math.log(0.7) - math.log(0.1) - math.log(0.3)) / 3, rel=1e-6
    )


def test_masked_cross_entropy_gradient_only_on_masked_tokens_and_clear_errors() -> None:
    pred = torch.randn(2, 5, 7, requires_grad=True)
    mask = torch.rand(2, 5) > 0.5
    mask[0, 0] = True
    masked_cross_entropy(pred, torch.randint(0, 7, (2, 5)), mask).backward()
    assert torch.all(pred.grad[~mask] == 0) and pred.grad[mask].abs().sum() > 0
    with pytest.raises(ValueError, match="integer token ids"):
        masked_cross_entropy(pred, torch.randn(2, 5), mask)
    with pytest.raises(ValueError, match=r"\(N, L, V\)"):
        masked_cross_entropy(pred, torch.zeros(2, 4, dtype=torch.long), None)
    with pytest.raises(ValueError, match="label_smoothing"):
        MaskedCrossEntropy(1.0)


# ----------------------------------------------------------------------------------------------- k-means


def _clusters(centres: torch.Tensor, per: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pts = centres.repeat_interleave(per, 0) + noise * torch.randn(len(centres) * per, centres.shape[1], generator=gen)
    return pts, torch.arange(len(centres)).repeat_interleave(per)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_well_separated_clusters(metric: str, seed: int) -> None:
    centres = torch.eye(6, 8) * 10.0  # orthogonal directions: separated under l2 and cosine alike
    pts, truth = _clusters(centres, per=60, noise=0.3)
    init = "kmeans++"
    res = kmeans(pts, 6, iters=30, metric=metric, init=init, seed=seed)
    ids = torch.cdist(F.normalize(pts, dim=-1) if metric == "cosine" else pts, res.centroids).argmin(1)
    for c in range(6):  # every true cluster lands in exactly one code, and codes are not shared
        assert ids[truth == c].unique().numel() == 1
    assert ids.unique().numel() == 6 and sorted(res.counts.tolist()) == [60] * 6
    ref = F.normalize(centres, dim=-1) if metric == "cosine" else centres
    err = torch.cdist(res.centroids, ref).min(1).values.max().item()
    assert err < (0.05 if metric == "cosine" else 0.2)
    again = kmeans(pts, 6, iters=30, metric=metric, init=init, seed=seed)
    assert torch.equal(again.centroids, res.centroids)  # deterministic by seed


def test_kmeans_random_seeding_is_deterministic_and_uses_every_code() -> None:
    # random seeding may settle in a local optimum (two codes in one cluster): only its contract is tested
    pts, _ = _clusters(torch.eye(6, 8) * 10.0, per=60, noise=0.3)
    runs = [kmeans(pts, 6, iters=30, metric="l2", init="random", seed=s) for s in (1, 1, 2)]
    assert torch.equal(runs[0].centroids, runs[1].centroids) and not torch.equal(runs[0].centroids, runs[2].centroids)
    assert all(int((r.counts > 0).sum()) == 6 and int(r.counts.sum()) == 360 for r in runs)
    best = kmeans(pts, 6, iters=30, metric="l2", init="kmeans++", seed=0)
    assert best.inertia <= min(r.inertia for r in runs) + 1e-6


def test_kmeans_reseeds_dead_centroids() -> None:
    # k-means++ never starts two codes on one point; random seeding on a sample with many duplicates does
    pts = torch.cat([torch.zeros(40, 2), torch.tensor([[10.0, 0.0]]).repeat(3, 1), torch.tensor([[0.0, 10.0]])])
    res = kmeans(pts, 3, iters=10, metric="l2", init="random", seed=0)
    assert res.reseeded >= 1
    assert sorted(res.counts.tolist()) == [1, 3, 40]  # every code ends up in use


def test_reservoir_keeps_a_seeded_uniform_sample_of_a_stream() -> None:
    from semmim.tokenizers.build import Reservoir

    def draw(seed: int) -> torch.Tensor:
        r = Reservoir(200, seed)
        for start in range(0, 4000, 128):  # blocks of rows 0..3999, the value of a row is its index
            r.add(torch.arange(start, min(start + 128, 4000)).float()[:, None])
        assert r.seen == 4000
        return r.sample()[:, 0]

    a, b, c = draw(0), draw(0), draw(1)
    assert a.shape == (200,) and a.unique().numel() == 200 and torch.equal(a, b) and not torch.equal(a, c)
    assert 1700 < a.mean().item() < 2300 and (a < 2000).sum().item() in range(70, 131)  # spread over the stream


def test_code_usage_and_perplexity() -> None:
    assert code_usage(torch.tensor([5, 5, 0, 0])) == (0.5, pytest.approx(2.0))
    usage, ppl = code_usage(torch.tensor([1, 2, 3, 4]))
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert usage == 1.0 and ppl == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-5)


def test_codebook_file_round_trip_and_refusals(tmp_path: Path) -> None:
    cb = Codebook(
        centroids=torch.randn(5, 3),
        metric="l2",
        norm="ln",
        grid=(4, 4),
        teacher={"config": {"name": "timm"}, "description": "t"},
        teacher_sha256="ab" * 32,
        info={"usage": "0.8"},
    )
    loaded = Codebook.load(cb.save(tmp_path / "cb.safetensors"))
    assert torch.equal(loaded.centroids, cb.centroids) and loaded.grid == (4, 4) and loaded.norm == "ln"
    assert loaded.teacher == cb.teacher and loaded.info["usage"] == "0.8"
    save_encoder(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, "vit_tiny_patch16_224", {})
    with pytest.raises(ValueError, match="not a semmim codebook"):
        Codebook.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="norm"):
        Codebook(torch.zeros(2, 2), "l2", "center", (1, 1), {}, "x")


# ----------------------------------------------------------------------------------------------- the codebook target


def _supmim_codebook(teacher_dir: Path, path: Path, *extra: str) -> list[str]:
    return tiny_overrides(
        "method.name=supmim",
        "method.num_classes=10",
        "method.target=codebook",
        f"method.target.path={path}",
        *teacher_overrides(teacher_dir),
        *extra,
    )


def _other_teacher(tmp_path: Path, seed: int = 7, width: int = 48) -> Path:
    torch.manual_seed(seed)
    enc = ViTEncoder(img_size=16, patch_size=4, in_chans=3, embed_dim=width, depth=2, num_heads=2)
    out = tmp_path / f"teacher{seed}_{width}"
    save_encoder(out / "encoder.safetensors", enc.timm_state_dict(), enc.timm_name, enc.timm_kwargs())
    return out


@pytest.fixture(scope="module")
def codebook_file(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cb") / "codebook.safetensors"
    cfg = load_config(None, _supmim_codebook(tiny_teacher_dir, path, "data.limit=32"))
    report = build_codebook(cfg, path, 8, iters=10, norm="ln", seed=0)
    assert report.size == 8 and report.tokens == 32 * 16 and report.images == 32
    return path


def test_codebook_target_gives_the_nearest_centroid_of_the_conditioned_teacher_tokens(
    tiny_teacher_dir: Path, codebook_file: Path
) -> None:
    method = build_method(load_config(None, _supmim_codebook(tiny_teacher_dir, codebook_file)))
    target = method.target
    assert isinstance(target, CodebookTarget) and target.out_dim == 8 and target.kind == "tokens"
    assert method.decoder.pred.out_features == 8  # one logit per code
    images = torch.rand(3, 3, 16, 16)
    out = target(images, method.grid)
    assert out.tokens.shape == (3, 16) and out.tokens.dtype == torch.long and not out.global_token
    feats = target.teacher(images, method.grid).tokens[:, 1:]
    unit = F.normalize(F.layer_norm(feats, (feats.shape[-1],), eps=1e-6), dim=-1)  # norm=ln, metric=cosine
    expected = (unit @ F.normalize(target.centroids, dim=-1).T).argmax(-1)
    assert torch.equal(out.tokens, expected)
    # the teacher and the centroids stay out of checkpoints
    assert not any(k.startswith(("target.teacher.", "target.centroids")) for k in method.state_dict())


def test_codebook_metadata_mismatch_is_a_clear_error(
    tiny_teacher_dir: Path, codebook_file: Path, tmp_path: Path
) -> None:
    other = _other_teacher(tmp_path)
    with pytest.raises(ConfigError, match=r"method\.target\.path=.*another teacher.*semmim codebook"):
        build_method(load_config(None, _supmim_codebook(other, codebook_file)))
    with pytest.raises(ConfigError, match=r"method\.target\.path=.*48-d centroids but the teacher gives 32-d"):
        build_method(load_config(None, _supmim_codebook(_other_teacher(tmp_path, 8, 32), codebook_file)))
    with pytest.raises(ConfigError, match=r"4x4 patch grid.*8x8"):
        build_method(load_config(None, _supmim_codebook(tiny_teacher_dir, codebook_file, "model.img_size=32")))
    with pytest.raises(FileNotFoundError, match="semmim codebook"):
        build_method(load_config(None, _supmim_codebook(tiny_teacher_dir, tmp_path / "missing.safetensors")))


def test_supmim_with_a_codebook_target_learns_on_a_fixed_batch(tiny_teacher_dir: Path, codebook_file: Path) -> None:
    from semmim.data.loader import build_dataset

    torch.manual_seed(0)
    cfg = load_config(None, _supmim_codebook(tiny_teacher_dir, codebook_file))
    method = build_method(cfg)
    assert isinstance(method, SupervisedMIM)
    data = build_dataset(cfg.data, img_size=16, in_chans=3, train=False)  # the images the codebook was built on
    items = [data[i] for i in range(16)]
    batch = {"image": torch.stack([it["image"] for it in items]), "label": torch.tensor([it["label"] for it in items])}
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=2e-3)
    mims, accs = [], []
    for _ in range(60):
        out = method(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        mims.append(out["logs"]["mim"].item())
        accs.append(out["logs"]["mim_acc"].item())
    first, last = sum(mims[:5]) / 5, sum(mims[-5:]) / 5
    assert mims[0] > math.log(8) * 0.8  # starts near chance over 8 codes
    assert last < 0.6 * first, (first, last)
    assert sum(accs[-5:]) / 5 > sum(accs[:5]) / 5 + 0.2
    assert out["loss"].item() == pytest.approx(out["logs"]["ce"].item() + out["logs"]["mim"].item(), rel=1e-5)
    assert predict(method.eval(), batch, seed=0)["kind"] == "tokens"  # the report draws no picture of ids


def test_codebook_cli_end_to_end_then_pretrain(tiny_teacher_dir: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "cb.safetensors"
    over = _supmim_codebook(tiny_teacher_dir, path, "data.limit=24")
    assert main(["codebook", "--k", "6", "--iters", "5", "--max-tokens", "300", "--seed", "3", *over]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["path"] == str(path) and report["size"] == 6 and report["tokens"] == 300
    assert report["images"] == 24 and 0 < report["usage"] <= 1 and 1 <= report["perplexity"] <= 6
    meta = Codebook.load(path)
    assert meta.grid == (4, 4) and meta.metric == "cosine" and meta.norm == "none"
    assert meta.teacher["config"]["path"] == str(tiny_teacher_dir) and meta.info["seed"] == "3"
    assert main(["codebook", "--k", "6", "--iters", "5", "--max-tokens", "300", "--seed", "3", *over]) == 0
    again = Codebook.load(path)  # deterministic by seed
    assert torch.equal(again.centroids, meta.centroids) and again.info == meta.info
    run = tmp_path / "run"
    assert pretrain(load_config(None, over), run).steps == 3
    rows = read_metrics(run / "metrics.jsonl")
    assert rows and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert any("mim_acc" in r for r in rows)


def test_codebook_cli_refusals(tiny_teacher_dir: Path, tmp_path: Path, capsys) -> None:
    over = _supmim_codebook(tiny_teacher_dir, tmp_path / "a.safetensors")
    assert main(["codebook", "--k", "4", "--out", str(tmp_path / "b.safetensors"), *over]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["codebook", "--k", "4", "--norm", "center", *over]) == 2
    assert "--norm must be one of none, ln" in capsys.readouterr().err
    assert main(["codebook", "--k", "4", *tiny_overrides("method.name=mae")]) == 2
    assert "teacher" in capsys.readouterr().err
    assert main(["codebook", "--k", "64", "--max-tokens", "100000", *over, "data.limit=2"]) == 2
    assert "only 32 tokens" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- pairing rules


SUP3 = ["method.name=supmim", "method.num_classes=3"]
VQ_X = ["method.target=vq", "method.target.path=x"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["method.name=supmim", "method.num_classes=3", "method.loss=ce"], r"method\.loss='ce'.*continuous.*mse"),
        (["method.name=mae", "method.target=vq", "method.target.path=x.pth"], r"method\.target='vq'.*tokens target"),
        (
            [
                "method.name=milan",
                "method.target=codebook",
                "method.target.path=x",
                "teacher.name=timm",
                "teacher.path=t",
            ],
            r"method\.target='codebook' cannot be used by method 'milan'",
        ),
        (
            [
                "method.name=supmim",
                "method.num_classes=3",
                "method.target=vq",
                "method.target.path=x",
                "method.loss=mse",
            ],
            r"method\.loss='mse'.*discrete token ids; allowed here: ce",
        ),
        (
            [
                "method.name=supmim",
                "method.num_classes=3",
                "method.target=vq",
                "method.target.path=x",
                "teacher.name=timm",
            ],
            r"teacher\.name='timm' is not used",
        ),
        (
            [
                "method.name=supmim",
                "method.num_classes=3",
                "method.target=vq",
                "method.target.path=x",
                "method.target.tokenizer=vqkd_encoder_base_decoder_3x768x12_clip",
            ],
            r"give the VQ tokenizer once",
        ),
    ],
)
def test_token_targets_and_losses_pair_or_fail_naming_the_keys(extra: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, tiny_overrides(*extra))


def test_default_loss_follows_a_token_target() -> None:
    cfg = load_config(
        None,
        tiny_overrides("method.name=supmim", "method.num_classes=3", "method.target=vq", "method.target.path=x.pth"),
    )
    assert cfg.method.loss == {"name": "ce", "label_smoothing": 0.0}
    cfg = load_config(None, tiny_overrides("method.name=maskdistill", "method.target=vq", "method.target.path=x"))
    assert cfg.method.loss["name"] == "ce"


# ----------------------------------------------------------------------------------------------- BEiT v2 VQ-KD


def tiny_vqkd_state(
    seed: int = 0, width: int = 32, depth: int = 2, patch: int = 4, img: int = 16, code_dim: int = 8, codes: int = 16
) -> dict[str, torch.Tensor]:
    """A random checkpoint in modeling_vqkd.VQKD's key layout (encoder, task layers, quantizer, decoder)."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    s: dict[str, torch.Tensor] = {}
    n = (img // patch) ** 2
    for side in ("encoder", "decoder"):
        s[f"{side}.cls_token"] = r(1, 1, width)
        s[f"{side}.pos_embed"] = r(1, n + 1, width)
        s[f"{side}.patch_embed.proj.weight"] = r(width, 3 if side == "encoder" else code_dim, patch, patch)
        s[f"{side}.patch_embed.proj.bias"] = r(width)
        for i in range(depth):
            b = f"{side}.blocks.{i}."
            for norm in ("norm1", "norm2"):
                s[b + f"{norm}.weight"], s[b + f"{norm}.bias"] = 1 + r(width), r(width)
            s[b + "attn.q_bias"], s[b + "attn.v_bias"] = r(width), r(width)
            s[b + "attn.qkv.weight"] = r(3 * width, width)
            s[b + "attn.proj.weight"], s[b + "attn.proj.bias"] = r(width, width), r(width)
            s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"] = r(4 * width, width), r(4 * width)
            s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"] = r(width, 4 * width), r(width)
        s[f"{side}.fc_norm.weight"], s[f"{side}.fc_norm.bias"] = 1 + r(width), r(width)
    s["encode_task_layer.0.weight"], s["encode_task_layer.0.bias"] = r(width, width, std=0.5), r(width)
    s["encode_task_layer.2.weight"], s["encode_task_layer.2.bias"] = r(code_dim, width, std=0.5), r(code_dim)
    s["decode_task_layer.0.weight"], s["decode_task_layer.0.bias"] = r(width, width), r(width)
    s["decode_task_layer.2.weight"], s["decode_task_layer.2.bias"] = r(512, width), r(512)
    s["quantize.embedding.weight"] = F.normalize(r(codes, code_dim), dim=-1)
    s["quantize.embedding.cluster_size"] = torch.rand(codes, generator=gen)
    s["quantize.embedding.embed_avg"] = r(codes, code_dim)
    s["quantize.embedding.initted"] = torch.tensor([1.0])
    s["quantize.cluster_size"] = torch.rand(codes, generator=gen)
    return s


def reference_codes(s: dict[str, torch.Tensor], images: torch.Tensor, num_heads: int) -> torch.Tensor:
    """BEiT v2's tokenizer by hand: [-1, 1] input, BEiT ViT (q/v biases), fc_norm on the patch tokens, task
    layer, l2 normalisation, nearest code by brute-force squared distance."""
    x = images * 2 - 1
    w = s["encoder.patch_embed.proj.weight"]
    x = F.conv2d(x, w, s["encoder.patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    n, width = x.shape[0], x.shape[-1]
    x = torch.cat([s["encoder.cls_token"].expand(n, -1, -1), x], 1) + s["encoder.pos_embed"]
    hd = width // num_heads
    depth = len({k.split(".")[2] for k in s if k.startswith("encoder.blocks.")})
    for i in range(depth):
        b = f"encoder.blocks.{i}."
        h = F.layer_norm(x, (width,), s[b + "norm1.weight"], s[b + "norm1.bias"], eps=1e-6)
        bias = torch.cat([s[b + "attn.q_bias"], torch.zeros(width), s[b + "attn.v_bias"]])
        q, k, v = F.linear(h, s[b + "attn.qkv.weight"], bias).reshape(n, -1, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
        attn = ((q * hd**-0.5) @ k.transpose(-2, -1)).softmax(-1)
        o = (attn @ v).transpose(1, 2).reshape(n, -1, width)
        g1, g2 = s.get(b + "gamma_1", torch.ones(width)), s.get(b + "gamma_2", torch.ones(width))  # LayerScale
        x = x + g1 * F.linear(o, s[b + "attn.proj.weight"], s[b + "attn.proj.bias"])
        h = F.layer_norm(x, (width,), s[b + "norm2.weight"], s[b + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"])), s[b + "mlp.fc2.weight"])
        x = x + g2 * (h + s[b + "mlp.fc2.bias"])
    if "encoder.fc_norm.weight" in s:  # mean pooling (the released tokenizers): fc_norm on the patch tokens
        t = F.layer_norm(x[:, 1:], (width,), s["encoder.fc_norm.weight"], s["encoder.fc_norm.bias"], eps=1e-6)
    else:  # no mean pooling: the final norm over all tokens, then the patch tokens
        t = F.layer_norm(x, (width,), s["encoder.norm.weight"], s["encoder.norm.bias"], eps=1e-6)[:, 1:]
    z = F.linear(
        torch.tanh(F.linear(t, s["encode_task_layer.0.weight"], s["encode_task_layer.0.bias"])),
        s["encode_task_layer.2.weight"],
        s["encode_task_layer.2.bias"],
    )
    z = F.normalize(z, dim=-1)
    dist = ((z[:, :, None, :] - s["quantize.embedding.weight"]) ** 2).sum(-1)
    return dist.argmin(-1)


def _save_pth(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"model": state, "args": argparse.Namespace(model="vqkd_tiny", lr=1e-4), "epoch": 3}, path)
    return path


def _supmim_vq(*extra: str) -> list[str]:
    return tiny_overrides("method.name=supmim", "method.num_classes=10", "method.target=vq", *extra)


def test_vqkd_checkpoint_codes_equal_the_hand_computation(tmp_path: Path) -> None:
    state = tiny_vqkd_state()
    path = _save_pth(state, tmp_path / "vqkd_tiny.pth")
    method = build_method(load_config(None, _supmim_vq(f"method.target.path={path}", "method.target.num_heads=2")))
    target = method.target
    assert isinstance(target, VQTarget) and target.out_dim == 16 and method.decoder.pred.out_features == 16
    images = torch.rand(4, 3, 16, 16)
    codes = target(images, method.grid).tokens
    expected = reference_codes(state, images, num_heads=2)
    assert codes.shape == (4, 16) and codes.dtype == torch.long
    assert torch.equal(codes, expected) and expected.unique().numel() > 3
    # one-channel images are repeated to three; the tokenizer is frozen and kept out of checkpoints
    gray = torch.rand(2, 1, 16, 16)
    assert torch.equal(target(gray, method.grid).tokens, reference_codes(state, gray.expand(-1, 3, -1, -1), 2))
    method.train()
    assert not target.tokenizer.training and not any(p.requires_grad for p in target.tokenizer.parameters())
    assert not any(k.startswith("target.tokenizer.") for k in method.state_dict())
    # the same weights as safetensors give the same codes
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "vqkd.safetensors"))
    st = build_method(
        load_config(
            None, _supmim_vq(f"method.target.path={tmp_path / 'vqkd.safetensors'}", "method.target.num_heads=2")
        )
    )
    assert torch.equal(st.target(images, st.grid).tokens, expected)


def test_vqkd_variants_layer_scale_and_final_norm(tmp_path: Path) -> None:
    """modeling_finetune's other switches: LayerScale (gamma_1/2 with init_values > 0), no mean pooling (norm)."""
    state = tiny_vqkd_state(seed=1)
    for i in range(2):
        state[f"encoder.blocks.{i}.gamma_1"] = torch.rand(32) + 0.5
        state[f"encoder.blocks.{i}.gamma_2"] = torch.rand(32) + 0.5
    state["encoder.norm.weight"] = state.pop("encoder.fc_norm.weight")
    state["encoder.norm.bias"] = state.pop("encoder.fc_norm.bias")
    path = _save_pth(state, tmp_path / "vqkd_ls.pth")
    method = build_method(load_config(None, _supmim_vq(f"method.target.path={path}", "method.target.num_heads=4")))
    images = torch.rand(3, 3, 16, 16)
    expected = reference_codes(state, images, num_heads=4)
    assert torch.equal(method.target(images, method.grid).tokens, expected) and expected.unique().numel() > 3


def test_vqkd_follows_the_student_grid_and_refuses_what_it_cannot_load(tmp_path: Path) -> None:
    path = _save_pth(tiny_vqkd_state(), tmp_path / "vqkd_tiny.pth")
    method = build_method(load_config(None, _supmim_vq(f"method.target.path={path}", "model.img_size=32")))
    assert method.target.tokenizer.image_size == 32  # 8x8 student grid x patch 4: position embeddings resampled
    assert method.target(torch.rand(2, 3, 32, 32), method.grid).tokens.shape == (2, 64)
    with pytest.raises(ConfigError, match=r"method\.target\.image_size=16.*4x4 grid of codes.*8x8"):
        build_method(
            load_config(
                None, _supmim_vq(f"method.target.path={path}", "model.img_size=32", "method.target.image_size=16")
            )
        )
    state = tiny_vqkd_state()
    state["encoder.blocks.0.attn.relative_position_bias_table"] = torch.zeros(3, 2)
    bad = _save_pth(state, tmp_path / "rel.pth")
    with pytest.raises(ConfigError, match="relative position bias"):
        build_method(load_config(None, _supmim_vq(f"method.target.path={bad}")))
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="not a VQ-KD checkpoint"):
        build_method(load_config(None, _supmim_vq(f"method.target.path={tmp_path / 'x.pth'}")))
    assert read_checkpoint(path)["quantize.embedding.weight"].shape == (16, 8)


def test_vq_tokenizer_by_name_downloads_the_released_file_once(tmp_path: Path, monkeypatch) -> None:
    state = tiny_vqkd_state()
    calls = []

    def fake_download(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        calls.append((url, hash_prefix))
        _save_pth(state, Path(dst))

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    name = "vqkd_encoder_base_decoder_3x768x12_clip"
    over = _supmim_vq(f"method.target.tokenizer={name}", "method.target.num_heads=2")
    method = build_method(load_config(None, over))
    assert calls == [(vqkd_module.VQKD_URLS[name], "d5036aa7")]
    assert calls[0][0].endswith("/vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth")
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(method.target(images, method.grid).tokens, reference_codes(state, images, 2))
    build_method(load_config(None, over))
    assert len(calls) == 1  # cached


def test_maskdistill_with_vq_tokens_is_beit_v2_style_and_learns(tmp_path: Path) -> None:
    path = _save_pth(tiny_vqkd_state(), tmp_path / "vqkd_tiny.pth")
    cfg = load_config(
        None,
        tiny_overrides(
            "method.name=maskdistill",
            "method.target=vq",
            f"method.target.path={path}",
            "method.target.num_heads=2",
            "model.layer_scale_init=0.1",
        ),
    )
    torch.manual_seed(0)
    method = build_method(cfg)
    assert isinstance(method, MaskDistill) and method.head.proj.out_features == 16
    batch = {"image": torch.rand(8, 3, 16, 16)}
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        out = method(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert "mim_acc" in out["logs"] and out["target"].dtype == torch.long
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_pretrain_with_a_python_teacher_and_codebook(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """The benchmark's path: a codebook and a run over one teacher passed from Python (a ModuleTeacher)."""
    from semmim.teachers import ModuleTeacher

    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 12, 4, stride=4)
    teacher = ModuleTeacher(net, embed_dim=12, image_size=16, mean=[0.5] * 3, std=[0.25] * 3)
    path = tmp_path / "cb.safetensors"
    over = tiny_overrides(
        "method.name=supmim",
        "method.num_classes=10",
        "method.target=codebook",
        f"method.target.path={path}",
        "teacher.name=module",
    )
    cfg = load_config(None, over)
    build_codebook(cfg, path, 4, iters=3, teacher=teacher)
    assert Codebook.load(path).teacher["config"]["name"] == "module"
    result = pretrain(cfg, tmp_path / "run", teacher=teacher)
    assert result.steps == 3 and math.isfinite(result.final_loss)
