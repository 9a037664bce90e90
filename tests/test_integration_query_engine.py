"""GMSACompressor + GMSALLM inside real LlamaIndex query engines over a tiny index (tiny random model).

Checks, for every response mode, that the decoder reads exactly the retrieved documents' soft tokens in
retrieval order, and that soft tokens are reused (memory, then disk) on later queries; sync and async.
"""
import asyncio

import pytest
import torch
from llama_index.core import VectorStoreIndex
from llama_index.core.schema import TextNode

from gmsa_rag import GMSAConfig, GMSAModel
from gmsa_rag.backbone import load_tokenizer, tiny_backbone
from gmsa_rag.cache import SoftTokenCache
from gmsa_rag.markers import SoftTokenStore
from gmsa_rag.prompt import qa_segments
from gmsa_rag.rag import hash_embedding, make_query_engine
from llama_index.llms.gmsa import GMSALLM, ContextWindowError, UnknownMarkerError, gmsa_query_engine_kwargs
from llama_index.postprocessor.gmsa import GMSACompressor, original_text

DOCS = [
    "Paris is the capital and largest city of France, on the river Seine.",
    "Berlin is the capital of Germany and its most populous city.",
    "Madrid is the capital of Spain and lies in the centre of the country.",
    "The Nile is a major river in northeastern Africa that flows into the Mediterranean Sea.",
    "Mount Everest is the highest mountain on Earth, in the Himalayas.",
    "The Amazon rainforest covers much of the Amazon basin of South America.",
]
QUESTION = "What is the capital city of France?"
MODES = ["compact", "refine", "tree_summarize", "simple_summarize", "accumulate"]
TOP_K = 3


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def blank_ids(tokenizer):
    return [i for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()]


@pytest.fixture()
def model(tokenizer):
    config = GMSAConfig(base_model="tiny", encoder_layers=2, lsa_layers=1, window=32, lora_rank=4, lora_alpha=8)
    return GMSAModel(tiny_backbone("llama"), tokenizer, config)


@pytest.fixture(scope="module")
def index():
    nodes = [TextNode(text=t, id_=f"doc-{i}", metadata={"title": f"Doc {i}"}) for i, t in enumerate(DOCS)]
    return VectorStoreIndex(nodes, embed_model=hash_embedding())


@pytest.fixture()
def llm(model, blank_ids):
    return GMSALLM(model, max_new_tokens=3, generate_kwargs={"suppress_tokens": blank_ids})


class Spy:
    """Records every decoder prompt and every compress call of a model."""

    def __init__(self, model, monkeypatch):
        self.prompts, self.compressed = [], []
        real_gen, real_compress = model.generate_from_segments, model.compress

        def generate_from_segments(prompts, **kwargs):
            self.prompts.extend(prompts)
            return real_gen(prompts, **kwargs)

        def compress(texts, rate, batch_size=16):
            self.compressed.extend(texts)
            return real_compress(texts, rate, batch_size=batch_size)

        monkeypatch.setattr(model, "generate_from_segments", generate_from_segments)
        monkeypatch.setattr(model, "compress", compress)

    def soft_spans(self):
        return [[s.embeds for s in p if s.embeds is not None] for p in self.prompts]


def retrieved_texts(index, question=QUESTION, k=TOP_K):
    return [n.node.get_content() for n in index.as_retriever(similarity_top_k=k).retrieve(question)]


def engine(index, llm, compressor, mode="compact", **kw):
    return index.as_query_engine(
        llm=llm, similarity_top_k=TOP_K, node_postprocessors=[compressor], response_mode=mode,
        **gmsa_query_engine_kwargs(), **kw,
    )


def check_order(spy, model, texts, mode, rate):
    expected = [model.compress([t], rate)[0] for t in texts]  # each document alone
    spans = spy.soft_spans()
    if mode in ("refine", "accumulate"):  # one call per retrieved node, one document each
        assert [len(s) for s in spans] == [1] * len(texts)
        flat = [s[0] for s in spans]
    else:  # one call holding all documents
        assert len(spans) == 1
        flat = spans[0]
    assert len(flat) == len(expected)
    for got, want in zip(flat, expected):
        assert got.shape == want.shape
        assert torch.allclose(got.to(want.dtype), want, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_every_response_mode_reads_retrieved_soft_tokens_in_order(index, model, llm, mode, monkeypatch):
    texts = retrieved_texts(index)
    assert texts[0].startswith("Paris")  # the tiny hash embedding does retrieve sensibly
    spy = Spy(model, monkeypatch)
    comp = GMSACompressor(model, rate=4)
    response = engine(index, llm, comp, mode).query(QUESTION)
    assert response.response and response.response != "Empty Response"
    assert sorted(spy.compressed) == sorted(texts)  # compressed once, as one batch
    check_order(spy, model, texts, mode, rate=4)
    # every decoder prompt is the qa prompt of the question over its documents
    for prompt, spans in zip(spy.prompts, spy.soft_spans()):
        same = qa_segments(model.tokenizer, QUESTION, spans)
        assert [s.token_ids for s in prompt] == [s.token_ids for s in same]
    # sources still show the original text
    assert [original_text(n) for n in response.source_nodes] == texts
    assert [n.node.node_id for n in response.source_nodes] == [n.node.node_id for n in index.as_retriever(
        similarity_top_k=TOP_K).retrieve(QUESTION)]


@pytest.mark.parametrize("mode", ["compact", "refine", "tree_summarize", "simple_summarize"])
def test_async_query(index, model, llm, mode, monkeypatch):
    texts = retrieved_texts(index)
    spy = Spy(model, monkeypatch)
    response = asyncio.run(engine(index, llm, GMSACompressor(model, rate=2), mode).aquery(QUESTION))
    assert response.response
    check_order(spy, model, texts, mode, rate=2)


def test_streaming_query(index, model, llm, monkeypatch):
    texts = retrieved_texts(index)
    spy = Spy(model, monkeypatch)
    response = engine(index, llm, GMSACompressor(model, rate=4), streaming=True).query(QUESTION)
    tokens = list(response.response_gen)
    assert "".join(tokens).strip()
    check_order(spy, model, texts, "compact", rate=4)
    assert llm.last_stats.ttft_seconds is not None


def test_cache_hits_on_later_queries(index, model, llm, tmp_path, monkeypatch):
    texts = retrieved_texts(index)
    spy = Spy(model, monkeypatch)
    with SoftTokenCache(tmp_path / "soft") as cache:
        comp = GMSACompressor(model, rate=4, cache=cache)
        qe = engine(index, llm, comp)
        qe.query(QUESTION)
        assert comp.last_stats.computed == TOP_K and len(cache) == TOP_K
        qe.query(QUESTION)  # same process: the shared in-memory store serves them
        assert comp.last_stats.memory_hits == TOP_K and comp.last_stats.computed == 0
        # a new LLM/compressor pair with its own empty store (as in a new process): the disk cache serves them
        store = SoftTokenStore()
        llm2 = GMSALLM(model, store=store, max_new_tokens=2)
        comp2 = GMSACompressor(model, rate=4, cache=cache, store=store)
        engine(index, llm2, comp2).query(QUESTION)
        assert comp2.last_stats.disk_hits == TOP_K and comp2.last_stats.computed == 0
        assert cache.stats().hits >= TOP_K
    assert sorted(spy.compressed) == sorted(texts)  # compressed exactly once overall
    assert len(spy.prompts) == 3


def test_uncompressed_baseline_uses_same_prompt_builder(index, model, llm, monkeypatch):
    texts = retrieved_texts(index)
    spy = Spy(model, monkeypatch)
    engine(index, llm, GMSACompressor(model, passthrough=True)).query(QUESTION)
    assert spy.compressed == []
    (prompt,) = spy.prompts
    assert [s.token_ids for s in prompt] == [s.token_ids for s in qa_segments(model.tokenizer, QUESTION, texts)]


def test_docstore_nodes_are_not_modified(index, model, llm):
    before = {nid: n.get_content() for nid, n in index.docstore.docs.items()}
    engine(index, llm, GMSACompressor(model, rate=4)).query(QUESTION)
    assert {nid: n.get_content() for nid, n in index.docstore.docs.items()} == before
    assert all(not k.startswith("gmsa_") for n in index.docstore.docs.values() for k in n.metadata)


def test_context_window_error_through_query_engine(model, llm, monkeypatch):
    """LlamaIndex packs prompts by the markers' text length; the LLM checks the real one (soft tokens)."""
    long_docs = [" ".join([f"Fact {i}.{j} about the capital city of France is recorded here." for j in range(60)])
                 for i in range(3)]
    index = VectorStoreIndex([TextNode(text=t) for t in long_docs], embed_model=hash_embedding())
    monkeypatch.setattr(model, "max_context_tokens", lambda: 900)  # LlamaIndex thinks the markers fit (it pads 500)
    with pytest.raises(ContextWindowError, match="decoder's window is 900"):
        engine(index, llm, GMSACompressor(model, rate=2)).query(QUESTION)
    monkeypatch.setattr(model, "max_context_tokens", lambda: 4096)
    assert engine(index, llm, GMSACompressor(model, rate=2)).query(QUESTION).response


@pytest.mark.parametrize("mode", MODES)
def test_unknown_marker_reaches_the_caller(index, model, mode):
    """An LLM that does not share the compressor's store fails loudly in every mode (no "Empty Response")."""
    lonely = GMSALLM(model, store=SoftTokenStore(), max_new_tokens=2)
    with pytest.raises(UnknownMarkerError, match="no such entry"):
        engine(index, lonely, GMSACompressor(model, rate=4), mode).query(QUESTION)


def test_make_query_engine_helper(index, model, monkeypatch):
    spy = Spy(model, monkeypatch)
    qe, comp, llm = make_query_engine(index, model, rate=8, top_k=2, max_new_tokens=2)
    qe.query(QUESTION)
    assert comp.store is llm.store and comp.rate == 8 and llm.max_new_tokens == 2
    assert len(spy.soft_spans()[0]) == 2
