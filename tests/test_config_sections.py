"""The train config in sections: one dotted key per setting, the flat spelling of older configs and run
folders as an alias, and every comparison (resume, sweep plan and names, report) the same for both."""

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.config import from_dict, to_dict
from core.errors import MuskError
from train.config import (FLAT, SECTIONS, TOP, TrainConfig, flat_dict, flatten, load_train_config, parse_train_sets,
                          sectioned)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_flat_names_are_unique_across_sections_and_cover_every_key():
    leaves = [(sec, f.name) for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    assert len(FLAT) == len(leaves) + len(TOP)  # no flat name is shared by two sections
    # a flat key is never a section's name, but for policy: a text value is policy.name, a mapping the section
    assert set(FLAT) & set(SECTIONS) == {"policy"} and sectioned({"policy": "x"}) == {"policy": {"name": "x"}}
    assert sorted(FLAT.values()) == sorted([*TOP, *(f"{s}.{k}" for s, k in leaves)])
    assert FLAT["beta"] == "grpo.beta" and FLAT["policy"] == "policy.name" and FLAT["lr"] == "optim.lr"


def test_literal_choices_match_the_code_that_reads_them():
    from pipeline.rewards import MODES
    from pipeline.vllm_engine import ENGINES
    from train.adapters import CONTEXT_ANCHORS, CONTEXT_GATES, FEATURE_NORMS
    from train.config import field_type

    def choices(key):
        return typing.get_args(field_type(key))

    assert choices("answer_extraction") == MODES and choices("rollout_engine") == ENGINES
    assert (choices("context_gate"), choices("context_anchor"), choices("feature_norm")) == (
        CONTEXT_GATES, CONTEXT_ANCHORS, FEATURE_NORMS)


@pytest.mark.parametrize("path", sorted((CONFIGS / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_every_train_preset_is_sectioned_and_reads_the_same_flat(path, tmp_path):
    data = yaml.safe_load(path.read_text())
    assert set(data) <= set(TOP) | set(SECTIONS), f"{path.name} has flat keys"
    flat = tmp_path / "flat.yaml"
    flat.write_text(yaml.safe_dump(flatten(data)))  # the preset as an older musk spelled it
    assert load_train_config(str(path)) == load_train_config(str(flat))


def _flat_grid(path: Path, tmp_path: Path) -> Path:
    """The grid file with every grid/set key in its flat spelling (as shipped before the sections)."""
    data = yaml.safe_load(path.read_text())
    for g in [data, *data.get("also", [])]:
        for k in ("grid", "set"):
            if k in g:
                g[k] = {FLAT.get(key, key) if "." not in key else key.split(".", 1)[1]: v for key, v in g[k].items()}
    out = tmp_path / path.name
    out.write_text(yaml.safe_dump(data))
    return out


@pytest.mark.parametrize("path", sorted((CONFIGS / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_grid_plans_the_same_runs_in_either_spelling(path, tmp_path, monkeypatch):
    from sweep.grid import expand, load_sweep_config

    monkeypatch.chdir(CONFIGS.parent)  # grids name their presets relative to the repository
    _, grids = load_sweep_config(path)
    _, flat_grids = load_sweep_config(_flat_grid(path, tmp_path))
    cells, flat_cells = expand(grids, tmp_path / "s"), expand(flat_grids, tmp_path / "s")
    assert [(c.name, c.train) for c in cells] == [(c.name, c.train) for c in flat_cells]
    assert cells.notes == flat_cells.notes
    for g in grids:
        assert all("." in k for k in [*g.grid, *g.set]), f"{path.name}: a flat grid key"
    if path.name == "table2.yaml":  # the run names of the shipped grid, as before the sections
        assert [c.name for c in cells][:2] == ["perceiver-pooling-first_token-s0", "perceiver-pooling-first_layer-s0"]


# Valid values per key, drawn so that the flat and the sectioned spelling can be compared.
def _values(key: str):
    from train.config import field_type

    tp = field_type(key)
    if typing.get_origin(tp) is typing.Literal:
        return st.sampled_from(typing.get_args(tp))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(min_value=0, max_value=40)
    if tp is float:
        return st.floats(min_value=0.0, max_value=2.0, allow_nan=False)
    return None


SCALARS = sorted(k for k in FLAT if k not in TOP and _values(k) is not None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(SCALARS), st.none(), min_size=1, max_size=8).flatmap(
    lambda keys: st.fixed_dictionaries({k: _values(k) for k in keys})))
def test_flat_and_sectioned_spellings_resolve_alike(flat):
    """Any keys and values: the flat dict, the dotted --set items and the sectioned YAML give one config,
    or the same refusal."""
    nested: dict = {}
    for k, v in flat.items():
        sec, leaf = FLAT[k].split(".")
        nested.setdefault(sec, {})[leaf] = v
    items = [f"{FLAT[k]}={json.dumps(v)}" for k, v in flat.items()]

    def resolve(overrides):
        try:
            return load_train_config(None, overrides)
        except MuskError as e:
            return str(e).split(": ", 1)[-1]

    want = resolve(flat)
    assert resolve(nested) == want
    try:
        sets = parse_train_sets(items)
    except MuskError:
        assert isinstance(want, str)  # refused at --set already (a bound): refused flat too
    else:
        assert resolve(sets) == want
    if isinstance(want, TrainConfig):
        assert flatten(to_dict(want)) == flat_dict(want) and from_dict(TrainConfig, to_dict(want)) == want


@pytest.mark.parametrize("overrides,message", [
    ({"grpo": {"loss_type": "ppo"}}, "grpo.loss_type: unknown loss_type 'ppo'; choices: ['grpo', 'dr_grpo'"),
    ({"context_gate": "open"}, "context.context_gate: unknown context_gate 'open'; choices: ['none', 'rms', 'ramp']"),
    ({"sampling": {"temperature": 0.0}}, "sampling.temperature must be more than 0, got 0.0"),
    ({"num_latents": 0}, "context.num_latents must be at least 1, got 0"),
    ({"grpo.group_size": 1}, "grpo.group_size must be at least 2 (GRPO normalises within a group), got 1"),
    ({"tis_cap": -1.0}, "grpo.tis_cap must be at least 0 (0: off), got -1.0"),
    ({"learning_rate": 1}, "unknown key 'learning_rate'; nearest valid keys: ['optim."),
    ({"grpo": {"betta": 1}}, "unknown key(s) ['betta'] ('betta': did you mean ['beta']?)"),
])
def test_bad_values_are_refused_by_their_dotted_key(overrides, message):
    with pytest.raises(MuskError) as e:
        load_train_config(None, overrides)
    assert message in str(e.value)


def test_set_with_an_unknown_key_names_the_dotted_keys_near_it():
    with pytest.raises(MuskError, match=r"--set 'clip_high': unknown key 'clip_high'; nearest valid keys: "
                                        r"\['grpo\.clip_eps_high'"):
        parse_train_sets(["clip_high=0.3"])
    assert parse_train_sets(["beta=0", "grpo.clip_eps=0.1", "policy=x"]) == {
        "grpo": {"beta": 0, "clip_eps": 0.1}, "policy": {"name": "x"}}


def test_a_run_folder_keeps_its_own_keys_beside_the_sections():
    resolved = {**flat_dict(TrainConfig()), "cache": "c.h5", "cache_fingerprint": "fp", "world_size": 1}
    written = sectioned(resolved, strict=False)
    assert written["cache"] == "c.h5" and written["grpo"]["beta"] == 0.04 and "beta" not in written
    assert flatten(written) == resolved and flatten(resolved) == resolved


def test_the_report_reads_an_old_flat_run_and_a_sectioned_one_alike(tmp_path):
    from analyze.runs import load_run, unmatched_keys

    resolved = {**flat_dict(load_train_config(None, {"method": "single"})), "cache": "c.h5", "task_family": "x"}
    for name, config in (("flat", resolved), ("sectioned", sectioned(resolved, strict=False))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(config))
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    old, new = load_run(tmp_path / "flat"), load_run(tmp_path / "sectioned")
    assert old.config == new.config == resolved and old.condition == new.condition
    assert unmatched_keys(old, new) == []


def test_resume_accepts_a_flat_config_yaml_of_an_older_run(tmp_path):
    """A run folder whose config.yaml is flat (as every run before the sections wrote it) resumes: the
    comparison is flat, and the folder's config.yaml is rewritten in sections."""
    from types import SimpleNamespace

    from train.setup import open_run

    cfg = load_train_config(None, {"method": "single"})
    data = SimpleNamespace(cache_fingerprint="fp", family="arithmetic", prompt_set="p")
    _, resolved = open_run(cfg, Path("c.h5"), tmp_path / "r", False, data=data)
    written = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert written["grpo"]["beta"] == cfg.grpo.beta and written["cache"] == "c.h5"
    (tmp_path / "r" / "config.yaml").write_text(yaml.safe_dump(resolved))  # flat, as an older musk wrote it
    assert open_run(cfg, Path("c.h5"), tmp_path / "r", True, data=data)[1] == resolved
    other = load_train_config(None, {"method": "single", "beta": 0.1})
    with pytest.raises(MuskError, match=r"other settings: \['beta'\]"):
        open_run(other, Path("c.h5"), tmp_path / "r", True, data=data)


@pytest.mark.slow
def test_a_run_written_flat_trains_on_with_resume(tiny_cache, tiny_policy, tmp_path):
    """A real run folder with a flat config.yaml (what today's folders hold) resumes to the same losses
    as an uninterrupted run."""
    from tests.helpers import quiet_train, tiny_train_overrides
    from train.loop import run_train

    quiet = quiet_train(lambda entry, text, mode: float(len(text) % 2))
    ov = tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=2, save_freq=1)
    full = run_train(load_train_config(None, ov), tiny_cache, tmp_path / "full", **quiet)
    part = run_train(load_train_config(None, {**ov, "total_training_steps": 1}), tiny_cache, tmp_path / "part", **quiet)
    config = part / "config.yaml"
    config.write_text(yaml.safe_dump(flatten(yaml.safe_load(config.read_text()))))
    run_train(load_train_config(None, ov), tiny_cache, part, resume=True, **quiet)

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(part) == losses(full)
