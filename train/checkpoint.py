"""Checkpoints that resume bit for bit: trainable weights (LoRA + g_phi), AdamW state, RNG state
and the data position. Written to a temporary folder and renamed, so a kill never leaves half of one."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch


def trainable_state(named_params) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in named_params if p.requires_grad}


def save_checkpoint(run: Path, step: int, model, adapter, optimizer, state: dict) -> Path:
    final = run / "checkpoints" / f"step_{step}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(trainable_state(model.named_parameters()), tmp / "lora.pt")
    torch.save(adapter.state_dict(), tmp / "adapter.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def latest_checkpoint(run: Path) -> Path | None:
    root = run / "checkpoints"
    if not root.is_dir():
        return None
    steps = [int(p.name.split("_")[1]) for p in root.iterdir()
             if p.is_dir() and p.name.startswith("step_") and p.name.split("_")[1].isdigit()]
    return root / f"step_{max(steps)}" if steps else None


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


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records past `max_step` (written after the checkpoint by a run that was killed)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= max_step]
    path.write_text("".join(line + "\n" for line in keep))
