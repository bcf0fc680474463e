"""CORE on a handmade bundle whose right answers are known by construction, plus the real bundle."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from nanotrain.errors import UserError
from nanotrain.eval import core
from nanotrain.eval.core import evaluate_core, fewshot_indices, load_rows, load_tasks, render_prompts
from tests.eval.eval_standins import BOS, BigramLM, ByteTokenizer, handmade_rows, oracle_table, write_bundle

REPO = Path(__file__).resolve().parents[2]
REAL_BUNDLE = REPO.parent / "shared" / "data" / "core_eval_bundle"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    tasks, rows = handmade_rows()
    return write_bundle(tmp_path_factory.mktemp("bundle") / "eval_bundle", tasks, rows)


def expected(bundle: Path, n: int, key=lambda row: row["oracle"]) -> dict[str, float]:
    """Accuracy over the first n shuffled rows of each task, read from the rows themselves."""
    out = {}
    for task in load_tasks(bundle):
        rows = load_rows(task)[: n if n > 0 else None]
        out[task.label] = sum(bool(key(r)) for r in rows) / len(rows)
    return out


def test_oracle_accuracies_and_centering(bundle):
    model = BigramLM(oracle_table())
    res = evaluate_core(model, ByteTokenizer(), "cpu", bundle_dir=bundle)
    # by construction: mc 5/8, schema 4/6, lm and lm_space 3/7 (all-'z' continuations)
    want = {"mc": 5 / 8, "schema": 4 / 6, "lm": 3 / 7, "lm_space": 3 / 7}
    assert res["results"] == pytest.approx(want, abs=1e-12)
    centered = {"mc": (5 / 8 - 0.25) / 0.75, "schema": (4 / 6 - 0.5) / 0.5, "lm": 3 / 7, "lm_space": 3 / 7}
    assert res["centered_results"] == pytest.approx(centered, abs=1e-12)
    assert res["core_metric"] == pytest.approx(sum(centered.values()) / 4, abs=1e-12)
    assert res["num_examples"] == {"mc": 8, "schema": 6, "lm": 7, "lm_space": 7}


def test_uniform_model_picks_first_choice(bundle):
    """Equal losses everywhere: choice 0 wins every tie, and greedy decoding of a flat distribution
    predicts token 0, which no continuation contains."""
    model = BigramLM(torch.zeros(257, 257))
    res = evaluate_core(model, ByteTokenizer(), "cpu", bundle_dir=bundle)
    gold0 = expected(bundle, -1, key=lambda r: r.get("gold") == 0)
    assert res["results"]["mc"] == pytest.approx(gold0["mc"])
    assert res["results"]["schema"] == pytest.approx(gold0["schema"])
    assert res["results"]["lm"] == 0.0 and res["results"]["lm_space"] == 0.0
    assert res["centered_results"]["mc"] == pytest.approx((gold0["mc"] - 0.25) / 0.75)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_max_per_task_smaller_than_fewshot(bundle, n):
    """Few-shot rows come from the whole task, so n < num_fewshot + 1 works, and each kept row is scored
    exactly as in a full run (the first n shuffled rows)."""
    model = BigramLM(oracle_table())
    res = evaluate_core(model, ByteTokenizer(), "cpu", bundle_dir=bundle, max_per_task=n)
    assert res["results"] == pytest.approx(expected(bundle, n), abs=1e-12)
    assert set(res["num_examples"].values()) == {n}


def test_truncation_keeps_the_scored_continuation(bundle):
    """Rows cropped from the left to 20 tokens (few-shot context lost) still score the same answers."""
    model = BigramLM(oracle_table(), sequence_len=20)
    seen = []
    real_forward = model.forward

    def spy(idx, *a, **k):
        seen.append(idx.shape[1])
        return real_forward(idx, *a, **k)

    model.forward = spy
    res = evaluate_core(model, ByteTokenizer(), "cpu", bundle_dir=bundle)
    assert max(seen) == 20
    assert res["results"] == pytest.approx(expected(bundle, -1), abs=1e-12)


def test_batching_does_not_change_results(bundle):
    tok = ByteTokenizer()
    table = torch.randn(257, 257) * 3
    one = evaluate_core(BigramLM(table), tok, "cpu", bundle_dir=bundle, batch_size=1)
    many = BigramLM(table)
    big = evaluate_core(many, tok, "cpu", bundle_dir=bundle, batch_size=64, max_batch_tokens=10**6)
    assert one["results"] == big["results"]
    assert many.calls == 4  # one forward per task: every example of a task shares it


def test_tasks_subset_and_unknown_task(bundle):
    res = evaluate_core(BigramLM(oracle_table()), ByteTokenizer(), "cpu", bundle_dir=bundle, tasks=["schema"])
    assert list(res["results"]) == ["schema"]
    assert res["core_metric"] == pytest.approx((4 / 6 - 0.5) / 0.5)
    with pytest.raises(UserError, match="unknown CORE task.*nope"):
        evaluate_core(BigramLM(oracle_table()), ByteTokenizer(), "cpu", bundle_dir=bundle, tasks=["nope"])


def test_render_prompts_exact_text():
    mc_shot = {"query": "Q1", "choices": ["a", "b"], "gold": 1}
    item = {"query": "Q2", "choices": ["c", "d"], "gold": 0}
    assert render_prompts("multiple_choice", item, "\nAnswer: ", [mc_shot]) == [
        "Q1\nAnswer: b\n\nQ2\nAnswer: c", "Q1\nAnswer: b\n\nQ2\nAnswer: d"]
    sc_shot = {"context_options": ["x1", "x2"], "continuation": "ends", "gold": 0}
    item = {"context_options": ["y1", "y2"], "continuation": "goes", "gold": 1}
    assert render_prompts("schema", item, " ", [sc_shot]) == ["x1 ends\n\ny1 goes", "x1 ends\n\ny2 goes"]
    lm_shot = {"context": "  C1 \n", "continuation": "one"}
    item = {"context": "C2  ", "continuation": "two"}
    assert render_prompts("language_modeling", item, " ", [lm_shot]) == ["C1 one\n\nC2", "C1 one\n\nC2 two"]
    with pytest.raises(ValueError):
        render_prompts("essay", item, " ", [])


def test_spans_of_each_task_type():
    tok = ByteTokenizer()
    rows, starts, ends = core._spans("multiple_choice", tok.encode(["ab zz", "ab yyy"], prepend=BOS))
    assert starts == [4, 4] and ends == [6, 7]
    rows, starts, ends = core._spans("schema", tok.encode(["A@ go", "BB# go"], prepend=BOS))
    assert [r[s:e] for r, s, e in zip(rows, starts, ends)] == [list(b" go"), list(b" go")]
    rows, starts, ends = core._spans("language_modeling", tok.encode(["ctx:", "ctx: zz"], prepend=BOS))
    assert len(rows) == 1 and rows[0][starts[0]:ends[0]] == list(b" zz")
    # one answer a token-prefix of another: both still score at least one token
    rows, starts, ends = core._spans("multiple_choice", tok.encode(["q a", "q ab"], prepend=BOS))
    assert starts == [3, 3] and ends == [4, 5]


def test_fewshot_draws_match_the_list_form_and_exclude_the_item():
    for n, k in [(5, 3), (50, 10), (3000, 10), (4, 10), (1, 3)]:
        for idx in range(0, n, max(1, n // 7)):
            got = fewshot_indices(idx, n, k)
            if n - 1 >= k:
                want = random.Random(1234 + idx).sample([i for i in range(n) if i != idx], k)
                assert got == want
            assert idx not in got and len(got) == min(k, n - 1) and len(set(got)) == len(got)
            assert got == fewshot_indices(idx, n, k)


@pytest.mark.skipif(not REAL_BUNDLE.is_dir(), reason=f"the real CORE bundle is not at {REAL_BUNDLE}")
def test_real_bundle_all_tasks_runs():
    """All 22 tasks of the real bundle, 8 rows each, through a tiny random GPT with a BPE tokenizer trained on
    a slice of the bundle's own text; rows longer than sequence_len=256 are cropped from the left."""
    from nanotrain.data.tokenizer import train_tokenizer
    from nanotrain.model import GPT, GPTConfig

    tasks = load_tasks(REAL_BUNDLE)
    assert len(tasks) == 22 and {t.task_type for t in tasks} == set(core.TASK_TYPES)
    assert [t.label for t in tasks][:3] == ["hellaswag_zeroshot", "jeopardy", "bigbench_qa_wikidata"]
    text = [json.dumps(row) for t in tasks for row in load_rows(t)[:20]]
    tok = train_tokenizer(text, vocab_size=512)
    model = GPT(GPTConfig(sequence_len=256, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    model.init_weights()
    res = evaluate_core(model, tok, "cpu", bundle_dir=REAL_BUNDLE, max_per_task=8)
    assert len(res["results"]) == 22 and all(n == 8 for n in res["num_examples"].values())
    for label, acc in res["results"].items():
        assert 0.0 <= acc <= 1.0 and acc * 8 == int(acc * 8), label
    assert res["core_metric"] == pytest.approx(sum(res["centered_results"].values()) / 22)
    # the real baselines: e.g. boolq 62 %, a 4-way task 25 %
    base = {t.label: t.random_baseline for t in tasks}
    assert base["boolq"] == 62 and base["arc_easy"] == 25
    assert res["centered_results"]["boolq"] == pytest.approx((res["results"]["boolq"] - 0.62) / 0.38)


@pytest.mark.skipif(not REAL_BUNDLE.is_dir(), reason=f"the real CORE bundle is not at {REAL_BUNDLE}")
def test_shared_prefix_path_equals_full_rows():
    """The KV-cache path (shared context once, then each row's remainder) gives the per-row losses and greedy
    hits of full padded forwards, on real 10-shot prompts longer than the model's short window."""
    from nanotrain.data.tokenizer import train_tokenizer
    from nanotrain.model import GPT, GPTConfig

    tasks = {t.label: t for t in load_tasks(REAL_BUNDLE)}
    text = [json.dumps(row) for t in tasks.values() for row in load_rows(t)[:20]]
    tok = train_tokenizer(text, vocab_size=400)
    torch.manual_seed(3)
    model = GPT(GPTConfig(sequence_len=512, vocab_size=tok.vocab_size, n_layer=3, n_head=2, n_kv_head=1, n_embd=32,
                          window_pattern="SSL"))
    model.init_weights()
    with torch.no_grad():  # every block and the head matter (init_weights zeroes projections)
        for name, p in model.named_parameters():
            if p.dim() == 2 and "wte" not in name and "value_embeds" not in name:
                p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
    model.eval()
    ctx = torch.no_grad
    checked = 0
    for label in ["arc_easy", "piqa", "winograd", "copa", "agi_eval_lsat_ar"]:
        task = tasks[label]
        examples = core._prepare_task(task, 0, tok, 3, None, 0, 1, [])  # uncropped
        for ex in examples:
            prefix = core._shared_prefix_len(ex)
            assert prefix >= 2, label
            full = core._forward_rows(model, [ex], tok.bos_token_id, torch.device("cpu"), ctx)
            shared = core._forward_shared_prefix(model, ex, prefix, tok.bos_token_id, torch.device("cpu"), ctx)
            assert shared[0] == pytest.approx(full[0], rel=1e-4, abs=1e-5), label
            assert shared[1] == full[1]
            checked += 1
    assert checked == 15
    assert max(len(r) for ex in examples for r in ex.rows) > 257  # beyond the S layers' window


def test_crop_keeps_a_shared_context_when_it_can():
    rows = [list(range(10)) + [50, 51], list(range(10)) + [60, 61, 62, 63]]  # longest 14 tokens
    starts, ends = [10, 10], [12, 14]
    core._crop_left(rows, starts, ends, 8)  # drop 6 from both: the prefix stays shared
    assert rows == [[6, 7, 8, 9, 50, 51], [6, 7, 8, 9, 60, 61, 62, 63]] and starts == [4, 4] and ends == [6, 8]
    rows = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 9]]  # the long answer alone exceeds 4: crop each row alone
    starts, ends = [2, 2], [9, 3]
    core._crop_left(rows, starts, ends, 4)
    assert rows == [[6, 7, 8, 9], [1, 2, 9]] and starts == [1, 2] and ends == [4, 3]


def test_max_per_task_zero_is_refused(bundle):
    """0 rows would score every task 0 and report a meaningless (negative) CORE: refuse it, name the fix."""
    with pytest.raises(UserError, match="max_per_task.*-1"):
        evaluate_core(BigramLM(oracle_table()), ByteTokenizer(), "cpu", bundle_dir=bundle, max_per_task=0)
