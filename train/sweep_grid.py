"""The grid file of `musk sweep` -> its cells: one `musk train` run each, typed, named, with its state.

`plan_sweep` expands a GRID.yaml (SPEC "musk sweep"; docs/sweeps.md) into cells, types every cell
against TrainConfig (the same check as `musk train --set`), and looks at its cache and at what its
folder already holds, so a bad grid stops before any run starts. `train_command` is the child process
of a cell.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from cache.reader import Cache
from cache.run_folder import NOT_SETTINGS, RunFolder
from core.config import from_dict, load_yaml, merge, parse_sets, to_dict
from core.errors import MuskError
from train.config import TrainConfig, load_train_config

LOGS = "logs"  # <sweep>/logs/<run name>.log: each run's own output, every attempt appended


@dataclass(frozen=True)
class SweepConfig:
    out: str = "sweeps/sweep"
    """The sweep folder: one run folder per cell, and logs/ (`--out` overrides it)."""
    cache: str | tuple[str, ...] = ""
    """A cache path, or a list of them (then each run's name carries the cache's file stem)."""
    config: str | tuple[str, ...] | None = None
    """A train preset (YAML), a list of them (then the name carries the preset's stem), or null for the
    embedded default (what `musk train` uses with no --config)."""
    methods: tuple[str, ...] = ("perceiver",)
    """Methods, one run each (single | hard-routing | output-collab | perceiver | ffn | prefix)."""
    seeds: tuple[int, ...] = (0,)
    """Seeds, one run each (the paper: 3)."""
    grid: dict = field(default_factory=dict)
    """KEY -> list of values, any TrainConfig key as `musk train --set` takes it; the product of all
    lists is taken, and each run's name carries its KEY-VALUE pairs."""
    set: dict = field(default_factory=dict)
    """KEY -> value applied to every run (`--set KEY=VALUE`); not part of the run names."""
    also: tuple[dict, ...] = ()
    """Further grids: each a mapping of the keys above (not out, not also) that replace the top-level
    ones for that grid (grid and set mappings are merged into the top-level ones)."""


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: its name (= its folder under the sweep), what `musk train` gets, its state."""

    name: str
    method: str
    seed: int
    cache: str
    config: str | None
    sets: dict  # KEY -> value: set, then this cell's grid values
    axes: dict  # KEY -> value: this cell's grid values (in its name)
    train: TrainConfig  # the resolved config, as the child will resolve it
    folder: Path
    state: str = "todo"  # todo | resume | done | no-cache | blocked
    note: str = ""  # why a cell cannot run (no-cache, blocked)

    @property
    def steps(self) -> int:
        return self.train.total_training_steps

    def describe(self) -> str:
        bits = [f"method={self.method}", f"seed={self.seed}", f"cache={self.cache}"]
        bits += [f"config={self.config}"] if self.config else []
        bits += [f"{k}={v}" for k, v in self.axes.items()]
        return f"{self.name} ({', '.join(bits)})"


def load_sweep_config(path: Path, out: Path | None = None) -> tuple[SweepConfig, list[SweepConfig]]:
    """The grid file -> (its top level, one SweepConfig per grid: the top level, then each `also`)."""
    data = load_yaml(path)
    if out is not None:
        data["out"] = str(out)
    top = from_dict(SweepConfig, data, f"grid {str(path)!r}")
    base = {k: v for k, v in data.items() if k != "also"}
    grids = [top]
    for i, extra in enumerate(top.also):
        bad = sorted(set(extra) & {"out", "also"})
        if bad:
            raise MuskError(f"grid {str(path)!r}: also[{i}] may not set {bad} (one sweep folder, one level of also)")
        grids.append(from_dict(SweepConfig, merge(base, extra), f"grid {str(path)!r} also[{i}]"))
    for g in grids:
        if not g.cache:
            raise MuskError(f"grid {str(path)!r}: no cache (a path or a list of paths)")
        for key in (*g.grid, *g.set):
            if key.split(".")[0] in ("method", "seed"):
                raise MuskError(f"grid {str(path)!r}: {key!r} goes in `methods:` / `seeds:`, not in grid or set")
        for key, values in g.grid.items():
            if not isinstance(values, list) or not values:
                raise MuskError(f"grid {str(path)!r}: grid.{key} must be a non-empty list, got {values!r}")
    return top, grids


def _slug(value) -> str:
    """A folder-name-safe form of a setting's value: 0.0001 -> 0.0001, [a, b] -> a_b, a/b.h5 -> a_b.h5."""
    if isinstance(value, (list, tuple)):
        value = "_".join(str(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("_") or "none"


def cell_name(method: str, seed: int, cache: str | None, config: str | None, grid: dict) -> str:
    """method[-cache stem][-preset stem][-KEY-VALUE...]-s<seed>; cache and preset only where the grid
    lists several (`cache: [..]`), so the name of a one-cache sweep's run is what `musk train --seeds` gives."""
    parts = [method]
    parts += [_slug(Path(cache).stem)] if cache is not None else []
    parts += [_slug(Path(config).stem)] if config is not None else []
    parts += [f"{_slug(k)}-{_slug(v)}" for k, v in grid.items()]
    return "-".join(parts + [f"s{seed}"])


def set_items(sets: dict) -> list[str]:
    """{KEY: value} -> ["KEY=value"] as `--set` reads them (JSON is YAML: values keep their types)."""
    return [f"{k}={json.dumps(v)}" for k, v in sets.items()]


def _as_list(v) -> tuple[list, bool]:
    return (list(v), True) if isinstance(v, (list, tuple)) else ([v], False)


def expand(grids: list[SweepConfig], out: Path) -> list[Cell]:
    """Every cell of every grid, typed against TrainConfig, seed outermost (the first seed of every
    setting finishes first, so a sweep cut short still fills a table). Raises MuskError naming the
    cell on an unknown method or key, a bad value, or two cells with one folder name."""
    cells: dict[str, Cell] = {}
    for seed in sorted({s for g in grids for s in g.seeds}):
        for g in grids:
            if seed not in g.seeds:
                continue
            caches, many_caches = _as_list(g.cache)
            configs, many_configs = _as_list(g.config)
            combos = [dict(zip(g.grid, vs)) for vs in itertools.product(*g.grid.values())]
            for cache, config, method, combo in itertools.product(caches, configs, g.methods, combos):
                name = cell_name(method, seed, cache if many_caches else None, config if many_configs else None, combo)
                sets = {**g.set, **combo}
                cell = f"cell {name} (method={method}, seed={seed}, cache={cache}, config={config}" + \
                    "".join(f", {k}={v}" for k, v in combo.items()) + ")"
                try:
                    overrides = merge(parse_sets(TrainConfig, set_items(sets), where=f"{cell}:"),
                                      {"method": method, "seed": seed})
                    cfg = load_train_config(config, overrides)
                except MuskError as e:
                    raise MuskError(f"{cell}: {e}") from None
                if name in cells:
                    raise MuskError(f"two cells are named {name!r} ({cells[name].describe()} and {cell}); "
                                    "give them different grid values or caches")
                cells[name] = Cell(name, method, seed, str(cache), config, sets, combo, cfg, out / name)
    return list(cells.values())


def _cache_fingerprint(path: str, fingerprints: dict) -> str | None:
    if path not in fingerprints:
        try:
            with Cache(path) as c:
                fingerprints[path] = c.fingerprint
        except MuskError as e:
            fingerprints[path] = None
            fingerprints[f"error:{path}"] = str(e)
    return fingerprints[path]


def with_state(cell: Cell, fingerprints: dict) -> Cell:
    """The cell with what its folder holds: done, resume, todo, no-cache (its cache is missing or not
    readable) or blocked (its folder holds a run of other settings); `note` says why it cannot run."""
    fp = _cache_fingerprint(cell.cache, fingerprints)
    if fp is None:
        return replace(cell, state="no-cache", note=fingerprints[f"error:{cell.cache}"])
    run = RunFolder(cell.folder)
    if not run.config_path.exists():
        return replace(cell, state="todo")
    old = run.read_config()
    new = {**to_dict(cell.train), "cache_fingerprint": fp}
    diff = sorted(k for k, v in new.items() if k not in NOT_SETTINGS and v is not None and old.get(k) != v)
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} there, {new[k]!r} here" for k in diff[:4])
        return replace(cell, state="blocked",
                       note=f"{cell.folder} holds a run with other settings ({shown}); remove it or use another out")
    done = run.read_summary().get("steps", -1) >= cell.steps
    return replace(cell, state="done" if done else "resume")


def plan_sweep(grid_path: Path, out: Path | None = None) -> tuple[Path, list[Cell]]:
    """(the sweep folder, its cells with their states). Raises MuskError on a bad grid file."""
    top, grids = load_sweep_config(Path(grid_path), out)
    folder = Path(top.out)
    fingerprints: dict = {}
    return folder, [with_state(c, fingerprints) for c in expand(grids, folder)]


def train_command(cell: Cell, resume: bool, threads: int | None, entry: list[str] | None = None) -> list[str]:
    """The child process of one cell: `musk train` with the cell's settings, quiet (its progress is read
    from its run folder), --resume when its folder holds a killed or failed run."""
    cmd = list(entry or [sys.executable, "-m", "cli"]) + [
        "train", "--cache", cell.cache, "--method", cell.method, "--seed", str(cell.seed),
        "--out", str(cell.folder), "--no-progress"]
    cmd += ["--config", cell.config] if cell.config else []
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--resume"] if resume else []
    for item in set_items(cell.sets):
        cmd += ["--set", item]
    return cmd
