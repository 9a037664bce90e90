"""GMSACompressor on a tiny random GMSA model (no LLM, no index: the postprocessor alone)."""
import asyncio

import pytest
import torch
from llama_index.core.schema import ImageNode, MetadataMode, NodeWithScore, TextNode

from gmsa_rag.cache import SoftTokenCache, cache_key
from gmsa_rag.markers import MARKER_RE, SoftTokenStore, store_for, text_key
from llama_index.postprocessor.gmsa import GMSACompressor, original_text
from llama_index.postprocessor.gmsa.base import ORIGINAL_TEXT_KEY


def spy_compress(model, monkeypatch):
    calls = []
    real = model.compress

    def compress(texts, rate, batch_size=16):
        calls.append(list(texts))
        return real(texts, rate, batch_size=batch_size)

    monkeypatch.setattr(model, "compress", compress)
    return calls


def test_class_and_serialisation(tiny_model):
    comp = GMSACompressor(tiny_model, rate=4)
    assert GMSACompressor.class_name() == "GMSACompressor"
    d = comp.to_dict()
    assert d["rate"] == 4 and d["passthrough"] is False
    assert "model" not in d and "cache" not in d and "store" not in d
    assert comp.store is store_for(tiny_model)


def test_rejects_unsupported_rate_and_bad_cache(tiny_model):
    with pytest.raises(ValueError, match="not allowed"):
        GMSACompressor(tiny_model, rate=3)
    with pytest.raises(TypeError, match="SoftTokenCache"):
        GMSACompressor(tiny_model, rate=4, cache={})


def test_nodes_become_markers_on_copies(tiny_model, nodes, texts):
    comp = GMSACompressor(tiny_model, rate=4)
    out = comp.postprocess_nodes(nodes, query_str="capital of France?")
    assert [n.node.node_id for n in out] == [n.node.node_id for n in nodes]
    assert [n.score for n in out] == [n.score for n in nodes]
    fp = tiny_model.fingerprint
    for src, new, text in zip(nodes, out, texts):
        key = cache_key(text, fp, 4)
        assert new.node is not src.node
        assert src.node.text == text and ORIGINAL_TEXT_KEY not in src.node.metadata  # docstore copy untouched
        assert new.node.text == f"<gmsa:{key}>"
        # the LLM sees the marker alone; the embedder never sees the original text
        assert new.node.get_content(metadata_mode=MetadataMode.LLM) == f"<gmsa:{key}>"
        assert ORIGINAL_TEXT_KEY not in new.node.get_content(metadata_mode=MetadataMode.EMBED)
        assert new.node.metadata["title"] == src.node.metadata["title"]
        assert original_text(new) == text and original_text(src) == text
        assert new.node.metadata["gmsa_rate"] == 4
        assert new.node.metadata["gmsa_soft_tokens"] == comp.store.get(key).shape[0]
    assert comp.last_stats.nodes == 3 and comp.last_stats.computed == 3


def test_store_holds_the_compressed_tensors(tiny_model, nodes, texts):
    comp = GMSACompressor(tiny_model, rate=2)
    out = comp.postprocess_nodes(nodes)
    expected = tiny_model.compress(texts, 2)
    for node, want in zip(out, expected):
        key = MARKER_RE.fullmatch(node.node.text).group(1)
        got = comp.store.get(key)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5)
        assert comp.store.source(key) == texts[out.index(node)]  # the text they were made from, for quoting


def test_batches_dedups_and_reuses_memory(tiny_model, nodes, texts, monkeypatch):
    calls = spy_compress(tiny_model, monkeypatch)
    comp = GMSACompressor(tiny_model, rate=4, batch_size=2)
    dup = nodes + [NodeWithScore(node=TextNode(text=texts[0], id_="dup"), score=0.1)]
    comp.postprocess_nodes(dup)
    assert sum(len(c) for c in calls) == 3  # the duplicate text is compressed once
    assert len(calls) == 1  # one compress call (the model batches internally, batch_size=2)
    comp.postprocess_nodes(nodes)
    assert len(calls) == 1
    assert comp.last_stats.memory_hits == 3 and comp.last_stats.computed == 0


def test_disk_cache_is_used_across_stores(tiny_model, nodes, tmp_path, monkeypatch):
    calls = spy_compress(tiny_model, monkeypatch)
    with SoftTokenCache(tmp_path / "st") as cache:
        first = GMSACompressor(tiny_model, rate=4, cache=cache, store=SoftTokenStore())
        first.postprocess_nodes(nodes)
        assert first.last_stats.computed == 3 and len(cache) == 3
        second = GMSACompressor(tiny_model, rate=4, cache=cache, store=SoftTokenStore())  # e.g. a new process
        out = second.postprocess_nodes(nodes)
        assert second.last_stats.disk_hits == 3 and second.last_stats.computed == 0
        assert len(calls) == 1
        key = MARKER_RE.fullmatch(out[0].node.text).group(1)
        assert torch.equal(second.store.get(key), first.store.get(key).cpu())


def test_passthrough_hands_over_text(tiny_model, nodes, texts, monkeypatch):
    calls = spy_compress(tiny_model, monkeypatch)
    comp = GMSACompressor(tiny_model, passthrough=True)
    out = comp.postprocess_nodes(nodes)
    assert calls == []
    for node, text in zip(out, texts):
        assert node.node.text == f"<gmsa:{text_key(text)}>"
        assert comp.store.get(text_key(text)) == text


def test_empty_and_non_text_nodes_pass_through(tiny_model, nodes):
    empty = NodeWithScore(node=TextNode(text="   ", id_="empty"), score=0.5)
    image = NodeWithScore(node=ImageNode(text="", image_url="http://example.invalid/x.png", id_="img"), score=0.4)
    out = GMSACompressor(tiny_model, rate=4).postprocess_nodes([empty, nodes[0], image])
    assert out[0] is empty and out[2] is image
    assert MARKER_RE.fullmatch(out[1].node.text)


def test_async_variant(tiny_model, nodes):
    comp = GMSACompressor(tiny_model, rate=4)
    out = asyncio.run(comp.apostprocess_nodes(nodes, query_str="q"))
    sync = GMSACompressor(tiny_model, rate=4).postprocess_nodes(nodes)
    assert [n.node.text for n in out] == [n.node.text for n in sync]


def test_bm25_rerank_keeps_the_nodes_sharing_the_query_words(tiny_model, texts):
    from llama_index.core.schema import QueryBundle

    from llama_index.postprocessor.gmsa import BM25Rerank

    nodes = [NodeWithScore(node=TextNode(text=t), score=1.0 - i / 10) for i, t in enumerate(texts)]
    query = QueryBundle("Which river flows into the Mediterranean Sea?")
    (kept,) = BM25Rerank().postprocess_nodes(nodes, query)
    assert kept.node.text == texts[2] and kept.score > 0
    two = BM25Rerank(top_n=2).postprocess_nodes(nodes, QueryBundle("capital of France"))
    assert [n.node.text for n in two] == [texts[0], texts[1]]  # France first; then Berlin ("capital"), before the Nile
    # after compression it reads the chunk text the node keeps in its metadata
    compressed = GMSACompressor(tiny_model, rate=4).postprocess_nodes(nodes, query)
    (kept,) = BM25Rerank().postprocess_nodes(compressed, query)
    assert original_text(kept) == texts[2]
    with pytest.raises(ValueError, match="query"):
        BM25Rerank().postprocess_nodes(nodes)
    with pytest.raises(ValueError):
        BM25Rerank(top_n=0)


def test_keeps_as_many_nodes_as_the_checkpoint_was_trained_to_read(tiny_model, texts):
    """By default the compressor hands on the checkpoint's trained number of documents, best BM25 match first;
    ``top_n`` overrides it (0: all); without a query it keeps the first ones in the order given."""
    from llama_index.core.schema import QueryBundle

    nodes = [NodeWithScore(node=TextNode(text=t), score=1.0 - i / 10) for i, t in enumerate(texts)]
    query = QueryBundle("Which river flows into the Mediterranean Sea?")
    comp = GMSACompressor(tiny_model, rate=4)
    assert comp.documents_kept == 0 and len(comp.postprocess_nodes(nodes, query)) == 3  # nothing recorded: all
    tiny_model.config.extra = {"train_config": {"stage": "keft", "max_docs": 1, "no_compress": False}}
    assert comp.documents_kept == 1
    (kept,) = comp.postprocess_nodes(nodes, query)
    assert original_text(kept) == texts[2] and comp.last_stats.nodes == 1  # the others are neither fetched nor read
    (first,) = comp.postprocess_nodes(nodes)  # no query to match: the retriever's first
    assert original_text(first) == texts[0]
    two = GMSACompressor(tiny_model, rate=4, top_n=2).postprocess_nodes(nodes, QueryBundle("capital of France"))
    assert [original_text(n) for n in two] == [texts[0], texts[1]]
    assert len(GMSACompressor(tiny_model, rate=4, top_n=0).postprocess_nodes(nodes, query)) == 3
    baseline = GMSACompressor(tiny_model, passthrough=True).postprocess_nodes(nodes, query)  # the same chunk as text
    assert [original_text(n) for n in baseline] == [texts[2]]
    with pytest.raises(ValueError):
        GMSACompressor(tiny_model, rate=4, top_n=-1)


def test_hands_the_nodes_on_in_the_order_the_checkpoint_was_trained_to_read(tiny_model, texts, monkeypatch):
    """A reader trained on documents in BM25 order (``--doc_order``) gets every retrieved node in that order, best
    first or best last; ``document_order`` overrides it; the uncompressed baseline reads the same order."""
    from llama_index.core.schema import QueryBundle

    nodes = [NodeWithScore(node=TextNode(text=t), score=1.0 - i / 10) for i, t in enumerate(texts)]
    query = QueryBundle("capital of France")  # BM25: France, then Berlin ("capital"), then the Nile
    best_first = [texts[0], texts[1], texts[2]]
    shuffled = [nodes[2], nodes[1], nodes[0]]
    monkeypatch.setattr(tiny_model.config, "extra", {"train_config": {"stage": "keft", "max_docs": 5,
                                                                      "doc_order": "bm25_first"}})
    comp = GMSACompressor(tiny_model, rate=4)
    assert comp.documents_order == "bm25_first"
    assert [original_text(n) for n in comp.postprocess_nodes(shuffled, query)] == best_first
    baseline = GMSACompressor(tiny_model, passthrough=True).postprocess_nodes(shuffled, query)
    assert [original_text(n) for n in baseline] == best_first
    last = GMSACompressor(tiny_model, rate=4, document_order="bm25_last").postprocess_nodes(shuffled, query)
    assert [original_text(n) for n in last] == best_first[::-1]
    given = GMSACompressor(tiny_model, rate=4, document_order="given").postprocess_nodes(shuffled, query)
    assert [original_text(n) for n in given] == [texts[2], texts[1], texts[0]]  # as retrieved
    assert len(comp.postprocess_nodes(shuffled)) == 3  # no query to match: as given
    monkeypatch.setattr(tiny_model.config, "extra", {"train_config": {"stage": "keft", "max_docs": 1}})
    assert GMSACompressor(tiny_model, rate=4).documents_order == "given"  # older checkpoints: as before
    with pytest.raises(ValueError, match="document_order"):
        GMSACompressor(tiny_model, rate=4, document_order="alphabetical")


def test_a_confident_best_match_is_handed_on_alone(tiny_model, texts):
    """confident_margin: where the best BM25 match leads the next by more than the margin, only it goes on."""
    from llama_index.core.schema import QueryBundle

    from gmsa_rag.lexical import bm25_scores, lead

    nodes = [NodeWithScore(node=TextNode(text=t), score=1.0) for t in texts]
    query = QueryBundle("capital of France")
    margin = lead(bm25_scores(query.query_str, texts))
    assert 0 < margin < float("inf")
    (alone,) = GMSACompressor(tiny_model, rate=4, confident_margin=margin / 2).postprocess_nodes(nodes, query)
    assert original_text(alone) == texts[0]
    assert len(GMSACompressor(tiny_model, rate=4, confident_margin=margin * 2).postprocess_nodes(nodes, query)) == 3
    assert len(GMSACompressor(tiny_model, rate=4).postprocess_nodes(nodes, query)) == 3  # off by default
    with pytest.raises(ValueError):
        GMSACompressor(tiny_model, rate=4, confident_margin=-1.0)


def test_lead_rate_compresses_the_best_ranked_node_finer(tiny_model, texts, tmp_path):
    """lead_rate: the best-ranked node handed on (first; last with bm25_last) at its own rate, the others at rate;
    each node's metadata names its rate; a disk cache serves both rates; a rate the model lacks is refused."""
    from llama_index.core.schema import QueryBundle

    nodes = [NodeWithScore(node=TextNode(text=t), score=1.0 - i / 10) for i, t in enumerate(texts)]
    query = QueryBundle("capital of France")  # BM25: France, then Berlin, then the Nile
    fp = tiny_model.fingerprint
    for order, lead in (("bm25_first", 0), ("bm25_last", 2)):
        cache = SoftTokenCache(tmp_path / order)
        comp = GMSACompressor(tiny_model, rate=4, lead_rate=2, document_order=order, cache=cache,
                              store=SoftTokenStore())
        out = comp.postprocess_nodes(list(reversed(nodes)), query)
        assert original_text(out[lead]) == texts[0]  # the best match
        for i, node in enumerate(out):
            rate = 2 if i == lead else 4
            assert node.node.metadata["gmsa_rate"] == rate
            assert node.node.text == f"<gmsa:{cache_key(original_text(node), fp, rate)}>"
            want = tiny_model.compress([original_text(node)], rate)[0]
            assert torch.allclose(comp.store.get(cache_key(original_text(node), fp, rate)), want, atol=1e-5)
        assert comp.last_stats.computed == 3
        again = GMSACompressor(tiny_model, rate=4, lead_rate=2, document_order=order, cache=cache,
                               store=SoftTokenStore())
        again.postprocess_nodes(list(reversed(nodes)), query)
        assert again.last_stats.disk_hits == 3 and again.last_stats.computed == 0
    plain = GMSACompressor(tiny_model, rate=4, store=SoftTokenStore()).postprocess_nodes(nodes, query)
    assert {n.node.metadata["gmsa_rate"] for n in plain} == {4}
    with pytest.raises(ValueError, match="not allowed"):
        GMSACompressor(tiny_model, rate=4, lead_rate=3)
