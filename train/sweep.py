"""`musk sweep GRID.yaml`: a grid of `musk train` runs, each an ordinary run folder under one sweep
folder, that a rerun of the same command completes.

A grid file (SPEC "musk sweep") names caches, train presets, methods, seeds, a `grid` of KEY -> values
(their product is taken) and `set` overrides for every run; `also` adds further grids made of the same
keys. `plan_sweep` expands it into cells, types every cell against TrainConfig (the same check as
`musk train --set`), checks its cache and what its folder already holds, all before any run starts.
`run_sweep` then starts the cells that are not finished as child processes
`musk train ... --set KEY=VALUE [--resume]` through an executor (train/sweep_exec.py: local lanes or a
Ray cluster) and prints one line per step and evaluation of each run from its metrics.jsonl and
eval.jsonl (train/sweep_watch.py).

Cell states: todo (nothing in its folder), resume (a config.yaml without a finished summary: killed
or failed; restarted with --resume from its last checkpoint), done (summary.json at the cell's
total_training_steps), blocked (the folder holds a run of other settings, or the cache is missing: the sweep stops).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

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
    """Methods, one run each (single | hard-routing | output-collab | perceiver | ffn)."""
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
    state: str = "todo"  # todo | resume | done | blocked
    note: str = ""  # why a cell is blocked

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
    """The cell with what its folder holds: done, resume, todo, or blocked (another run's settings,
    or a missing cache: `note` says which)."""
    fp = _cache_fingerprint(cell.cache, fingerprints)
    if fp is None:
        return replace(cell, state="blocked", note=fingerprints[f"error:{cell.cache}"])
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


# ---------------------------------------------------------------------------------------------
# The plan (--dry-run) and its estimated time.


def measured_step_seconds(cells: list[Cell]) -> dict[str, float]:
    """Median step_seconds per method over the steps this sweep's runs logged (on the machines they
    ran on), and over all methods under the key '*'."""
    from statistics import median

    from cache.run_folder import METRICS

    per: dict[str, list[float]] = {}
    for c in cells:
        for r in RunFolder(c.folder).read(METRICS) if c.folder.is_dir() else []:
            if "step_seconds" in r:
                per.setdefault(c.method, []).append(float(r["step_seconds"]))
    out = {m: median(v) for m, v in per.items()}
    if per:
        out["*"] = median([x for v in per.values() for x in v])
    return out


def _steps_done(cell: Cell) -> int:
    last = RunFolder(cell.folder).latest_checkpoint()
    return int(last.name.split("_")[1]) if last is not None and cell.state == "resume" else 0


def makespan(durations: list[float], lanes: int) -> float:
    """Longest-first onto the lane free soonest: the wall time of `durations` on `lanes` lanes."""
    ends = [0.0] * max(1, lanes)
    for d in sorted(durations, reverse=True):
        ends[ends.index(min(ends))] += d
    return max(ends)


def plan_lines(folder: Path, cells: list[Cell], lanes: int | None, step_seconds: float | None) -> list[str]:
    from train.sweep_watch import duration

    states = {s: [c for c in cells if c.state == s] for s in ("done", "resume", "todo", "blocked")}
    lines = [f"sweep {folder}: {len(cells)} runs: {len(states['done'])} finished, {len(states['resume'])} "
             f"to resume, {len(states['todo'])} to start" +
             (f", {len(states['blocked'])} that cannot run" if states["blocked"] else "")]
    width = max(len(c.name) for c in cells)
    for c in cells:
        what = {"done": f"{c.steps}/{c.steps} steps",
                "resume": f"from step {_steps_done(c)} of {c.steps} (last checkpoint)",
                "todo": f"{c.steps} steps", "blocked": c.note}[c.state]
        lines.append(f"  {c.state:<8} {c.name:<{width}}  {what}")
    left = {c.name: c.steps - _steps_done(c) for c in states["resume"] + states["todo"]}
    if not left:
        return lines + ["nothing to run"]
    measured = measured_step_seconds(cells)
    if step_seconds is not None:
        per, source = (lambda c: step_seconds), f"{step_seconds:g} s a step (given)"
    elif measured:
        per = lambda c: measured.get(c.method, measured["*"])  # noqa: E731
        source = "the median step time of this sweep's runs so far, per method (" + ", ".join(
            f"{m} {s:.1f} s" for m, s in measured.items() if m != "*") + ")"
    else:
        return lines + [f"{sum(left.values())} steps to run; estimated time unknown: no run of this sweep has "
                        "logged a step yet. Give one with --step-seconds S (e.g. measured with "
                        "`musk train ... --max-steps 2`), or start the sweep: its first steps measure it."]
    secs = [left[c.name] * per(c) for c in cells if c.name in left]
    total = sum(secs)
    lines.append(f"estimated: {sum(left.values())} steps from {source} = {duration(total)} of steps"
                 + (f", about {duration(makespan(secs, lanes))} on {lanes} lane(s)" if lanes else "")
                 + "; model loading and evaluations come on top")
    return lines


# ---------------------------------------------------------------------------------------------
# Running the plan.


class SweepResult(NamedTuple):
    folder: Path
    finished: list[str]  # finished by this command
    before: list[str]  # finished before it (skipped)
    failed: list[tuple[str, object, Path]]  # (name, exit code, log)
    remaining: list[str]  # not run (interrupted)


def _last_line(log: Path) -> str:
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def make_executor(executor: str, lanes: int, threads: int | None, address: str | None, gpus_per_run: float | None):
    from train import sweep_exec

    if executor == "local":
        return sweep_exec.LocalExecutor(sweep_exec.lane_plan(lanes, os.cpu_count() or 1, sweep_exec.visible_gpus(),
                                                             threads))
    if executor == "ray":
        return sweep_exec.RayExecutor(address, threads or 1, gpus_per_run)
    raise MuskError(f"unknown executor {executor!r}; choices: ['local', 'ray']")


def run_sweep(grid: Path, out: Path | None = None, executor: str = "local", lanes: int = 1,
              threads: int | None = None, address: str | None = None, gpus_per_run: float | None = None,
              dry_run: bool = False, step_seconds: float | None = None, quiet: float = 120.0, poll: float = 1.0,
              entry: list[str] | None = None, log=print) -> SweepResult:
    """Plan the grid, stop on a bad one before any run starts, run what is not finished, print each run's
    progress and a summary. `entry`: the child's command before `train` (default: this Python, -m cli)."""
    from train.sweep_exec import Job
    from train.sweep_watch import RunWatcher, duration

    folder, cells = plan_sweep(grid, out)
    if dry_run:
        for line in plan_lines(folder, cells, lanes if executor == "local" else None, step_seconds):
            log(line)
        return SweepResult(folder, [], [c.name for c in cells if c.state == "done"], [], [])
    bad = [c for c in cells if c.state == "blocked"]
    if bad:
        more = f" ({len(bad) - 1} more cells cannot run; `--dry-run` lists them)" if len(bad) > 1 else ""
        raise MuskError(f"cell {bad[0].describe()}: {bad[0].note}{more}. No run was started.")
    ex = make_executor(executor, lanes, threads, address, gpus_per_run)
    before = [c.name for c in cells if c.state == "done"]
    pending = [c for c in cells if c.state != "done"]
    log(f"sweep {folder}: {len(cells)} runs, {len(before)} finished before, {len(pending)} to run on {ex.describe()}")
    (folder / LOGS).mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[Cell, RunWatcher, float]] = {}
    finished, failed = [], []
    try:
        while pending or running:
            while pending and ex.capacity() > 0:
                c = pending.pop(0)
                logf = folder / LOGS / f"{c.name}.log"
                where = ex.start(Job(c.name, train_command(c, c.state == "resume", None, entry), logf, os.getcwd()))
                w = RunWatcher(c.name, c.folder, c.steps, c.train.log_freq, c.train.test_freq, logf, quiet)
                running[c.name] = (c, w, time.monotonic())
                log(f"{w.prefix()} {'resuming' if c.state == 'resume' else 'started'} on {where}; log: {logf}")
            for c, w, _ in running.values():
                for line in w.poll():
                    log(line)
            for name, rc in ex.poll():
                c, w, t0 = running.pop(name)
                for line in w.poll():
                    log(line)
                logf = folder / LOGS / f"{name}.log"
                if rc == 0:
                    finished.append(name)
                    acc = RunFolder(c.folder).read_summary().get("final_val_accuracy")
                    shown = f"{100 * acc:.1f}%" if isinstance(acc, (int, float)) else acc
                    log(f"[{name} {c.steps}/{c.steps}] finished in {duration(time.monotonic() - t0)}: "
                        f"final val accuracy {shown}")
                else:
                    failed.append((name, rc, logf))
                    log(f"{w.prefix()} FAILED (exit {rc}) after {duration(time.monotonic() - t0)}: "
                        f"{_last_line(logf)} | log: {logf}")
            if pending or running:
                time.sleep(poll)
    except KeyboardInterrupt:
        log("sweep: interrupted; stopping the running runs (a rerun resumes them)")
        ex.stop()
    finally:
        ex.close()
    remaining = [c.name for c in cells if c.state != "done" and c.name not in finished
                 and c.name not in {f[0] for f in failed}]
    result = SweepResult(folder, finished, before, failed, remaining)
    for line in summary_lines(result, grid):
        log(line)
    return result


def summary_lines(r: SweepResult, grid: Path) -> list[str]:
    n = len(r.finished) + len(r.before) + len(r.failed) + len(r.remaining)
    lines = [f"sweep {r.folder}: {len(r.finished) + len(r.before)} of {n} runs finished "
             f"({len(r.before)} before this command), {len(r.failed)} failed, {len(r.remaining)} not run"]
    for name, rc, logf in r.failed:
        lines.append(f"  failed: {name} (exit {rc}): {_last_line(logf)} | log: {logf}")
    if r.remaining:
        lines.append(f"  not finished (interrupted, or never started): {', '.join(r.remaining)}")
    if r.failed or r.remaining:
        lines.append(f"rerun `musk sweep {grid}` to retry the failed runs and resume the others "
                     "(finished runs are skipped)")
    lines.append(f"results: {r.folder}/<run>/ (metrics.jsonl, eval.jsonl, summary.json, final/); "
                 f"tables and figures: musk report {r.folder} --out {r.folder}/report")
    return lines
