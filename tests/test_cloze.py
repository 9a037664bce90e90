"""Fill-in-the-blank questions for stage 2 (gmsa_rag.data.cloze) and their place in the trainer's batches."""
import random

import pytest

from gmsa_rag.data.cloze import BLANK, CLOZE_PROMPT, cloze_example, cloze_spans, make_cloze
from gmsa_rag.data.qa import QAExample, format_context
from gmsa_rag.train import Data, TrainConfig, parse_args, step_batches

PASSAGE = format_context("Norman Conquest", "In 1066 the Normans under William the Conqueror invaded England. "
                                            "It was short. the army of Harold Godwinson lost the battle near Hastings.")


def test_spans_are_numbers_and_names_never_the_opening_word():
    sentence = "In 1066 the Normans under William the Conqueror invaded England."
    spans = [sentence[a:b] for a, b in cloze_spans(sentence)]
    assert spans == ["1066", "Normans", "William the Conqueror", "England"]  # not "In"
    sales = "Sales rose to 2,000,000 units, No. 1 in Europe."
    assert [sales[a:b] for a, b in cloze_spans(sales)] == ["2,000,000", "1", "Europe"]  # "No" is no answer


def test_a_cloze_blanks_one_span_of_one_long_enough_sentence_of_the_text():
    sentences = ["In 1066 the Normans under William the Conqueror invaded England.",
                 "the army of Harold Godwinson lost the battle near Hastings."]
    seen = set()
    for seed in range(40):
        cloze = make_cloze(PASSAGE, random.Random(seed))
        assert cloze.question.startswith(CLOZE_PROMPT) and cloze.question.count(BLANK) == 1
        restored = cloze.question.removeprefix(CLOZE_PROMPT).replace(BLANK, cloze.answer)
        assert restored in sentences  # "It was short." is too short; the title line is never used
        seen.add(cloze.answer)
    assert {"1066", "England", "Harold Godwinson", "Hastings"} <= seen


def test_no_cloze_without_a_sentence_to_blank():
    assert make_cloze("all lower case words and no numbers in this one sentence here.", random.Random(0)) is None
    assert cloze_example(QAExample("q", ["a"], [PASSAGE]), random.Random(0)) is None  # no gold passage marked


def test_stage2_batches_mix_cloze_questions_over_the_same_documents():
    example = QAExample("who invaded england", ["William the Conqueror"], ["distractor one", PASSAGE], gold_index=1)
    data = Data(None, [example], [])
    assert not any(s.question.startswith(CLOZE_PROMPT) for s in step_batches(3, data, TrainConfig(stage="keft",
                                                                                                   batch_size=8), [4], 0)[0])
    cloze = TrainConfig(stage="keft", batch_size=8, cloze_fraction=1.0)
    [samples] = step_batches(3, data, cloze, [4], 0)
    assert all(s.question.startswith(CLOZE_PROMPT) and s.target in PASSAGE for s in samples)
    assert all(PASSAGE in s.documents and set(s.documents) <= set(example.contexts) for s in samples)  # the gold kept
    half = [s for step in range(8) for s in step_batches(step, data, TrainConfig(stage="keft", batch_size=8,
                                                                                  cloze_fraction=0.5), [4], 0)[0]]
    assert 0 < sum(s.question.startswith(CLOZE_PROMPT) for s in half) < len(half)


@pytest.mark.parametrize("argv", [["--stage", "keft", "--no_compress", "true", "--cloze_fraction", "1.5"],
                                  ["--stage", "ae", "--cloze_fraction", "0.5"]])
def test_cloze_fraction_is_validated(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_module_writes_cloze_questions_over_the_dev_prompt_documents(tmp_path):
    from gmsa_rag.data.cloze import main
    from gmsa_rag.data.qa import load_qa_jsonl, save_qa_jsonl

    examples = [QAExample(f"q{i}", ["a"], [f"distractor {j} of {i}" for j in range(6)] + [PASSAGE], gold_index=6)
                for i in range(3)]
    save_qa_jsonl(examples + [QAExample("no gold", ["a"], ["x"])], tmp_path / "qa.jsonl")
    assert main([str(tmp_path / "qa.jsonl"), "--out", str(tmp_path / "cloze.jsonl.gz"), "--max_docs", "3"]) == 0
    written = load_qa_jsonl(tmp_path / "cloze.jsonl.gz")
    assert len(written) == 3  # the example without a gold passage gives none
    for i, example in enumerate(written):
        assert example.question.startswith(CLOZE_PROMPT) and example.answers[0] in PASSAGE
        assert example.gold_index == i % 3 and example.contexts[example.gold_index] == PASSAGE
        assert [c for c in example.contexts if c != PASSAGE] == [f"distractor {j} of {i}" for j in range(2)]
    with pytest.raises(SystemExit, match="no QA data"):
        main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x.jsonl")])
