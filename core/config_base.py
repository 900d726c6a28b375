"""What every settings model shares: strict pydantic models, the config error, content digests."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict


def digest(parts: Any, length: int = 16) -> str:
    """A short content hash of JSON-able `parts` (configs, keys): the same parts, the same name."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:length]


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the field."""


class Strict(BaseModel):
    """A settings model that refuses unknown keys: a typo is an error before anything starts."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
