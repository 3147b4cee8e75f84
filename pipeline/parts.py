"""A cache group's part files (cache/writer.PartsStore: one file per finished batch) gathered into
[N, ...] arrays, proven whole (every row computed, each batch holding the rows the plan gives it) and
finite before the cache is assembled."""

from __future__ import annotations

import numpy as np

from cache.writer import PartsStore
from core.errors import MuskError
from pipeline.tasks import Prompt


def gather_parts(parts: PartsStore, group: str, kind: str, batches: list[np.ndarray], *, N: int,
                 name: str) -> dict[str, np.ndarray]:
    """Assemble the stored batches of one group into [N, ...] arrays, proving the result whole: each
    stored batch must hold exactly the rows the plan gives it, and every row must end up computed.
    Raises MuskError otherwise (the cache is then never marked complete)."""
    out: dict[str, np.ndarray] = {}
    covered = np.zeros(N, dtype=bool)
    for b, rows in enumerate(batches):
        if not parts.has(group, kind, b):
            raise MuskError(f"expert {name!r}: {kind} batch {b} was never computed; rerun `musk extract`")
        part = parts.load(group, kind, b)
        if not np.array_equal(part["rows"], rows):
            raise MuskError(f"expert {name!r}: stored {kind} batch {b} holds rows other than the plan's; delete "
                            f"{str(parts.root)!r} and rerun `musk extract`")
        for k, v in part.items():
            if k != "rows":
                if k not in out:
                    dtype = {"f": np.float32, "U": object}.get(v.dtype.kind, v.dtype)
                    out[k] = np.zeros((N, *v.shape[1:]), dtype=dtype)
                out[k][rows] = v
        covered[rows] = True
    if not covered.all():
        raise MuskError(f"expert {name!r}: {int((~covered).sum())} of {N} prompts have no {kind} computed")
    return out


def check_finite(arrays: dict[str, np.ndarray], name: str, prompts: list[Prompt]) -> None:
    """Raise MuskError naming the expert, the variant and the prompts whose features are NaN or inf
    (fp16 overflow, a broken checkpoint): a cache never stores them."""
    for k, v in arrays.items():
        if v.dtype.kind != "f":
            continue
        bad = np.nonzero(~np.isfinite(v.reshape(len(v), -1)).all(1))[0]
        if len(bad):
            shown = ", ".join(f"{i} ({prompts[i].text[:40]!r})" for i in bad[:3])
            raise MuskError(f"expert {name!r}: {k} is not finite for {len(bad)} prompts, e.g. rows {shown}; "
                            "try dtype float32 or bfloat16 (float16 overflows in some models)")
