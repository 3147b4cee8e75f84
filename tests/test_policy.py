"""The policy's prompt layout: where C goes (suffix, prefix, after-question), the tail of the
format, and log-probs under a sampling temperature."""

import pytest
import torch

from train.policy import build_prompt_parts, build_prompt_text, encode_prompts, splice


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
    assert splice(e, mask, None, "after-question", 2)[0] is e


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
