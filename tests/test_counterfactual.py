"""Counterfactual answers for stage 2 (gmsa_rag.data.counterfactual) and their place in the trainer's batches."""
import random

import pytest

from gmsa_rag.data.counterfactual import (AnswerPool, answer_shape, clean_answer, counterfactual_example, main,
                                          mentions, question_word)
from gmsa_rag.data.qa import QAExample, format_context, load_qa_jsonl, save_qa_jsonl
from gmsa_rag.train import Data, TrainConfig, parse_args, step_batches

GOLD = format_context("The Art of War", "The Art of War is attributed to Sun Tzu. Sun Tzu was a general; "
                                        "scholars call him Tzu. It was written around 500 BC.")
DISTRACTOR = format_context("Clausewitz", "On War was written by Carl von Clausewitz in 1832.")
EXAMPLE = QAExample("who wrote the art of war", ["Sun Tzu", "Tzu."], [DISTRACTOR, GOLD], gold_index=1)
POOL_EXAMPLES = [QAExample("who painted the mona lisa", ["Leonardo da Vinci"]),
                 QAExample("who discovered penicillin", ["Alexander Fleming"]),
                 QAExample("where is the eiffel tower", ["Paris"]),
                 QAExample("when did the war end", ["1945"]),
                 QAExample("what is a long answer", ["one two three four five six"])]


@pytest.mark.parametrize("answer, shape", [("1066", "year"), ("46%", "percent"), ("$1.2 million", "money"),
                                           ("2,000", "number"), ("4 July 1776", "date"), ("binary32", "counted"),
                                           ("Karl Marx.", "name"), ("a flat surface", "phrase"), ("999", "number")])
def test_answer_shapes(answer, shape):
    assert answer_shape(answer) == shape


def test_question_words_and_clean_answers():
    assert question_word("How many moons does Mars have?") == "how many"
    assert question_word("the capital of France is which city") == "which"
    assert question_word("name the capital") == "other"
    assert clean_answer("  Karl Marx. ") == "Karl Marx"


def test_mentions_are_whole_words_and_case_blind():
    assert mentions(GOLD, "sun tzu") and mentions(GOLD, "Tzu")
    assert not mentions(GOLD, "Sun T") and not mentions(GOLD, "")


def test_the_pool_keeps_short_answers_by_kind_and_draws_the_question_kind_when_it_has_enough():
    pool = AnswerPool.from_examples(POOL_EXAMPLES)
    assert pool.by_shape["name"] == ("Leonardo da Vinci", "Alexander Fleming", "Paris")
    assert pool.by_kind[("who", "name")] == ("Leonardo da Vinci", "Alexander Fleming")
    assert "phrase" not in pool.by_shape  # six words: too long to swap in
    rng = random.Random(0)
    assert {pool.draw("who is it", "name", rng) for _ in range(50)} == set(pool.by_shape["name"])  # kind too small
    big = AnswerPool.from_examples([QAExample("who is it", [f"Person {chr(65 + i)}"]) for i in range(20)] + POOL_EXAMPLES[2:3])
    assert all(big.draw("who is it", "name", rng).startswith("Person") for _ in range(50))
    assert big.draw("where", "name", rng) in big.by_shape["name"]
    assert pool.draw("when", "money", rng) is None


def test_the_answer_is_swapped_everywhere_in_the_gold_passage_only():
    pool = AnswerPool.from_examples(POOL_EXAMPLES)
    for seed in range(20):
        made = counterfactual_example(EXAMPLE, pool, random.Random(seed))
        [substitute] = made.answers
        assert substitute in ("Leonardo da Vinci", "Alexander Fleming", "Paris")
        assert made.question == EXAMPLE.question and made.gold_index == 1 and made.contexts[0] == DISTRACTOR
        gold = made.contexts[1]
        assert not mentions(gold, "Tzu") and gold.count(substitute) == 3  # "Sun Tzu" twice and "Tzu" once
        assert gold == GOLD.replace("Sun Tzu", substitute).replace("Tzu", substitute)
    assert EXAMPLE.contexts[1] == GOLD  # the example itself is left alone


def test_a_longer_answer_is_swapped_whole_before_a_shorter_one_it_starts_with():
    passage = format_context("Marx", "Karl Marx wrote it; Karl was German.")
    made = counterfactual_example(QAExample("who wrote it", ["Karl", "Karl Marx"], [passage], 0),
                                  AnswerPool.from_examples(POOL_EXAMPLES), random.Random(0))
    [substitute] = made.answers
    assert made.contexts[0] == passage.replace("Karl Marx", substitute).replace("Karl", substitute)


def test_other_answers_the_passage_names_stay():
    passage = format_context("Deathly Hallows", "Death Eaters kill Mad-Eye Moody and Hedwig during the flight.")
    example = QAExample("who dies in the beginning", ["Hedwig", "Mad-Eye Moody"], [passage], 0)
    made = counterfactual_example(example, AnswerPool.from_examples(POOL_EXAMPLES), random.Random(0))
    [substitute] = made.answers
    assert made.contexts[0] == passage.replace("Mad-Eye Moody", substitute)  # the longest swapped, Hedwig kept


def test_no_counterfactual_where_it_would_be_ambiguous_or_there_is_nothing_to_swap():
    pool = AnswerPool.from_examples(POOL_EXAMPLES)
    rng = random.Random(0)
    assert counterfactual_example(QAExample("q", ["Sun Tzu"], [GOLD]), pool, rng) is None  # no gold passage marked
    assert counterfactual_example(QAExample("q", ["Napoleon"], [GOLD], 0), pool, rng) is None  # answer not named
    long_answer = QAExample("who", ["Attributed to Sun Tzu. Sun Tzu"], [GOLD], 0)  # a "name" six words long
    assert counterfactual_example(long_answer, pool, rng) is None
    only_paris = AnswerPool.from_examples(POOL_EXAMPLES[2:3])
    in_a_distractor = QAExample("who", ["Sun Tzu"], [format_context("", "Paris is far."), GOLD], 1)
    assert counterfactual_example(in_a_distractor, only_paris, rng) is None  # every draw stands in a document
    assert counterfactual_example(QAExample("who", ["Paris"], ["Paris is far."], 0), only_paris, rng) is None
    assert counterfactual_example(EXAMPLE, AnswerPool({}, {}), rng) is None


def test_stage2_batches_mix_counterfactual_answers_over_the_same_distractors():
    data = Data(None, [EXAMPLE, *[QAExample(e.question, e.answers, [GOLD], 0) for e in POOL_EXAMPLES[:2]]], [])
    plain = [s for step in range(4) for s in step_batches(step, data, TrainConfig(stage="keft", batch_size=8), [4], 0)[0]]
    assert {s.target for s in plain} <= {"Sun Tzu", "Leonardo da Vinci", "Alexander Fleming"}
    swapped = [s for step in range(4) for s in step_batches(step, data, TrainConfig(
        stage="keft", batch_size=8, counterfactual_fraction=1.0), [4], 0)[0]]
    tzu = [s for s in swapped if s.question == EXAMPLE.question]
    assert tzu and all(s.target != "Sun Tzu" and s.target in " ".join(s.documents) for s in tzu)
    assert all(not mentions(" ".join(s.documents), "Tzu") for s in tzu)
    half = [s for step in range(8) for s in step_batches(step, data, TrainConfig(
        stage="keft", batch_size=8, counterfactual_fraction=0.5), [4], 0)[0] if s.question == EXAMPLE.question]
    assert 0 < sum(s.target == "Sun Tzu" for s in half) < len(half)


@pytest.mark.parametrize("argv", [["--stage", "keft", "--no_compress", "true", "--counterfactual_fraction", "1.5"],
                                  ["--stage", "ae", "--counterfactual_fraction", "0.5"]])
def test_counterfactual_fraction_is_validated(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_the_module_writes_counterfactual_questions(tmp_path, capsys):
    source = tmp_path / "qa.jsonl"
    who = QAExample("who discovered penicillin", ["Alexander Fleming"], [format_context("P", "Alexander Fleming did.")], 0)
    save_qa_jsonl([EXAMPLE, who], source)
    assert main([str(source), "--out", str(tmp_path / "cf.jsonl.gz"), "--max_docs", "2"]) == 0
    assert "counterfactual questions from 2 examples" in capsys.readouterr().out
    written = load_qa_jsonl(tmp_path / "cf.jsonl.gz")
    assert written and all(e.answers[0] in e.gold_context for e in written)
    with pytest.raises(SystemExit, match="at least 1"):
        main([str(source), "--out", str(tmp_path / "none.jsonl"), "--max_docs", "0"])
    assert not (tmp_path / "none.jsonl").exists()
