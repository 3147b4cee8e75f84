"""Null rejection rate, power against +5 points and mean width of the between-run intervals, by
simulation (analyze/calibration.py): the report's seed-and-question interval, the seed-level t
interval, the plain question bootstrap, and (with --old-ref) the former two-level bootstrap read
from git at that commit. Prints a markdown table (docs/evaluation.md holds one).

    PYTHONPATH=. python benchmarks/interval_calibration.py --draws 1000 --old-draws 200 --old-ref 18a8d9a
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analyze.calibration import DESIGNS, Decision, calibrate  # noqa: E402


def old_interval(ref: str, resamples: int):
    """fn(a, b, design) -> Decision from the two_level_bootstrap of analyze/stats.py at git `ref`."""
    src = subprocess.run(["git", "show", f"{ref}:analyze/stats.py"], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    mod = types.ModuleType("old_stats")
    exec(compile(src, "old_stats.py", "exec"), mod.__dict__)

    def fn(a, b, design):
        cis = [mod.two_level_bootstrap(x, y, paired_seeds=design == "paired", fixed_b=design == "fixed",
                                       resamples=resamples, seed=i) for i, (x, y) in enumerate(zip(a, b))]
        return Decision(np.array([c.excludes_zero() for c in cis]), np.array([c.hi - c.lo for c in cis]))
    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument("--old-ref", default=None, help="git commit whose two_level_bootstrap to measure beside")
    ap.add_argument("--old-draws", type=int, default=200)
    ap.add_argument("--old-resamples", type=int, default=1000)
    args = ap.parse_args()
    old = old_interval(args.old_ref, args.old_resamples) if args.old_ref else None
    print("| design | seed sd | seeds | questions | interval | null rejection | power at +5 | mean width (points) |")
    print("|---|---|---|---|---|---|---|---|")
    for design in DESIGNS:
        for sd in (0.04, 0.10):
            for seeds in (2, 3, 6):
                for n in (64, 256):
                    res = calibrate(design, seeds, n, sd, draws=args.draws)
                    if old is not None:
                        res |= calibrate(design, seeds, n, sd, draws=args.old_draws, kinds=(),
                                         extra={"old two-level": old})
                    for kind, r in res.items():
                        print(f"| {design} | {sd * 100:.0f} | {seeds} | {n} | {kind} | {r['null'] * 100:.1f}% | "
                              f"{r['power'] * 100:.1f}% | {r['width'] * 100:.1f} |", flush=True)


if __name__ == "__main__":
    main()
