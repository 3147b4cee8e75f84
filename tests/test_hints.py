"""output-collab: Eq. 12 as written (a literal [Expert Hints] block where C goes, the reference given
zero-valued tokens there) and musk's labelled, in-turn form, as config switches."""

import pytest
import torch

from core.errors import MuskError
from tests.helpers import ROOT, tiny_train_overrides
from train.config import load_train_config
from train.inputs import hint_block_text

HINTS = [("a", "  x = 3\n"), ("b", "so 4 ")]


def test_hint_block_text_by_hand():
    assert hint_block_text(HINTS, "literal") == "[Expert Hints]\n  x = 3\n\nso 4 "  # verbatim, unlabelled
    assert hint_block_text(HINTS, "labelled") == "[Expert Hints]\n- a: x = 3\n- b: so 4"
    with pytest.raises(MuskError, match="unknown hint_format 'x'.*literal"):
        hint_block_text(HINTS, "x")


def test_zeros_reference_needs_the_context_position(tiny_policy):
    with pytest.raises(MuskError, match="hint_reference zeros needs hint_position context"):
        load_train_config(None, tiny_train_overrides(tiny_policy, hint_position="user-turn", hint_reference="zeros"))


def test_presets_choose_their_hint_form():
    for preset in ("paper", "paper-gsm8k", "paper-h100"):
        cfg = load_train_config(str(ROOT / "configs" / "train" / f"{preset}.yaml"))
        assert (cfg.hint_format, cfg.hint_position, cfg.hint_reference) == ("literal", "context", "zeros")
    cfg = load_train_config(None)
    assert (cfg.hint_format, cfg.hint_position, cfg.hint_reference) == ("labelled", "user-turn", "reads")


def _inputs(tiny_cache, tiny_policy, **ov):
    from train.inputs import policy_inputs
    from train.setup import build_models, load_data

    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="output-collab", **ov))
    data = load_data(cfg, tiny_cache)
    m = build_models(cfg, data, "cpu", torch.float32)
    idx = [0, 5]
    with torch.no_grad():
        return cfg, m, data, idx, policy_inputs(cfg, m, data, idx, "cpu"), policy_inputs(cfg, m, data, idx, "cpu",
                                                                                         mode="removed")


def test_literal_block_where_c_goes_and_zero_reference(tiny_cache, tiny_policy):
    from train.inputs import encode_blocks

    cfg, m, data, idx, pi, bare = _inputs(tiny_cache, tiny_policy, hint_format="literal", hint_position="context",
                                          hint_reference="zeros", context_position="suffix")
    E = m.lm.get_input_embeddings()
    for r, i in enumerate(idx):
        block = hint_block_text([(n, data.hints[n][i]) for n in data.experts], "literal")
        ids, mk = encode_blocks(m.tok, [block], "cpu")
        H, P = int(mk.sum()), int(bare.mask[r].sum())
        real = pi.mask[r].bool()
        assert int(real.sum()) == P + H and bool(pi.mask[r, -(P + H):].all())  # left aligned, nothing lost
        got = pi.embeds[r][real]  # [P+H, d]: the bare prompt, then the block (suffix: [x || C])
        torch.testing.assert_close(got[:P], bare.embeds[r][bare.mask[r].bool()], rtol=0, atol=0)
        torch.testing.assert_close(got[P:], E(ids[0, :H]), rtol=0, atol=0)
        ref = pi.ref_embeds[r][real]
        torch.testing.assert_close(ref[:P], got[:P], rtol=0, atol=0)
        assert bool((ref[P:] == 0).all())  # the reference reads zero-valued tokens at the hints


def test_labelled_in_turn_read_by_the_reference(tiny_cache, tiny_policy):
    from train.inputs import prompt_batch

    cfg, m, data, idx, pi, bare = _inputs(tiny_cache, tiny_policy, hint_format="labelled",
                                          hint_position="user-turn", hint_reference="reads")
    assert torch.equal(pi.embeds, pi.ref_embeds)  # the reference reads the hints too
    pb = prompt_batch(m, data, idx, True, "cpu", hint_format="labelled")
    text = m.tok.decode(pb.ids[0][pb.mask[0].bool()])
    assert f"- {data.experts[0]}: " in text and "[Expert Hints]" in text
    assert int(pi.mask[0].sum()) == int(pb.mask[0].sum()) > int(bare.mask[0].sum())  # no extra block slots
