"""The wheels benchmarks/gpu.sh installs on a GPU machine with no package index: fetched for that
machine's Python and platform, and checked tag by tag before anything is installed.

    python benchmarks/gpu_wheels.py fetch DIR [--python 3.12]   # here, with an index: DIR/*.whl + DIR/requirements.txt
    python benchmarks/gpu_wheels.py check DIR [--python X.Y]    # there (or here for X.Y): exit 2 naming each misfit
    python benchmarks/gpu_wheels.py check benchmarks/gpu_wheels.txt --python 3.12   # the names fetch got last

fetch downloads binary wheels only (pip download --only-binary=:all: --python-version X.Y
--implementation cp --platform manylinux...x86_64), each with --no-deps, walking the Requires-Dist
of every wheel it gets (markers evaluated for the target). It skips what the GPU machine's image
already holds (IMAGE_HAS) and what nothing on gpu.sh's path imports (LEFT_OUT: pycosat, a C
extension with no binary wheel, which reasoning-gym pins for its zebra puzzles only, imported when
such a puzzle is generated; polars, ~54 MB, used by `musk report` and GSM8K loading). A pure-Python
package published as a source archive only (zss, cellpylib) is built here into a py3-none-any wheel;
one with compiled code is refused by name. gpu.sh installs with --no-deps, so reasoning-gym's pin
on pycosat is not resolved there either.
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# The GPU image's Python and platform (/work/.library/device/KINDS.md: Python 3.12.3, x86-64, glibc >= 2.28).
PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64", "linux_x86_64")
LIST = Path(__file__).with_name("gpu_wheels.txt")  # the wheel names fetch got last (gpu.sh --tiny checks them)
WANTS = ("reasoning-gym>=0.1.20",)  # musk's needs on gpu.sh's path that the image lacks (pytest, hypothesis: it has them)
LEFT_OUT = {"pycosat": "C code, no binary wheel; only reasoning-gym's zebra puzzles import it",
            "polars": "~54 MB; only `musk report` and GSM8K loading import it"}
IMAGE_HAS = set("""absl-py accelerate aiofiles aiohttp annotated-doc anyio attrs certifi charset-normalizer click
cloudpickle colorama contourpy cycler cython einops filelock fonttools fsspec h11 h5py hf-xet httpcore httpx
huggingface-hub hypothesis idna iniconfig jinja2 joblib kiwisolver markdown-it-py markupsafe matplotlib mdurl
mpmath networkx numpy packaging pandas peft pillow pip pluggy protobuf psutil pyarrow pygments pyparsing pytest
python-dateutil pyyaml regex requests rich safetensors scikit-learn scipy sentencepiece setuptools shellingham six
sympy tabulate tokenizers torch tqdm transformers triton typer typing-extensions urllib3 wheel xxhash""".split())


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def target_tags(python: str = PYTHON, platforms=PLATFORMS) -> set[str]:
    """The wheel tags (interpreter-abi-platform) a CPython `python` on `platforms` installs."""
    from packaging import tags

    v = tuple(int(x) for x in python.split("."))
    cp = f"cp{v[0]}{v[1]}"
    found = list(tags.cpython_tags(python_version=v, abis=[cp, "abi3", "none"], platforms=list(platforms)))
    found += list(tags.compatible_tags(python_version=v, interpreter=cp, platforms=list(platforms)))
    return {str(t) for t in found}


def misfits(names: list[str], supported: set[str]) -> list[str]:
    """'file: why' for each wheel file name that `supported` (tag strings) cannot install: not a
    wheel, or no tag of its name among them. Empty when every one fits."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    out = []
    for name in names:
        try:
            _, _, _, tags = parse_wheel_filename(name)
        except InvalidWheelFilename as e:
            out.append(f"{name}: not a wheel ({e})")
            continue
        if not any(str(t) in supported for t in tags):
            out.append(f"{name}: built for {', '.join(sorted(str(t) for t in tags))}")
    return out


def requires(wheel: Path, python: str) -> list[str]:
    """The requirements a wheel's METADATA lists for a Linux x86-64 CPython `python`, extras off."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    out = []
    for ln in lines:
        if ln.startswith("Requires-Dist:"):
            r = Requirement(ln.split(":", 1)[1].strip())
            if r.marker is None or r.marker.evaluate(env):
                out.append(str(r).split(";")[0].strip())
    return out


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def fetch_one(req: str, folder: Path, python: str) -> Path:
    """One wheel of `req` for the target, binary only; a source-only pure-Python package is built here
    (and must come out py3-none-any). Raises SystemExit naming the package otherwise."""
    before = set(folder.glob("*.whl"))
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    p = _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python, "--implementation",
             "cp", *plat, "-d", str(folder), req)
    if p.returncode != 0:  # no binary wheel: build one here, accepted only if it is pure Python
        with tempfile.TemporaryDirectory() as tmp:
            p = _pip("wheel", "-q", "--no-deps", "--no-binary=:all:", "-w", tmp, req)
            built = list(Path(tmp).glob("*.whl"))
            if p.returncode != 0 or not built or misfits([b.name for b in built], target_tags(python)):
                raise SystemExit(f"gpu_wheels: {req} has no wheel for CPython {python} on Linux x86-64 and does not "
                                 f"build into a pure-Python one ({(p.stderr or '').strip()[-300:]}); leave it out "
                                 "(LEFT_OUT) if nothing on gpu.sh's path imports it")
            target = folder / built[0].name
            target.write_bytes(built[0].read_bytes())
    new = set(folder.glob("*.whl")) - before
    return new.pop() if new else next(w for w in folder.glob("*.whl") if norm(w.name.split("-")[0]) == norm(
        re.split(r"[<>=!~; \[]", req)[0]))


def fetch(folder: Path, python: str = PYTHON, wants=WANTS) -> list[Path]:
    """Every wheel gpu.sh needs beside the image's packages, for CPython `python`: wants and what
    they require, minus IMAGE_HAS and LEFT_OUT. Writes requirements.txt (the wheels' names)."""
    from packaging.requirements import Requirement

    folder.mkdir(parents=True, exist_ok=True)
    todo, seen, got = list(wants), set(), []
    while todo:
        req = todo.pop(0)
        name = norm(Requirement(req).name)
        if name in seen or name in IMAGE_HAS or name in LEFT_OUT:
            continue
        seen.add(name)
        wheel = fetch_one(req, folder, python)
        got.append(wheel)
        todo += requires(wheel, python)
    bad = misfits([w.name for w in got], target_tags(python))
    if bad:
        raise SystemExit("gpu_wheels: wheels that CPython " + python + " cannot install:\n  " + "\n  ".join(bad))
    (folder / "requirements.txt").write_text("".join(f"{w.name}\n" for w in sorted(got)))
    return got


def wheel_names(folder: Path) -> list[str]:
    """The *.whl names in `folder`, or the names listed in a file (LIST: one a line, # comments)."""
    if folder.is_file():
        return [ln.strip() for ln in folder.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return sorted(w.name for w in folder.glob("*.whl"))


def check(folder: Path, python: str | None) -> list[str]:
    """misfits() of the folder's wheels (or of the names in a LIST-style file) against `python` (X.Y, Linux x86-64) or, when None, against the
    running interpreter's own tags (what pip on this machine installs)."""
    if python is None:
        from packaging import tags

        supported = {str(t) for t in tags.sys_tags()}
    else:
        supported = target_tags(python)
    names = wheel_names(folder)
    left = [n for n in names if norm(n.split("-")[0]) in LEFT_OUT]
    return misfits(names, supported) + [f"{n}: left out on purpose ({LEFT_OUT[norm(n.split('-')[0])]})" for n in left]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("fetch", "check"))
    ap.add_argument("folder")
    ap.add_argument("--python", default=None, help=f"X.Y (fetch default {PYTHON}; check default: this interpreter)")
    args = ap.parse_args()
    folder = Path(args.folder)
    if args.action == "fetch":
        got = fetch(folder, args.python or PYTHON)
        LIST.write_text(f"# benchmarks/gpu_wheels.py fetch for CPython {args.python or PYTHON}, {datetime.date.today()}\n"
                        + "".join(f"{w.name}\n" for w in sorted(got)))
        size = sum(w.stat().st_size for w in got) / 2**20
        print("\n".join(w.name for w in got) + f"\n{folder}: {len(got)} wheels, {size:.1f} MB for CPython "
              f"{args.python or PYTHON}")
        return
    bad = check(folder, args.python)
    if bad:
        print(f"gpu_wheels: {len(bad)} wheel(s) in {folder} would not install here; nothing was installed:\n  "
              + "\n  ".join(bad), file=sys.stderr)
        sys.exit(2)
    print(f"gpu_wheels: {len(wheel_names(folder))} wheels in {folder} fit CPython {args.python or 'here'}")


if __name__ == "__main__":
    main()
