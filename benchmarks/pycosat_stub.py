"""A stand-in for pycosat on a machine where it cannot be installed (it has C code and no binary
wheel; benchmarks/gpu_wheels.py). reasoning-gym imports it at `import reasoning_gym` but calls it only
to generate zebra puzzles, which the GPU check never does; a call says so instead of solving."""


def _absent(*args, **kwargs):
    raise ImportError("pycosat is not installed on this machine (a stand-in from benchmarks/pycosat_stub.py): "
                      "reasoning-gym's zebra puzzles cannot be generated here")


solve = itersolve = _absent
