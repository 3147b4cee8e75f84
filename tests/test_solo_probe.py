"""The decodability probe (`musk probe`): a variant that carries the label is decoded, one that does
not sits at chance; what a first-token target shows against the whole answer and the question-only
control; its intervals; the command end to end on a tiny cache."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from analyze.probe import (ProbeConfig, first_token_labels, linear_probe, paired_difference, probe_rows,
                          target_labels, wilson)
from core.errors import MuskError


def _synthetic(seed: int, n_train=400, n_val=200, k=5, d=16):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n_train + n_val)
    centers = rng.normal(size=(k, d)) * 3.0
    informative = centers[y] + rng.normal(size=(len(y), d))  # the label, linearly
    noise = rng.normal(size=(len(y), d))  # nothing
    return y, informative, noise, n_train


@pytest.mark.slow
def test_probe_decodes_the_informative_variant_only():
    y, informative, noise, n = _synthetic(0)
    r = linear_probe(informative[:n], y[:n], informative[n:], y[n:])
    assert r.accuracy > 0.95 and r.n_train == 400 and r.n_val == 200 and r.classes == 5
    assert r.shuffled < 0.35 and r.shuffled_p95 < 0.4 and r.permutations == 20  # no information learned
    assert r.chance == pytest.approx(0.2) and r.accuracy_lo <= r.accuracy <= r.accuracy_hi
    m = np.mean(y[n:] == np.bincount(y[:n]).argmax())
    assert r.majority == pytest.approx(m, abs=1e-12)
    z = linear_probe(noise[:n], y[:n], noise[n:], y[n:])
    assert z.accuracy < 0.35 and z.shuffled < 0.35


@pytest.mark.slow
def test_probe_on_noise_is_calibrated():
    """Null simulation: on uninformative features the probe beats the majority rate by more than a
    binomial 2.5-sigma margin in at most 2 of 20 draws."""
    wins = 0
    for s in range(20):
        y, _, noise, n = _synthetic(100 + s, n_train=200, n_val=200, k=4, d=8)
        r = linear_probe(noise[:n], y[:n], noise[n:], y[n:])
        p = max(r.majority, 0.25)
        wins += r.accuracy > p + 2.5 * np.sqrt(p * (1 - p) / r.n_val)
    assert wins <= 2


def test_unconverged_fits_are_counted_not_printed(recwarn):
    """lbfgs capped at 2 iterations stops early in every fit: the count says so, and no warning escapes."""
    from analyze.probe import probe_markdown

    y, informative, _, n = _synthetic(1, n_train=120, n_val=40, k=3, d=8)
    capped = linear_probe(informative[:n], y[:n], informative[n:], y[n:], ProbeConfig(max_iter=2))
    assert capped.unconverged == 21 and not [w for w in recwarn if "converge" in str(w.message)]
    assert linear_probe(informative[:n], y[:n], informative[n:], y[n:]).unconverged == 0
    row = {**capped._asdict(), "expert": "e", "variant": "v", "dim": 8, "minus_control": None, "seconds": 0.0,
           "split": "val", "target": "answer"}
    assert "in 21 of 42 fits" in probe_markdown([{**row, "unconverged": 0}, row], "t")


def test_probe_edge_cases():
    x = np.zeros((4, 3))
    with pytest.raises(MuskError, match="one class"):  # every classifier would be the majority rule
        linear_probe(x, np.array([7, 7, 7, 7]), x[:2], np.array([7, 1]))
    with pytest.raises(MuskError, match="training and held-out"):
        linear_probe(x[:0], np.array([], dtype=int), x, np.zeros(4, dtype=int))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(MuskError, match="non-finite"):
        linear_probe(bad, np.arange(4), x, np.arange(4))
    with pytest.raises(MuskError, match="at least 20 permutations"):
        linear_probe(x, np.arange(4), x, np.arange(4), ProbeConfig(permutations=19))


def test_wilson_hand_worked():
    """8/10: centre (0.8 + z²/20) / (1 + z²/10) = 0.71674, half 1.96 sqrt(0.016 + z²/400) / 1.38415 =
    0.22657; 0/10: [0, 0.27753]; 10/10 mirrors it."""
    assert wilson(8, 10) == pytest.approx((0.49016, 0.94331), abs=1e-5)
    assert wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)


def test_paired_difference_hand_worked_and_calibrated():
    """a = [1,1,0,0,1,0,1,1], b = [0,1,0,1,0,0,0,1]: 2 both, 3 a only, 1 b only, 2 neither; shares 5/8
    and 3/8, Wilson (0.30574, 0.86316) and (0.13684, 0.69426), phi = (2*2 - 3*1) / sqrt(5*3*3*5) = 1/15;
    lower margin 0.31926 sqrt(2 - 2/15) = 0.43619, upper 0.23816 sqrt(2 - 2/15) = 0.32539: +0.25
    [-0.18619, +0.57539]. Identical outcomes (phi = 1): 0 ± |(p - l) - (u - p)| = 0.08110. Swapping the
    sides mirrors the interval; over 2,000 simulated pairs of correlated outcomes (n = 64, true shares
    0.6 and 0.5) it covers the true +0.1 in 93-97% of draws."""
    a = np.array([1, 1, 0, 0, 1, 0, 1, 1])
    b = np.array([0, 1, 0, 1, 0, 0, 0, 1])
    assert paired_difference(a, b) == pytest.approx((0.25, -0.18619, 0.57539), abs=1e-5)
    assert paired_difference(a, a) == pytest.approx((0.0, -0.08110, 0.08110), abs=1e-5)
    d, lo, hi = paired_difference(a, b)
    assert paired_difference(b, a) == pytest.approx((-d, -hi, -lo))
    rng = np.random.default_rng(0)
    cover = 0
    for _ in range(2000):
        u = rng.random(64)
        x, y = u < 0.6, (u + 0.3 * rng.standard_normal(64)) % 1 < 0.5  # correlated, true shares 0.6, 0.5
        _, lo, hi = paired_difference(x, y)
        cover += lo <= 0.1 <= hi
    assert 0.93 <= cover / 2000 <= 0.97


def test_first_token_labels(tiny_policy):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_policy))
    got = first_token_labels(tok, ["12", "7"])
    assert got.tolist() == [tok("12", add_special_tokens=False)["input_ids"][0], tok("7", add_special_tokens=False)["input_ids"][0]]
    with pytest.raises(MuskError, match="no tokens"):
        first_token_labels(tok, ["3", ""])


def _terms_task(n=400, seed=0):
    """Questions "a + b =" (a in 1..9, b in 0..9) whose answers are str(a) followed by a digit r drawn
    independently of the question: the first token (a's digit, byte tokenizer) follows from the question,
    the whole answer does not. The "expert" is a one-hot of the two terms [n, 19]."""
    rng = np.random.default_rng(seed)
    a, b, r = rng.integers(1, 10, n), rng.integers(0, 10, n), rng.integers(0, 10, n)
    texts = [f"Add: {x} + {y} =" for x, y in zip(a, b)]
    answers = [f"{x}{z}" for x, z in zip(a, r)]
    onehot = np.concatenate([np.eye(9)[a - 1], np.eye(10)[b]], axis=1)
    return texts, answers, onehot


@pytest.mark.slow
def test_first_token_target_reads_the_question_and_the_whole_answer_does_not():
    """By construction: a one-hot of the question's terms decodes the first token on every held-out
    prompt, and exactly as well as the question-only control (expert − control: 0, its interval
    around 0); the whole answer (a random second digit) stays at the shuffled-label level."""
    from pipeline.experts import byte_tokenizer

    tok = byte_tokenizer()
    texts, answers, onehot = _terms_task()
    train, val = np.arange(300), np.arange(300, 400)
    y, _ = target_labels("first-token", answers, tok, train)
    ctrl, expert = probe_rows([("terms", "one-hot", onehot)], texts, y, train, val=val, tok=tok)
    assert expert["accuracy"] == 1.0 and ctrl["accuracy"] == 1.0 and ctrl["expert"] == "question-only control"
    assert expert["minus_control"] == 0.0 and expert["minus_control_lo"] <= 0.0 <= expert["minus_control_hi"]
    assert expert["classes"] == 9 and expert["chance"] == pytest.approx(1 / 9) and expert["permutations"] == 20
    y, _ = target_labels("answer", answers, tok, train)
    ctrl, expert = probe_rows([("terms", "one-hot", onehot)], texts, y, train, val=val, tok=tok)
    assert expert["classes"] >= 85 and expert["accuracy"] < 0.25 and expert["accuracy_lo"] < 0.2
    assert expert["accuracy"] <= expert["shuffled_p95"] + 0.12


class _LeadingMarker:
    """A Llama-2 style tokenizer: every answer's first token is the word-start marker, then its digits."""

    def __init__(self, tok):
        self.tok, self.marker = tok, tok.convert_tokens_to_ids("Ġ")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.marker] + self.tok(text, add_special_tokens=False)["input_ids"]}

    def convert_ids_to_tokens(self, ids):
        return self.tok.convert_ids_to_tokens(ids)


def test_a_one_class_target_is_refused():
    from pipeline.experts import byte_tokenizer

    tok = _LeadingMarker(byte_tokenizer())
    with pytest.raises(MuskError, match="first-token target has one class.*every label is 'Ġ'"):
        target_labels("first-token", ["12", "7", "30"], tok, np.arange(3))
    assert len(np.unique(target_labels("answer", ["12", "7", "30"], tok, np.arange(3))[0])) == 3
    with pytest.raises(MuskError, match="answer target has one class"):
        target_labels("answer", ["4", " 4", "5"], tok, np.arange(2))
    with pytest.raises(MuskError, match="unknown probe target"):
        target_labels("last-token", ["4"], tok, np.arange(1))


@pytest.mark.slow
def test_probe_cli_end_to_end(tiny_cache, tiny_policy, tmp_path):
    from cache.reader import Cache
    from cli import app

    res = CliRunner().invoke(app, ["probe", str(tiny_cache), "--policy", str(tiny_policy), "--out",
                                   str(tmp_path / "probe")])
    assert res.exit_code == 0, res.output
    with Cache(tiny_cache) as c:
        for e in c.experts:
            for v in c.variants:
                assert f"| {e} | {v} |" in res.output
        n_val, n_rows = len(c.split_indices("val")), len(c.experts) * len(c.variants)
    assert f"of {n_val} val prompts" in res.output and "| question-only control |" in res.output
    assert "Target: the whole reference answer" in res.output and "20 permutations" in res.output
    assert (tmp_path / "probe.md").read_text().startswith("### Decodability probe")
    # a header, the control and one line per probe
    assert (tmp_path / "probe.csv").read_text().strip().count("\n") == n_rows + 1
    bad = CliRunner().invoke(app, ["probe", str(tmp_path / "nope.h5"), "--policy", str(tiny_policy)])
    assert bad.exit_code == 2 and "does not exist" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(app, ["probe", str(tiny_cache), "--policy", str(tiny_policy), "--max-train", "0"])
    assert bad.exit_code == 2 and "--max-train" in bad.output
    for args, want in ((["--permutations", "5"], "--permutations"), (["--target", "last"], "--target")):
        bad = CliRunner().invoke(app, ["probe", str(tiny_cache), "--policy", str(tiny_policy), *args])
        assert bad.exit_code == 2 and want in bad.output and "Traceback" not in bad.output
    # --variants: only the named variants are probed; one the cache lacks is refused by name
    one = CliRunner().invoke(app, ["probe", str(tiny_cache), "--policy", str(tiny_policy), "--variants", "last_token"])
    assert one.exit_code == 0, one.output
    assert "| last_token |" in one.output and "| first_token |" not in one.output
    bad = CliRunner().invoke(app, ["probe", str(tiny_cache), "--policy", str(tiny_policy), "--variants", "nope"])
    assert bad.exit_code == 2 and "no pooling variant(s) ['nope']" in bad.output and "Traceback" not in bad.output


def test_probe_cli_refuses_a_one_class_first_token(tiny_cache, tiny_policy, monkeypatch):
    """A tokenizer whose first token of every answer is the word-start marker: the first-token probe
    is refused (exit 2, no traceback) instead of printing 100 / 100 / 100."""
    import pipeline.experts
    from cli import app

    real = pipeline.experts.load_tokenizer_from
    monkeypatch.setattr(pipeline.experts, "load_tokenizer_from", lambda name: _LeadingMarker(real(name)))
    res = CliRunner().invoke(app, ["probe", str(tiny_cache), "--policy", str(tiny_policy), "--target", "first-token"])
    assert res.exit_code == 2 and "one class" in res.output and "Traceback" not in res.output
    assert "100.0" not in res.output
