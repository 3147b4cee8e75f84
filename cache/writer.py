"""Crash-safe cache writing.

HDF5 is not safe against a writer killed mid-write (a SIGKILL can leave a file that no longer
opens), so extraction never writes the final file incrementally:

1. every finished batch goes to `<out>.parts/<group>/<kind>_<batch>.npz`, written under a temporary
   name and renamed (a batch is either wholly there or absent);
2. when every batch of every new group is there, the cache is assembled into `<out>.tmp<pid>`
   (a copy of the existing cache, if any, plus the new groups), flushed, fsynced, marked
   complete, and renamed over `<out>` in one step.

A kill at any moment therefore leaves the old cache (or none) and a set of finished batches that
the rerun picks up; the content equals an uninterrupted run's because batches are deterministic.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np

from cache.schema import SCHEMA_VERSION, open_failure, versions
from core.atomic import atomic_path, atomic_write_bytes
from core.errors import MuskError

STR = h5py.string_dtype("utf-8")


class PartsStore:
    """Finished batches of an extraction in progress, tied to the prompt-config fingerprint and to the
    layout settings (batch sizes, padding, prefix sharing, dtype) that decide what each batch holds.

    A rerun of another prompt config clears the folder (scratch of another config is worthless); a
    rerun of the same config with other layout settings is refused, naming them, because its batch
    b would stand for other rows than the stored batch b.
    """

    def __init__(self, out: Path, data_fp: str, layout: dict | None = None):
        self.root = Path(str(out) + ".parts")
        manifest = self.root / "manifest.json"
        layout = layout or {}
        if self.root.exists():
            try:
                old = json.loads(manifest.read_text())
            except (OSError, ValueError):
                old = {}
            if old.get("data_fingerprint") != data_fp:  # scratch of another config: worthless here
                shutil.rmtree(self.root)
            elif old.get("layout", {}) != layout:
                was = old.get("layout", {})
                diff = ", ".join(f"{k}: {was.get(k)!r} then, {layout.get(k)!r} now"
                                 for k in sorted(set(was) | set(layout)) if was.get(k) != layout.get(k))
                raise MuskError(
                    f"an interrupted extraction into {str(out)!r} used other settings ({diff}); its finished "
                    f"batches would stand for other rows. Rerun with the settings it used to complete it, or "
                    f"delete {str(self.root)!r} to start over."
                )
        self.root.mkdir(parents=True, exist_ok=True)
        if not manifest.exists():
            atomic_write_bytes(manifest, json.dumps({"data_fingerprint": data_fp, "layout": layout}).encode())

    def _path(self, group: str, kind: str, batch: int) -> Path:
        return self.root / group / f"{kind}_{batch:06d}.npz"

    def has(self, group: str, kind: str, batch: int) -> bool:
        return self._path(group, kind, batch).exists()

    def save(self, group: str, kind: str, batch: int, **arrays: np.ndarray) -> None:
        with atomic_path(self._path(group, kind, batch)) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)  # a file object: np.savez would append .npz to a path

    def load(self, group: str, kind: str, batch: int) -> dict[str, np.ndarray]:
        with np.load(self._path(group, kind, batch), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def save_prompts(self, prompts: list[dict]) -> None:
        atomic_write_bytes(self.root / "prompts.json", json.dumps(prompts).encode())

    def load_prompts(self) -> list[dict] | None:
        p = self.root / "prompts.json"
        return json.loads(p.read_text()) if p.exists() else None

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _h5_strings(values) -> np.ndarray:
    """UTF-8 strings for HDF5, which cannot store NUL inside a variable-length string."""
    return np.array([str(v).replace("\x00", "\ufffd") for v in values], dtype=object)


def assemble(
    out: Path,
    *,
    prompts: dict[str, list[str]] | None,
    experts: list[tuple[str, dict, dict[str, np.ndarray]]],
    routers: list[tuple[str, dict, np.ndarray]],
    root_attrs: dict,
    updates: list[tuple[str, dict, dict[str, np.ndarray]]] = (),
) -> None:
    """Write `out` atomically: the existing cache (if any) plus new expert and router groups.

    prompts: column -> list of str, only when creating a new cache.
    experts: (name, attrs, datasets) per new expert; routers: (encoder, attrs, embedding).
    updates: (name, attrs, datasets) added to an expert the cache holds (its solo answers); a dataset
    of that name is replaced, every other dataset of the group is copied as it was.
    """
    out = Path(out)
    now = versions()
    with atomic_path(out) as tmp:
        if out.exists():
            shutil.copyfile(out, tmp)
        try:
            f = h5py.File(tmp, "a")
        except OSError as e:
            raise MuskError(open_failure(out, e)) from None
        with f:
            f.attrs["complete"] = False
            _keep_versions(f)
            _write_groups(f, prompts, experts, routers, now)
            replaced = _update_groups(f, updates, now)
            f.attrs["musk_schema"] = SCHEMA_VERSION
            f.attrs["versions"] = f.attrs.get("versions", now)  # the versions the cache was made with
            for k, v in root_attrs.items():
                f.attrs[k] = v
            f.attrs["complete"] = True
        if replaced:  # a deleted dataset's bytes stay in the file as dead space until it is rewritten
            repack(tmp)


def _keep_versions(f: h5py.File) -> None:
    """Groups of a cache written before parts carried their own versions get the root's (the
    versions of the last write, which made them or came after them): stamped once, never overwritten."""
    old = f.attrs.get("versions")
    if old is None:
        return
    for kind in ("experts", "router"):
        for g in f.get(kind, {}).values():
            if "versions" not in g.attrs:
                g.attrs["versions"] = old
            if kind == "experts" and "solo" in g and "solo_versions" not in g.attrs:
                g.attrs["solo_versions"] = old


def repack(path: Path) -> None:
    """Rewrite the HDF5 file at `path` with its live objects only (h5repack's effect: what deleted
    datasets left behind is dropped). Every group, dataset and attribute is copied as it is."""
    path = Path(path)
    packed = path.with_name(path.name + ".repack")
    with h5py.File(path, "r") as src, h5py.File(packed, "w") as dst:
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        for name in src:
            src.copy(src[name], dst, name=name)
    packed.replace(path)


def _write_groups(f: h5py.File, prompts, experts, routers, now: str) -> None:
    if prompts is not None:
        g = f.require_group("prompts")
        for col, values in prompts.items():
            g.create_dataset(col, data=_h5_strings(values), dtype=STR)
    for name, attrs, arrays in experts:
        g = f.require_group("experts").create_group(name)
        for k, v in {**attrs, "versions": now, **({"solo_versions": now} if "solo" in arrays else {})}.items():
            g.attrs[k] = v
        for k, v in arrays.items():
            if v.dtype.kind in ("U", "O"):
                g.create_dataset(k, data=_h5_strings(v), dtype=STR)
            else:
                g.create_dataset(k, data=v)
    for name, attrs, emb in routers:
        g = f.require_group("router").create_group(name)
        for k, v in {**attrs, "versions": now}.items():
            g.attrs[k] = v
        g.create_dataset("embedding", data=emb.astype(np.float32))


def _update_groups(f: h5py.File, updates, now: str) -> bool:
    """Add or replace datasets of existing expert groups (solo answers, stamped solo_versions: now).
    Returns whether a dataset was replaced (the file then holds dead space)."""
    replaced = False
    for name, attrs, arrays in updates:
        g = f["experts"][name]
        for k, v in {**attrs, "solo_versions": now}.items():
            g.attrs[k] = v
        for k, v in arrays.items():
            if k in g:
                del g[k]
                replaced = True
            if v.dtype.kind in ("U", "O"):
                g.create_dataset(k, data=_h5_strings(v), dtype=STR)
            else:
                g.create_dataset(k, data=v)
    return replaced
