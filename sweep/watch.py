"""Progress of the runs of a sweep, read from their run folders (metrics.jsonl, eval.jsonl), not from
their output: the same lines whichever executor runs them, and a run's own log stays untouched.

Every line names its run and how far it is: `[perceiver-s0 7/20] reward 0.375 ...`. A run prints a line
per log_freq steps (its config's), one per evaluation, and a heartbeat when it has said nothing for
`quiet` seconds (loading, evaluating), so a sweep is never silent for long.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cache.run_folder import EVAL, METRICS, RunFolder


def duration(seconds: float) -> str:
    """7 -> '7s', 95 -> '1m 35s', 7300 -> '2h 01m'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


class _Tail:
    """New complete JSON lines of a file that is appended to (and, on a resume, rewritten shorter)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:  # truncated by a resume: read it again (the caller skips what it printed)
            self.offset = 0
        if size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n") + 1  # a line being written is read next time
        self.offset += end
        out = []
        for line in chunk[:end].splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


class RunWatcher:
    """Lines for one running cell. `poll()` returns the lines that are due now."""

    def __init__(self, name: str, folder: Path, steps: int, log_freq: int, *, test_freq: int, log: Path,
                 quiet: float = 120.0, clock=time.monotonic):
        run = RunFolder(folder)
        last = run.latest_checkpoint()
        self.name, self.steps, self.log_freq, self.test_freq, self.log = name, steps, log_freq, test_freq, log
        self.step = self.start = int(last.name.split("_")[1]) if last is not None else 0  # a resume starts here
        self.metrics, self.evals = _Tail(run.log_path(METRICS)), _Tail(run.log_path(EVAL))
        self.seen_evals: set = set()
        self.step_seconds: list[float] = []
        self.quiet, self.clock = quiet, clock
        self.started = self.last_line = clock()

    def prefix(self) -> str:
        return f"[{self.name} {self.step}/{self.steps}]"

    def _step_line(self, r: dict) -> str:
        left = (self.steps - self.step) * sum(self.step_seconds) / len(self.step_seconds)
        return (f"{self.prefix()} reward {r.get('reward/mean', float('nan')):.3f} "
                f"acc {r.get('accuracy', float('nan')):.3f} kl {r.get('kl', float('nan')):.4f} | "
                f"{r.get('step_seconds', 0.0):.1f} s/step, ~{duration(left)} of steps left")

    def _eval_line(self, e: dict) -> str:
        kind = "eval" if e.get("kind", "full") == "full" else f"{e['kind']} eval"
        parts = [f"accuracy {100 * e['accuracy']:.1f}%"]
        for key, label in (("accuracy_without_context", "C removed"), ("accuracy_null_context", "C nulled")):
            if e.get(key) is not None:
                parts.append(f"{label} {100 * e[key]:.1f}%")
        return f"{self.prefix()} {kind} at step {e['step']} ({e.get('split', 'val')}, {e.get('n', '?')} prompts): " \
               + ", ".join(parts)

    def poll(self) -> list[str]:
        lines = []
        # in step order, a step's evaluation after the step itself: [(step, 0, metrics) | (step, 1, eval)]
        events = [(r.get("step", 0), 0, r) for r in self.metrics.read()] + \
                 [(e.get("step", 0), 1, e) for e in self.evals.read()]
        for step, is_eval, r in sorted(events, key=lambda x: x[:2]):
            if is_eval:
                key = (step, r.get("kind", "full"))
                if step > self.start and key not in self.seen_evals:  # not the evaluations before a resume
                    self.seen_evals.add(key)
                    lines.append(self._eval_line(r))
                continue
            if step <= self.step:
                continue  # printed before, or redone after a resume
            self.step = int(step)
            self.step_seconds.append(float(r.get("step_seconds", 0.0)))
            if self.step % self.log_freq == 0 or self.step == self.steps or len(self.step_seconds) == 1:
                lines.append(self._step_line(r))
        now = self.clock()
        if lines:
            self.last_line = now
        elif now - self.last_line >= self.quiet:
            lines.append(f"{self.prefix()} still running ({self.doing()}), {duration(now - self.last_line)} "
                         f"since its last line; its log: {self.log}")
            self.last_line = now
        return lines

    def doing(self) -> str:
        if not self.step_seconds:
            return "loading the policy and the cache, or the first step"
        if self.step >= self.steps:
            return "final evaluation and saving"
        if self.step % self.test_freq == 0:
            return "evaluating"
        return f"step {self.step + 1}"
