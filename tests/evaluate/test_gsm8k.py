import json

import pytest

from kvtuner import KVConfig
from kvtuner.evaluate.data import DataError
from kvtuner.evaluate.gsm8k import evaluate_gsm8k, few_shot_prompt, final_answer, load_gsm8k


@pytest.mark.parametrize("text,value", [
    ("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("so the answer is 12.0.", "12"),
    ("It costs $5 then 18 dollars", "18"),
    ("#### -3", "-3"),
    ("no digits", None),
])
def test_final_answer(text, value):
    assert final_answer(text) == value


def test_prompt_strips_calculator_annotations():
    prompt = few_shot_prompt([{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}], "2+2?")
    assert prompt == "Question: 1+1?\nAnswer: 1+1=2\n#### 2\n\nQuestion: 2+2?\nAnswer:"


def test_load_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match="each line needs 'question' and 'answer'"):
        load_gsm8k(bad)
    with pytest.raises(DataError, match="no such data file"):
        load_gsm8k(tmp_path / "none.jsonl")


@pytest.mark.slow
def test_gsm8k_runs_with_quantized_cache(default_model):
    model, tok = default_model
    shots = [{"question": "Tom has 2 apples and buys 3 more. How many apples does he have?",
              "answer": "2 + 3 = 5\n#### 5"}]
    examples = [{"question": "Ann has 4 pens and buys 4 more. How many pens does she have?", "answer": "#### 8"},
                {"question": "A box has 10 eggs and 3 break. How many are left?", "answer": "#### 7"}]
    result = evaluate_gsm8k(model, tok, KVConfig.uniform("K4V2", 30), examples, shots, max_new_tokens=24, progress=False)
    assert result.total == 2 and len(result.predictions) == 2
    assert result.correct == sum(p == e["answer"][5:] for p, e in zip(result.predictions, examples))
