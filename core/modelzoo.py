"""Named model configs shipped with vidkd, registered with open_clip's factory.

open_clip creates every model from a named JSON config; vidkd adds its own small ones
(`vidkd-vit-micro` for tests; `vidkd-vit-mini-32px` and `vidkd-vit-base-32px`, the student and
teacher of the demo and of bench/quality.py; `vidkd-vit-tiny`, `vidkd-vit-base` and
`vidkd-vit-small` at 64 px for the other benchmarks) beside open_clip's (ViT-B-32,
convnext_base, ...), so one factory serves both.
"""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip

# open_clip logs every step of a model creation at INFO, on the root logger: the Ray workers run
# at WARNING (jobs.runtime.init_ray), so only its warnings come through there.

MODEL_CONFIG_DIR = Path(__file__).parent / "models"
_registered = False


def register_model_configs() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def create_clip(name: str, pretrained: str | None = None, device: str = "cpu"):
    """An open_clip model and its tokenizer, by name; `pretrained` is a tag or a local file."""
    register_model_configs()
    if name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {name!r}")
    if pretrained and not Path(pretrained).exists() and pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise ValueError(f"{name!r} has no pretrained tag or local file {pretrained!r}")
    if pretrained:
        model = open_clip.create_model(name, pretrained=pretrained, device=device)
    else:  # random init is what was asked for (weights come from our checkpoint, or none): no warning
        root = logging.getLogger()
        root.addFilter(_no_random_init_warning)
        try:
            model = open_clip.create_model(name, device=device)
        finally:
            root.removeFilter(_no_random_init_warning)
    return model, open_clip.get_tokenizer(name)


def _no_random_init_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No pretrained weights loaded")
