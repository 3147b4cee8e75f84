"""--report-to: trackers mirror metrics.jsonl; a missing one stops before work; a failing one is dropped."""

import struct

import pytest
from typer.testing import CliRunner

import train.loop
import train.trackers
from cli import app
from train.config import load_train_config
from train.loop import run_train
from train.trackers import matrices, scalars
from tests.helpers import quiet_train, tiny_train_overrides

QUIET = quiet_train()


def test_scalars_and_matrices_by_hand():
    rec = {"step": 3, "kl": 0.5, "ok": True, "routing/utilization": [0.25, 0.75], "routing/attention": [[1, 0], [0, 1]],
           "note": "x", "empty": []}
    assert scalars(rec) == {"step": 3.0, "kl": 0.5, "ok": 1.0, "routing/utilization/0": 0.25,
                            "routing/utilization/1": 0.75}
    m = matrices(rec)
    assert list(m) == ["routing/attention"] and m["routing/attention"].shape == (2, 2)


def _events(folder):
    """(tag, step, value) of every scalar in a TensorBoard event folder (TFRecord framing, by hand)."""
    from tensorboardX.proto.event_pb2 import Event

    out, images = [], []
    for f in sorted(folder.glob("events.out.tfevents.*")):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos: pos + 8])
            ev = Event.FromString(data[pos + 12: pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                if v.HasField("image"):
                    images.append((v.tag, ev.step))
                elif v.HasField("simple_value") or v.tag:
                    out.append((v.tag, ev.step, v.simple_value))
    return out, images


@pytest.mark.slow
def test_tensorboard_gets_every_metrics_key(tiny_cache, tiny_policy, tmp_path):
    ov = tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=2, report_to=["tensorboard"])
    run = run_train(load_train_config(None, ov), tiny_cache, tmp_path / "tb", **QUIET)
    import json

    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    got, images = _events(run / "tensorboard")
    by = {(t, s): v for t, s, v in got}
    for rec in metrics:
        for k, v in scalars(rec).items():
            assert by[(k, rec["step"])] == pytest.approx(v, rel=1e-6), k
    assert ("routing/attention", 1) in images and ("routing/attention", 2) in images
    assert any(t == "eval/full/accuracy" for t, _, _ in got)


def test_missing_tracker_stops_before_any_work(tiny_cache, tmp_path, monkeypatch):
    real = train.trackers.importlib.util.find_spec
    monkeypatch.setattr(train.trackers.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    res = CliRunner().invoke(app, ["train", "--cache", str(tiny_cache), "--method", "single", "--report-to", "wandb",
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "pip install -e '.[wandb]'" in res.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_failing_tracker_is_reported_once_and_the_run_goes_on(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    calls, lines = [], []

    def broken(self, record, step):
        calls.append(step)
        raise OSError("No space left on device")

    monkeypatch.setattr(train.trackers.TensorBoard, "log", broken)
    ov = tiny_train_overrides(tiny_policy, method="single", total_training_steps=3, report_to=["tensorboard"])
    run = run_train(load_train_config(None, ov), tiny_cache, tmp_path / "f", **quiet_train(log=lines.append))
    assert calls == [1]  # dropped after its first failure
    assert sum("tracker tensorboard failed" in x for x in lines) == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
