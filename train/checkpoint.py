"""Checkpoints that resume bit for bit: trainable weights (LoRA + g_phi), AdamW state, RNG state
and the data position. Written through core.atomic (temporary folder, fsync, rename), so a kill never leaves half of one.

Every file is read with torch.load(weights_only=True): tensors and plain containers only, so a run
folder from someone else cannot run code on resume. The RNG states are stored as tensors and ints
(rng_state); an rng.pt of an older musk (pickled numpy and Python objects) is refused, not unpickled."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from cache.run_folder import RunFolder
from core.atomic import atomic_path
from core.errors import MuskError


def trainable_state(named_params) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in named_params if p.requires_grad}


REFERENCE = "reference.pt"  # GRPO's KL reference after a warm-up: {"lora": ..., "adapter": ...} (train/recipes.py)


def save_checkpoint(run: RunFolder, step: int, model, adapter, *, optimizer, state: dict,
                    reference: dict | None = None) -> Path:
    """A checkpoint folder for `step`; reference: the KL reference after a warm-up (train/recipes.reference_state:
    tensors only), kept beside the weights so a resume past the warm-up reads the same reference."""
    final = run.checkpoint(step)
    with atomic_path(final, directory=True) as tmp:
        _write_checkpoint(tmp, step, model, adapter, optimizer=optimizer, state=state)
        if reference is not None:
            torch.save(reference, tmp / REFERENCE)
    return final


def load_reference(path: Path) -> dict | None:
    """The KL reference a checkpoint folder keeps ({"lora", "adapter"} state), None when it keeps none."""
    return safe_load(path / REFERENCE) if (path / REFERENCE).is_file() else None


def _write_checkpoint(tmp: Path, step: int, model, adapter, *, optimizer, state: dict) -> None:
    torch.save(trainable_state(model.named_parameters()), tmp / "lora.pt")
    torch.save(adapter.state_dict(), tmp / "adapter.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}))


def load_checkpoint(path: Path, model, adapter, optimizer=None) -> dict:
    """LoRA, g_phi, the optimizer (when given: evaluation has none) and the RNG states of a checkpoint
    folder; returns its state.json ({step, cursor})."""
    lora = safe_load(path / "lora.pt")
    params = dict(model.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    check_lora_loaded(path / "lora.pt", missing=sorted(trained - set(lora)), unexpected=sorted(set(lora) - set(params)))
    with torch.no_grad():
        for n, v in lora.items():
            params[n].copy_(v)
    adapter.load_state_dict(safe_load(path / "adapter.pt"))
    if optimizer is not None:
        optimizer.load_state_dict(safe_load(path / "optimizer.pt"))
    set_rng_state(load_rng(path / "rng.pt"))
    return json.loads((path / "state.json").read_text())


def check_lora_loaded(path: Path, missing: list[str], unexpected: list[str]) -> None:
    """Refuse weights that leave a trained LoRA tensor untouched or name tensors the policy lacks
    (another model's adapter, renamed keys): evaluating them would evaluate the untrained LoRA.
    missing: the policy's LoRA (trained) tensor names the file lacks; unexpected: the file's names the
    policy lacks (a load result's missing_keys filtered to LoRA names, and its unexpected_keys).
    Raises MuskError naming the file and a few keys of each."""
    if missing or unexpected:
        few = lambda keys: ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")  # noqa: E731
        raise MuskError(f"{str(path)!r} does not fit this policy: {len(missing)} trained LoRA tensor(s) it does not "
                        f"set{': ' + few(missing) if missing else ''}; {len(unexpected)} tensor(s) the policy lacks"
                        f"{': ' + few(unexpected) if unexpected else ''}. Was it saved from this run's policy and "
                        "lora_target_modules?")


def rng_state() -> dict:
    """The torch, numpy, Python and CUDA generators' states as tensors and ints (what
    torch.load(weights_only=True) reads back): torch [5056] uint8; numpy MT19937 key [624] int64 with
    pos, has_gauss, cached_gaussian; Python's Mersenne Twister [625] int64 with its gauss_next
    (None or float); cuda: one uint8 tensor per device, or None."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    return {"format": 2, "torch": torch.get_rng_state(),
            "numpy": {"kind": str(kind), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
            "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                       "gauss_next": gauss_next},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def safe_load(path: Path):
    """torch.load(path, weights_only=True): tensors and plain containers only, never code. Raises
    MuskError naming the file when it holds anything else (a crafted pickle, an older musk's rng.pt
    with pickled numpy and Python objects) or cannot be read."""
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise MuskError(f"{str(path)!r} is missing: the checkpoint is incomplete") from None
    except Exception as e:  # pickle.UnpicklingError for objects outside the allowed set, RuntimeError, EOFError
        raise MuskError(
            f"{str(path)!r} holds objects other than tensors and plain data, so it is not loaded (loading it "
            f"could run code; {type(e).__name__}). If it is an rng.pt of an older musk, the run resumes only "
            "from a checkpoint of this version: start the run again, or evaluate the checkpoint's weights "
            "(musk eval --checkpoint final) without resuming.") from None


def load_rng(path: Path) -> dict:
    """rng_state() as saved at `path` (safe_load). Raises MuskError naming the file when it is not
    such a record."""
    rng = safe_load(path)
    if not isinstance(rng, dict) or rng.get("format") != 2:
        raise MuskError(f"{str(path)!r} is not an RNG state this musk wrote (no format 2 record)")
    return rng


def set_rng_state(rng: dict) -> None:
    """Restore the generators from rng_state()'s record."""
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
