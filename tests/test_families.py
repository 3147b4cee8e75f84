"""The family matrix: every architecture of the paper's teams through musk on a tiny random model of its
own config class (tests/families.py says what each one switches on).

As an expert (all seven): `musk extract` gives every pooling variant equal to an unpadded single-prompt
forward with plain transformers, with and without the shared prefix, and hints equal to
`model.generate`'s greedy output. As a policy (Qwen2, Llama, Mistral, Gemma-2, Phi-3): two GRPO steps
of every method, LoRA on the family's module names, KL exactly 0 at step 0 on the stable path, and
`final/` reloading with plain PEFT. Where a family needs its own handling, musk handles it or refuses
before any work with a message naming the family.
"""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import pytest
import torch

from core.errors import MuskError
from tests.families import FAMILIES, POLICY_FAMILIES, build_family
from tests.helpers import quiet_train, tiny_extract_config, tiny_train_overrides

QUIET = dict(progress=False, log=lambda *a: None)
TRAIN = quiet_train()  # run_train's: the training evaluation and the parity reward handed in
LETTERS = {"family": "letter-counting", "train_size": 6, "val_size": 2}  # prompts of unequal length: padding
HINT_TOKENS = 5


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root / name, seed=i) for i, name in enumerate(FAMILIES)}


@pytest.fixture(scope="module", params=[True, False], ids=["shared-prefix", "no-prefix"])
def family_cache(request, family_dirs, tmp_path_factory):
    """One cache holding all seven families as experts: 8 letter-counting prompts (86 to 135
    characters) in batches of 3 (padding inside every batch: after the shared prefix on the right,
    without it on the left), 2 random-pooling draws, 5-token hints."""
    from pipeline.extract import load_extract_config, run_extract
    from tests.helpers import write_yaml

    d = tmp_path_factory.mktemp("family-cache")
    experts = [{"name": n, "kind": "hf", "model": str(p)} for n, p in family_dirs.items()]
    cfg = tiny_extract_config(d / "fam.h5", experts=experts, router=False, task=LETTERS,
                              batch_size=3, hint_batch_size=3, hint_max_new_tokens=HINT_TOKENS, pooling_draws=2,
                              share_prefix=request.param, padding_side="right" if request.param else "left")
    return run_extract(load_extract_config(str(write_yaml(d / "e.yaml", cfg))), **QUIET)


def _reference_ids(tok, question: str) -> list[int]:
    """The prompt's token ids with plain transformers (the date-stamping templates read musk's fixed date)."""
    from pipeline.chat import PLAIN_FORMAT, PROMPT_DATE, fixed_clock

    if tok.chat_template:
        with fixed_clock(PROMPT_DATE):
            text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(PLAIN_FORMAT.format(question=question))["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_expert_features_and_hints_equal_plain_transformers(family, family_cache, family_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cache.reader import Cache

    with Cache(family_cache) as c:
        questions = c.prompts()["text"]
        assert len({len(q) for q in questions}) > 4  # batches are padded
        attrs = c.expert_attrs(family)
        n_tokens = c.column(family, "n_tokens")
        rti, rli = c.column(family, "random_token_index"), c.column(family, "random_layer_index")  # [N, 2]
        feats = {k: c.column(family, k) for k in ("last_token", "first_token", "first_layer", "first_block",
                                                  "random_token", "random_layer")}
        hints = c.hints(family)
    tok = AutoTokenizer.from_pretrained(family_dirs[family])
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32).eval()
    L = model.config.get_text_config().num_hidden_layers
    fam = FAMILIES[family]
    assert attrs["prompt_format"] == ("plain" if fam.template is None else
                                      "chat_template date=2024-07-26" if "strftime_now" in fam.template else
                                      "chat_template")
    assert rti.shape == (len(questions), 2)
    with torch.inference_mode():
        for i, q in enumerate(questions):
            ids = _reference_ids(tok, q)
            assert n_tokens[i] == len(ids)
            hs = model.base_model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
            ref = {"last_token": hs[L][0, -1], "first_token": hs[L][0, 0], "first_layer": hs[0][0, -1],
                   "first_block": hs[1][0, -1],
                   "random_token": torch.stack([hs[L][0, t] for t in rti[i]]),
                   "random_layer": torch.stack([hs[l][0, -1] for l in rli[i]])}
            for k, v in ref.items():
                err = float((torch.from_numpy(feats[k][i]) - v).abs().max()) / max(1.0, float(v.abs().max()))
                assert err < 1e-5, (family, k, i, err)
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=HINT_TOKENS, do_sample=False)
            assert hints[i] == tok.decode(out[0, len(ids):], skip_special_tokens=True), (family, i)
    assert len(set(hints)) > 1  # the hints depend on the prompt (a constant one would prove little)


def test_the_families_switch_on_what_they_stand_for(family_dirs):
    """The tiny models really carry each family's distinctive parts (else the matrix proves little)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def model(name):
        return AutoModelForCausalLM.from_pretrained(family_dirs[name], dtype=torch.float32)

    assert model("qwen2").model.layers[0].self_attn.q_proj.bias is not None
    assert hasattr(model("phi3").model.layers[0].self_attn, "qkv_proj")
    g = AutoConfig.from_pretrained(family_dirs["gemma2"])
    assert g.sliding_window == 6 and g.attn_logit_softcapping and g.final_logit_softcapping
    assert AutoConfig.from_pretrained(family_dirs["mistral"]).sliding_window == 8
    oss = model("gpt_oss")
    assert oss.config.num_local_experts == 4 and oss.model.layers[0].self_attn.sinks.shape == (2,)
    for name in ("llama", "mistral", "gpt2"):
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(family_dirs[name]).pad_token is None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_random_init_experts_of_every_family(family):
    """kind: random builds each family from its config class (naive-expert stand-ins of any family)."""
    from pipeline.experts import ExpertSpec, load_expert

    spec = ExpertSpec("r", "random", family, config=FAMILIES[family].dims, tokenizer="bytes", seed=1)
    spec.validate()
    model, tok = load_expert(spec, torch.float32)
    assert model.config.model_type == family and model.get_input_embeddings().weight.shape[0] == len(tok)


# ---------------------------------------------------------------------------------------------
# Prompts without a calendar.


class _Day:
    """A stand-in for transformers' clock: strftime_now() reads this day."""

    def __init__(self, day: datetime):
        self.day = day

    def now(self, tz=None):
        return self.day


@pytest.mark.parametrize("family", ["llama", "gpt_oss"])
def test_date_stamping_templates_read_a_fixed_date(family, family_dirs, monkeypatch):
    from transformers import AutoTokenizer
    from transformers.utils import chat_template_utils as ctu

    from pipeline.chat import format_prompt
    from train.inputs import build_prompt_text

    tok = AutoTokenizer.from_pretrained(family_dirs[family])
    msgs = [{"role": "user", "content": "What is 2 + 3?"}]
    plain, ours, policy = [], [], []
    for day in (datetime(2030, 1, 2), datetime(2031, 12, 31)):
        monkeypatch.setattr(ctu, "datetime", _Day(day))
        plain.append(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        text, fmt, add = format_prompt(tok, "What is 2 + 3?")
        ours.append(tok(text, add_special_tokens=add)["input_ids"])
        policy.append(build_prompt_text(tok, "Be brief.", "What is 2 + 3?"))
        assert fmt == "chat_template date=2024-07-26"
    assert plain[0] != plain[1]  # the template itself follows the clock
    assert ours[0] == ours[1] and policy[0] == policy[1]
    assert ("26 Jul 2024" if family == "llama" else "2024-07-26") in tok.decode(ours[0])


def test_the_fixed_date_is_in_the_expert_fingerprint(family_dirs, tmp_path, monkeypatch):
    import pipeline.extract as ex

    cfg = ex.load_extract_config(None, tiny_extract_config(
        tmp_path / "x.h5", experts=[{"name": "llama", "kind": "hf", "model": str(family_dirs["llama"])}], router=False))
    a = ex.plan_extract(cfg, tmp_path / "x.h5", torch.float32, "data").expert_fps["llama"]
    monkeypatch.setattr(ex, "PROMPT_DATE_ISO", "2031-12-31")
    assert ex.plan_extract(cfg, tmp_path / "x.h5", torch.float32, "data").expert_fps["llama"] != a


# ---------------------------------------------------------------------------------------------
# Family habits musk handles, or refuses before any work.


def test_a_template_that_refuses_a_system_turn_gets_it_in_the_user_turn(family_dirs):
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer

    from train.inputs import build_prompt_parts

    tok = AutoTokenizer.from_pretrained(family_dirs["gemma2"])
    with pytest.raises(TemplateError, match="System role not supported"):
        tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], tokenize=False)
    from transformers.utils import chat_template_utils as ctu

    clock = ctu.datetime
    head, tail = build_prompt_parts(tok, "Be brief.", "What is 2+3?")
    assert ctu.datetime is clock  # the fixed clock is put back, also after the template raised
    assert head == "<bos><start_of_turn>user\nBe brief.\n\nWhat is 2+3?"
    assert tail == "<end_of_turn>\n<start_of_turn>model\n"


def test_mxfp4_weights_on_a_cpu_are_refused_before_any_work(family_dirs, tmp_path):
    """gpt-oss ships its experts in MXFP4: on a CPU musk stops before hashing, converting or reading
    anything, naming the family and what to do (the weights here are not even MXFP4: nothing reads them)."""
    import shutil

    from pipeline.extract import load_extract_config, run_extract
    from train.config import load_train_config
    from train.policy import load_policy

    q = tmp_path / "gpt-oss-mxfp4"
    shutil.copytree(family_dirs["gpt_oss"], q)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "lm_head"]}
    (q / "config.json").write_text(json.dumps(cfg))
    (q / "model.safetensors").write_bytes(b"not read")
    out = tmp_path / "c.h5"
    ecfg = load_extract_config(None, tiny_extract_config(out, experts=[{"name": "oss", "kind": "hf", "model": str(q)}],
                                                         router=False))
    with pytest.raises(MuskError, match=r"(?s)gpt_oss.*MXFP4.*device cuda"):
        run_extract(ecfg, **QUIET)
    assert not any(tmp_path.glob("c.h5*"))  # no cache, no parts folder
    with pytest.raises(MuskError, match="gpt_oss.*MXFP4"):
        load_policy(load_train_config(None, tiny_train_overrides(q)), torch.float32, "cpu")


def test_lora_targets_follow_the_family(family_dirs):
    from transformers import AutoModelForCausalLM

    from train.policy import lora_targets

    def targets(name, wanted=("q_proj", "k_proj", "v_proj", "o_proj")):
        m = AutoModelForCausalLM.from_pretrained(family_dirs[name], dtype=torch.float32)
        return lora_targets(m, wanted, name)

    assert targets("phi3") == ["qkv_proj", "o_proj"]
    assert targets("phi3", ("gate_proj", "up_proj", "down_proj")) == ["gate_up_proj", "down_proj"]
    assert targets("qwen2") == ["q_proj", "k_proj", "v_proj", "o_proj"]
    with pytest.raises(MuskError, match=r"gpt2.*no linear modules named 'q_proj'.*c_attn"):
        targets("gpt2")
    with pytest.raises(MuskError, match="gpt_oss.*router of its mixture of experts"):
        targets("gpt_oss", ("q_proj", "router"))


@pytest.mark.slow
def test_a_policy_that_cannot_train_stops_before_the_run_folder(family_dirs, policy_cache, tmp_path):
    """LoRA names the family lacks (GPT-2 has c_attn, not q_proj) or MXFP4 on a CPU: refused before any
    run folder, config.yaml or weights exist."""
    import shutil

    from train.config import load_train_config
    from train.loop import run_train

    q = tmp_path / "oss-mxfp4"
    shutil.copytree(family_dirs["gpt_oss"], q)
    cfg = json.loads((q / "config.json").read_text())
    (q / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "mxfp4"}}))
    for policy, msg in ((family_dirs["gpt2"], r"\(gpt2\) has no linear modules named 'q_proj'"), (q, "MXFP4")):
        with pytest.raises(MuskError, match=msg):
            run_train(load_train_config(None, tiny_train_overrides(policy)), policy_cache, tmp_path / "run", **TRAIN)
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# As a policy: two GRPO steps of every method.

STABLE = dict(context_position="after-question", context_gate="rms", context_rms=3.0, gate_lr=3e-3,
              feature_norm="standardize", context_anchor="mean-embedding", grad_clip_scope="per-group")
METHODS = ["single", "perceiver", "ffn", "hard-routing", "output-collab"]


@pytest.fixture(scope="module")
def policy_cache(tmp_path_factory):
    """Two tiny random experts with hints and the router, on letter-counting prompts of unequal
    length (the policy's batches are left padded)."""
    from pipeline.extract import load_extract_config, run_extract
    from tests.helpers import write_yaml

    d = tmp_path_factory.mktemp("policy-cache")
    cfg = tiny_extract_config(d / "p.h5", task={**LETTERS, "train_size": 8, "val_size": 4})
    return run_extract(load_extract_config(str(write_yaml(d / "e.yaml", cfg))), **QUIET)


@pytest.mark.slow
@pytest.mark.parametrize("family", POLICY_FAMILIES)
def test_policy_trains_every_method(family, family_dirs, policy_cache, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.config import load_train_config
    from train.loop import run_train

    folder = family_dirs[family]
    for method in METHODS:
        ov = tiny_train_overrides(folder, method=method, total_training_steps=2, gradient_accumulation_steps=1,
                                  eval_without_context=False, **STABLE)
        run = run_train(load_train_config(None, ov), policy_cache, tmp_path / method, **TRAIN)
        m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in m] == [1, 2] and all(np.isfinite(r["loss"]) for r in m), (family, method)
        assert m[0]["kl"] == 0.0, (family, method)  # LoRA B = 0 and the gate shut: policy == reference
        acfg = json.loads((run / "final" / "adapter_config.json").read_text())
        assert sorted(acfg["target_modules"]) == sorted(FAMILIES[family].lora)
        assert acfg["base_model_name_or_path"] == str(folder.resolve())
    # the last run's final/ with plain PEFT: LoRA on the family's modules, trained (B moved from 0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, run / "final")
    wrapped = {n.rsplit(".", 1)[-1] for n, mod in peft.named_modules() if hasattr(mod, "lora_A")}
    assert wrapped == set(FAMILIES[family].lora)
    assert any(float(v.abs().max()) > 0 for k, v in peft.state_dict().items() if "lora_B" in k)


def test_a_policy_with_dropout_starts_at_kl_zero(family_dirs, policy_cache, tmp_path):
    """GPT-2's config has dropout 0.1 (embeddings, residuals, attention); GRPO runs the policy in train
    mode, so musk turns dropout off: KL is exactly 0 at step 0 (LoRA on GPT-2's fused c_attn)."""
    from transformers import AutoConfig

    from train.config import load_train_config
    from train.loop import run_train

    assert AutoConfig.from_pretrained(family_dirs["gpt2"]).resid_pdrop == 0.1
    ov = tiny_train_overrides(family_dirs["gpt2"], method="perceiver", total_training_steps=1,
                              gradient_accumulation_steps=1, eval_without_context=False,
                              lora_target_modules=["c_attn"], **STABLE)
    run = run_train(load_train_config(None, ov), policy_cache, tmp_path / "gpt2", **TRAIN)
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["kl"] == 0.0
