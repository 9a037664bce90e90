"""The question-first prompt layout (``--question_first``): the question before the documents as well as after them,
in every QA prompt of a model trained so (generation, training samples, answer scoring), and never for plain text
read by the pristine base model."""
from __future__ import annotations

import pytest

from gmsa_rag.per_document import document_scores
from gmsa_rag.prompt import qa_segments
from gmsa_rag.samples import Sample, build_prompts
from gmsa_rag.testing import lively, tiny_gmsa
from gmsa_rag.train import parse_args

DOCS = ["The tower was designed by Gustave Eiffel's company.", "Paris is the capital of France."]
QUESTION = "Who designed the tower?"


def rendered(tokenizer, segments) -> str:
    """The prompt as text, each soft-token span shown as <soft>."""
    return "".join("<soft>" if s.embeds is not None else tokenizer.decode(s.token_ids) for s in segments)


def asks_first(tokenizer, segments) -> bool:
    text = rendered(tokenizer, segments)
    first = text.find(f"Question: {QUESTION}")
    assert first >= 0 and text.rstrip().rfind(f"Question: {QUESTION}") > text.find("Document [1]")  # always after
    return first < text.find("Document [1]")


def test_question_first_states_the_question_before_the_documents_too(tokenizer):
    plain = qa_segments(tokenizer, QUESTION, DOCS)
    first = qa_segments(tokenizer, QUESTION, DOCS, question_first=True)
    assert not asks_first(tokenizer, plain) and asks_first(tokenizer, first)
    assert rendered(tokenizer, first).count(QUESTION) == 2 and rendered(tokenizer, plain).count(QUESTION) == 1
    assert rendered(tokenizer, first).replace(f"Question: {QUESTION}\n\n", "", 1) == rendered(tokenizer, plain)


@pytest.fixture()
def model(tokenizer):
    return lively(tiny_gmsa(tokenizer, window=64, question_first=True))


def test_the_model_asks_first_where_its_adapter_reads_and_never_for_the_pristine_base(model, tokenizer):
    soft = model.compress(DOCS, 4)
    assert asks_first(tokenizer, model.qa_prompt(QUESTION, soft))
    assert asks_first(tokenizer, model.qa_prompt(QUESTION, [DOCS[0], soft[1]]))  # any soft span: the adapter reads
    assert not asks_first(tokenizer, model.qa_prompt(QUESTION, DOCS))  # plain text: base model, base layout
    model.config.decoder_adapter = "always"  # a no-compress fine-tune reads text with its adapter
    assert asks_first(tokenizer, model.qa_prompt(QUESTION, DOCS))
    model.config.question_first = False
    assert not asks_first(tokenizer, model.qa_prompt(QUESTION, soft))


def test_generation_training_and_scoring_follow_the_layout(model, tokenizer, monkeypatch):
    soft = model.compress(DOCS, 4)
    want = model.qa_prompt(QUESTION, soft)
    seen = []
    monkeypatch.setattr(model, "generate_from_segments", lambda prompts, **kw: seen.extend(prompts) or [""] * len(prompts))
    model.generate(QUESTION, soft, max_new_tokens=2)
    assert rendered(tokenizer, seen[0]) == rendered(tokenizer, want)

    (trained,) = build_prompts(model, [Sample(documents=list(DOCS), target="Gustave Eiffel", question=QUESTION, rate=4)])
    assert asks_first(tokenizer, trained) and trained[-1].is_target
    answered = model.qa_prompt(QUESTION, soft, answer="Gustave Eiffel")
    assert rendered(tokenizer, trained) == rendered(tokenizer, answered)
    # per-document scores read the same prompt as training: its answer loss
    score, = document_scores(model, [QUESTION], [soft], ["Gustave Eiffel"])
    assert score == pytest.approx(-model.answer_losses([answered]).item(), abs=1e-5)


def test_question_first_is_a_stage_two_option():
    with pytest.raises(SystemExit):
        parse_args(["--stage", "ae", "--question_first", "true"])


def test_soft_token_distillation_lines_up_with_the_question_first_layout(tokenizer):
    """--distill_soft_weight compares each soft token with the teacher's states over the text it stands for: the
    teacher's text prompt keeps the student's layout, question first included."""
    student = tiny_gmsa(tokenizer, window=8, rates=[2, 4, 8], decoder_tuning="qkv_lora")
    student.set_stage("keft")
    student.config.question_first = True
    samples = [Sample(list(DOCS), "Gustave Eiffel", question=QUESTION, rate=4)]
    terms = student.distillation_terms(samples, hidden=True, soft=True)
    assert terms["soft_per_layer"].shape == (student.decoder.config.num_hidden_layers,)
