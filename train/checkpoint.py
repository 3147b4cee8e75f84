"""Checkpoints that resume bit for bit: trainable weights (LoRA + g_phi), AdamW state, RNG state
and the data position. Written through core.atomic (temporary folder, fsync, rename), so a kill never leaves half of one."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from cache.run_folder import RunFolder
from core.atomic import atomic_path


def trainable_state(named_params) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in named_params if p.requires_grad}


def save_checkpoint(run: RunFolder, step: int, model, adapter, optimizer, state: dict) -> Path:
    final = run.checkpoint(step)
    with atomic_path(final, directory=True) as tmp:
        _write_checkpoint(tmp, step, model, adapter, optimizer, state)
    return final


def _write_checkpoint(tmp: Path, step: int, model, adapter, optimizer, state: dict) -> None:
    torch.save(trainable_state(model.named_parameters()), tmp / "lora.pt")
    torch.save(adapter.state_dict(), tmp / "adapter.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}))


def load_checkpoint(path: Path, model, adapter, optimizer) -> dict:
    lora = torch.load(path / "lora.pt", weights_only=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in lora.items():
            params[n].copy_(v)
    adapter.load_state_dict(torch.load(path / "adapter.pt", weights_only=True))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text())
