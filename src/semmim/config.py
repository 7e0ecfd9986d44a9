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

import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from semmim.errors import ConfigError
from semmim.parts import SLOT_KEY, merge_checked, merge_node, suggest

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
    """What every method takes; a method adds its own keys in a subclass (its ``Options``).

    The part nodes ``masker``, ``target`` and ``loss`` are ``{name: <registered part>, <its keys>}``
    (a bare name is shorthand for ``{name: ...}``); a node left out is the method's default part.
    """

    name: str = "mae"
    """Registered method: ``semmim list`` shows them."""
    num_masks: int = 1
    """Draw M masks per image and reuse one data load and one teacher pass for all of them (data2vec 2.0,
    Baevski et al. 2022, arXiv:2212.07525): the student sees batch_size x M masked views (methods that
    declare multi-mask support: mae, milan, maskdistill)."""
    masker: Any = None
    """Which patches are hidden: ``{name: random|block|semantic|<yours>, mask_ratio: ..., ...}``."""
    target: Any = None
    """What is reconstructed: ``{name: pixels, norm_pix: true}``, ``{name: teacher_features, norm: ...}``, or token ids:
    ``{name: codebook, path: ...}`` (k-means codes of a teacher's features), ``{name: vq, tokenizer|path: ...}``."""
    loss: Any = None
    """How predictions are compared with targets: ``{name: mse|cosine|smooth_l1|<yours>, ...}``; ``{name: ce,
    label_smoothing: ...}`` for token ids."""


@dataclass
class ModelConfig:
    """The student ViT encoder (timm-compatible)."""

    name: str = "vit"
    """Registered encoder (``semmim list``); it is built with the keys below."""
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
    """timm architecture the exported state dict loads into (with the size kwargs above); a ``beit*`` name
    (e.g. ``beit_base_patch16_224``) when ``rel_pos_bias`` is set."""
    rel_pos_bias: str = "none"
    """BEiT's learnable relative position bias in attention: none | shared (one table for all blocks, BEiT
    pretraining) | per_block. Exported as timm's ``Beit`` with a table per block (a shared one copied)."""
    abs_pos: str = "sincos"
    """Absolute positions added to the tokens: sincos (fixed 2D sin-cos, MAE) | none (BEiT pretraining, which
    relies on the relative position bias alone)."""


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
    """The teacher's own per-channel input mean; ``None`` = what its model records (e.g. CLIP's)."""
    std: list[float] | None = None
    """The teacher's own per-channel input std; ``None`` = what its model records."""
    input_norm: str = "own"
    """How the teacher's input is normalised: ``own`` = with the teacher's own statistics (``teacher.mean/std``
    or what its model records); ``data`` = with ``data.mean/std``, the very input the student gets (the
    official MILAN code feeds CLIP the ImageNet-normalised batch)."""
    tokens: str | None = None
    """Which tokens a CLIP teacher (open_clip, hf_clip) gives: proj (its embedding space: every token after the
    final LayerNorm and the projection, 512-d for ViT-B/16; MILAN) | last_block (the raw output of the last
    transformer block, 768-d for ViT-B/16; public MaskDistill reproductions). None = the teacher's default
    (proj); other teachers take no choice."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the teacher's model factory (e.g. timm ``img_size``)."""
    cache: str | None = None
    """A directory written by ``semmim teacher cache``: the targets are cut from the teacher's stored token maps of
    the full images (RoIAlign to each view's crop box, then its flip) and no teacher runs during training (methods
    milan and maskdistill with method.target=teacher_features)."""
    cache_crops: str = "nearest"
    """With teacher.cache: nearest = every view is a fresh random resized crop, its target cut from the stored view
    nearest it (approximate); stored = every view is one of the random crops stored with the cache (``semmim teacher
    cache --random-crops K``) with its flip, drawn at random each time, so its target is that view's own teacher
    output (exact up to the storage precision; each image then has only K views over the whole run)."""


@dataclass
class TextConfig:
    """The text tower of language-aligned methods (clip, rils)."""

    name: str = "minilm"
    """Registered text encoder: minilm | hf | open_clip."""
    model: str | None = None
    """open_clip architecture (ViT-B-16-quickgelu, local-dir:DIR) or Hugging Face model (hub name or directory)."""
    pretrained: str | None = None
    """open_clip pretrained tag or checkpoint file (null = random initialisation, to train with locked=false);
    minilm/hf: false = random weights."""
    path: str | None = None
    """Local weights file (open_clip) or model directory (hf) to load."""
    max_length: int | None = None
    """Most tokens per caption; null = the tower's own (open_clip: its context length, 77 for CLIP; minilm: 256;
    hf: the model's limit). A randomly initialised open_clip tower is built with this context length; one with
    weights takes only its own."""
    locked: bool = True
    """Freeze the text tower (LiT, Zhai et al. 2022): its embeddings are cached per caption."""
    cache_size: int = 100_000
    """Captions whose locked-tower embeddings are kept in memory, least recently used dropped first (about 1.5 KB
    each at width 384; 0 = encode every caption every step). A dropped caption is encoded again to the same
    numbers, so the bound never changes results. Only read with text.locked=true."""


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
    decode: str = "pil"
    """How image files are decoded and augmented: ``pil`` (PIL images, torchvision transforms) or ``torchvision``
    (``torchvision.io.decode_jpeg`` into uint8 tensors, crop / resize / flip on tensors; about 2x the images per
    CPU core of ``pil`` with ``uint8``, see benchmarks/input_pipeline.py). ``torchvision`` is for the datasets that read
    image files (imagefolder, manifest, webdataset) and does not combine with ``rand_augment``."""
    max_bad_fraction: float = 0.01
    """Stop with an error once more than this fraction of an epoch's images (at least 1 file) failed to decode."""
    max_image_pixels: int | None = 64_000_000
    """Image files whose header announces more pixels (width x height) are skipped as broken before any
    decoding (64 MP = 8000 x 8000, about 192 MB as RGB; ImageNet's largest have about 12 MP); null = only
    Pillow's own limit. Pillow refuses more than 179 MP (twice its ``Image.MAX_IMAGE_PIXELS``) whatever this is."""
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
    decoder: Any = None
    """The decoder node ``{name: mae|prompting|linear|<yours>, embed_dim: ..., depth: ...}`` (None = the
    method's default)."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "teacher": TeacherConfig,
    "text": TextConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
}
"""Sections with a fixed schema; ``method`` and ``decoder`` are typed by the chosen method and parts."""

PART_SLOTS = ("masker", "target", "loss")
"""Part nodes inside the ``method`` section (the decoder node is the top-level ``decoder``)."""

MOVED_KEYS: dict[str, str] = {
    "method.mask_ratio": "method.masker.mask_ratio",
    "method.masking": "method.masker (e.g. method.masker=block, or method.masker.name=block)",
    "method.block_min_patches": "method.masker.min_patches",
    "method.block_min_aspect": "method.masker.min_aspect",
    "method.smooth_l1_beta": "method.loss.beta",
    "method.norm_pix_loss": "method.target.norm_pix",
    "teacher.target_norm": "method.target.norm",
    "teacher.ln_target": "method.target.norm (ln or none)",
    "teacher.pca_dim": "method.target.pca_dim",
    "teacher.grid": "method.target.grid",
    "teacher.global_weight": "method.global_weight (milan)",
}
"""Keys of semmim 0.1 that now live elsewhere: naming one is an error that gives the new key."""

BASE_KEY = "base"
"""Top-level key of a config file naming the file(s) it extends: ``base: demo/mae`` or a list."""


# ------------------------------------------------------------------ finding and composing files
def configs_dir() -> Path:
    """The configs shipped inside the package (``semmim/configs``; ``configs/`` in a checkout links there)."""
    return Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    """Names of the shipped pretraining configs (``demo/mae.yaml``, ...); the evaluation recipes in
    ``eval/`` are not among them (:func:`semmim.eval.recipes.recipe_names`)."""
    root = configs_dir()
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml") if p.relative_to(root).parts[0] != "eval")


def find_config(name: str | Path, relative_to: Path | None = None) -> Path:
    """A config file: a path (relative to ``relative_to`` first, for ``base:``), or a shipped name (``demo/mae``).

    Raises:
        FileNotFoundError: neither exists (the message lists where it looked).
    """
    p = Path(name)
    candidates = [relative_to / p, relative_to / f"{p}.yaml"] if relative_to is not None and not p.is_absolute() else []
    candidates += [p, configs_dir() / p, configs_dir() / f"{p}.yaml"]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise FileNotFoundError(
        f"config file not found: {name} (looked in {relative_to or Path.cwd()} and among the shipped configs "
        f"in {configs_dir()}; `semmim list` shows them)"
    )


def _is_node_path(path: tuple[str, ...]) -> bool:
    return ".".join(path) in SLOT_KEY.values()


def deep_merge(base: dict[str, Any], other: Mapping[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """``other`` merged onto ``base`` (a new dict). Mappings merge key by key; anything else replaces.

    Part nodes (``method.masker``, ``method.target``, ``method.loss``, ``decoder``) follow
    :func:`semmim.parts.merge_node`: a bare string is ``{name: ...}``, and a node naming another part
    replaces the node whole, so switching ``block`` to ``random`` drops ``min_patches``.
    """
    out = dict(base)
    for key, value in other.items():
        here = (*path, str(key))
        old = out.get(key)
        if _is_node_path(here):
            new = {"name": value} if isinstance(value, str) else value
            if isinstance(new, Mapping) and isinstance(old, Mapping):
                out[key] = merge_node(old, new)
            else:
                out[key] = dict(new) if isinstance(new, Mapping) else new
        elif isinstance(value, Mapping) and isinstance(old, Mapping):
            out[key] = deep_merge(dict(old), value, here)
        else:
            out[key] = dict(value) if isinstance(value, Mapping) else value
    return out


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file with its ``base:`` files merged underneath (bases first, in the order listed).

    Raises:
        ConfigError: the file is not a mapping, ``base`` is not a name or list of names, the bases form a
            cycle, or the file uses ``defaults:`` (write ``base:``).
        FileNotFoundError: the file or one of its bases does not exist.
    """
    p = Path(path).resolve()
    if p in _chain:
        chain = " -> ".join(str(c) for c in (*_chain, p))
        raise ConfigError(f"config files extend each other in a cycle: {chain}")
    data = read_yaml_file(p) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(data).__name__}")
    if "defaults" in data:
        raise ConfigError(f"{p}: 'defaults:' is not read by semmim; name the files this one extends with 'base:'")
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{p}: '{BASE_KEY}' must be a config name or a list of them, got {bases!r}")
    merged: dict[str, Any] = {}
    for b in bases:
        merged = deep_merge(merged, read_config_file(find_config(b, relative_to=p.parent), (*_chain, p)))
    return deep_merge(merged, data)


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


def compose(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The raw (unchecked) config: a file with its bases, then ``key=value`` overrides in order."""
    raw: dict[str, Any] = {} if path is None else read_config_file(find_config(path))
    for text in overrides:
        key, value = parse_override(text)
        _check_moved(key, f"override '{text}'")
        raw = deep_merge(raw, _nest(key, value))
    return raw


def _check_moved(key: str, where: str) -> None:
    for old, new in MOVED_KEYS.items():
        if key == old or key.startswith(old + "."):
            raise ConfigError(f"{where}: '{old}' has moved to {new}")


def _flat_keys(d: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, Mapping) and not _is_node_path(tuple(key.split("."))):
            out += _flat_keys(v, key + ".")
    return out


# ------------------------------------------------------------------ typing the raw config
def _typed_section(schema_cls: type, raw: Any, section: str, where: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: '{section}' must be a mapping of keys, got {raw!r}")
    merged = merge_checked(OmegaConf.structured(schema_cls), raw, where, prefix=f"{section}.")
    return OmegaConf.to_object(merged)


def resolve(raw: Mapping[str, Any], where: str = "config") -> Config:
    """Type and check a raw config (from :func:`compose`): every key, every part node, every combination.

    Raises:
        ConfigError: one line naming the first wrong key and its fix.
    """
    from semmim.parts import SLOT_CONTEXT, SLOT_REGISTRY, build_part, check_part, resolve_part
    from semmim.registry import METHODS, RegistryError

    for key in _flat_keys(raw):
        _check_moved(key, where)
    unknown = [k for k in raw if k not in (*SECTIONS, "method", "decoder")]
    if unknown:
        raise ConfigError(
            f"{where}: unknown config section '{unknown[0]}'.{suggest(unknown[0], [*SECTIONS, 'method', 'decoder'])}"
        )
    sections = {name: _typed_section(cls, raw.get(name), name, where) for name, cls in SECTIONS.items()}
    method_raw = dict(raw.get("method") or {})
    name = method_raw.get("name", MethodConfig.name)
    try:
        method_cls = METHODS.get(str(name))
    except RegistryError as e:
        raise ConfigError(f"{where}: method.name: {e}") from None
    options_cls = getattr(method_cls, "Options", MethodConfig)
    user_nodes = {slot: method_raw.pop(slot, None) for slot in PART_SLOTS}
    user_nodes["decoder"] = raw.get("decoder")
    method = _typed_section(options_cls, method_raw, "method", where)
    model: ModelConfig = sections["model"]
    slots = tuple(getattr(method_cls, "slots", ()))
    defaults = method_cls.default_parts(model, user_nodes) if hasattr(method_cls, "default_parts") else {}
    resolved: dict[str, Any] = {}
    for slot, key in SLOT_KEY.items():
        if slot not in slots:
            if user_nodes[slot] is not None:
                raise ConfigError(f"{key}: method '{name}' uses no {slot}; remove it")
            resolved[slot] = None
            continue
        node = merge_node(defaults.get(slot), user_nodes[slot])
        if node is None:
            raise ConfigError(f"{key} is not set and method '{name}' has no default {slot}: set {key}.name")
        resolved[slot] = resolve_part(SLOT_REGISTRY[slot], node, key, SLOT_CONTEXT[slot])
    for slot in PART_SLOTS:
        setattr(method, slot, resolved[slot])
    cfg = Config(method=method, decoder=resolved["decoder"], **sections)
    validate(cfg)
    for slot, where in SLOT_KEY.items():  # each part's own checks of its keys, before any work
        if resolved[slot] is not None:
            check_part(SLOT_REGISTRY[slot], resolved[slot], where)
            if slot in ("masker", "loss"):  # cheap to build: their constructors' checks run now
                build_part(SLOT_REGISTRY[slot], resolved[slot], where)
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build a :class:`Config` from defaults, an optional YAML file (with its bases) and ``key=value`` overrides.

    ``path`` is a file or a shipped config name (``demo/mae``).

    Raises:
        ConfigError: unknown key, wrong type or impossible value (the message names the key); a YAML file
            over :data:`MAX_CONFIG_BYTES` or whose aliases expand beyond :data:`MAX_YAML_NODES` nodes.
        FileNotFoundError: the YAML file does not exist.
    """
    where = str(path) if path is not None else "config"
    return resolve(compose(path, overrides), where)


#: Defaults that changed since runs were first saved: ``(node path, part name or None, key, value the
#: older runs were trained with, version that changed it)``. A saved run config lacks the key (it
#: predates it), and reading it with today's default would silently rebuild a different model.
CHANGED_DEFAULTS: tuple[tuple[str, str | None, str, Any, str], ...] = (
    ("decoder", "prompting", "prompt_norm", True, "0.2"),
    ("method", "rils", "kl_projection", "separate", "0.2"),
)


def upgrade_saved(raw: dict[str, Any], where: str) -> list[str]:
    """Fill, in place, the keys a saved run config predates with the values that run was trained with.

    Returns:
        One note per filled key (``"decoder.prompt_norm=True (...)"``), empty for a current config.
    """
    notes = []
    for path, part, key, old, since in CHANGED_DEFAULTS:
        node: Any = raw
        for name in path.split("."):
            node = node.get(name) if isinstance(node, dict) else None
        if not isinstance(node, dict) or key in node or (part is not None and node.get("name") != part):
            continue
        node[key] = old
        notes.append(f"{where}: {path}.{key}={old} (the run predates semmim {since}, where the default changed)")
    return notes


def load_saved_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """:func:`load_config` for a run directory's ``config.yaml``: keys it predates are set as it trained.

    Each filled key is printed as a note on stderr (see :data:`CHANGED_DEFAULTS`); ``overrides`` apply after.
    """
    raw = compose(path)
    for note in upgrade_saved(raw, str(path)):
        print(f"note: {note}", file=sys.stderr)
    for text in overrides:
        key, value = parse_override(text)
        _check_moved(key, f"override '{text}'")
        raw = deep_merge(raw, _nest(key, value))
    return resolve(raw, str(path))


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
    "method.num_masks": 1,
    "text.max_length": 1,
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
    if cfg.optim.clip_grad is not None and cfg.optim.clip_grad <= 0:
        raise ConfigError(f"optim.clip_grad must be > 0 (or null for no clipping), got {cfg.optim.clip_grad}")


def _unused_sections(cfg: Config) -> None:
    """A section the method does not read (a teacher for pixel targets, a text tower for MAE) must stay unset."""
    from semmim.registry import METHODS

    method_cls = METHODS.get(cfg.method.name)
    for section, used in (("teacher", method_cls.uses_teacher(cfg)), ("text", method_cls.uses_text(cfg))):
        if used:
            continue
        default = SECTIONS[section]()
        for f in fields(default):
            value = getattr(getattr(cfg, section), f.name)
            if value != getattr(default, f.name):
                why = "its parts take no teacher" if section == "teacher" else "it has no text tower"
                raise ConfigError(
                    f"{section}.{f.name}={value!r} is not used: method '{cfg.method.name}' reads no {section} section "
                    f"({why}); remove it"
                )


def _check_data(cfg: Config) -> None:
    """``data.root`` is refused by a dataset that reads no files (it would be silently ignored)."""
    from semmim.registry import DATASETS, RegistryError

    try:
        dataset = DATASETS.get(cfg.data.name)
    except RegistryError as e:
        raise ConfigError(f"data.name: {e}") from None
    if cfg.data.root is not None and not getattr(dataset, "reads_files", True):
        raise ConfigError(f"data.root={cfg.data.root!r}: dataset '{cfg.data.name}' reads no files; remove data.root")
    defaults = DataConfig()
    only = {  # keys one dataset reads, silently ignored by the others
        "num_samples": "webdataset",
        "shuffle_buffer": "webdataset",
        "manifest_image_key": "manifest",
        "manifest_caption_key": "manifest",
    }
    for key, owner in only.items():
        value = getattr(cfg.data, key)
        if cfg.data.name != owner and value != getattr(defaults, key):
            raise ConfigError(
                f"data.{key}={value!r} is only read by data.name={owner}; dataset '{cfg.data.name}' ignores it: "
                f"remove data.{key}"
            )
    if cfg.data.name == "webdataset" and cfg.data.limit is not None:
        raise ConfigError(
            f"data.limit={cfg.data.limit} is not read by data.name=webdataset (a stream has no first N samples to "
            "keep): remove data.limit and use fewer shards, or set data.num_samples to size the epoch"
        )
    from semmim.data.tensor_decode import decode_conflict

    conflict = decode_conflict(cfg.data.decode, cfg.data.name, dataset, cfg.data.rand_augment)
    if conflict is not None:
        raise ConfigError(conflict)


def _check_positions(m: ModelConfig) -> None:
    """``model.rel_pos_bias`` / ``model.abs_pos`` values, and a ``model.timm_name`` of the family they export to."""
    from timm.models import is_model, model_entrypoint

    from semmim.models.vit import ABS_POS, REL_POS_BIAS

    if m.rel_pos_bias not in REL_POS_BIAS:
        raise ConfigError(f"model.rel_pos_bias={m.rel_pos_bias!r} is not one of {', '.join(REL_POS_BIAS)}")
    if m.abs_pos not in ABS_POS:
        raise ConfigError(f"model.abs_pos={m.abs_pos!r} is not one of {', '.join(ABS_POS)}")
    if m.rel_pos_bias == "none" and m.abs_pos == "none":
        raise ConfigError(
            "model.abs_pos=none with model.rel_pos_bias=none leaves the encoder without any position information: "
            "set model.abs_pos=sincos or model.rel_pos_bias=shared"
        )
    if not is_model(m.timm_name):
        raise ConfigError(f"model.timm_name={m.timm_name!r} is not a timm architecture (`timm.list_models()`)")
    beit = model_entrypoint(m.timm_name).__module__.endswith(".beit")
    if m.rel_pos_bias != "none" and not beit:
        raise ConfigError(
            f"model.rel_pos_bias={m.rel_pos_bias} exports to timm's BEiT, but model.timm_name={m.timm_name} is not a "
            "BEiT architecture: set model.timm_name=beit_base_patch16_224 (the model keys set its size)"
        )
    if m.rel_pos_bias == "none" and beit:
        raise ConfigError(
            f"model.timm_name={m.timm_name} is a BEiT architecture, which semmim exports only with a relative position "
            "bias: set model.rel_pos_bias=shared, or a ViT name such as model.timm_name=vit_base_patch16_224"
        )


def validate(cfg: Config) -> None:
    """Reject impossible combinations before any work starts."""
    from semmim.registry import ENCODERS, METHODS, RegistryError

    m = cfg.model
    try:
        ENCODERS.get(m.name)
    except RegistryError as e:
        raise ConfigError(f"model.name: {e}") from None
    if m.img_size % m.patch_size != 0:
        raise ConfigError(
            f"model.patch_size={m.patch_size} does not divide model.img_size={m.img_size}; "
            f"choose a patch size among {[p for p in range(1, m.img_size + 1) if m.img_size % p == 0]}"
        )
    if m.embed_dim % m.num_heads != 0:
        raise ConfigError(f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}")
    _check_positions(m)
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
    if cfg.trainer.compile not in (True, False, "auto"):
        raise ConfigError(f"trainer.compile must be true, false or auto, got {cfg.trainer.compile!r}")
    method_cls = METHODS.get(cfg.method.name)
    if cfg.method.num_masks > 1 and not getattr(method_cls, "multi_mask", False):
        multi = [n for n in METHODS.names() if getattr(METHODS.get(n), "multi_mask", False)]
        raise ConfigError(
            f"method.num_masks={cfg.method.num_masks} is supported by {', '.join(multi)}, not by '{cfg.method.name}'"
        )
    check_loader_kwargs(cfg.teacher.kwargs, "teacher.kwargs")  # unsafe loader options first, whatever else is wrong
    if cfg.teacher.cache_crops not in ("nearest", "stored"):
        raise ConfigError(f"teacher.cache_crops must be nearest or stored, got {cfg.teacher.cache_crops!r}")
    if cfg.teacher.cache_crops != "nearest" and cfg.teacher.cache is None:
        raise ConfigError(
            f"teacher.cache_crops={cfg.teacher.cache_crops} is read only with teacher.cache=DIR (a cache written with "
            "--random-crops K): set teacher.cache or remove teacher.cache_crops"
        )
    method_cls.check_config(cfg)
    _unused_sections(cfg)
    _check_data(cfg)
    if cfg.trainer.precision not in ("auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true"):
        raise ConfigError(
            f"trainer.precision='{cfg.trainer.precision}' is not one of auto, 32-true, bf16-mixed, 16-mixed, bf16-true"
        )
    from semmim.teachers.base import check_teacher_config  # teacher keys that name two teachers / weights

    check_teacher_config(cfg.teacher)
    if method_cls.uses_text(cfg):
        _check_text(cfg.text)


def _check_text(t: TextConfig) -> None:
    """A text tower that cannot be what the ``text`` section asks: checked from the keys alone (no model built)."""
    if t.cache_size < 0:
        raise ConfigError(f"text.cache_size must be >= 0 (0 = no cache), got {t.cache_size}")
    if not t.locked and t.cache_size != TextConfig.cache_size:
        raise ConfigError(
            f"text.cache_size={t.cache_size} is not read with text.locked=false (a trained tower's embeddings change "
            "every step and are never cached); remove text.cache_size"
        )
    if t.name != "open_clip":
        return
    from semmim.text.base import open_clip_context_length

    pretrained = t.pretrained is not None and t.pretrained.strip().lower() not in ("", "false", "none", "no", "0")
    own = str(t.model or "").startswith(("hf-hub:", "local-dir:"))  # such a model may bring its weights
    if t.locked and not (pretrained or t.path is not None or own):
        raise ConfigError(
            f"text.locked=true with text.pretrained and text.path unset: the open_clip tower '{t.model}' would stay at "
            "its random initialisation; set text.pretrained (e.g. openai) or text.locked=false to train it"
        )
    if t.max_length is not None and (pretrained or t.path is not None):
        context = open_clip_context_length(t.model)
        if context is not None and context != t.max_length:
            raise ConfigError(
                f"text.max_length={t.max_length}: the pretrained open_clip tower '{t.model}' takes a context of "
                f"exactly {context} tokens; remove text.max_length (null = the tower's own)"
            )


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain Python data (what ``config.yaml`` holds)."""
    return asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=1000)


# ------------------------------------------------------------------ explaining a config
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (and its bases): ``{"batch_size": "Per-device batch size."}``."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not is_dataclass(klass):
            continue
        try:
            tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, [*body[1:], None], strict=True):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def explain(cfg: Config) -> str:
    """The resolved config as YAML, each key followed by its help (``semmim config show``)."""
    from semmim.parts import SLOT_CONTEXT, SLOT_REGISTRY, part_keys

    def fmt(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()

    def line(indent: int, key: str, value: Any, doc: str) -> str:
        text = f"{'  ' * indent}{key}: {fmt(value)}"
        return f"{text:<48} # {doc}" if doc else text

    def node_lines(slot: str, node: dict[str, Any] | None, indent: int) -> list[str]:
        if node is None:
            return []
        registry = SLOT_REGISTRY[slot]
        helps = {k.name: k.help for k in part_keys(registry, node["name"], SLOT_CONTEXT[slot])}
        out = [line(indent + 1, "name", node["name"], f"registered {registry.kind}: {', '.join(registry.names())}")]
        out += [line(indent + 1, k, v, helps.get(k, "")) for k, v in node.items() if k != "name"]
        return out

    lines: list[str] = []
    method_docs = field_docs(type(cfg.method))
    lines.append("method:")
    for f in fields(cfg.method):
        value = getattr(cfg.method, f.name)
        if f.name in PART_SLOTS:
            if value is not None:
                lines.append(f"{'  ' + f.name + ':':<48} # {method_docs.get(f.name, '')}")
                lines += node_lines(f.name, value, 1)
            continue
        lines.append(line(1, f.name, value, method_docs.get(f.name, "")))
    for section in ("model", "decoder", "teacher", "text", "data", "optim", "trainer"):
        obj = getattr(cfg, section)
        if section == "decoder":
            if obj is not None:
                lines.append("decoder:")
                lines += node_lines("decoder", obj, 0)
            continue
        docs = field_docs(type(obj))
        lines.append(f"{section}:")
        lines += [line(1, f.name, getattr(obj, f.name), docs.get(f.name, "")) for f in fields(obj)]
    return "\n".join(lines) + "\n"
