"""Edge cases of files from elsewhere and of the cache: no file is unpickled, a completed cache keeps
each part's versions and no dead space, a lock failure says how to turn locking off, Ray runs get the
sweep's environment, eval refuses an adapter that loads nothing, the float32 LM head."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from core.errors import MuskError
from train import checkpoint as ckpt


class _Plant:
    """A pickle that creates a file when it is loaded (what a crafted rng.pt does)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # a cached Gaussian in numpy's state
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.standard_normal(3), random.random(), random.gauss(0, 1))
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    ckpt.set_rng_state(ckpt.load_rng(tmp_path / "rng.pt"))
    got = (torch.rand(3), np.random.standard_normal(3), random.random(), random.gauss(0, 1))
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2:] == got[2:]


@pytest.mark.parametrize("payload", ["crafted", "old"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_crafted_or_old_rng_pt_is_refused_by_name_and_never_unpickled(tmp_path, payload):
    folder = tmp_path / "step_1"
    folder.mkdir()
    planted = tmp_path / "planted"
    if payload == "crafted":
        with open(folder / "rng.pt", "wb") as f:
            pickle.dump({"torch": _Plant(str(planted))}, f)
    else:  # what an older musk wrote: numpy and Python objects
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": None}, folder / "rng.pt")
    lin = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(lin.parameters())
    torch.save({}, folder / "lora.pt"), torch.save(lin.state_dict(), folder / "adapter.pt")
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    with pytest.raises(MuskError, match="rng.pt") as e:
        ckpt.load_checkpoint(folder, lin, lin, opt)
    assert str(folder / "rng.pt") in str(e.value) and "start the run again" in str(e.value)
    assert not planted.exists()
