"""The policy's prompt layout: where C goes (suffix, prefix, after-question), the tail of the
format, and log-probs under a sampling temperature."""

import pytest
import torch

from train.inputs import build_prompt_parts, build_prompt_text, encode_prompts, splice


def test_splice_positions_hand_worked():
    # 2 rows, P = 5 (row 1 left-padded by 2), tail 2 (the end of turn + generation prompt), m = 2
    e = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    C = torch.tensor([[[-1.0], [-2.0]], [[-3.0], [-4.0]]])
    col = lambda x: x[..., 0].tolist()  # noqa: E731
    ee, mm = splice(e, mask, C, "suffix", tail=2)
    assert col(ee)[1] == [5, 6, 7, 8, 9, -3, -4] and mm.tolist()[1] == [0, 0, 1, 1, 1, 1, 1]
    ee, mm = splice(e, mask, C, "prefix", tail=2)
    assert col(ee)[1] == [-3, -4, 5, 6, 7, 8, 9] and mm.tolist()[1] == [1, 1, 0, 0, 1, 1, 1]
    ee, mm = splice(e, mask, C, "after-question", tail=2)
    assert col(ee)[0] == [0, 1, 2, -1, -2, 3, 4] and col(ee)[1] == [5, 6, 7, -3, -4, 8, 9]
    assert mm.tolist()[1] == [0, 0, 1, 1, 1, 1, 1]
    assert splice(e, mask, None, "after-question", tail=2)[0] is e


def test_prompt_parts_split_after_the_users_content(tiny_policy):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy)
    head, tail = build_prompt_parts(tok, "Be brief.", "What is 2+3?", [("e1", "five ")])
    assert head.endswith("What is 2+3?\n\n[Expert Hints]\n- e1: five")
    assert tail == "</s><s>assistant: "  # the tiny chat template's end of turn + generation prompt
    assert head + tail == build_prompt_text(tok, "Be brief.", "What is 2+3?", [("e1", "five ")])
    tok.chat_template = None  # plain format: system, blank line, "Question: ...\nAnswer:"
    head, tail = build_prompt_parts(tok, "Be brief.", "Q?")
    assert (head, tail) == ("Be brief.\n\nQuestion: Q?", "\nAnswer:")


def test_encode_prompts_puts_the_tail_in_one_column(tiny_policy):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_policy)
    tok.padding_side = "left"
    parts = [build_prompt_parts(tok, "S", q) for q in ("a", "a longer question")]
    pb = encode_prompts(tok, parts, "cpu")
    tail_ids = tok(parts[0][1], add_special_tokens=False)["input_ids"]
    assert pb.tail == len(tail_ids)
    assert pb.ids[:, -pb.tail:].tolist() == [tail_ids, tail_ids]
    # the same tokens as the whole prompt tokenized at once (the boundary is a special token here)
    for row, (h, t) in zip(pb.ids.tolist(), parts):
        whole = tok(h + t, add_special_tokens=False)["input_ids"]
        assert row[len(row) - len(whole):] == whole
    with pytest.raises(ValueError, match="share their tail"):
        encode_prompts(tok, [("a", "x"), ("b", "y")], "cpu")


def test_logprobs_follow_the_sampling_temperature():
    """With temperature T, the loss reads log softmax(logits / T): the distribution the rollouts were
    drawn from (a mismatch would make ratio and KL compare different policies)."""
    from pipeline.experts import ExpertSpec, load_expert
    from pipeline.generation import positions
    from tests.helpers import TINY_LLAMA
    from train.policy import completion_logprobs

    lm, tok = load_expert(ExpertSpec("t", "random", "llama", config=TINY_LLAMA, tokenizer="bytes", seed=3),
                          torch.float32)
    ids = torch.tensor([tok("12 + 7 =")["input_ids"]])
    comp = torch.tensor([[50, 60, 70]])
    live = torch.ones_like(comp)
    emb = lm.get_input_embeddings()(ids)
    full = torch.cat([ids, comp], 1)
    with torch.no_grad():
        logits = lm(input_ids=full, position_ids=positions(torch.ones_like(full))).logits[0, ids.shape[1] - 1:-1]
        for T in (1.0, 0.5, 1.7):
            got = completion_logprobs(lm, emb, torch.ones_like(ids), comp, live, temperature=T)[0]
            want = torch.log_softmax(logits / T, -1)[torch.arange(3), comp[0]]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(completion_logprobs(lm, emb, torch.ones_like(ids), comp, live, temperature=0.5),
                                  completion_logprobs(lm, emb, torch.ones_like(ids), comp, live))


def test_merged_lora_decodes_the_same_and_puts_w_back(tiny_policy):
    """Inside merged_lora each LoRA linear computes x (W + s B A) with its branch off: the logits equal
    the LoRA forward's within fp32 rounding (and differ from the base model's: B A is really used), greedy
    tokens are identical, and every base weight is its original tensor again afterwards, also when the
    body raises."""
    from peft.tuners.lora import LoraLayer

    from pipeline.generation import eos_ids, generate
    from tests.helpers import tiny_train_overrides
    from train.config import load_train_config
    from train.policy import load_policy, merged_lora

    peft, tok, _ = load_policy(load_train_config(None, tiny_train_overrides(tiny_policy)), torch.float32, "cpu")
    lm = peft.get_base_model()
    torch.manual_seed(0)
    for name, p in peft.named_parameters():
        if "lora_B" in name:  # B starts at zero; make B A count
            p.data.normal_(0, 0.3)
    layers = [mod for mod in lm.modules() if isinstance(mod, LoraLayer)]
    weights = [mod.get_base_layer().weight for mod in layers]
    ids = torch.tensor([tok("12 + 7 =")["input_ids"]] * 2)
    with torch.no_grad():
        want = lm(input_ids=ids).logits
        with peft.disable_adapter():
            base = lm(input_ids=ids).logits
        with merged_lora(peft):
            got = lm(input_ids=ids).logits
        with merged_lora(peft, enabled=False):
            assert torch.equal(lm(input_ids=ids).logits, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (base - want).abs().max() > 1e-2
    assert all(mod.get_base_layer().weight is w for mod, w in zip(layers, weights))

    emb, mask = lm.get_input_embeddings()(ids), torch.ones_like(ids)
    a = generate(lm, emb, mask, 8, eos=eos_ids(lm, tok), pad_id=tok.pad_token_id, greedy=True)
    with merged_lora(peft):
        b = generate(lm, emb, mask, 8, eos=eos_ids(lm, tok), pad_id=tok.pad_token_id, greedy=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(RuntimeError), merged_lora(peft):
        raise RuntimeError("inside")
    assert all(mod.get_base_layer().weight is w for mod, w in zip(layers, weights))
    with torch.no_grad():
        assert torch.equal(lm(input_ids=ids).logits, want)  # adapters back on


def test_decode_merged_auto_is_float32_only():
    from types import SimpleNamespace

    from train.inputs import decode_merged

    def m(dtype):
        return SimpleNamespace(lm=SimpleNamespace(dtype=dtype))

    def cfg(v):
        return SimpleNamespace(sampling=SimpleNamespace(decode_merged=v))

    assert decode_merged(cfg("auto"), m(torch.float32)) and not decode_merged(cfg("auto"), m(torch.bfloat16))
    assert decode_merged(cfg("on"), m(torch.bfloat16)) and not decode_merged(cfg("off"), m(torch.float32))


def test_the_loop_and_the_evaluations_go_through_the_policys_face():
    """Training and evaluation build inputs, decode and take log-probs through Policy's methods: they
    import none of the free functions behind them, and no file of train/ or evaluate/ probes g_phi with
    hasattr (its class declares `caps`)."""
    import ast

    from tests.helpers import ROOT

    behind = {"policy_inputs", "rollout_inputs", "completion_logprobs", "merged_lora", "decode_merged", "sample",
              "decode", "save_policy", "save_adapter", "load_weights"}
    for rel in ("train/loop.py", "train/recipes.py", "evaluate/records.py", "evaluate/run.py"):
        tree = ast.parse((ROOT / rel).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not names & behind, f"{rel} imports {sorted(names & behind)}: call the Policy's methods"
    probes = [f"{p.relative_to(ROOT)}:{n.lineno}" for pkg in ("train", "evaluate") for p in (ROOT / pkg).rglob("*.py")
              for n in ast.walk(ast.parse(p.read_text()))
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "hasattr"]
    assert not probes, f"hasattr probes (read the module's caps): {probes}"
