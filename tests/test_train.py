"""Training end to end on a tiny policy and the tiny cache: what changes, resume, artefacts, bad input."""

import json
import math
import shutil

import pytest
import torch

import train.loop
import train.inputs
import train.optim
from core.errors import MuskError
from train.config import load_train_config
from train.loop import run_train
from tests.helpers import quiet_train, tiny_train_overrides



def _fake_score(entry, text, mode):
    # Random-init policies never answer right; a length-parity reward gives groups variance.
    return float(len(text) % 2)


QUIET = quiet_train(_fake_score)


@pytest.fixture(autouse=True)
def _no_expert_is_loaded(monkeypatch):
    """Training must read features from the cache only: building a (random) expert is an error."""
    import pipeline.experts

    def boom(*a, **k):
        raise AssertionError("an expert model was built during training")

    monkeypatch.setattr(pipeline.experts, "_build_random", boom)


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_perceiver_updates_lora_and_gphi_not_base(tiny_cache, tiny_policy, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.adapters import load_adapter

    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=3))
    run = run_train(cfg, tiny_cache, tmp_path / "run", **QUIET)
    m = _metrics(run)
    assert [r["step"] for r in m] == [1, 2, 3]
    for r in m:
        assert {"reward/mean", "reward/std", "accuracy", "kl", "loss", "grad_norm", "lr", "frac_reward_zero_std",
                "step_seconds", "tokens_per_second", "routing/entropy", "routing/utilization",
                "routing/attention"} <= set(r)
        assert len(r["routing/utilization"]) == 2 and len(r["routing/attention"]) == 4
        assert abs(sum(r["routing/utilization"]) - 1) < 1e-5
    assert m[0]["kl"] < 1e-3  # near-zero C and zero LoRA: policy == reference at step 0

    base = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    trained = PeftModel.from_pretrained(base, run / "final")
    lora_b = [v for k, v in trained.state_dict().items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)  # LoRA B starts at 0
    for k, v in trained.get_base_model().state_dict().items():
        key = k.replace(".base_layer", "")
        if "lora_" not in k:
            torch.testing.assert_close(v, base_sd[key], rtol=0, atol=0)  # base weights untouched

    adapter, spec = load_adapter(run / "final")
    assert spec.expert_names == ("tiny-llama", "tiny-gpt2") and spec.num_latents == 4
    assert float(adapter.out.proj.bias.detach().abs().max()) > 0  # b_out starts at exactly 0: g_phi trained

    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "perceiver" and summary["steps"] == 3 and summary["team"] == ["tiny-llama", "tiny-gpt2"]
    ev = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert ev[-1]["step"] == 3 and ev[-1]["n"] == 4 and "accuracy_without_context" in ev[-1]
    cfg_saved = (run / "config.yaml").read_text()
    assert "cache_fingerprint" in cfg_saved and "method: perceiver" in cfg_saved


@pytest.mark.slow
def test_completions_log_training_groups_and_eval_side_by_side(tiny_cache, tiny_policy, tmp_path):
    """completions.jsonl: every log_completions_freq steps a prompt's G completions with rewards,
    advantages and attention row; each full evaluation, its first prompts with C and with C removed."""
    ov = tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=2, log_completions_freq=1,
                              log_completions_prompts=1, eval_completions=2)
    run = run_train(load_train_config(None, ov), tiny_cache, tmp_path / "c", **QUIET)
    recs = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2]
    for r in train_recs:
        assert len(r["completions"]) == len(r["rewards"]) == len(r["advantages"]) == ov["group_size"]
        assert r["rewards"] == [_fake_score(None, t, None) for t in r["completions"]]
        assert abs(sum(r["advantages"])) < 1e-4  # group-normalised
        assert len(r["attention"]) == 4 and len(r["attention"][0]) == 2  # [m][n]
    ev = [r for r in recs if r["kind"] == "eval"]
    assert len(ev) == 2 and {r["step"] for r in ev} == {2}
    for r in ev:
        assert r["reward"] == _fake_score(None, r["completion"], None)
        assert r["reward_without_context"] == _fake_score(None, r["completion_without_context"], None)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["single", "ffn", "hard-routing", "output-collab"])
def test_every_method_trains(tiny_cache, tiny_policy, tmp_path, method):
    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method=method, total_training_steps=2))
    run = run_train(cfg, tiny_cache, tmp_path / method, **QUIET)
    m = _metrics(run)
    assert len(m) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in m)
    assert ("routing/entropy" in m[0]) == (method == "hard-routing")
    assert (run / "final" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_resume_matches_uninterrupted(tiny_cache, tiny_policy, tmp_path):
    ov = tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=4, save_freq=2)
    full = run_train(load_train_config(None, ov), tiny_cache, tmp_path / "full", **QUIET)
    part = run_train(load_train_config(None, {**ov, "total_training_steps": 2}), tiny_cache, tmp_path / "part",
                     **QUIET)
    # simulate a kill after step 3 was logged but before its checkpoint: resume must drop it
    with open(part / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "reward/mean": -1}) + "\n")
    run_train(load_train_config(None, ov), tiny_cache, part, resume=True, **QUIET)
    skip = {"step_seconds", "tokens_per_second"}
    a = [{k: v for k, v in r.items() if k not in skip and not k.startswith("time/")} for r in _metrics(full)]
    b = [{k: v for k, v in r.items() if k not in skip and not k.startswith("time/")} for r in _metrics(part)]
    assert a == b


def test_existing_run_folder_is_not_overwritten(tiny_cache, tiny_policy, tmp_path):
    ov = tiny_train_overrides(tiny_policy, method="single", total_training_steps=1)
    run_train(load_train_config(None, ov), tiny_cache, tmp_path / "r", **QUIET)
    with pytest.raises(MuskError, match="already holds a run"):
        run_train(load_train_config(None, ov), tiny_cache, tmp_path / "r", **QUIET)
    with pytest.raises(MuskError, match="other settings"):
        run_train(load_train_config(None, {**ov, "lr": 0.5}), tiny_cache, tmp_path / "r", resume=True, **QUIET)


def test_missing_hints_and_router_are_clear_errors(tiny_cache, tiny_policy, tmp_path):
    import h5py

    bare = tmp_path / "bare.h5"
    shutil.copyfile(tiny_cache, bare)
    with h5py.File(bare, "a") as f:
        del f["experts/tiny-llama/hint"]
        del f["router"]
    for method, msg in (("output-collab", "has no hints"), ("hard-routing", "no router embedding")):
        cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method=method))
        with pytest.raises(MuskError, match=msg):
            run_train(cfg, bare, tmp_path / method, **QUIET)
    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="perceiver", experts=["nope"]))
    with pytest.raises(MuskError, match="has no expert 'nope'"):
        run_train(cfg, tiny_cache, tmp_path / "x", **QUIET)


def test_nan_loss_stops_with_checkpoint(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    real = train.loop.grpo_loss

    def nan_at_step_2(*a, **k):
        out = real(*a, **k)
        nan_at_step_2.calls += 1
        if nan_at_step_2.calls > 2:  # 2 micro-batches per step: step 2 goes NaN
            return out._replace(loss=out.loss * float("nan"))
        return out

    nan_at_step_2.calls = 0
    monkeypatch.setattr(train.loop, "grpo_loss", nan_at_step_2)
    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=3))
    with pytest.raises(MuskError, match="non-finite loss at step 2.*checkpoints/step_1"):
        run_train(cfg, tiny_cache, tmp_path / "nan", **QUIET)
    step1 = tmp_path / "nan" / "checkpoints" / "step_1"
    assert (step1 / "lora.pt").exists()
    # the saved data position is the one after step 1 (2 micro-batches x 2 prompts), not after step 2
    assert json.loads((step1 / "state.json").read_text())["cursor"] == 4
    assert [r["step"] for r in _metrics(tmp_path / "nan")] == [1]


def test_unknown_keys_and_methods(tiny_policy):
    with pytest.raises(MuskError, match="unknown method 'nope'.*perceiver"):
        load_train_config(None, {"method": "nope"})
    with pytest.raises(MuskError, match="unknown key"):
        load_train_config(None, {"learning_rate": 1})
    with pytest.raises(MuskError, match="unknown pooling"):
        load_train_config(None, {"pooling": "mean"})


@pytest.mark.slow
def test_rollout_chunks_and_checkpointing_give_the_same_gradient(tiny_cache, tiny_policy, tmp_path):
    ov = tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=2)
    a = _metrics(run_train(load_train_config(None, ov), tiny_cache, tmp_path / "a", **QUIET))
    b = _metrics(run_train(load_train_config(None, {**ov, "rollout_chunk": 3, "gradient_checkpointing": True}),
                           tiny_cache, tmp_path / "b", **QUIET))
    for ra, rb in zip(a, b):
        assert ra["reward/mean"] == rb["reward/mean"]  # same rollouts
        for k in ("loss", "grad_norm", "kl"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-7), k


@pytest.mark.slow
def test_cache_file_is_not_read_after_loading(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    """Everything the loop needs is read once: with the HDF5 file gone right after loading, training
    and evaluation still run (no per-row HDF5 reads on the hot path)."""
    import cache.reader

    # a copy: the shared tiny cache is read by other tests (and xdist workers) at the same time
    own = tmp_path / "tiny.h5"
    shutil.copy(tiny_cache, own)
    moved = tmp_path / "moved.h5"
    real_exit = cache.reader.Cache.__exit__

    def exit_and_move(self, *exc):
        out = real_exit(self, *exc)
        if own.exists():
            shutil.move(str(own), str(moved))
        return out

    monkeypatch.setattr(cache.reader.Cache, "__exit__", exit_and_move)
    ov = tiny_train_overrides(tiny_policy, method="hard-routing", total_training_steps=2, test_freq=1)
    run = run_train(load_train_config(None, ov), own, tmp_path / "r", **QUIET)
    assert not own.exists() and moved.exists() and len(_metrics(run)) == 2


def _two_group_optimizer():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.03, 0.04])  # norms 5 and 0.05
    opt = torch.optim.AdamW([{"name": "gate", "params": [a]}, {"name": "lora", "params": [b]}])
    return opt, a, b


def test_global_clip_lets_one_group_shrink_the_other():
    """Hand-worked: norms 5 and 0.05, total sqrt(25.0025); a global clip to 1 divides both by 5.00025."""
    opt, a, b = _two_group_optimizer()
    total, norms = train.optim.clip_gradients(opt, 1.0, "global")
    assert total == pytest.approx(25.0025 ** 0.5, rel=1e-6)
    assert norms == pytest.approx({"gate": 5.0, "lora": 0.05}, rel=1e-6)
    assert torch.allclose(b.grad, torch.tensor([0.03, 0.04]) / 25.0025 ** 0.5, rtol=1e-5)
    assert torch.allclose(a.grad, torch.tensor([3.0, 4.0]) / 25.0025 ** 0.5, rtol=1e-5)


def test_per_group_clip_keeps_the_small_group_intact():
    opt, a, b = _two_group_optimizer()
    total, _ = train.optim.clip_gradients(opt, 1.0, "per-group")
    assert total == pytest.approx(25.0025 ** 0.5, rel=1e-6)
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.8]), rtol=1e-5)  # clipped to norm 1
    assert torch.equal(b.grad, torch.tensor([0.03, 0.04]))  # under its own budget: untouched


STABLE = dict(context_position="after-question", context_gate="rms", context_rms=3.0, gate_lr=3e-3,
              feature_norm="standardize", context_anchor="mean-embedding", grad_clip_scope="per-group")


@pytest.mark.parametrize("method", ["perceiver", "ffn"])
def test_stable_path_starts_at_kl_zero_and_c_stays_bounded(tiny_cache, tiny_policy, tmp_path, method):
    """Gate closed at step 0: the policy reads C = anchor, the reference reads the same anchor and LoRA
    B = 0, so KL is exactly 0. Adam's first step moves gamma by at most gate_lr, so afterwards
    rms(C - anchor) <= tanh(gate_lr) * context_rms * s (s: the token-embedding RMS): C is still a
    whisper next to the tokens around it."""
    from transformers import AutoModelForCausalLM

    from train.adapters import load_adapter
    from train.setup import load_data

    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method=method, total_training_steps=1, **STABLE))
    run = run_train(cfg, tiny_cache, tmp_path / "run", **QUIET)
    m = _metrics(run)
    assert m[0]["kl"] == 0.0
    assert set(m[0]) >= {"grad_norm/lora", "grad_norm/router", "grad_norm/gate"}

    adapter, spec = load_adapter(run / "final")
    emb = AutoModelForCausalLM.from_pretrained(tiny_policy, dtype=torch.float32).get_input_embeddings().weight
    torch.testing.assert_close(adapter.out.anchor, emb.detach().mean(0))
    assert spec.context_anchor == "mean-embedding"
    gamma = float(adapter.out.gate)
    assert 0 < abs(gamma) <= 3e-3 * (1 + 1e-5)
    data = load_data(cfg, tiny_cache)
    with torch.no_grad():
        adapter.eval()
        c = adapter(data.features(list(range(4))), None).context  # [4, m, d]
    rms = (c - adapter.out.anchor).pow(2).mean(dim=(1, 2)).sqrt()  # float32: (anchor + x) - anchor loses ~1e-4
    s = float(emb.detach().pow(2).mean().sqrt())
    torch.testing.assert_close(rms, torch.full_like(rms, math.tanh(abs(gamma)) * 3.0 * s), rtol=2e-3, atol=0)
    assert float(rms.max()) <= math.tanh(3e-3) * 3.0 * s * (1 + 2e-3)


def test_null_context_eval_equals_with_c_while_the_gate_is_shut(tiny_cache, tiny_policy, tmp_path):
    """Probe case: gate_lr 0 keeps gamma at 0, so C is exactly its anchor and evaluating "with C's
    information removed" must give the very same greedy completions as "with C"; with C removed
    (no slots) the input differs."""
    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=1,
                                                       test_freq=1, eval_null_context=True,
                                                       **{**STABLE, "gate_lr": 0.0}))
    run = run_train(cfg, tiny_cache, tmp_path / "run", **QUIET)
    ev = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()][-1]
    assert ev["accuracy_null_context"] == ev["accuracy"] and ev["reward_null_context"] == ev["reward"]
    recs = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    evs = [r for r in recs if r["kind"] == "eval"]
    assert evs and all(r["completion_null_context"] == r["completion"] for r in evs)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_val_accuracy_null_context"] == ev["accuracy_null_context"]


def test_null_context_input_is_the_anchor_in_the_slots(tiny_cache, tiny_policy):
    """The null variant's input: the prompt with m copies of the anchor (the mean token embedding) where
    C goes; with gamma = 0 it is exactly the "with C" input, and never the zero-slot input."""
    from evaluate.records import eval_inputs
    from train.setup import build_models, load_data

    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="perceiver", **STABLE))
    data = load_data(cfg, tiny_cache)
    m = build_models(cfg, data, "cpu", torch.float32)
    m.adapter.eval()
    idx = [int(i) for i in data.val_idx[:2]]
    with torch.no_grad():
        e_with, mk_with, _ = eval_inputs(cfg, m, data, idx, "with", "cpu")
        e_null, mk_null, _ = eval_inputs(cfg, m, data, idx, "null", "cpu")
        e_none, mk_none, _ = eval_inputs(cfg, m, data, idx, "removed", "cpu")
    assert torch.equal(e_with, e_null) and torch.equal(mk_with, mk_null)
    assert e_null.shape[1] == e_none.shape[1] + cfg.context.num_latents
    anchor = m.lm.get_input_embeddings().weight.mean(0)
    slots = [(e_null[b] - anchor).abs().amax(-1) < 1e-6 for b in range(2)]  # [P+m] rows equal to the anchor
    assert all(int(s.sum()) >= cfg.context.num_latents for s in slots)


# --- GRPO settings: loss types, several passes per batch, truncation masking --------------------


@pytest.mark.slow
def test_loss_types_agree_when_every_completion_has_the_same_length(tiny_cache, tiny_policy, tmp_path):
    """Known by construction: with EOS suppressed for the whole budget every completion has exactly
    max_new_tokens tokens, so the per-completion mean (grpo), the micro-batch token mean (bnpo), the
    step's token mean (dapo) and the constant normaliser (dr_grpo, scale_rewards group) are one number:
    same loss and gradient norm at every step, also with dapo's rollouts in chunks."""
    ov = tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=2, min_new_tokens=6)
    runs = {lt: _metrics(run_train(load_train_config(None, {**ov, "loss_type": lt, "scale_rewards": "group"}),
                                   tiny_cache, tmp_path / lt, **QUIET))
            for lt in ("grpo", "bnpo", "dapo", "dr_grpo")}
    runs["dapo-chunks"] = _metrics(run_train(load_train_config(None, {**ov, "loss_type": "dapo", "rollout_chunk": 3}),
                                             tiny_cache, tmp_path / "dapo-chunks", **QUIET))
    base = runs.pop("grpo")
    assert all(r["completion_tokens"] == 2 * 2 * 4 * 6 for r in base)  # 2 micro x 2 prompts x 4 rollouts x 6
    assert all(r["grad_norm"] > 0 for r in base)
    for name, m in runs.items():
        for ra, rb in zip(base, m):
            assert rb["reward/mean"] == ra["reward/mean"], name
            for k in ("loss", "grad_norm", "kl"):
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-7), (name, k)


def _varied_lengths(monkeypatch):
    """Rollouts of set lengths: in even rollout calls row i ends with an EOS at position i % (T+1), in odd calls
    at position 0 except row 0; an end at T means the whole budget without EOS (truncated). A random
    tiny policy almost never samples EOS itself."""
    from pipeline.generation import Decoded

    import train.policy

    gen, calls = train.policy.sample, []

    def varied(lm, embeds, mask, max_new_tokens, **k):
        d = gen(lm, embeds, mask, max_new_tokens, **k)
        if k.get("greedy"):  # the evaluations decode as they would
            return d
        eos, pad_id = k["eos"], k["pad_id"]
        tokens, lp = d.tokens, d.logprobs
        N, T = tokens.shape
        rows = torch.arange(N)
        end = rows % (T + 1) if len(calls) % 2 == 0 else torch.where(rows == 0, T, 0)
        calls.append(1)  # rollouts only: each run's start even
        end, pos = end[:, None], torch.arange(T)[None]
        live = (pos <= end).long()
        tokens = torch.where(pos == end, eos[0], torch.where(live.bool(), tokens, pad_id))
        return Decoded(tokens, live, None if lp is None else lp * live)

    monkeypatch.setattr(train.policy, "sample", varied)  # what Policy.sample calls


@pytest.mark.slow
def test_loss_types_differ_when_lengths_do(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    """With unequal lengths the estimators weight tokens differently (the probe above: they agree when
    lengths do); masking truncated completions changes the gradient only when some are truncated."""
    _varied_lengths(monkeypatch)
    ov = tiny_train_overrides(tiny_policy, method="single", total_training_steps=1, min_new_tokens=6)
    m = {lt: _metrics(run_train(load_train_config(None, {**ov, **kw}), tiny_cache, tmp_path / lt, **QUIET))[0]
         for lt, kw in [("grpo", {}), ("dapo", {"loss_type": "dapo"}), ("bnpo", {"loss_type": "bnpo"}),
                        ("mask", {"mask_truncated_completions": True})]}
    assert m["grpo"]["completion_tokens"] == (1 + 2 + 3 + 4 + 5 + 6 + 6 + 1) + (6 + 7 * 1)  # two micro-batches
    assert m["grpo"]["loss"] == 0.0  # per-completion means of -A (ratio 1, KL 0 at init) cancel in each group
    assert len({r["reward/mean"] for r in m.values()}) == 1  # the same rollouts
    norms = [m[k]["grad_norm"] for k in ("grpo", "dapo", "bnpo", "mask")]
    assert all(a != pytest.approx(b, rel=1e-3) for i, a in enumerate(norms) for b in norms[i + 1:])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["perceiver", "hard-routing"])
def test_second_pass_starts_from_the_sampling_policy(tiny_cache, tiny_policy, tmp_path, monkeypatch, method):
    """num_iterations 2 with every learning rate 0: the second pass sees the same weights, rebuilds the
    same C (hard-routing: the same Gumbel draw, so the same expert for every prompt) and its stored
    pi_old log-probs line up with the rows: log pi - log pi_old is 0 on every token, so the ratio is 1
    and the loss equals the first pass's. Two AdamW updates a step."""
    seen, gaps, updates, contexts = [], [], [], []
    step, upd = train.loop.grpo_step, train.loop.update
    loss_fn, ctx_fn = train.loop.grpo_loss, train.inputs.context_tokens

    def spy_step(cfg, m, ro, timing, old=None):
        out = step(cfg, m, ro, timing, old)
        seen.append((old is None, out.loss))
        return out

    def spy_loss(logp, old_logp, *a, **k):
        gaps.append(float((logp.detach() - old_logp).abs().max()))
        return loss_fn(logp, old_logp, *a, **k)

    def spy_ctx(*a):
        out = ctx_fn(*a)
        contexts.append((out.context.detach().clone(), None if out.choice is None else out.choice.tolist()))
        return out

    monkeypatch.setattr(train.loop, "grpo_step", spy_step)
    monkeypatch.setattr(train.loop, "grpo_loss", spy_loss)
    monkeypatch.setattr(train.inputs, "context_tokens", spy_ctx)
    monkeypatch.setattr(train.loop, "update", lambda *a: updates.append(1) or upd(*a))
    ov = tiny_train_overrides(tiny_policy, method=method, total_training_steps=2, num_iterations=2, lr=0.0,
                              router_lr=0.0, gate_lr=0.0)
    run_train(load_train_config(None, ov), tiny_cache, tmp_path / "run", **QUIET)
    first = [loss for is_first, loss in seen if is_first]
    second = [loss for is_first, loss in seen if not is_first]
    assert len(first) == len(second) == 2 * 2 and len(updates) == 2 * 2  # 2 steps x 2 micro-batches; 2 x mu
    assert second == pytest.approx(first, rel=1e-6, abs=1e-9)
    assert len(gaps) == 8 and max(gaps) < 1e-6
    # C per call: step 1 samples micro 0, 1 then rebuilds them; step 2 the same (then the evaluation)
    for s in (0, 4):
        for micro in (0, 1):
            (c1, r1), (c2, r2) = contexts[s + micro], contexts[s + 2 + micro]
            assert torch.equal(c1, c2) and r1 == r2
    if method == "hard-routing":  # the probe can fail: the draws do pick different experts
        assert len({tuple(r) for _, r in contexts[:8]}) > 1


@pytest.mark.slow
def test_several_passes_reuse_the_rollouts_and_move_the_policy(tiny_cache, tiny_policy, tmp_path):
    ov = tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=2)
    one = _metrics(run_train(load_train_config(None, ov), tiny_cache, tmp_path / "one", **QUIET))
    two = _metrics(run_train(load_train_config(None, {**ov, "num_iterations": 2, "clip_eps_high": 0.28}),
                             tiny_cache, tmp_path / "two", **QUIET))
    assert two[0]["reward/mean"] == one[0]["reward/mean"] and two[0]["loss"] == pytest.approx(one[0]["loss"])
    assert two[1]["kl"] != pytest.approx(one[1]["kl"], rel=1e-3)  # the extra update moved the policy


@pytest.mark.slow
def test_masking_truncated_completions_leaves_nothing_when_all_hit_the_budget(tiny_cache, tiny_policy, tmp_path):
    """EOS suppressed for the whole budget: every completion is truncated, so with the mask on no token
    is in the loss (loss 0, gradient 0); without it the same rollouts give a gradient."""
    ov = tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=1, min_new_tokens=6,
                              top_k=50, top_p=0.9, min_p=0.01)
    on = _metrics(run_train(load_train_config(None, {**ov, "mask_truncated_completions": True}), tiny_cache,
                            tmp_path / "on", **QUIET))[0]
    off = _metrics(run_train(load_train_config(None, ov), tiny_cache, tmp_path / "off", **QUIET))[0]
    assert on["reward/mean"] == off["reward/mean"]
    assert on["loss"] == 0.0 and on["grad_norm"] == 0.0 and off["grad_norm"] > 0


def test_nan_in_a_later_pass_saves_no_mislabelled_checkpoint(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    """num_iterations 2, NaN in step 1's second pass: the first pass has already updated the weights,
    so they are not step 0's and are not saved as a checkpoint; the message says so."""
    real = train.loop.grpo_loss

    def nan_in_second_pass(*a, **k):
        out = real(*a, **k)
        nan_in_second_pass.calls += 1
        return out._replace(loss=out.loss * float("nan")) if nan_in_second_pass.calls > 2 else out

    nan_in_second_pass.calls = 0
    monkeypatch.setattr(train.loop, "grpo_loss", nan_in_second_pass)
    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="perceiver", num_iterations=2))
    with pytest.raises(MuskError, match="non-finite loss at step 1 .*saved nothing \\(pass 2 of num_iterations"):
        run_train(cfg, tiny_cache, tmp_path / "nan", **QUIET)
    assert not (tmp_path / "nan" / "checkpoints").exists()


def test_evaluations_keep_per_prompt_records_and_steps_log_diagnostics(tiny_cache, tiny_policy, tmp_path):
    """eval_records.jsonl: every validation prompt x condition of each evaluation, once, with step and
    kind; metrics.jsonl: completion length, truncation, policy token entropy, clip fraction, reward per dataset."""
    ov = tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=2, test_freq=1)
    run = run_train(load_train_config(None, ov), tiny_cache, tmp_path / "r", **QUIET)
    recs = [json.loads(x) for x in (run / "eval_records.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [1, 2]
    for e in evals:
        mine = [r for r in recs if r["step"] == e["step"]]
        assert sorted((r["condition"], r["prompt"]) for r in mine) == sorted(
            (c, p) for c in ("with", "without") for p in {r["prompt"] for r in mine})
        assert len({r["prompt"] for r in mine}) == e["n"] == 4 and all(r["kind"] == "full" for r in mine)
        w = [r for r in mine if r["condition"] == "with"]
        assert e["accuracy"] == sum(r["correct"] for r in w) / 4
        assert e["completion_tokens_mean"] == pytest.approx(sum(r["completion_tokens"] for r in w) / 4)
        assert e["token_entropy_mean"] == pytest.approx(sum(r["token_entropy"] for r in w) / 4)
        assert all(r["reward"] == _fake_score(None, r["completion"], None) for r in mine)
    tasks = {r["task"] for r in recs}
    for r in _metrics(run):
        assert 1 <= r["completion/length_mean"] <= r["completion/length_max"] <= 6
        assert 0 <= r["completion/truncated_frac"] <= 1 and r["clip_frac"] == 0.0  # one pass: ratio == 1
        assert 0 < r["policy/entropy"] <= math.log(256 + 3)  # nats, at most ln |V| (byte tokenizer)
        assert {k[len("reward/task/"):] for k in r if k.startswith("reward/task/")} <= tasks | {"secret-digit"}
        assert any(k.startswith("reward/task/") for k in r)


@pytest.mark.slow
def test_resume_drops_a_torn_last_line_with_a_warning(tiny_cache, tiny_policy, tmp_path):
    """A kill mid-write leaves half a JSON line at the end of a log: --resume drops it (warning) and
    the next records start on a line of their own."""
    from cache.run_folder import TornLineWarning

    ov = tiny_train_overrides(tiny_policy, method="single", total_training_steps=1, save_freq=1, test_freq=1)
    run = run_train(load_train_config(None, ov), tiny_cache, tmp_path / "r", **QUIET)
    for log in ("metrics.jsonl", "eval.jsonl", "eval_records.jsonl"):
        with open(run / log, "a") as f:
            f.write('{"step": 2, "rew')
    with pytest.warns(TornLineWarning, match="dropped its last line"):
        run_train(load_train_config(None, {**ov, "total_training_steps": 2}), tiny_cache, run, resume=True, **QUIET)
    assert [r["step"] for r in _metrics(run)] == [1, 2]
    ev = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in ev] == [1, 2]
