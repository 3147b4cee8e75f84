"""Fingerprints: what produced a cache, so that it is never silently mixed with something else.

- prompt-config fingerprint: schema version, task config, limit and the reasoning-gym version (what
  makes the prompts; it names the scratch folder of an extraction in progress);
- data fingerprint: the prompt-config fingerprint and a digest of every prompt's text, answer, task,
  split and scorer entry, so caches holding different prompts never share it (whatever a generator
  did in another process);
- expert fingerprint: data fingerprint + expert spec + weights hash + the extraction settings that
  change the stored numbers (dtype, pooling seed, hint budget); batch size and device do not;
- root fingerprint: data fingerprint + every expert's and the router's fingerprint.
"""

from __future__ import annotations

import hashlib
import json

from cache.schema import PROMPT_COLUMNS, PROMPTS_SCHEMA
from core.hashing import sha256_of


def prompt_config_fingerprint(task_cfg, limit: int | None) -> str:
    import reasoning_gym

    return sha256_of(
        {"schema": PROMPTS_SCHEMA, "task": task_cfg, "limit": limit,
         "reasoning_gym": getattr(reasoning_gym, "__version__", "?")}
    )


def prompts_digest(columns: dict[str, list[str]]) -> str:
    """SHA-256 over the prompt columns (text, answer, task, split, entry), row by row."""
    h = hashlib.sha256()
    for row in zip(*(columns[c] for c in PROMPT_COLUMNS)):
        h.update(json.dumps(row, ensure_ascii=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def data_fingerprint(prompt_config_fp: str, columns: dict[str, list[str]]) -> str:
    return sha256_of({"prompt_config": prompt_config_fp, "prompts": prompts_digest(columns)})


def expert_fingerprint(data_fp: str, spec, weights_sha256: str, settings: dict) -> str:
    return sha256_of({"data": data_fp, "spec": spec, "weights": weights_sha256, "settings": settings})


def router_fingerprint(data_fp: str, spec, weights_sha256: str) -> str:
    return sha256_of({"data": data_fp, "router": spec, "weights": weights_sha256})


def root_fingerprint(data_fp: str, experts: dict[str, str], router: dict[str, str]) -> str:
    return sha256_of({"data": data_fp, "experts": experts, "router": router})
