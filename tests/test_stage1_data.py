"""Stage-1 data and objectives: the tokenized passage corpus, multi-span restore, continuation, quoted spans, budget
schedule."""
import gzip
import json
import math
import random

import pytest
import torch

from gmsa_rag.data.passages import PassageCorpus, tokenize_corpus
from gmsa_rag.prompt import CONTINUE_INSTRUCTION, RESTORE_INSTRUCTION, SPAN_INSTRUCTION
from gmsa_rag.samples import Sample, build_prompts
from gmsa_rag.testing import tiny_gmsa
from gmsa_rag.train import Progress, TrainConfig, lr_factor, parse_args, stage1_sample

ARTICLES = [
    {"title": "Nile", "text": "The Nile is a river in Africa. It flows north into the Mediterranean Sea.\n"
                              "Its basin covers eleven countries and about ten percent of the continent.\n"
                              "The White Nile and the Blue Nile meet at Khartoum in Sudan."},
    {"title": "Paris", "text": "Paris is the capital of France and its largest city by population.\n"
                               "The Seine runs through the city from east to west."},
]


@pytest.fixture()
def corpus_file(tmp_path):
    path = tmp_path / "wiki-test.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for article in ARTICLES:
            f.write(json.dumps(article) + "\n")
    return path


def test_corpus_is_tokenized_once_and_cached(corpus_file, tmp_path, tokenizer):
    cache = tmp_path / "cache"
    [first] = tokenize_corpus([corpus_file], tokenizer, cache, workers=1)
    stamp = first.stat().st_mtime_ns
    [again] = tokenize_corpus([corpus_file], tokenizer, cache, workers=1)
    assert again == first and again.stat().st_mtime_ns == stamp  # read from the cache, not rebuilt
    corpus = PassageCorpus([first], tokenizer)
    expected = sum(len(tokenizer.encode(p, add_special_tokens=False)) for a in ARTICLES for p in a["text"].split("\n"))
    assert corpus.num_paragraphs == 5
    assert abs(corpus.num_tokens - expected) <= 5  # paragraphs joined by newline tokens


def test_corpus_files_of_a_full_last_batch_empty_or_malformed(tmp_path, tokenizer):
    full = tmp_path / "full.jsonl"  # records are tokenized 256 articles at a time
    full.write_text("".join(json.dumps({"title": f"T{i}", "text": f"Article {i} text."}) + "\n" for i in range(256)))
    [cached] = tokenize_corpus([full], tokenizer, tmp_path / "cache", workers=1)
    assert PassageCorpus([cached], tokenizer).num_paragraphs == 256
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no paragraphs"):
        PassageCorpus.build([empty], tokenizer, tmp_path / "cache")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ARTICLES[0]) + "\n{cut\n")
    with pytest.raises(ValueError, match="broken.jsonl:2: not a JSON record"):
        tokenize_corpus([broken], tokenizer, tmp_path / "cache", workers=1)


def test_passages_start_at_paragraphs_carry_titles_and_their_continuation(corpus_file, tmp_path, tokenizer):
    corpus = PassageCorpus.build([corpus_file], tokenizer, tmp_path / "cache", workers=1)
    rng = random.Random(0)
    paragraph_starts = [p.split(" ")[0] for a in ARTICLES for p in a["text"].split("\n")]
    for _ in range(40):
        passage = corpus.passage(rng, 8, 20, continuation_tokens=12)
        text = tokenizer.decode(passage.token_ids)
        title, body = text.split("\n", 1)
        assert title in ("Title: Nile", "Title: Paris")
        assert body.split(" ")[0] in paragraph_starts
        head = len(corpus.title_prefix) + len(tokenizer.encode(title.removeprefix("Title: "), add_special_tokens=False)) + 1
        assert 8 <= len(passage.token_ids) - head <= 20
        article = next(a for a in ARTICLES if a["title"] == title.removeprefix("Title: "))
        whole = tokenizer.decode(passage.token_ids[-3:] + passage.continuation)
        assert whole.strip()[:20] in article["text"].replace("\n", "\n")  # the continuation follows in the article
    untitled = corpus.passage(rng, 8, 20, with_title=False)
    assert not tokenizer.decode(untitled.token_ids).startswith("Title:")


def test_short_corpus_refuses_impossible_lengths(corpus_file, tmp_path, tokenizer):
    corpus = PassageCorpus.build([corpus_file], tokenizer, tmp_path / "cache", workers=1)
    with pytest.raises(ValueError, match="no passage of at least 500 tokens"):
        corpus.passage(random.Random(0), 500, 600)


def test_stage1_samples_restore_one_of_several_documents_or_continue(corpus_file, tmp_path, tokenizer):
    corpus = PassageCorpus.build([corpus_file], tokenizer, tmp_path / "cache", workers=1)
    multi = TrainConfig(min_chunk_tokens=8, max_chunk_tokens=20, multi_doc_fraction=1.0, max_docs=3,
                        continuation_fraction=0.0)
    rng = random.Random(1)
    samples = [stage1_sample(corpus, multi, 4, rng) for _ in range(30)]
    assert {len(s.documents) for s in samples} == {2, 3}
    assert all(s.task == "restore" and s.target == s.documents[s.target_doc] for s in samples)
    assert len({s.target_doc for s in samples}) == 3
    cont = TrainConfig(min_chunk_tokens=8, max_chunk_tokens=12, multi_doc_fraction=0.0, continuation_fraction=1.0,
                       continuation_tokens=16)
    continued = [stage1_sample(corpus, cont, 4, rng) for _ in range(30)]
    assert any(s.task == "continue" for s in continued)
    assert all(len(s.target) >= 16 for s in continued if s.task == "continue")


def test_same_article_distractors_come_from_the_target_documents_article(corpus_file, tmp_path, tokenizer):
    corpus = PassageCorpus.build([corpus_file], tokenizer, tmp_path / "cache", workers=1)
    rng = random.Random(2)
    for _ in range(20):
        passage = corpus.passage(rng, 6, 12)
        other = corpus.sibling(passage, rng, 6, 12)
        assert other is not None  # every test article has a second paragraph
        assert other.source[:2] == passage.source[:2] and other.source[2] != passage.source[2]
    cfg = TrainConfig(min_chunk_tokens=6, max_chunk_tokens=12, multi_doc_fraction=1.0, max_docs=3,
                      multi_doc_distractors="same_article", title_fraction=0.0)
    samples = [stage1_sample(corpus, cfg, 4, rng) for _ in range(30)]
    assert {len(s.documents) for s in samples} == {2, 3} and len({s.target_doc for s in samples}) == 3
    for s in samples:
        home = [a["text"] for a in ARTICLES if tokenizer.decode(s.target).strip()[:12] in a["text"]]
        assert len(home) == 1 and s.target == s.documents[s.target_doc]
        texts = [tokenizer.decode(d).strip() for d in s.documents]
        assert all(t[:12] in home[0] for t in texts), texts  # the others are passages of the same article
        if len(texts) == 2:  # a sibling starts at another paragraph than the target
            assert texts[0] != texts[1]
    with pytest.raises(SystemExit):
        parse_args(["--multi_doc_distractors", "nearby"])


def test_span_samples_quote_a_cue_and_ask_for_the_words_after_it(corpus_file, tmp_path, tokenizer):
    corpus = PassageCorpus.build([corpus_file], tokenizer, tmp_path / "cache", workers=1)
    cfg = TrainConfig(min_chunk_tokens=16, max_chunk_tokens=40, multi_doc_fraction=0.5, max_docs=3, span_fraction=1.0,
                      span_tokens=10)
    rng = random.Random(3)
    samples = [stage1_sample(corpus, cfg, 4, rng) for _ in range(40)]
    assert all(s.task == "span" for s in samples)
    starts = set()
    for s in samples:
        doc = s.documents[s.target_doc]
        assert 4 <= len(s.cue) <= 8 and 1 <= len(s.target) <= 10
        quoted = s.cue + s.target  # cue and target are one contiguous stretch of the target document
        at = [i for i in range(len(doc) - len(quoted) + 1) if doc[i : i + len(quoted)] == quoted]
        assert at, "the cue and its continuation must come from the target document, in order"
        starts.add(at[0])
    assert len(starts) > 5 and max(starts) > 0  # from anywhere in the passage, not only its start
    assert any(len(s.documents) > 1 for s in samples)  # among other documents (which one holds it is not said)
    mixed = TrainConfig(min_chunk_tokens=16, max_chunk_tokens=40, multi_doc_fraction=0.0, span_fraction=0.5)
    tasks = [stage1_sample(corpus, mixed, 4, rng).task for _ in range(200)]
    assert 0.35 < tasks.count("span") / len(tasks) < 0.65 and set(tasks) == {"span", "restore"}


def test_span_fraction_is_validated():
    with pytest.raises(SystemExit):
        parse_args(["--continuation_fraction", "0.6", "--span_fraction", "0.5"])
    with pytest.raises(SystemExit):
        parse_args(["--span_tokens", "4"])
    assert parse_args(["--span_fraction", "0.5"]).span_fraction == 0.5


def test_stage1_prompts_label_each_separately_compressed_span(tokenizer):
    model = tiny_gmsa(tokenizer)
    docs = [tokenizer.encode(t, add_special_tokens=False) for t in ("First document here.", "Second one.", "Third.")]
    restore, cont = build_prompts(model, [Sample(docs, docs[1], rate=2, target_doc=1),
                                          Sample(docs[:1], [5, 6, 7], rate=2, task="continue")])
    spans = [seg for seg in restore if seg.embeds is not None]
    assert [len(s) for s in spans] == [math.ceil(len(d) / 2) for d in docs]
    text = "".join(tokenizer.decode(seg.token_ids) for seg in restore if seg.token_ids is not None and not seg.is_target)
    assert "Document [1]: " in text and "Document [3]: " in text and RESTORE_INSTRUCTION.format(2) in text
    target = [seg for seg in restore if seg.is_target][0]
    assert target.token_ids[: len(docs[1])] == docs[1]
    cont_text = "".join(tokenizer.decode(seg.token_ids) for seg in cont if seg.token_ids is not None and not seg.is_target)
    assert CONTINUE_INSTRUCTION.format(1) in cont_text
    cue = tokenizer.encode(" Second", add_special_tokens=False)
    [span] = build_prompts(model, [Sample(docs, docs[1][len(cue):], rate=2, task="span", target_doc=1, cue=cue)])
    span_text = "".join(tokenizer.decode(seg.token_ids) for seg in span if seg.token_ids is not None and not seg.is_target)
    assert SPAN_INSTRUCTION.format("Second") in span_text and "Document [2]" in span_text  # the cue, quoted
    assert "Repeat" not in span_text and "Continue" not in span_text
    assert [seg for seg in span if seg.is_target][0].token_ids[:-1] == docs[1][len(cue):]  # + end of turn


def test_schedule_ends_where_the_budget_ends():
    cfg = TrainConfig(steps=1000, max_tokens=1e6, time_limit_minutes=10, warmup_steps=10, min_lr_ratio=0.1)
    assert Progress(step=100, tokens=500_000, seconds=60).fraction(cfg) == 0.5  # tokens lead
    assert Progress(step=100, tokens=10_000, seconds=480).fraction(cfg) == 0.8  # time leads
    assert lr_factor(cfg, 0.0, 0) == pytest.approx(0.1)  # warm-up
    assert lr_factor(cfg, 0.0, 50) == pytest.approx(1.0)
    assert lr_factor(cfg, 0.5, 500) == pytest.approx(0.55)
    assert lr_factor(cfg, 1.0, 900) == pytest.approx(0.1)  # at the end of the budget, whichever part ran out
    linear = TrainConfig(schedule="linear", min_lr_ratio=0.0, warmup_steps=0)
    assert lr_factor(linear, 0.25, 10) == pytest.approx(0.75)
    wsd = TrainConfig(schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0, warmup_steps=0)
    assert lr_factor(wsd, 0.5, 500) == lr_factor(wsd, 0.8, 800) == 1.0  # stable
    assert lr_factor(wsd, 0.85, 850) == pytest.approx(1 - 0.25 ** 0.5)  # 1-sqrt cooldown over the last 20%
    assert lr_factor(wsd, 1.0, 1000) == pytest.approx(0.0)


def test_trainer_stops_at_its_token_budget_with_the_schedule_finished(tmp_path, corpus_file, tokenizer):
    from gmsa_rag.backbone import tiny_backbone
    from gmsa_rag.train import train

    base = tmp_path / "base"
    tiny_backbone("llama").save_pretrained(base)
    tokenizer.save_pretrained(base)
    cfg = TrainConfig(stage="ae", base_model=str(base), data=[str(corpus_file)], out_dir=str(tmp_path / "run"),
                      encoder_layers=2, window=32, lora_rank=4, lora_alpha=8, rates=[2, 4], steps=1000, batch_size=2,
                      max_tokens=1000, warmup_steps=0, min_lr_ratio=0.1, log_every=1, eval_every=1000, eval_samples=0,
                      save_every=1000, min_chunk_tokens=8, max_chunk_tokens=16, token_cache=str(tmp_path / "cache"))
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["tokens"] >= 1000 and records[-2]["tokens"] < 1000  # stopped as the budget ran out
    assert records[-1]["step"] < 1000
    assert records[-1]["lr"] < 0.2 * cfg.lr  # the cosine reached (nearly) its floor at the budget's end
    state = json.loads((tmp_path / "run" / "checkpoints" / f"step-{records[-1]['step']:07d}" / "trainer_state.json").read_text())
    assert state["tokens"] == records[-1]["tokens"]


def test_a_steps_samples_are_sorted_into_micro_batches_of_similar_length(corpus_file, tmp_path, tokenizer):
    from gmsa_rag.train import Data, decoder_positions, step_batches

    corpus = PassageCorpus.build([corpus_file], tokenizer, tmp_path / "cache", workers=1)
    cfg = TrainConfig(batch_size=3, grad_accum=4, min_chunk_tokens=4, max_chunk_tokens=40, multi_doc_fraction=0.5,
                      max_docs=3)
    data = Data(corpus, [], [])
    micro = step_batches(7, data, cfg, [2, 4, 8], 0)
    assert [len(m) for m in micro] == [3, 3, 3, 3]
    sizes = [decoder_positions(s) for m in micro for s in m]
    assert sizes == sorted(sizes)
    again = step_batches(7, data, cfg, [2, 4, 8], 0)  # a pure function of the step: resume sees the same batches
    assert [[s.documents for s in m] for m in micro] == [[s.documents for s in m] for m in again]
