"""Typed run configuration: YAML files merged onto dataclass defaults, plus ``key=value`` overrides.

Every run is described by one :class:`Config`. A YAML file may set any subset of its keys; unknown
keys, wrong types and impossible values are errors that name the key, raised before any work starts.
The fully resolved config is written into every run directory.

Examples:
    >>> cfg = load_config(None, ["model.embed_dim=192", "trainer.max_steps=3"])
    >>> cfg.model.embed_dim, cfg.trainer.max_steps
    (192, 3)
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and what is allowed."""


MAX_CONFIG_BYTES = 1 << 20
"""Largest config file :func:`load_config` reads (1 MiB; the shipped configs are a few KiB)."""

MAX_YAML_NODES = 100_000
"""Most YAML nodes a document may expand to once its aliases (``*name``) are resolved. A billion-laughs
document of a few hundred bytes expands to billions of nodes; it is refused before anything is built."""


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """Nodes of ``root`` with every alias expanded, stopping early above ``limit``; cycles are refused."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError("an alias refers to a node that contains it (a recursive structure)")
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children: list[yaml.Node] = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            total += size(child)
            if total > limit:
                break
        active.discard(key)
        sizes[key] = total
        return total

    return size(root)


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses documents whose aliases expand beyond :data:`MAX_YAML_NODES` nodes.

    The check runs on the composed node graph, where each alias is one shared node, so it costs time
    proportional to the text, before the constructor (or OmegaConf) would expand the aliases.
    """

    def compose_document(self) -> Any:
        node = super().compose_document()
        if node is not None and _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise ConfigError(
                f"its aliases (*name) expand to more than {MAX_YAML_NODES} YAML nodes (a 'billion laughs' document?)"
            )
        return node


def safe_load_yaml(text: str, where: str) -> Any:
    """Parse YAML ``text`` like ``yaml.safe_load``, bounding what aliases may expand to.

    Raises:
        ConfigError: the aliases expand to more than :data:`MAX_YAML_NODES` nodes, refer to themselves,
            or nest too deeply; the message starts with ``where``.
        yaml.YAMLError: the text is not valid YAML.
    """
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{where}: the YAML nests too deeply") from None


def read_yaml_file(path: str | Path, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """Read a YAML file of at most ``max_bytes`` with :func:`safe_load_yaml`.

    Raises:
        FileNotFoundError: ``path`` is not a regular file.
        ConfigError: the file is too large, not valid YAML, or its aliases expand too far (names the file).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    with p.open("rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ConfigError(f"{p}: larger than {max_bytes} bytes, too large for a config file")
    try:
        return safe_load_yaml(raw.decode("utf-8"), str(p))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None


UNSAFE_LOADER_KEYS: dict[str, str] = {
    "weights_only": "semmim always unpickles checkpoints with weights_only=True",
    "trust_remote_code": "running code from a model repository is not allowed",
    "pickle_module": "checkpoints are never unpickled with a custom pickle module",
    "pickle_load_args": "checkpoints are never unpickled with custom pickle arguments",
    "allow_pickle": "NumPy archives are never unpickled",
    "from_tf": "TensorFlow checkpoints are not loaded",
    "from_flax": "Flax checkpoints are not loaded",
}
"""Keyword arguments of model loaders (``torch.load``, ``transformers``' ``from_pretrained``,
``open_clip.create_model``, ``timm.create_model``) that could make them run code from a file; a config
(``teacher.kwargs``) or a loader's ``**kwargs`` naming one is refused. ``use_safetensors`` is refused
unless it is ``true``."""


def check_loader_kwargs(kwargs: Any, where: str) -> None:
    """Refuse loader keyword arguments that would allow unsafe unpickling or remote code.

    Args:
        kwargs: the keyword arguments (a mapping) about to be forwarded to a model loader.
        where: what they configure, for the message (e.g. ``teacher.kwargs``).

    Raises:
        ConfigError: one line naming the first unsafe key.
    """
    for key in kwargs or {}:
        name = str(key)
        if name in UNSAFE_LOADER_KEYS:
            raise ConfigError(f"{where}.{name} is not allowed: {UNSAFE_LOADER_KEYS[name]}")
        if name == "use_safetensors" and kwargs[key] is not True:
            raise ConfigError(
                f"{where}.use_safetensors={kwargs[key]!r} is not allowed: only true (safetensors files are preferred "
                "and pickled .bin files are read with weights_only=True)"
            )


@dataclass
class MethodConfig:
    name: str = "mae"
    """Registered method: ``semmim list`` shows them."""
    mask_ratio: float | None = None
    """Fraction of patches masked; None = the method's default (0.75; 0.4 for MaskDistill)."""
    masking: str | None = None
    """Registered masker: random | block | semantic; ``None`` = the method's default."""
    norm_pix_loss: bool = True
    """MAE: normalise each target patch by its own mean and variance."""
    loss: str | None = None
    """Override the method's default loss (a registered loss name)."""
    num_masks: int = 1
    """Draw M masks per image and reuse one data load and one teacher pass for all of them (data2vec 2.0,
    Baevski et al. 2022, arXiv:2212.07525): the student sees batch_size x M masked views; mae, milan,
    maskdistill."""
    block_min_patches: int = 16
    block_min_aspect: float = 0.3
    smooth_l1_beta: float = 2.0
    """MaskDistill: threshold of the smooth-L1 loss (targets are LayerNorm-normalised, unit variance)."""
    target: str | None = None
    """supmim: what the MIM branch reconstructs (pixels | teacher_features); None = method default."""
    num_classes: int | None = None
    """supmim: classes of the classifier; None = taken from the dataset."""
    mim_weight: float = 1.0
    """supmim: total loss = cross-entropy + mim_weight * MIM loss (0 = supervised only)."""
    label_smoothing: float = 0.1
    mixup: float = 0.0
    """supmim: mixup alpha (0 = off), applied on the device with timm's Mixup."""
    cutmix: float = 0.0
    """supmim: cutmix alpha (0 = off)."""
    embed_dim: int = 256
    """clip/rils: width of the joint image-text embedding space."""
    init_temperature: float = 0.07
    """clip/rils: initial softmax temperature of the contrastive loss (learnable, as in CLIP)."""
    pool: str | None = None
    """clip/rils: image embedding from the CLS token ("cls") or the mean of patch tokens ("mean");
    None = the method's default (clip: cls; rils: mean, its global average pooling)."""
    teacher_temperature: float = 0.04
    """rils: temperature of the unmasked pass's patch-to-caption distribution."""
    student_temperature: float = 0.1
    """rils: temperature of the masked pass's patch-to-caption distribution."""
    kl_weight: float = 0.5
    """rils: loss = InfoNCE + kl_weight * KL(teacher || student)."""
    gate_correct: bool = True
    """rils: use only samples whose image-to-text retrieval was correct for the KL term."""


@dataclass
class ModelConfig:
    """The student ViT encoder (timm-compatible)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path: float = 0.0
    layer_scale_init: float | None = None
    timm_name: str = "vit_base_patch16_224"
    """timm architecture the exported state dict loads into (with the size kwargs above)."""


@dataclass
class DecoderConfig:
    name: str | None = None
    """Registered decoder (mae | prompting); ``None`` = the method's default."""
    embed_dim: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0


@dataclass
class TeacherConfig:
    """A frozen teacher that provides feature targets (and attention for semantic masking)."""

    name: str | None = None
    """Registered teacher: open_clip | hf_clip | timm | none."""
    model: str | None = None
    """open_clip/timm architecture name, or a Hugging Face hub name / local directory."""
    pretrained: str | None = None
    """open_clip pretrained tag (e.g. ``openai``) or checkpoint file; ``true`` for timm hub weights."""
    path: str | None = None
    """Local weights file (or semmim run directory) to load into the teacher."""
    image_size: int | None = None
    """Teacher input size; ``None`` = the teacher's own default."""
    mean: list[float] | None = None
    std: list[float] | None = None
    ln_target: bool | None = None
    """Shorthand: true = ``target_norm=ln``, false = ``target_norm=none`` (kept for older configs)."""
    target_norm: str | None = None
    """How teacher tokens are conditioned before the loss: none | ln | center | center_ln | whiten | pca
    (``semmim.targets.conditioning``). None = the method's default: ``center`` for MILAN, ``ln`` for
    MaskDistill and supmim."""
    pca_dim: int | None = None
    """Output width of ``target_norm=pca``."""
    grid: str = "student"
    """Where the loss compares tokens: "student" (the teacher's map resampled to the student's grid) or
    "native" (MILAN: the student's predictions pooled to the teacher's own grid)."""
    global_weight: float = 1.0
    """MILAN: weight of the global (CLS) token in the loss against each patch token (1 = as in MILAN)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the teacher's model factory (e.g. timm ``img_size``)."""


@dataclass
class TextConfig:
    """The text tower of language-aligned methods (clip, rils)."""

    name: str = "minilm"
    """Registered text encoder: minilm | hf | open_clip."""
    model: str | None = None
    pretrained: str | None = None
    path: str | None = None
    max_length: int = 64
    locked: bool = True
    """Freeze the text tower (LiT, Zhai et al. 2022): its embeddings are cached per caption."""


@dataclass
class DataConfig:
    name: str = "imagefolder"
    """Registered dataset: imagefolder | fashion_mnist | synthetic."""
    root: str | None = None
    split: str = "train"
    batch_size: int = 64
    """Per-device batch size."""
    num_workers: int = 8
    pin_memory: bool = True
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: bool = True
    rand_augment: str | None = None
    """timm RandAugment spec for supervised recipes, e.g. ``rand-m9-mstd0.5-inc1`` (None = off)."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    uint8: bool = False
    """Batches of uint8 images (4x less to collate and copy), turned into floats and normalised on the device."""
    max_bad_fraction: float = 0.01
    """Stop with an error once more than this fraction of images failed to decode."""
    max_image_pixels: int | None = 64_000_000
    """Image files whose header announces more pixels (width x height) are skipped as broken before any
    decoding (64 MP = 8000 x 8000, about 192 MB as RGB; ImageNet's largest have about 12 MP); null = only
    Pillow's own limit (89 MP)."""
    limit: int | None = None
    """Use only the first N samples (quick runs)."""
    download: bool = False
    captions: str | None = None
    """Give every image a caption: "templates" = class-name templates for a labelled dataset."""
    manifest_image_key: str = "image"
    manifest_caption_key: str = "caption"
    num_samples: int | None = None
    """Samples in a WebDataset stream (needed to size epochs); None = count the shards."""
    shuffle_buffer: int = 1000


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4
    """Learning rate for an effective batch of 256: lr = base_lr * effective_batch / 256."""
    lr: float | None = None
    """Absolute learning rate; overrides base_lr scaling when set."""
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None
    """Overrides warmup_epochs when set."""
    clip_grad: float | None = None
    effective_batch: int | None = None
    """Target global batch; gradient accumulation is derived from it when set."""
    accumulate: int = 1


@dataclass
class TrainerConfig:
    max_epochs: int = 400
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides max_epochs)."""
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"
    """auto = bf16-mixed on GPU, 32-true on CPU."""
    seed: int = 0
    log_every_n_steps: int = 10
    ckpt_every_n_steps: int = 1000
    compile: Any = "auto"
    """torch.compile the method: true | false | auto (on for CUDA, where graphs that fail to compile fall back
    to eager)."""
    progress_bar: bool = True
    knn_every_n_steps: int = 0
    """Online kNN monitor: every this many steps (0 = off) the weighted 20-NN top-1 of the current encoder
    on a fixed labelled subset is logged as ``knn_top1`` (needs a labelled dataset)."""
    knn_data: str | None = None
    """Dataset of the kNN monitor (None = ``data.name``); its ``train`` split is the memory bank and its
    ``test`` split (``val/`` for image folders) the queries."""
    knn_root: str | None = None
    """Root of the kNN monitor's dataset (None = ``data.root``; an image folder needs train/ and val/)."""
    knn_train_limit: int = 5000
    knn_test_limit: int = 1000
    max_nonfinite_steps: int = 3
    """A NaN/Inf loss skips its step (counted in metrics as skipped_nonfinite); the run stops with an error
    after more than this many in a row (0 = stop at the first)."""


@dataclass
class Config:
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def _suggest(key: str, node: Any) -> str:
    try:
        names = list(node.keys())
    except Exception:
        return ""
    close = difflib.get_close_matches(key.split(".")[-1], names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f" Allowed keys here: {', '.join(sorted(names))}.{hint}"


def _parent(schema: DictConfig, full_key: str) -> Any:
    node: Any = schema
    for part in full_key.split(".")[:-1]:
        try:
            node = node[part]
        except Exception:
            return schema
    return node


def _merge(schema: DictConfig, other: DictConfig | dict[str, Any], where: str) -> DictConfig:
    try:
        merged = OmegaConf.merge(schema, other)
        assert isinstance(merged, DictConfig)
        return merged
    except (ConfigKeyError, ConfigAttributeError) as e:
        key = str(getattr(e, "full_key", "") or getattr(e, "key", ""))
        raise ConfigError(f"{where}: unknown config key '{key}'.{_suggest(key, _parent(schema, key))}") from None
    except ValidationError as e:
        key = str(getattr(e, "full_key", ""))
        raise ConfigError(f"{where}: bad value for '{key}': {str(e.msg).splitlines()[0]}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=3"`` -> ``("a.b", 3)``; the value is parsed as YAML (``null``, lists, numbers)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. trainer.max_steps=3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = safe_load_yaml(raw, f"override '{key}'") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build a :class:`Config` from defaults, an optional YAML file and ``key=value`` overrides.

    Raises:
        ConfigError: unknown key, wrong type or impossible value (the message names the key); a YAML file
            over :data:`MAX_CONFIG_BYTES` or whose aliases expand beyond :data:`MAX_YAML_NODES` nodes.
        FileNotFoundError: the YAML file does not exist.
    """
    cfg = OmegaConf.structured(Config)
    if path is not None:
        p = Path(path)
        data = read_yaml_file(p) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
        data.pop("defaults", None)
        cfg = _merge(cfg, data, str(p))
    for text in overrides:
        key, value = parse_override(text)
        cfg = _merge(cfg, _nest(key, value), f"override '{text}'")
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    validate(obj)
    return obj


# Which parts each built-in method can compose: its encoder style fixes the decoders it can feed (a
# visible-only MAE-style encoder feeds the MAE / prompting decoders; a BEiT-style encoder with mask
# tokens returns every position, so only a per-token head fits), and maskers that vary the number of
# visible patches per image only work with mask tokens. Methods registered by users are not checked here.
METHOD_PARTS: dict[str, dict[str, tuple[str, ...]]] = {
    "mae": {"encoder": ("visible-only",), "decoder": ("mae", "prompting"), "masking": ("random",)},
    "milan": {"encoder": ("visible-only",), "decoder": ("prompting", "mae"), "masking": ("semantic", "random")},
    "maskdistill": {"encoder": ("mask-token (BEiT)",), "decoder": ("linear",), "masking": ("block", "random")},
    "supmim": {"encoder": ("visible-only",), "decoder": ("mae", "prompting"), "masking": ("random",)},
    "rils": {"encoder": ("visible-only",), "decoder": ("mae", "prompting"), "masking": ("random",)},
    "clip": {"encoder": ("full image",), "decoder": (), "masking": ()},
}


MULTI_MASK_METHODS = ("mae", "milan", "maskdistill")
"""Methods that accept method.num_masks > 1."""


def _check_parts(cfg: Config) -> None:
    parts = METHOD_PARTS.get(cfg.method.name)
    if parts is None:
        return
    style = parts["encoder"][0]
    for key, value in (("decoder.name", cfg.decoder.name), ("method.masking", cfg.method.masking)):
        allowed = parts[key.split(".")[0] if key.startswith("decoder") else "masking"]
        if value is None or value in allowed:
            continue
        if not allowed:
            raise ConfigError(f"{key}={value!r}: method '{cfg.method.name}' uses no {key.split('.')[-1]}; remove it")
        why = ""
        if key == "decoder.name" and value == "prompting":
            why = " (the prompting decoder needs a visible-only encoder; this method's encoder is " + style + ")"
        elif key == "method.masking" and value == "block":
            why = " (block masking varies the visible count per image, which a visible-only encoder cannot batch)"
        elif key == "method.masking" and value == "semantic":
            why = " (semantic-aware masking needs a teacher's attention)"
        raise ConfigError(
            f"{key}={value!r} cannot be combined with method.name={cfg.method.name!r}{why}; "
            f"allowed: {', '.join(allowed)}"
        )


_AT_LEAST: dict[str, int] = {
    "trainer.max_steps": 1,
    "trainer.max_epochs": 1,
    "trainer.log_every_n_steps": 1,
    "trainer.ckpt_every_n_steps": 1,
    "trainer.max_nonfinite_steps": 0,
    "trainer.num_nodes": 1,
    "data.num_workers": 0,
    "data.limit": 1,
    "data.num_samples": 1,
    "data.shuffle_buffer": 0,
    "optim.warmup_steps": 0,
    "optim.effective_batch": 1,
    "trainer.knn_every_n_steps": 0,
    "trainer.knn_train_limit": 1,
    "trainer.knn_test_limit": 1,
    "teacher.pca_dim": 1,
}
"""Lower bounds of counts and intervals: a zero step count or interval is an error before any work (a
``None`` value means "not set" and is not checked)."""


def _check_counts(cfg: Config) -> None:
    for key, low in _AT_LEAST.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None or value >= low:
            continue
        if key == "trainer.max_epochs" and cfg.trainer.max_steps is not None:
            continue  # max_steps decides the length of the run
        fix = " (set trainer.max_steps to train a given number of steps)" if key == "trainer.max_epochs" else ""
        raise ConfigError(f"{key} must be >= {low}, got {value}{fix}")
    if cfg.optim.warmup_epochs < 0:
        raise ConfigError(f"optim.warmup_epochs must be >= 0, got {cfg.optim.warmup_epochs}")
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_fraction must lie in [0, 1], got {cfg.data.max_bad_fraction}")
    if cfg.teacher.global_weight < 0:
        raise ConfigError(f"teacher.global_weight must be >= 0, got {cfg.teacher.global_weight}")
    if cfg.optim.clip_grad is not None and cfg.optim.clip_grad <= 0:
        raise ConfigError(f"optim.clip_grad must be > 0 (or null for no clipping), got {cfg.optim.clip_grad}")


TEACHER_TARGET_METHODS = ("milan", "maskdistill", "supmim")
"""Built-in methods whose targets are teacher features (supmim with method.target=teacher_features)."""


def _check_targets(cfg: Config) -> None:
    from semmim.targets.conditioning import TARGET_NORMS

    t, name = cfg.teacher, cfg.method.name
    uses_features = name in ("milan", "maskdistill") or (name == "supmim" and cfg.method.target == "teacher_features")
    set_keys = [
        k
        for k, v, default in (
            ("teacher.target_norm", t.target_norm, None),
            ("teacher.ln_target", t.ln_target, None),
            ("teacher.pca_dim", t.pca_dim, None),
            ("teacher.grid", t.grid, "student"),
            ("teacher.global_weight", t.global_weight, 1.0),
        )
        if v != default
    ]
    if set_keys and name in METHOD_PARTS and not uses_features:
        raise ConfigError(
            f"{set_keys[0]} conditions teacher-feature targets, which method '{name}' does not use; remove it "
            f"(teacher-feature methods: milan, maskdistill, supmim with method.target=teacher_features)"
        )
    if t.target_norm is not None and t.target_norm not in TARGET_NORMS:
        raise ConfigError(f"teacher.target_norm={t.target_norm!r} is not one of {', '.join(TARGET_NORMS)}")
    if t.ln_target is not None and t.target_norm is not None and t.target_norm != ("ln" if t.ln_target else "none"):
        raise ConfigError(
            f"teacher.ln_target={t.ln_target} contradicts teacher.target_norm={t.target_norm}: set only target_norm"
        )
    if t.target_norm == "pca" and t.pca_dim is None:
        raise ConfigError("teacher.target_norm=pca needs teacher.pca_dim (the number of principal directions kept)")
    if t.pca_dim is not None and t.target_norm != "pca":
        raise ConfigError(f"teacher.pca_dim={t.pca_dim} is used only by teacher.target_norm=pca; remove it or set that")
    if t.grid not in ("student", "native"):
        raise ConfigError(f"teacher.grid must be student or native, got {t.grid!r}")
    if name in METHOD_PARTS and name != "milan":
        for key, value, default in (
            ("teacher.grid", t.grid, "student"),
            ("teacher.global_weight", t.global_weight, 1.0),
        ):
            if value != default:
                raise ConfigError(
                    f"{key}={value!r} applies to MILAN's loss over all tokens; method '{name}' compares masked "
                    "patches on the student's grid: remove it"
                )


def validate(cfg: Config) -> None:
    """Reject impossible combinations before any work starts."""
    m = cfg.model
    if cfg.method.mask_ratio is not None and not 0.0 < cfg.method.mask_ratio < 1.0:
        raise ConfigError(f"method.mask_ratio must lie in (0, 1), got {cfg.method.mask_ratio}")
    if m.img_size % m.patch_size != 0:
        raise ConfigError(
            f"model.patch_size={m.patch_size} does not divide model.img_size={m.img_size}; "
            f"choose a patch size among {[p for p in range(1, m.img_size + 1) if m.img_size % p == 0]}"
        )
    if m.embed_dim % m.num_heads != 0:
        raise ConfigError(f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}")
    d = cfg.decoder
    if d.embed_dim % d.num_heads != 0:
        raise ConfigError(f"decoder.embed_dim={d.embed_dim} is not divisible by decoder.num_heads={d.num_heads}")
    if cfg.data.max_image_pixels is not None and cfg.data.max_image_pixels < 1:
        raise ConfigError(f"data.max_image_pixels must be >= 1 or null, got {cfg.data.max_image_pixels}")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    if len(cfg.data.mean) != m.in_chans or len(cfg.data.std) != m.in_chans:
        raise ConfigError(
            f"data.mean/data.std need model.in_chans={m.in_chans} values, got {len(cfg.data.mean)}/{len(cfg.data.std)}"
        )
    if len(cfg.data.crop_scale) != 2 or not 0 < cfg.data.crop_scale[0] <= cfg.data.crop_scale[1] <= 1:
        raise ConfigError(f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {cfg.data.crop_scale}")
    _check_counts(cfg)
    if cfg.optim.accumulate < 1:
        raise ConfigError(f"optim.accumulate must be >= 1, got {cfg.optim.accumulate}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas must have two values, got {cfg.optim.betas}")
    _check_parts(cfg)
    _check_targets(cfg)
    if cfg.trainer.compile not in (True, False, "auto"):
        raise ConfigError(f"trainer.compile must be true, false or auto, got {cfg.trainer.compile!r}")
    if cfg.method.num_masks < 1:
        raise ConfigError(f"method.num_masks must be >= 1, got {cfg.method.num_masks}")
    if cfg.method.num_masks > 1 and cfg.method.name not in MULTI_MASK_METHODS:
        raise ConfigError(
            f"method.num_masks={cfg.method.num_masks} is supported by {', '.join(MULTI_MASK_METHODS)}, "
            f"not by '{cfg.method.name}'"
        )
    check_loader_kwargs(cfg.teacher.kwargs, "teacher.kwargs")
    if cfg.trainer.precision not in ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"):
        raise ConfigError(
            f"trainer.precision='{cfg.trainer.precision}' is not one of auto, 32-true, bf16-mixed, 16-mixed, bf16-true"
        )
    from semmim.teachers.base import check_teacher_config  # teacher keys that name two teachers / weights

    check_teacher_config(cfg.teacher)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]
