"""Numbers that are numbers: a NaN or infinite float is refused in every config key and float flag,
the key or flag named (a NaN passes every `<= 0` check and runs to nonsense)."""

import dataclasses
import math
import re
import typing

import pytest
from typer.testing import CliRunner

from cli import app
from core.config import from_dict
from core.errors import MuskError
from pipeline.extract import ExtractConfig
from pipeline.probes import ProbeConfig
from pipeline.tasks import TaskConfig
from train.config import TrainConfig, parse_train_sets

BAD = [math.nan, math.inf, -math.inf, "nan", "inf", "-Infinity"]


def _float_fields(cls) -> list[str]:
    """Float keys of cls, dotted into its nested sections (`grpo.beta`)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and cls is TrainConfig:
            out += [f"{f.name}.{k}" for k in _float_fields(tp)]
        elif tp is float or (float in typing.get_args(tp) and tp is not typing.Any):
            out.append(f.name)
    return out


def _nested(key: str, value) -> dict:
    head, _, rest = key.partition(".")
    return {head: _nested(rest, value) if rest else value}


@pytest.mark.parametrize("cls", [TrainConfig, TaskConfig, ExtractConfig, ProbeConfig])
def test_every_float_key_refuses_non_finite(cls):
    fields = _float_fields(cls)
    assert fields  # the test has keys to see
    for name in fields:
        for bad in BAD:
            with pytest.raises(MuskError, match=rf"^cfg\.{re.escape(name)}: expected a finite number, got "):
                from_dict(cls, _nested(name, bad), "cfg")
    assert len(_float_fields(TrainConfig)) >= 10


def test_nested_and_mapping_values_are_checked():
    from core.config import check_finite

    with pytest.raises(MuskError, match=r"task\.datasets\.aiw\.weight: expected a finite number, got nan"):
        from_dict(ExtractConfig, {"task": {"family": "logic", "datasets": {"aiw": {"weight": math.nan}}}})
    with pytest.raises(MuskError, match=r"x\.a\[1\]\.b: expected a finite number, got inf"):
        check_finite({"a": [1.0, {"b": math.inf}]}, "x")
    assert check_finite({"a": [1.0, {"b": 2}], "s": "nan"}, "x") == {"a": [1.0, {"b": 2}], "s": "nan"}  # text stays
    assert from_dict(TrainConfig, {"sampling": {"temperature": "0.7"}}).sampling.temperature == 0.7  # numbers as text still read


def test_set_names_the_key():
    with pytest.raises(MuskError, match="--set sampling.temperature: expected a finite number, got nan"):
        parse_train_sets(["temperature=nan"])
    with pytest.raises(MuskError, match="--set grpo.beta: expected a finite number, got inf"):
        parse_train_sets(["grpo.beta=.inf"])


def _cli(args):
    res = CliRunner().invoke(app, args)
    return res.exit_code, res.output + (res.stderr if res.stderr_bytes is not None else "")


@pytest.mark.parametrize("args,flag", [
    (["eval", "RUN", "--samples", "4", "--temperature", "nan"], "--temperature"),
    (["eval", "RUN", "--temperature", "inf"], "--temperature"),
    (["train", "--cache", "c.h5", "--method", "single", "--lr", "nan"], "--lr"),
    (["train", "--cache", "c.h5", "--method", "single", "--grad-clip", "-inf"], "--grad-clip"),
    (["sweep", "grid.yaml", "--dry-run", "--step-seconds", "nan"], "--step-seconds"),
])
def test_float_flags_refuse_non_finite(args, flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = _cli(args)
    assert code == 2 and f"musk: error: {flag}: expected a finite number" in out, out
    assert "Traceback" not in out and list(tmp_path.iterdir()) == []


def test_eval_request_refuses_nan_before_reading_anything(tmp_path):
    from evaluate.run import EvalRequest, run_eval

    with pytest.raises(MuskError, match="--temperature: expected a finite number, got nan"):
        run_eval(EvalRequest(run=tmp_path / "no-run", samples=4, temperature=math.nan), progress=False)
