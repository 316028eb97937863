"""A small deterministic version of the fidelity benchmark: same prefill, every configuration."""
import json

import pytest

from bench.accuracy import MAX_NEW, configs, run_sample
from bench.tasks import TASKS

LENGTH = 2048


@pytest.mark.parametrize("task", ["niah_single_number"])  # the passkey: tests/test_passkey.py
def test_flat_all_equals_full_and_retrieval_answers_what_full_answers(engine, task):
    runs = [r for r in configs(100, [], exact=True) if r.name in ("full", "flat@all", "retrieval")]
    solved = 0
    for seed in range(1):  # one sample: a second doubles the test's time
        sample = TASKS[task](engine.tokenizer, LENGTH, seed=seed)
        ids = engine.encode_chat(sample.messages)
        assert len(ids) > 128 + 512 + 600  # a real share of the prompt is offloaded
        out = run_sample(engine, ids, runs, MAX_NEW[task])
        assert out["flat@all"]["tokens"] == out["full"]["tokens"]
        assert max(out["flat@all"]["rel_err"]) < 1e-4  # attention outputs match layer by layer
        if sample.correct(out["full"]["text"]):
            solved += 1
            assert sample.correct(out["retrieval"]["text"]), (out["full"]["text"], out["retrieval"]["text"])
    assert solved >= 1, "full attention solved no sample: the check would be empty"


def test_records_of_one_sample_merge(tmp_path):
    # a later run that adds or redoes configurations appends a line; the report sees one merged sample
    from bench.accuracy import load_records

    base = {"task": "passkey", "length": 1024, "seed": 0, "prompt_tokens": 9, "answers": ["1"]}
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(json.dumps({**base, "outputs": o}) for o in (
        {"full": {"text": "a"}, "retrieval": {"text": "old"}},
        {"full": {"text": "a"}, "retrieval": {"text": "new"}, "flat": {"text": "f"}})) + "\n")
    (rec,) = load_records(path)
    assert rec["outputs"] == {"full": {"text": "a"}, "retrieval": {"text": "new"}, "flat": {"text": "f"}}
