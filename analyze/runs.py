"""Loading run folders (and only run folders) into polars frames."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml

from cache.run_folder import CONFIG, EVAL, METRICS, NOT_SETTINGS, RunFolder
from core.errors import MuskError
from core.hashing import sha256_of
from train.config import DEFAULTS_BEFORE_KEY, METHOD_KEYS, flatten, method_reads  # noqa: F401  (METHOD_KEYS: the report's reading)
from train.recipes import recipe_name

# Keys of the resolved config that never make two runs different conditions. total_training_steps
# is replaced by the step the run reached (`Run.steps`): a run cut short with --max-steps is its own
# condition, a resumed run that reached the same final step is not.
NOT_A_CONDITION = ("seed", "device", *NOT_SETTINGS)
# When evaluations happen, not what is trained: Table 1 sets a GSM8K run (233 steps, curve every 40)
# in the same row as Reasoning Gym runs (500 steps, curve every 50).
SCHEDULE = ("curve_freq", "curve_prompts", "test_freq")


@dataclass
class Run:
    name: str
    path: Path
    config: dict
    summary: dict
    metrics: pl.DataFrame
    evals: pl.DataFrame

    @property
    def method(self) -> str:
        return self.config["method"]

    @property
    def family(self) -> str:
        return self.config.get("task_family") or self.summary.get("task_family", "?")

    @property
    def team(self) -> tuple[str, ...]:
        return tuple(self.config.get("experts") or self.summary.get("team") or ())

    @property
    def steps(self) -> int:
        """The optimizer step the run reached (summary, else its last metrics record)."""
        if "steps" in self.summary:
            return int(self.summary["steps"])
        return int(self.metrics["step"].max()) if not self.metrics.is_empty() else 0

    @property
    def condition(self) -> str:
        """Fingerprint of everything but the seed: runs pool into one cell only when it is equal."""
        return self.condition_without()

    def condition_without(self, *keys: str, steps: bool = True) -> str:
        """The condition without config `keys` (and without the step reached when steps=False)."""
        skip = set(NOT_A_CONDITION) | set(keys)
        if self.config.get("dtype_resolved"):  # the dtype trained in is the fact; `auto` or its name is a wish
            skip.add("dtype")
        # a key added after some runs were made, at the value that reproduces what musk did before it
        # existed, is no difference: an older run without it pools with a newer one at that value
        cfg = {k: v for k, v in self.config.items()
               if k not in skip and not (k in DEFAULTS_BEFORE_KEY and DEFAULTS_BEFORE_KEY[k] == v)}
        return sha256_of({**cfg, "steps reached": self.steps} if steps else cfg)[:10]

    @property
    def recipe(self) -> str | None:
        """The training recipe beyond the paper ('sft-warmup 30 (context)'), None for reward alone."""
        return recipe_name(self.config)

    @property
    def label(self) -> str:
        """The method as the report names it: with its recipe when it has one ('perceiver + sft-warmup
        30 (context)'), so a recipe run never reads as the paper's method."""
        return f"{self.method} + {self.recipe}" if self.recipe else self.method

    @property
    def final_accuracy(self) -> float | None:
        return self.summary.get("final_val_accuracy")

    @property
    def finished(self) -> bool:
        """summary.json is written last: without it the run is still training, was killed, or is
        waiting for --resume."""
        return "final_val_accuracy" in self.summary

    def status(self) -> str:
        """'finished', or 'unfinished: step K of T' (the last step in metrics.jsonl)."""
        if self.finished:
            return "finished"
        return f"unfinished: step {self.steps} of {self.config.get('total_training_steps', '?')}"


def _frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()


def is_run(path: Path) -> bool:
    return RunFolder(path).is_run()


def discover(paths: list[Path]) -> list[Path]:
    """Run folders among `paths` and below them (a run inside a run is not looked for)."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise MuskError(f"{str(p)!r} does not exist")
        if is_run(p):
            found.append(p)
            continue
        found += sorted(d.parent for d in p.rglob(CONFIG) if is_run(d.parent))
    unique = sorted(set(found))
    if not unique:
        raise MuskError(f"no run folders (config.yaml + metrics.jsonl) under {[str(p) for p in paths]}")
    return unique


def load_run(path: Path) -> Run:
    folder = RunFolder(path)
    try:
        config = flatten(folder.read_config())  # sectioned, or flat from an older musk: compared flat
    except yaml.YAMLError as e:
        raise MuskError(f"run {str(path)!r}: config.yaml is not valid YAML: {e}") from None
    try:
        summary = folder.read_summary()
        metrics, evals = _frame(folder.read(METRICS)), _frame(folder.read(EVAL))
    except (ValueError, json.JSONDecodeError) as e:
        raise MuskError(f"run {str(path)!r}: summary.json or a .jsonl file is not valid JSON: {e}") from None
    return Run(path.name, path, config, summary, metrics, evals)


def load_runs(paths: list[Path]) -> list[Run]:
    """The runs under `paths`, each named by its folder, or by as many of its parent folders as make
    the name unique in the report (records and tables key on the name)."""
    runs = [load_run(p) for p in discover(paths)]
    depth = {r.path: 1 for r in runs}
    while True:
        names = {r.path: "/".join(r.path.parts[-depth[r.path]:]) for r in runs}
        clash = {p for p in names if list(names.values()).count(names[p]) > 1 and depth[p] < len(p.parts)}
        if not clash:
            break
        for p in clash:
            depth[p] += 1
    for r in runs:
        r.name = names[r.path]
    return runs


def distinct_runs(runs: list[Run]) -> tuple[list[Run], list[tuple[str, str]]]:
    """Runs with the same condition and seed are one run (a sweep's main setting appears in several
    sweep folders): the first of each (by name) is kept. Returns (kept, [(copy set aside, run kept)])."""
    kept: dict[tuple, Run] = {}
    aside = []
    for r in sorted(runs, key=lambda r: r.name):
        key = (r.condition, repr(r.config.get("seed")), r.finished)
        if key in kept:
            aside.append((r.name, kept[key].name))
        else:
            kept[key] = r
    return [r for r in runs if r in kept.values()], aside


def dtype_of(r: Run) -> str:
    """The dtype the run trained in (config.yaml's dtype_resolved), or 'DTYPE, unresolved' for a run
    made before it was recorded."""
    return str(r.config.get("dtype_resolved") or r.summary.get("dtype") or f"{r.config.get('dtype', 'auto')}, "
               "unresolved")


def dtype_note(runs: list[Run]) -> str:
    """' Dtype: bfloat16.' or ' Dtypes: bfloat16 (a, b), float32 (c).' ('' for no runs)."""
    by: dict[str, list[str]] = {}
    for r in sorted(runs, key=lambda r: r.name):
        by.setdefault(dtype_of(r), []).append(r.name)
    if len(by) == 1:
        return f" Dtype: {next(iter(by))}."
    return (" Dtypes (never pooled in one cell): " + "; ".join(f"{d} ({', '.join(n)})" for d, n in by.items()) + ".") \
        if by else ""


# Config keys a control need not share with the method it is set against: the seed and what never makes a
# condition (NOT_A_CONDITION), the method itself, the column (family, cache, prompt set), the evaluation
# schedule, the experts (a control reads none) and the dtype (matched as trained, dtype_of).
CONTROL_FREE = set(NOT_A_CONDITION) | {"method", "experts", "cache", "cache_fingerprint", "prompt_set", "task_family",
                                       "dtype", "dtype_resolved", *SCHEDULE}


def unmatched_keys(run: Run, control: Run) -> list[str]:
    """Config keys both methods read (method_reads) on which control differs from run,
    beyond CONTROL_FREE: a key added to the config later is matched without naming it here."""
    keys = (set(run.config) | set(control.config)) - CONTROL_FREE

    def value(config: dict, k: str):  # a key an older run lacks reads as its value from before it existed
        return config.get(k, DEFAULTS_BEFORE_KEY.get(k))

    return sorted(k for k in keys if method_reads(run.method, k) and method_reads(control.method, k)
                  and repr(value(run.config, k)) != repr(value(control.config, k)))
