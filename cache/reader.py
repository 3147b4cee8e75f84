"""Reading a cache: refuses incomplete or foreign files; reads whole datasets, never per row."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from cache.schema import (EXPERT_ATTRS, POOLED, PROMPT_COLUMNS, RANDOM_VARIANTS, READABLE_SCHEMAS,
                          SCHEMA_1_VARIANTS, open_failure)
from core.errors import MuskError
from core.heldout import composition, count_overlap


def _str_list(ds) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in ds.asstr()[()]]


class Cache:
    """A read-only view of one complete cache file. Use as a context manager or call close()."""

    def __init__(self, path: str | Path, allow_incomplete: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise MuskError(f"cache {str(self.path)!r} does not exist (build it with `musk extract`)")
        try:
            self.f = h5py.File(self.path, "r")
        except OSError as e:
            raise MuskError(open_failure(self.path, e)) from None
        a = self.f.attrs
        if "musk_schema" not in a:
            self.close()
            raise MuskError(f"{str(self.path)!r} is an HDF5 file but not a musk cache (no musk_schema attribute)")
        if int(a["musk_schema"]) not in READABLE_SCHEMAS:
            self.close()
            raise MuskError(
                f"cache {str(self.path)!r} has schema {int(a['musk_schema'])}, this musk reads schemas "
                f"{list(READABLE_SCHEMAS)}; rebuild it with `musk extract`"
            )
        self.schema = int(a["musk_schema"])
        if not bool(a.get("complete", False)) and not allow_incomplete:
            self.close()
            raise MuskError(
                f"cache {str(self.path)!r} is incomplete (an extraction did not finish); rerun `musk extract` "
                "with the same config to complete it"
            )

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- metadata
    @property
    def fingerprint(self) -> str:
        return str(self.f.attrs["fingerprint"])

    @property
    def data_fingerprint(self) -> str:
        return str(self.f.attrs.get("data_fingerprint", ""))

    @property
    def config_yaml(self) -> str:
        return str(self.f.attrs["config"])

    @property
    def experts(self) -> list[str]:
        """Expert names in the order the config listed them (recorded at extraction)."""
        order = json.loads(self.f.attrs.get("expert_order", "[]"))
        present = list(self.f["experts"].keys()) if "experts" in self.f else []
        return [n for n in order if n in present] + sorted(set(present) - set(order))

    @property
    def routers(self) -> list[str]:
        return list(self.f["router"].keys()) if "router" in self.f else []

    def expert_fingerprint(self, name: str) -> str:
        return str(self._expert(name).attrs.get("fingerprint", ""))

    def router_fingerprint(self, name: str) -> str:
        return str(self.f["router"][name].attrs.get("fingerprint", ""))

    def expert_attrs(self, name: str) -> dict:
        g = self._expert(name)
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in g.attrs.items()}

    def _expert(self, name: str):
        if name not in self.experts:
            raise MuskError(f"cache {str(self.path)!r} has no expert {name!r}; it has {self.experts}")
        return self.f["experts"][name]

    def __len__(self) -> int:
        return int(self.f["prompts/text"].shape[0])

    # -- data (whole datasets: one read each)
    def prompts(self) -> dict[str, list[str]]:
        return {c: _str_list(self.f["prompts"][c]) for c in PROMPT_COLUMNS}

    def split_overlap(self) -> int:
        """Held-out prompts whose problem (`core.heldout.problem_key`) is in the training split: the
        stored count from schema 4 on; counted from the prompts for older caches, whose stored count
        (schema 3) compared texts only and missed commutative twins (`3 + 8` held out, `8 + 3` trained)."""
        if "split_overlap" in self.f.attrs and self.schema >= 4:
            return int(self.f.attrs["split_overlap"])
        return count_overlap(_str_list(self.f["prompts/text"]), _str_list(self.f["prompts/split"]))

    def split_shares(self) -> dict:
        """Each dataset's part of each split (see cache.schema, schema 4): the stored record, else
        counted from the prompts (older caches; no configured "mix" then)."""
        if "split_shares" in self.f.attrs:
            return json.loads(str(self.f.attrs["split_shares"]))
        return composition(_str_list(self.f["prompts/task"]), _str_list(self.f["prompts/split"]))

    def split_indices(self, split: str) -> np.ndarray:
        splits = np.array(_str_list(self.f["prompts/split"]))
        return np.nonzero(splits == split)[0]

    @property
    def variants(self) -> tuple[str, ...]:
        """The pooling variants this cache holds (schema 1 has no first_block)."""
        return POOLED if self.schema >= 2 else SCHEMA_1_VARIANTS

    def draws(self, variant: str, expert: str) -> int:
        """How many seeded draws the cache holds for `variant` (1 for deterministic variants and for
        schema-1 caches, which hold one draw)."""
        ds = self._expert(expert)[variant]
        return int(ds.shape[1]) if variant in RANDOM_VARIANTS and ds.ndim == 3 else 1

    def features(self, variant: str, experts: list[str] | None = None, draw: int = 0) -> dict[str, np.ndarray]:
        """[N, d] per expert. For random_token / random_layer, draw `draw % D` of the D stored draws."""
        if variant not in POOLED:
            raise MuskError(f"unknown pooling variant {variant!r}; choices: {list(POOLED)}")
        if variant not in self.variants:
            raise MuskError(f"cache {str(self.path)!r} (schema {self.schema}) has no {variant!r} pooling; it has "
                            f"{list(self.variants)}. Rebuild it with `musk extract` (schema 2) to get it.")
        names = experts if experts is not None else self.experts
        out = {}
        for n in names:
            ds = self._expert(n)[variant]
            out[n] = ds[:, draw % ds.shape[1]] if ds.ndim == 3 else ds[()]  # one hyperslab read, not per row
        return out

    def column(self, name: str, dataset: str) -> np.ndarray:
        """A per-prompt dataset of one expert (n_tokens, hint_n_tokens, ...), read whole."""
        g = self._expert(name)
        if dataset not in g:
            raise MuskError(f"cache {str(self.path)!r}: expert {name!r} has no {dataset!r}")
        return g[dataset][()]

    def has_column(self, name: str, dataset: str) -> bool:
        return dataset in self._expert(name)

    def has_hints(self, name: str) -> bool:
        return "hint" in self._expert(name)

    def hints(self, name: str) -> list[str]:
        if not self.has_hints(name):
            raise MuskError(f"cache {str(self.path)!r}: expert {name!r} has no hints (extract with hints: true)")
        return _str_list(self._expert(name)["hint"])

    def has_solo(self, name: str) -> bool:
        """Whether the expert's own scored answers are stored (schema 5, extracted with solo: true)."""
        return "solo_score" in self._expert(name)

    def solo_answers(self, name: str) -> list[str]:
        """The expert's own greedy completions [N] (pipeline/solo.py)."""
        self._need_solo(name)
        return _str_list(self._expert(name)["solo"])

    def solo_scores(self, name: str) -> np.ndarray:
        """[N] float32: the expert's own answers scored by the task's scorer, in [0, 1]."""
        self._need_solo(name)
        return self._expert(name)["solo_score"][()]

    def _need_solo(self, name: str) -> None:
        if not self.has_solo(name):
            raise MuskError(f"cache {str(self.path)!r}: expert {name!r} has no solo answers (extract with "
                            "solo: true; a rerun of `musk extract` adds them without recomputing features)")

    def router_embedding(self, encoder: str | None = None) -> np.ndarray:
        if not self.routers:
            raise MuskError(f"cache {str(self.path)!r} has no router embedding (extract with a router)")
        enc = encoder or self.routers[0]
        if enc not in self.routers:
            raise MuskError(f"cache has no router {enc!r}; it has {self.routers}")
        return self.f["router"][enc]["embedding"][()]

    def check_layout(self) -> list[str]:
        """Problems with the SPEC layout (empty when the file conforms)."""
        problems = []
        for k in ("musk_schema", "fingerprint", "config", "complete", "versions"):
            if k not in self.f.attrs:
                problems.append(f"root attribute {k} missing")
        for c in PROMPT_COLUMNS:
            if f"prompts/{c}" not in self.f:
                problems.append(f"/prompts/{c} missing")
        for n in self.experts:
            g = self.f["experts"][n]
            for k in EXPERT_ATTRS:
                if k not in g.attrs:
                    problems.append(f"/experts/{n} attribute {k} missing")
            for k in self.variants + ("random_token_index", "random_layer_index", "n_tokens"):
                if k not in g:
                    problems.append(f"/experts/{n}/{k} missing")
        return problems
