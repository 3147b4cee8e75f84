"""Fingerprints: what produced a cache, so that it is never silently mixed with something else.

- data fingerprint: schema version, task config, limit and the reasoning-gym version (the prompts);
- expert fingerprint: data fingerprint + expert spec + weights hash + the extraction settings that
  change the stored numbers (dtype, pooling seed, hint budget); batch size and device do not;
- root fingerprint: data fingerprint + every expert's and the router's fingerprint.
"""

from __future__ import annotations

from core.hashing import sha256_of

from cache.schema import SCHEMA_VERSION


def data_fingerprint(task_cfg, limit: int | None) -> str:
    import reasoning_gym

    return sha256_of(
        {"schema": SCHEMA_VERSION, "task": task_cfg, "limit": limit,
         "reasoning_gym": getattr(reasoning_gym, "__version__", "?")}
    )


def expert_fingerprint(data_fp: str, spec, weights_sha256: str, settings: dict) -> str:
    return sha256_of({"data": data_fp, "spec": spec, "weights": weights_sha256, "settings": settings})


def router_fingerprint(data_fp: str, spec, weights_sha256: str) -> str:
    return sha256_of({"data": data_fp, "router": spec, "weights": weights_sha256})


def root_fingerprint(data_fp: str, experts: dict[str, str], router: dict[str, str]) -> str:
    return sha256_of({"data": data_fp, "experts": experts, "router": router})
