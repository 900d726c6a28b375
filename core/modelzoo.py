"""Named model configs shipped with vidkd, registered with open_clip's factory.

open_clip creates every model from a named JSON config; vidkd adds its own small ones
(`vidkd-vit-micro` for tests, `vidkd-vit-tiny` for the demo student, `vidkd-vit-base` for the
demo teacher, `vidkd-vit-small` for the heavier teacher of bench/train_step.py) beside open_clip's (ViT-B-32, convnext_base, ...), so one factory serves both.
"""

from __future__ import annotations

import logging
from pathlib import Path

import open_clip

# open_clip logs every step of every model creation at INFO; in a Ray job that is one block of
# lines per worker per restart. Warnings still come through.
logging.getLogger("open_clip").setLevel(logging.WARNING)

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
    model = open_clip.create_model(name, pretrained=pretrained, device=device)
    return model, open_clip.get_tokenizer(name)
