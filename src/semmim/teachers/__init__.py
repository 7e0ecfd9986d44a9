"""Frozen teachers that provide per-token feature targets and the CLS attention map.

Importing this package registers the teachers in :data:`semmim.registry.TEACHERS`:

* ``open_clip`` — OpenCLIP ViT image towers (MILAN, Hou et al. 2022, arXiv:2208.06049),
* ``hf_clip`` — Hugging Face ``transformers`` CLIP image encoders,
* ``timm`` — timm ViTs/CNNs, local weights files and semmim exports,
* ``module`` — any ``nn.Module`` passed from Python.

Build one with
``TEACHERS.build(name, model=..., pretrained=..., path=..., image_size=..., mean=..., std=...)``
and call it as ``teacher(images, grid, need_attn=True)`` -> :class:`TeacherOutput`.
"""

from semmim.teachers.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    Teacher,
    TeacherOutput,
    check_teacher_config,
    cls_attention_row,
    resample_attention,
    resample_tokens,
)
from semmim.teachers.hf_clip import HFCLIPTeacher, build_hf_clip_teacher, load_hf_clip
from semmim.teachers.module import ModuleTeacher
from semmim.teachers.openclip import OpenCLIPTeacher, build_open_clip_teacher, load_open_clip_weights
from semmim.teachers.timm_teacher import TimmTeacher, build_timm_teacher, load_timm_weights

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "HFCLIPTeacher",
    "ModuleTeacher",
    "OpenCLIPTeacher",
    "Teacher",
    "TeacherOutput",
    "TimmTeacher",
    "build_hf_clip_teacher",
    "build_open_clip_teacher",
    "build_timm_teacher",
    "check_teacher_config",
    "cls_attention_row",
    "load_hf_clip",
    "load_open_clip_weights",
    "load_timm_weights",
    "resample_attention",
    "resample_tokens",
]
