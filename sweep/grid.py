"""The grid file of `musk sweep` -> its cells: one `musk train` run each, typed, named, with its state.

`plan_sweep` expands a GRID.yaml (SPEC "musk sweep"; docs/sweeps.md) into cells, types every cell
against TrainConfig (the same check as `musk train --set`), and looks at its cache and at what its
folder already holds, so a bad grid stops before any run starts. `train_command` is the child process
of a cell.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from cache.reader import Cache
from cache.run_folder import NOT_SETTINGS, RunFolder
from core.config import is_text, dump_yaml, from_dict, load_yaml, merge, to_dict
from core.errors import MuskError
from train.config import (FLAT, TrainConfig, field_type, flat_dict, flat_name, flatten, keys_missing_from_old_run,
                          load_train_config, method_reads, parse_train_sets)

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
        return self.train.optim.total_training_steps

    def describe(self) -> str:
        bits = [f"method={self.method}", f"seed={self.seed}", f"cache={self.cache}"]
        bits += [f"config={self.config}"] if self.config else []
        bits += [f"{k}={v}" for k, v in self.axes.items()]
        return f"{self.name} ({', '.join(bits)})"


def load_sweep_config(path: Path, out: Path | None = None) -> tuple[SweepConfig, list[SweepConfig]]:
    """The grid file -> (its top level, one SweepConfig per grid: the top level, then each `also`)."""
    data = _text_as_written(load_yaml(path), path)
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


def _text_as_written(data: dict, path: Path) -> dict:
    """grid and set values of a text field as written: YAML reads `off` as false and `1e-3` as a string
    (YAML 1.1); a text field (context_gate, decode_merged) takes the text typed, as `--set` does."""
    try:
        raw = yaml.load(Path(path).read_text(), Loader=yaml.BaseLoader)  # every scalar as its text
    except (OSError, yaml.YAMLError):
        return data
    def fix(node: dict, raw_node, is_grid: bool) -> None:
        if not isinstance(node, dict) or not isinstance(raw_node, dict):
            return
        for k, v in node.items():
            if is_text(field_type(k)) and k in raw_node:
                r = raw_node[k]
                if is_grid and isinstance(v, list) and isinstance(r, list) and len(r) == len(v):
                    node[k] = [x if isinstance(x, str) or x is None else rx for x, rx in zip(v, r)]
                elif not is_grid and not isinstance(v, (str, list, dict)) and v is not None and isinstance(r, str):
                    node[k] = r

    if isinstance(raw, dict):
        for where, r in [(data, raw)] + list(zip(data.get("also") or [], raw.get("also") or [])):
            if isinstance(where, dict) and isinstance(r, dict):
                fix(where.get("grid"), r.get("grid"), True)
                fix(where.get("set"), r.get("set"), False)
    return data


def _slug(value) -> str:
    """A folder-name-safe form of a setting's value: 0.0001 -> 0.0001, [a, b] -> a_b, a/b.h5 -> a_b.h5."""
    if isinstance(value, (list, tuple)):
        value = "_".join(str(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value)).strip("_") or "none"


NAME_MAX = 255  # bytes of one file name where the file system does not say (Linux ext4, xfs, btrfs)
LONGEST = ".yaml"  # the longest suffix a cell's name gets (<sweep>/configs/<name>.yaml; logs/<name>.log)


def name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system holding `folder` (or its nearest existing parent) takes."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return int(os.pathconf(p, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return NAME_MAX


def shorten(name: str, limit: int) -> str:
    """`name` if it fits `limit` bytes, else a readable prefix of it, a digest of the whole name and
    its seed suffix: `perceiver-lr-0.0001-...-3f9a01c2d4-s0`; deterministic, so a rerun finds its folders."""
    if len(name.encode()) <= limit:
        return name
    head, seed = name.rsplit("-", 1)
    tail = f"-{hashlib.sha256(name.encode()).hexdigest()[:10]}-{seed}"
    keep = head.encode()[: max(1, limit - len(tail.encode()))].decode(errors="ignore").rstrip("-_.")
    return keep + tail


def cell_name(method: str, seed: int, cache: str | None, config: str | None, grid: dict) -> str:
    """method[-cache stem][-preset stem][-KEY-VALUE...]-s<seed>; cache and preset only where the sweep
    lists several (`cache: [..]`), so the name of a one-cache sweep's run is what `musk train --seeds` gives.
    The values are the typed ones (what the train config holds), so two spellings of one value are one name."""
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


class Cells(list):
    """The cells of a plan, with `notes`: what the plan says about them (keys a method does not read)."""

    notes: list[str]


def _typed(cfg: TrainConfig, key: str, value):
    """The value the train config holds for a grid key (`1e-3` -> 0.001), for the cell's name."""
    node = cfg
    for part in FLAT.get(key, key).split("."):
        if not hasattr(node, part):
            return value
        node = getattr(node, part)
    return node


def _type_cell(cell: str, config: str | None, sets: dict, method: str, seed: int) -> TrainConfig:
    try:
        overrides = merge(parse_train_sets(set_items(sets), where=f"{cell}:"), {"method": method, "seed": seed})
        return load_train_config(config, overrides)
    except MuskError as e:
        raise MuskError(f"{cell}: {e}") from None


def _shown(grids: list[SweepConfig], key: str) -> bool:
    """Whether run names carry the cache (config) stem: where a grid lists them (`cache: [..]`), or where
    two grids with a method in common read different ones (else their runs would share names)."""
    if any(_as_list(getattr(g, key))[1] for g in grids):
        return True
    return any(getattr(a, key) != getattr(b, key) and set(a.methods) & set(b.methods)
               for i, a in enumerate(grids) for b in grids[i + 1:])


def expand(grids: list[SweepConfig], out: Path) -> Cells:
    """Every cell of every grid, typed against TrainConfig, seed outermost (the first seed of every
    setting finishes first, so a sweep cut short still fills a table). A grid key a method does not read
    (train.config.METHOD_KEYS) does not multiply that method's runs. Raises MuskError naming the cell on
    an unknown method or key, a bad value, two cells with one folder name or one resolved configuration,
    or a name the file system cannot hold."""
    cells: dict[str, Cell] = {}
    resolved: dict[str, str] = {}  # the resolved configuration (JSON) -> the cell's name
    unread: dict[tuple[str, str], int] = {}  # (method, key) -> values it would have multiplied by
    many_caches, many_configs = _shown(grids, "cache"), _shown(grids, "config")
    limit = name_max(out) - len(LONGEST)
    for seed in sorted({s for g in grids for s in g.seeds}):
        for g in grids:
            if seed not in g.seeds:
                continue
            grid = {flat_name(k): v for k, v in g.grid.items()}  # grpo.beta or beta: one axis, named beta
            combos = [dict(zip(grid, vs)) for vs in itertools.product(*grid.values())]
            seen: set = set()  # (cache, config, method, the keys it reads): one run however the others vary
            for cache, config, method, combo in itertools.product(_as_list(g.cache)[0], _as_list(g.config)[0],
                                                                   g.methods, combos):
                read = {k: v for k, v in combo.items() if method_reads(method, k)}
                for k in combo.keys() - read.keys():
                    unread[(method, k)] = len(grid[k])
                key = (cache, config, method, json.dumps(read, sort_keys=True, default=str))
                if key in seen:
                    continue
                seen.add(key)
                _add_cell(cells, resolved, g, seed, cache_shown=cache if many_caches else None, cache=cache,
                          config_shown=config if many_configs else None, config=config, method=method, combo=read,
                          out=out, limit=limit)
    plan = Cells(cells.values())
    plan.notes = [f"{k} is not read by {m}: one {m} run where the grid lists {n} values of it"
                  for (m, k), n in sorted(unread.items())]
    return plan


def _add_cell(cells: dict, resolved: dict, g: SweepConfig, seed: int, *, cache_shown, cache: str, config_shown,
              config, method: str, combo: dict, out: Path, limit: int) -> None:
    sets = {**g.set, **combo}
    cell = f"cell {cell_name(method, seed, cache_shown, config_shown, combo)} (method={method}, seed={seed}, " \
           f"cache={cache}, config={config}" + "".join(f", {k}={v}" for k, v in combo.items()) + ")"
    cfg = _type_cell(cell, config, sets, method, seed)
    axes = {k: _typed(cfg, k, v) for k, v in combo.items()}
    full = cell_name(method, seed, cache_shown, config_shown, axes)
    name = shorten(full, limit)
    if name != full and len(name.encode()) > limit:
        raise MuskError(f"{cell}: its name does not fit a file name here ({limit} bytes)")
    if name in cells:
        raise MuskError(f"two cells are named {name!r} ({cells[name].describe()} and {cell}): their values are "
                        "one value as the train config reads it; list it once, or give other grid values or caches")
    same = json.dumps({**flat_dict(cfg), "cache": str(cache)}, sort_keys=True, default=str)
    if same in resolved:
        raise MuskError(f"{cell} and cell {resolved[same]} are one configuration (the same resolved train "
                        "config and cache); list it once")
    resolved[same] = name
    cells[name] = Cell(name, method, seed, str(cache), config, sets, axes, cfg, out / name)


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
    try:
        old = run.read_config()
        old = flatten(old) if isinstance(old, dict) else old  # sectioned, or flat from an older musk
        summary = run.read_summary()
    except (OSError, ValueError, yaml.YAMLError) as e:  # written whole by musk train: another program's folder
        return replace(cell, state="blocked", note=f"{cell.folder} holds a config.yaml or summary.json that "
                       f"cannot be read ({type(e).__name__}); remove it or use another out")
    if not isinstance(old, dict) or not isinstance(summary, dict):
        return replace(cell, state="blocked", note=f"{cell.folder}/config.yaml holds no run config; remove it "
                       "or use another out")
    new = {**flat_dict(cell.train), "cache_fingerprint": fp}
    taken, lacking = keys_missing_from_old_run(old, new, NOT_SETTINGS)
    if lacking:
        return replace(cell, state="blocked", note=f"{cell.folder} holds a run made by an older musk without the "
                       f"keys {lacking}, whose values here are not what it did before they existed; remove it "
                       "or use another out")
    diff = sorted(k for k, v in new.items()
                  if k not in NOT_SETTINGS and k not in taken and v is not None and old.get(k) != v)
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} there, {new[k]!r} here" for k in diff[:4])
        return replace(cell, state="blocked",
                       note=f"{cell.folder} holds a run with other settings ({shown}); remove it or use another out")
    done = summary.get("steps", -1) >= cell.steps
    note = f"made by an older musk: {sorted(taken)} taken as their defaults from before they existed" if taken else ""
    return replace(cell, state="done" if done else "resume", note=note)


def plan_sweep(grid_path: Path, out: Path | None = None) -> tuple[Path, list[Cell]]:
    """(the sweep folder, its cells with their states). Raises MuskError on a bad grid file."""
    top, grids = load_sweep_config(Path(grid_path), out)
    folder = Path(top.out)
    fingerprints: dict = {}
    cells = expand(grids, folder)
    planned = Cells(with_state(c, fingerprints) for c in cells)
    planned.notes = cells.notes
    return folder, planned


CONFIGS = "configs"  # <sweep>/configs/<run name>.yaml: the resolved config each run reads


def write_resolved(cell: Cell, folder: Path) -> Path:
    """The cell's resolved train config as the plan typed it, for its child to read (`--config`): a preset
    edited while the sweep runs changes nothing already planned. Written whole (temporary file, rename)."""
    path = folder / CONFIGS / f"{cell.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(dump_yaml(to_dict(cell.train)))
    tmp.replace(path)
    return path


def train_command(cell: Cell, resume: bool, threads: int | None, entry: list[str] | None = None,
                  config_file: Path | None = None) -> list[str]:
    """The child process of one cell: `musk train` with the cell's settings, quiet (its progress is read
    from its run folder), --resume when its folder holds a killed or failed run. With `config_file` (the
    cell's resolved config, `write_resolved`) the child reads only that, no preset and no --set."""
    cmd = list(entry or [sys.executable, "-m", "cli"]) + [
        "train", "--cache", cell.cache, "--method", cell.method, "--seed", str(cell.seed),
        "--out", str(cell.folder), "--no-progress"]
    cmd += ["--config", str(config_file or cell.config)] if config_file or cell.config else []
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["--resume"] if resume else []
    for item in [] if config_file else set_items(cell.sets):
        cmd += ["--set", item]
    return cmd
