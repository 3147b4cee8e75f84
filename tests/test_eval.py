"""`musk eval` and the expert ablations: hand-computed C with an expert dropped, shuffles that touch one
expert only, complete records that a rerun never duplicates, bad input that writes nothing."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import train.loop
from cli import app
from train.adapters import AdapterSpec, build_adapter
from train.inputs import ExpertView, expert_features
from train.data import CachedFeatures
from pipeline.rewards import score
from tests.helpers import parity_score, quiet_train, tiny_train_overrides

DIMS = (5, 3, 4)


def _spec(method, **kw):
    return AdapterSpec(method=method, expert_dims=DIMS, expert_names=("a", "b", "c"), d_latent=8, d_out=6,
                       num_latents=3, num_heads=2, router_dim=7, init_std=0.5, gumbel_tau=1.0, pooling="last_token",
                       context_scale=1.0, **kw)


def _feats(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g) for d in DIMS]


@pytest.mark.parametrize("gate", ["none", "rms"])
def test_drop_perceiver_is_attention_over_the_remaining_tokens(gate):
    """C by hand from the tokens of experts a and c only: per-head softmax over 2 keys, heads
    concatenated, FFN(Q_lat + mixed), W_out."""
    torch.manual_seed(0)
    p = build_adapter(_spec("perceiver", context_gate=gate)).eval()
    with torch.no_grad():
        p.out.gate.fill_(0.7) if gate == "rms" else None
        feats = _feats()
        keep = torch.tensor([True, False, True])
        got = p(feats, None, keep=keep)
        V = p.experts(feats)[:, [0, 2]]  # [B, 2, d]: the remaining experts' tokens
        B, m, h, dh = V.shape[0], 3, 2, 4
        q = p.wq(p.latents).view(m, h, dh).transpose(0, 1)  # [h, m, dh]
        k = p.wk(V).view(B, 2, h, dh).transpose(1, 2)  # [B, h, 2, dh]
        v = p.wv(V).view(B, 2, h, dh).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), -1)  # [B, h, m, 2]
        want = p.out(p.ffn(p.latents + (att @ v).transpose(1, 2).reshape(B, m, 8)))
    torch.testing.assert_close(got.context, want, rtol=1e-6, atol=1e-6)
    assert torch.all(got.attention[:, :, 1] == 0)  # the dropped expert has no weight
    torch.testing.assert_close(got.attention[:, :, [0, 2]], att.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.attention.sum(-1), torch.ones(B, m))
    assert not torch.allclose(got.context, p(feats, None).context)  # dropping b changes C


def test_drop_ffn_leaves_the_expert_token_out():
    torch.manual_seed(0)
    f = build_adapter(_spec("ffn")).eval()
    feats = _feats()
    with torch.no_grad():
        got = f(feats, None, keep=torch.tensor([True, True, False])).context
        want = f.out(f.ffn(f.experts(feats)[:, :2]))  # [B, 2, d_out]: tokens of a and b
        full = f(feats, None).context
    assert got.shape == (4, 2, 6)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, full[:, :2], rtol=0, atol=0)  # gate none: tokens are per expert


def test_drop_hard_routing_never_chooses_the_dropped_expert():
    torch.manual_seed(0)
    r = build_adapter(_spec("hard-routing"))
    with torch.no_grad():
        r.router.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))  # b wins every prompt
    emb, feats, keep = torch.randn(64, 7), _feats(64), torch.tensor([True, False, True])
    r.eval()
    assert torch.all(r(feats, emb).choice == 1)
    assert not torch.any(r(feats, emb, keep=keep).choice == 1)
    r.train()  # straight-through Gumbel draws: never b either
    assert not torch.any(r(feats, emb, keep=keep).choice == 1)
    assert torch.all(r(feats, emb, keep=keep).attention[..., 1] == 0)


def test_shuffle_changes_only_that_experts_column():
    class Data:
        features = CachedFeatures([torch.arange(10.0)[:, None] * (i + 1) + torch.zeros(10, d) for i, d in enumerate(DIMS)])

    idx = [2, 3, 4, 5]
    view = ExpertView(source={1: {2: 5, 3: 2, 4: 3, 5: 4}})
    base, got = expert_features(Data, idx), expert_features(Data, idx, view)
    assert torch.equal(got[0], base[0]) and torch.equal(got[2], base[2])
    assert torch.equal(got[1], Data.features([5, 2, 3, 4])[1]) and not torch.equal(got[1], base[1])


# ---------------------------------------------------------------------------------------------
# musk eval end to end on a tiny run


@pytest.fixture(scope="module")
def tiny_run(tiny_cache, tiny_policy, tmp_path_factory):
    from train.config import load_train_config

    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=2,
                                                       save_freq=1))
    return train.loop.run_train(cfg, tiny_cache, tmp_path_factory.mktemp("runs") / "p", **quiet_train())


def _eval(*args):
    res = CliRunner().invoke(app, ["eval", *map(str, args), "--no-progress"], obj={"scorer": parity_score})
    return res.exit_code, res.output + (res.stderr if res.stderr_bytes is not None else "")


def _records(folder):
    return [json.loads(x) for x in (folder / "records.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_eval_records_are_complete_and_a_rerun_adds_none(tiny_run, tmp_path):
    out = tmp_path / "ev"
    args = [tiny_run, "--context", "with,without", "--ablate", "drop:tiny-llama", "--ablate", "shuffle:tiny-gpt2",
            "--out", out]
    code, msg = _eval(*args)
    assert code == 0, msg
    recs = _records(out)
    conds = ["with", "without", "drop:tiny-llama", "shuffle:tiny-gpt2"]
    keys = [(r["prompt"], r["condition"], r["sample"]) for r in recs]
    val_rows = sorted({r["prompt"] for r in recs})
    assert len(val_rows) == 4 and sorted(keys) == sorted((p, c, 0) for p in val_rows for c in conds)
    for r in recs:
        assert r["split"] == "val" and r["reward"] == parity_score(None, r["completion"], None)
        assert r["correct"] == (r["reward"] >= 1) and 1 <= r["completion_tokens"] <= 6
        assert not r["truncated"] or r["completion_tokens"] == 6  # truncated: the whole budget, no EOS
        assert 0 < r["token_entropy"] <= math.log(300)  # nats, below ln |V| (byte tokenizer)
        assert r["truncated"] or r["completion"] is not None
        if r["condition"] != "without":
            assert len(r["utilization"]) == 2 and abs(sum(r["utilization"]) - 1) < 1e-5
        if r["condition"] == "drop:tiny-llama":
            assert r["utilization"][0] == 0.0 and r["entropy"] == pytest.approx(0.0, abs=1e-6)
    s = json.loads((out / "summary.json").read_text())
    assert s["n_prompts"] == 4 and s["samples"] == 1 and s["split"] == "val" and s["checkpoint"] == "final"
    assert list(s["conditions"]) == conds
    w = s["conditions"]["with"]
    assert w["accuracy"] == pytest.approx(sum(r["correct"] for r in recs if r["condition"] == "with") / 4)
    assert w["n"] == 4 and sum(t["n"] for t in w["per_task"].values()) == 4
    assert set(w["routing"]) >= {"entropy", "utilization", "per_task"} and "routing" not in s["conditions"]["without"]

    before = (out / "records.jsonl").read_text()
    assert _eval(*args)[0] == 0 and (out / "records.jsonl").read_text() == before  # complete: nothing redone
    # a kill during the last condition: its records are gone; the rerun computes it, once
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs
                                               if r["condition"] != "shuffle:tiny-gpt2"))
    assert _eval(*args)[0] == 0
    again = _records(out)
    assert sorted((r["prompt"], r["condition"], r["sample"]) for r in again) == sorted(keys)
    code, msg = _eval(tiny_run, "--limit", "2", "--out", out)  # other settings: refused, nothing changed
    assert code == 2 and "other settings" in msg and "n_prompts" in msg


@pytest.mark.slow
def test_eval_dtype_is_chosen_recorded_and_never_mixed(tiny_run, tmp_path):
    """--dtype run decodes in the run's own dtype; another dtype is recorded in summary.json, and a
    folder evaluated in one dtype refuses another. A bad name exits 2 with the choices, writing nothing."""
    out = tmp_path / "dt"
    code, msg = _eval(tiny_run, "--limit", "2", "--dtype", "float64", "--out", out)
    assert code == 2 and "unknown dtype 'float64'" in msg and "bfloat16" in msg and not out.exists()
    assert _eval(tiny_run, "--limit", "2", "--out", out)[0] == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["dtype"] == "float32"  # the tiny run's dtype
    code, msg = _eval(tiny_run, "--limit", "2", "--dtype", "bfloat16", "--out", out)
    assert code == 2 and "other settings or weights (['dtype'])" in msg
    # a summary written before dtype was recorded cannot show it matches: refused, naming dtype
    del s["dtype"]
    (out / "summary.json").write_text(json.dumps(s))
    code, msg = _eval(tiny_run, "--limit", "2", "--out", out)
    assert code == 2 and "other settings or weights (['dtype'])" in msg
    code, msg = _eval(tiny_run, "--limit", "2", "--dtype", "bfloat16", "--out", tmp_path / "bf")
    assert code == 0, msg
    assert json.loads((tmp_path / "bf" / "summary.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.slow
def test_eval_records_its_setting_and_reuses_a_folder_only_for_the_same_weights(tiny_run, tmp_path):
    """summary.json holds the resolved dtype, temperature, samples, limit, shuffle seed, decoding and a
    digest of the weights; one sampled completion is mean@1, not a greedy accuracy; a folder whose
    weights changed since (final/ rewritten) is refused."""
    from evaluate.run import weights_digest

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    out = tmp_path / "ev"
    assert _eval(run, "--limit", "2", "--seed", "3", "--out", out)[0] == 0
    s = json.loads((out / "summary.json").read_text())
    assert (s["dtype"], s["temperature"], s["samples"], s["limit"], s["seed"], s["decoding"]) == \
        ("float32", None, 1, 2, 3, "greedy")
    assert s["weights_sha"] == weights_digest(run / "final") and len(s["weights_sha"]) == 64
    with open(run / "final" / "context_adapter.pt", "ab") as f:  # a longer sweep rewrote final/
        f.write(b"\0")
    code, msg = _eval(run, "--limit", "2", "--seed", "3", "--out", out)
    assert code == 2 and "(['weights_sha'])" in msg
    code, msg = _eval(tiny_run, "--limit", "2", "--samples", "1", "--temperature", "0.7", "--out", tmp_path / "t")
    assert code == 0, msg
    s = json.loads((tmp_path / "t" / "summary.json").read_text())
    assert s["decoding"] == "sampled" and s["temperature"] == 0.7
    c = s["conditions"]["with"]
    assert "accuracy" not in c and c["k"] == 1 and c["mean_at_k"] == pytest.approx(c["pass_at_k"])


def test_dtype_is_recorded_resolved_and_used(tiny_run, tiny_policy, tiny_cache, tmp_path):
    """config.yaml keeps `dtype` and the dtype it resolved to, summary.json too; musk eval --dtype run
    decodes in the recorded one (an older run without it: resolved here, and said); --resume in
    another resolved dtype is refused naming both."""
    import yaml

    from train.config import flatten, load_train_config

    cfg = flatten(yaml.safe_load((tiny_run / "config.yaml").read_text()))  # written flat below: an older run folder
    assert cfg["dtype"] == "float32" and cfg["dtype_resolved"] == "float32"
    assert json.loads((tiny_run / "summary.json").read_text())["dtype"] == "float32"
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval"))
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "dtype_resolved": "bfloat16"}))
    assert _eval(run, "--limit", "1", "--out", tmp_path / "a")[0] == 0
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["dtype"] == "bfloat16"
    (run / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "dtype_resolved"}))
    code, msg = _eval(run, "--limit", "1", "--out", tmp_path / "b")
    assert code == 0 and "does not record the dtype it trained in" in msg and "float32" in msg
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    other = load_train_config(None, tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=2,
                                                         save_freq=1, dtype="bfloat16"))
    with pytest.raises(train.loop.MuskError, match="trained in float32.*resolves to bfloat16"):
        train.loop.run_train(other, tiny_cache, run, resume=True, **quiet_train(score))


@pytest.mark.slow
def test_eval_works_on_single_runs(tiny_cache, tiny_policy, tmp_path):
    from train.config import load_train_config

    single = train.loop.run_train(load_train_config(None, tiny_train_overrides(tiny_policy, method="single",
                                                                                total_training_steps=1)),
                                  tiny_cache, tmp_path / "s", **quiet_train(score))
    code, msg = _eval(single, "--limit", "2")
    assert code == 0, msg
    s = json.loads((single / "eval" / "final-val" / "summary.json").read_text())
    assert s["method"] == "single" and list(s["conditions"]) == ["with"] and s["decoding"] == "greedy"


def test_eval_samples_give_pass_at_k_and_checkpoints_load(tiny_run, tmp_path):
    out = tmp_path / "k"
    code, msg = _eval(tiny_run, "--checkpoint", "step_1", "--samples", "3", "--temperature", "1.0", "--limit", "2",
                      "--context", "with", "--out", out)
    assert code == 0, msg
    recs = _records(out)
    assert sorted((r["prompt"], r["sample"]) for r in recs) == sorted((p, s) for p in {r["prompt"] for r in recs}
                                                                      for s in range(3))
    c = json.loads((out / "summary.json").read_text())["conditions"]["with"]
    by = {}
    for r in recs:
        by.setdefault(r["prompt"], []).append(r["correct"])
    from analyze.stats import pass_at_k

    assert c["mean_at_k"] == pytest.approx(sum(sum(v) / 3 for v in by.values()) / 2)
    assert c["pass_at_k"] == pytest.approx(sum(pass_at_k(3, sum(v), 3) for v in by.values()) / 2)
    assert "accuracy" not in c
    default = _eval(tiny_run, "--limit", "1")
    assert default[0] == 0 and (tiny_run / "eval" / "final-val" / "summary.json").exists()
    # another dtype gets its own default folder instead of a refusal by the run's own one
    other = _eval(tiny_run, "--limit", "1", "--dtype", "bfloat16", "--context", "with")
    assert other[0] == 0, other[1]
    assert json.loads((tiny_run / "eval" / "final-val-bfloat16" / "summary.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.slow
def test_musk_eval_builds_no_optimizer(tiny_run, tmp_path, monkeypatch):
    """Evaluation reads the policy alone (build_policy): AdamW is never constructed, whether final/ or a
    checkpoint (whose optimizer state stays unread) is evaluated."""
    import torch

    from evaluate.run import EvalRequest, run_eval

    def refuse(*a, **k):
        raise AssertionError("musk eval built an optimizer")

    monkeypatch.setattr(torch.optim, "AdamW", refuse)
    for ck in ("final", "step_1"):
        out = run_eval(EvalRequest(run=tiny_run, checkpoint=ck, contexts=("with",), limit=1, out=tmp_path / ck),
                       scorer=parity_score, progress=False, log=lambda *a: None)
        assert json.loads((out / "summary.json").read_text())["conditions"]["with"]["n"] == 1


@pytest.mark.parametrize("args,message", [
    (["--ablate", "drop:nope"], "unknown expert 'nope'; the run's experts are ['tiny-llama', 'tiny-gpt2']"),
    (["--ablate", "mute:tiny-llama"], "--ablate takes drop:NAME, shuffle:NAME or only:NAME"),
    (["--context", "sideways"], "unknown --context 'sideways'; choices"),
    (["--checkpoint", "step_9"], "has no step_9"),
    (["--split", "dev"], "unknown --split 'dev'"),
    (["--samples", "4"], "needs --temperature"),
])
def test_eval_bad_input_writes_nothing(tiny_run, tmp_path, args, message):
    code, msg = _eval(tiny_run, *args, "--out", tmp_path / "x")
    assert code == 2 and message in msg and "Traceback" not in msg
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_eval_refuses_a_method_without_experts_and_a_foreign_cache(tiny_run, tiny_cache, tiny_policy, tmp_path):
    import h5py

    from train.config import load_train_config

    single = train.loop.run_train(load_train_config(None, tiny_train_overrides(tiny_policy, method="single",
                                                                                total_training_steps=1)),
                                  tiny_cache, tmp_path / "s", **quiet_train(score))
    code, msg = _eval(single, "--ablate", "drop:tiny-llama", "--out", tmp_path / "x")
    assert code == 2 and "method 'single' reads no experts" in msg and not (tmp_path / "x").exists()
    other = tmp_path / "other.h5"
    shutil.copyfile(tiny_cache, other)
    with h5py.File(other, "a") as f:  # another extraction: other prompts, another fingerprint
        text = f["prompts/text"].asstr()[()]
        f["prompts/text"][0] = text[0] + " (edited)"
        f.attrs["fingerprint"] = "f" * 64
    code, msg = _eval(tiny_run, "--cache", other, "--out", tmp_path / "y")
    assert code == 2 and "train prompts are not the run's" in msg and not (tmp_path / "y").exists()
    with h5py.File(other, "a") as f:
        f["prompts/text"][0] = text[0]  # same prompts, new file: accepted
    assert _eval(tiny_run, "--cache", other, "--limit", "1", "--out", tmp_path / "z")[0] == 0


def test_help_lists_eval_with_its_options():
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0 and "eval" in res.output
    res = CliRunner().invoke(app, ["eval", "--help"])
    assert res.exit_code == 0
    for opt in ("--checkpoint", "--cache", "--split", "--limit", "--samples", "--temperature", "--context", "--ablate",
                "--out"):
        assert opt in res.output


def test_output_collab_ablations_edit_the_hint_block(tiny_policy):
    """output-collab reads its experts as hint lines: drop leaves a line out, shuffle takes that expert's
    hint from another prompt, only keeps one line."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from train.inputs import prompt_batch

    tok = AutoTokenizer.from_pretrained(tiny_policy)
    tok.padding_side = "left"
    data = SimpleNamespace(system="sys", prompts={"text": ["q0", "q1"]}, experts=["a", "b"],
                           hints={"a": ["A0", "A1"], "b": ["B0", "B1"]})
    m = SimpleNamespace(tok=tok)

    def text(view):
        pb = prompt_batch(m, data, [0], True, "cpu", view=view)
        return tok.decode(pb.ids[0][pb.mask[0].bool()])

    assert "- a: A0\n- b: B0" in text(ExpertView())
    assert "- b: B0" in text(ExpertView(keep=torch.tensor([False, True]))) and "- a:" not in text(
        ExpertView(keep=torch.tensor([False, True])))
    assert "- a: A0\n- b: B1" in text(ExpertView(source={1: {0: 1}}))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=2, max_size=30), st.integers(0, 10_000))
def test_shuffle_is_a_derangement_over_distinct_questions(qs, seed):
    """No row reads features of its own question (repeated questions included) once there are two
    distinct questions; sources are evaluated rows; the draw is fixed by the seed."""
    from core.errors import MuskError
    from evaluate.run import shuffled
    from evaluate.records import Condition

    rows = np.arange(100, 100 + len(qs))
    cond = Condition("shuffle:b", "with", ExpertView(source={1: {}}))
    if len(set(qs)) < 2:
        with pytest.raises(MuskError, match="distinct question"):
            shuffled(cond, rows, seed, qs)
        return
    src = shuffled(cond, rows, seed, qs).view.source[1]
    q_of = dict(zip(rows.tolist(), qs))
    assert set(src) == set(q_of) and set(src.values()) <= set(q_of)
    assert all(q_of[r] != q_of[s] for r, s in src.items())
    assert shuffled(cond, rows, seed, qs) == shuffled(cond, rows, seed, qs)


def test_drop_of_the_only_expert_is_refused():
    from types import SimpleNamespace

    from core.errors import MuskError
    from evaluate.run import EvalRequest, parse_conditions

    req = EvalRequest(run=Path("r"), ablations=("drop:a",))
    cfg, data = SimpleNamespace(method="perceiver"), SimpleNamespace(experts=["a"], features=object())
    with pytest.raises(MuskError, match="only expert is 'a'; dropping it leaves no expert"):
        parse_conditions(req, cfg, data, True)
    data2 = SimpleNamespace(experts=["a", "b"], features=object())
    assert [c.name for c in parse_conditions(req, cfg, data2, True)] == ["with", "drop:a"]
