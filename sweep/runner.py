"""`musk sweep GRID.yaml`: a grid of `musk train` runs, each an ordinary run folder under one sweep
folder, that a rerun of the same command completes.

A grid file (SPEC "musk sweep"; docs/sweeps.md) names caches, train presets, methods, seeds, a `grid`
of KEY -> values (their product is taken) and `set` overrides for every run; `also` adds further grids
made of the same keys. `plan_sweep` (sweep/grid.py) expands it into cells, types every cell
against TrainConfig (the same check as `musk train --set`), checks its cache and what its folder
already holds, all before any run starts. `run_sweep` then starts the cells that are not finished as child processes
`musk train ... --set KEY=VALUE [--resume]` through an executor (sweep/executors.py: local lanes or a
Ray cluster) and prints one line per step and evaluation of each run from its metrics.jsonl and
eval.jsonl (sweep/watch.py).

Cell states: todo (nothing in its folder), resume (a config.yaml without a finished summary: killed
or failed; restarted with --resume from its last checkpoint), done (summary.json at the cell's
total_training_steps), no-cache (its cache is missing or unreadable) and blocked (the folder holds a
run of other settings): the last two stop the sweep before any run starts (a plan lists them).
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from cache.run_folder import METRICS, RunFolder
from core.errors import MuskError
from sweep.grid import LOGS, Cell, plan_sweep, train_command, write_resolved

LOCK = "sweep.lock"  # <sweep>/sweep.lock: held by the musk sweep that drives the folder

__all__ = ["plan_sweep", "plan_lines", "run_sweep", "makespan", "SweepResult"]


# ---------------------------------------------------------------------------------------------
# The plan (--dry-run) and its estimated time.


def measured_step_seconds(cells: list[Cell]) -> dict[str, float]:
    """Median step_seconds per method over the steps this sweep's runs logged (on the machines they
    ran on), and over all methods under the key '*'."""
    from statistics import median

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


# Measuring runs: a few steps, evaluations cut to one prompt, nothing else logged.
MEASURE_STEPS = 3
MEASURE_SETS = {"eval.eval_batches": 1, "eval.val_batch_size": 1, "eval.eval_without_context": False,
                "eval.eval_null_context": False, "eval.eval_completions": 0, "run.log_completions_freq": 0,
                "eval.curve_freq": 0}


def measure_step_seconds(cells: list[Cell], threads: int, entry: list[str] | None = None) -> dict[str, float]:
    """Times MEASURE_STEPS steps of the first unfinished cell of each method on this machine, one run
    at a time with `threads` threads, in a temporary folder: {method: median step_seconds}. Raises
    MuskError with the run's last line if a measuring run fails."""
    import subprocess
    import tempfile
    from dataclasses import replace
    from statistics import median

    firsts: dict[str, Cell] = {}
    for c in cells:
        if c.state in ("todo", "resume") and c.method not in firsts:
            firsts[c.method] = c
    out = {}
    with tempfile.TemporaryDirectory(prefix="musk-measure-") as tmp:
        for method, c in firsts.items():
            probe = replace(c, folder=Path(tmp) / c.name, sets={**c.sets, **MEASURE_SETS})
            cmd = train_command(probe, False, threads, entry) + ["--max-steps", str(MEASURE_STEPS)]
            log = Path(tmp) / f"{c.name}.log"
            with open(log, "wb") as f:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
            steps = [float(r["step_seconds"]) for r in RunFolder(probe.folder).read(METRICS)]
            if rc != 0 or not steps:
                raise MuskError(f"measuring {c.name} failed (exit {rc}): {_last_line(log)}")
            out[method] = median(steps)
    return out


def plan_lines(folder: Path, cells: list[Cell], lanes: int | None, step_seconds: float | None,
               *, measured_now: dict[str, float] | None = None, step_source: str | None = None) -> list[str]:
    from sweep.watch import duration

    states = {s: [c for c in cells if c.state == s] for s in ("done", "resume", "todo", "no-cache", "blocked")}
    lines = [f"sweep {folder}: {len(cells)} runs: {len(states['done'])} finished, {len(states['resume'])} "
             f"to resume, {len(states['todo'])} to start" +
             (f", {len(states['no-cache'])} waiting for their cache" if states["no-cache"] else "") +
             (f", {len(states['blocked'])} blocked by a run of other settings" if states["blocked"] else "")]
    width = max(len(c.name) for c in cells)
    for c in cells:
        older = f"; {c.note}" if c.note else ""
        what = {"done": f"{c.steps}/{c.steps} steps{older}",
                "resume": f"from step {_steps_done(c)} of {c.steps} (last checkpoint){older}",
                "todo": f"{c.steps} steps", "no-cache": c.note, "blocked": c.note}[c.state]
        lines.append(f"  {c.state:<8} {c.name:<{width}}  {what}")
    lines += [f"  note: {n}" for n in getattr(cells, "notes", [])]
    left = {c.name: c.steps - _steps_done(c) for c in states["resume"] + states["todo"] + states["no-cache"]}
    if not left:
        return lines + ["nothing to run"]
    measured = measured_step_seconds(cells)
    if step_seconds is not None:
        per, source = (lambda c: step_seconds), f"{step_seconds:g} s a step ({step_source or 'given'})"
    elif measured_now:
        per = lambda c: measured_now[c.method]  # noqa: E731
        source = (f"step times measured just now, {MEASURE_STEPS} steps of each method one run at a time (" +
                  ", ".join(f"{m} {s:.1f} s" for m, s in measured_now.items()) + ")")
    elif measured:
        per = lambda c: measured.get(c.method, measured["*"])  # noqa: E731
        source = "the median step time of this sweep's runs so far, per method (" + ", ".join(
            f"{m} {s:.1f} s" for m, s in measured.items() if m != "*") + ")"
    else:
        return lines + [f"compute: {len(left)} runs, {sum(left.values())} steps; GPU-hours not measured "
                        "(no step time)",
                        f"{sum(left.values())} steps to run; estimated time unknown: no run of this sweep has "
                        "logged a step yet. Measure it here with --measure (it needs the caches), give it "
                        "with --step-seconds S or --step-figures FILE, or start the sweep: its first steps "
                        "measure it."]
    secs = [left[c.name] * per(c) for c in cells if c.name in left]
    total = sum(secs)
    per_step = f"{step_seconds:g} s a step" if step_seconds is not None else "the step times below"
    lines.append(f"compute: {len(left)} runs, {sum(left.values())} steps x {per_step} = {total / 3600:.1f} "
                 "GPU-hours of steps (one device a run)")
    lines.append(f"estimated: {sum(left.values())} steps from {source} = {duration(total)} of steps"
                 + (f", about {duration(makespan(secs, lanes))} on {lanes} lane(s)" if lanes else "")
                 + "; model loading and evaluations come on top")
    return lines


def step_figures(path: Path, key: str = "paper_step_seconds") -> tuple[float, str]:
    """(seconds a step, where it came from) from a figures JSON file (`{"paper_step_seconds": 6.2, ...}`,
    as benchmarks/gpu.sh writes it; its `machine` and `date` are named when present). Raises MuskError
    when the file is unreadable or has no positive finite `key`."""
    import json
    import math

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise MuskError(f"--step-figures {str(path)!r}: not a readable JSON file ({e})") from None
    v = data.get(key) if isinstance(data, dict) else None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise MuskError(f"--step-figures {str(path)!r}: no positive number {key!r} in it (got {v!r})")
    where = ", ".join(str(data[k]) for k in ("machine", "device", "date") if data.get(k))
    return float(v), f"{key} measured in {path}" + (f": {where}" if where else "")


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
    from sweep import executors as sweep_exec

    if executor == "local":
        return sweep_exec.LocalExecutor(sweep_exec.lane_plan(lanes, sweep_exec.usable_cpus(), sweep_exec.visible_gpus(),
                                                             threads))
    if executor == "ray":
        return sweep_exec.RayExecutor(address, threads or 1, gpus_per_run)
    raise MuskError(f"unknown executor {executor!r}; choices: ['local', 'ray']")


def run_sweep(grid: Path, *, out: Path | None = None, executor: str = "local", lanes: int = 1,
              threads: int | None = None, address: str | None = None, gpus_per_run: float | None = None,
              dry_run: bool = False, step_seconds: float | None = None, measure: bool = False,
              quiet: float = 120.0, poll: float = 1.0, entry: list[str] | None = None, log=print,
              figures: Path | None = None) -> SweepResult:
    """Plan the grid, stop on a bad one before any run starts, run what is not finished, print each run's
    progress and a summary. `entry`: the child's command before `train` (default: this Python, -m cli).
    Raises MuskError on a bad grid, or while another `musk sweep` drives the same folder."""
    folder, cells = plan_sweep(grid, out)
    if measure and not dry_run:
        raise MuskError("--measure goes with --dry-run (it times steps for the plan's estimate)")
    source = None
    if figures is not None:
        if step_seconds is not None:
            raise MuskError("--step-seconds or --step-figures, not both")
        step_seconds, source = step_figures(figures)
    if dry_run:
        now = None
        methods = {c.method for c in cells if c.state in ("todo", "resume")}
        if measure and step_seconds is None and methods:
            from sweep.executors import usable_cpus

            n = threads or max(1, usable_cpus() // lanes)
            log(f"measuring the step time of {len(methods)} method(s) here ({MEASURE_STEPS} steps each, "
                f"{n} thread(s))...")
            now = measure_step_seconds(cells, n, entry)
        for line in plan_lines(folder, cells, lanes if executor == "local" else None, step_seconds, measured_now=now,
                               step_source=source):
            log(line)
        return SweepResult(folder, [], [c.name for c in cells if c.state == "done"], [], [])
    bad = [c for c in cells if c.state in ("no-cache", "blocked")]
    if bad:
        more = f" ({len(bad) - 1} more cells cannot run; `--dry-run` lists them)" if len(bad) > 1 else ""
        raise MuskError(f"cell {bad[0].describe()}: {bad[0].note}{more}. No run was started.")
    before = [c.name for c in cells if c.state == "done"]
    pending = [c for c in cells if c.state != "done"]
    finished: list[str] = []
    failed: list[tuple[str, object, Path]] = []
    with sweep_lock(folder):
        try:
            configs = {c.name: write_resolved(c, folder) for c in pending}
        except OSError as e:
            raise MuskError(f"could not write the runs' resolved configs under {folder}: {e}. No run was started.") \
                from None
        ex = make_executor(executor, lanes, threads, address, gpus_per_run)
        log(f"sweep {folder}: {len(cells)} runs, {len(before)} finished before, {len(pending)} to run on "
            f"{ex.describe()}")
        try:
            _drive(ex, folder, pending, finished, failed=failed, quiet=quiet, poll=poll, entry=entry, log=log,
                   configs=configs)
        except KeyboardInterrupt:
            log("sweep: interrupted; stopping the running runs (a rerun resumes them)")
            ex.stop()
        finally:
            ex.close()
    ended = set(finished) | {f[0] for f in failed}
    remaining = [c.name for c in cells if c.state != "done" and c.name not in ended]
    result = SweepResult(folder, finished, before, failed, remaining)
    for line in summary_lines(result, grid):
        log(line)
    return result


@contextmanager
def sweep_lock(folder: Path):
    """One `musk sweep` at a time drives a sweep folder: two would start the same runs twice."""
    import fcntl

    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / LOCK, "a+")
    except OSError as e:
        raise MuskError(f"cannot write the sweep folder {folder}: {e}. No run was started.") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise MuskError(f"another musk sweep is running on {folder} ({f.read().strip() or 'pid unknown'}); "
                            "wait for it, or stop it (a rerun resumes its runs)") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def _drive(ex, folder: Path, pending: list[Cell], finished: list, *, failed: list, quiet: float, poll: float,
           entry: list[str] | None, log, configs: dict) -> None:
    """Start cells while the executor has room, print their progress, record how each ended."""
    from sweep.executors import Job
    from sweep.watch import RunWatcher, duration

    (folder / LOGS).mkdir(parents=True, exist_ok=True)
    running: dict[str, tuple[Cell, RunWatcher, float]] = {}
    while pending or running:
        while pending and ex.capacity() > 0:
            c = pending.pop(0)
            logf = folder / LOGS / f"{c.name}.log"
            cmd = train_command(c, c.state == "resume", None, entry, configs[c.name])
            where = ex.start(Job(c.name, cmd, logf, os.getcwd()))
            w = RunWatcher(c.name, c.folder, c.steps, c.train.run.log_freq, test_freq=c.train.eval.test_freq,
                           log=logf, quiet=quiet)
            running[c.name] = (c, w, time.monotonic())
            log(f"{w.prefix()} {'resuming' if c.state == 'resume' else 'started'} on {where}; log: {logf}")
        for c, w, _ in running.values():
            for line in w.poll():
                log(line)
        for name, rc in ex.poll():
            c, w, t0 = running.pop(name)
            for line in w.poll():
                log(line)
            took = duration(time.monotonic() - t0)
            if rc == 0:
                finished.append(name)
                acc = RunFolder(c.folder).read_summary().get("final_val_accuracy")
                shown = f"{100 * acc:.1f}%" if isinstance(acc, (int, float)) else acc
                log(f"[{name} {c.steps}/{c.steps}] finished in {took}: final val accuracy {shown}")
            else:
                logf = folder / LOGS / f"{name}.log"
                failed.append((name, rc, logf))
                log(f"{w.prefix()} FAILED (exit {rc}) after {took}: {_last_line(logf)} | log: {logf}")
        if pending or running:
            time.sleep(poll)


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
