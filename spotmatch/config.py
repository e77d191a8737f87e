"""Config helpers shared by every stage: a stable short hash of a dataclass config names its cache."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, TypeVar

T = TypeVar("T")

# Where every command caches embeddings, masks, keypoints and pair evidence unless told otherwise (working folder).
DEFAULT_CACHE = ".cache/spotmatch"


def config_to_dict(conf: Any) -> dict:
    return dataclasses.asdict(conf) if dataclasses.is_dataclass(conf) else dict(conf)


def config_hash(conf: Any, length: int = 10) -> str:
    """Hash of a config's values: a changed setting never reads a stale cache entry."""
    payload = json.dumps(config_to_dict(conf), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def config_from_dict(cls: type[T], values: dict) -> T:
    """Build a dataclass config, ignoring keys it does not know (configs saved by newer versions)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def merge_config(conf: T, **overrides: Any) -> T:
    """`default_conf` merged with keyword overrides, rejecting unknown names (typos fail loudly)."""
    unknown = set(overrides) - {f.name for f in dataclasses.fields(conf)}
    if unknown:
        raise TypeError(f"unknown config keys for {type(conf).__name__}: {sorted(unknown)}")
    return dataclasses.replace(conf, **overrides)
