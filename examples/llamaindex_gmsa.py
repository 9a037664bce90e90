"""GMSA compression inside a plain LlamaIndex pipeline (what `gmsa-rag ask` does, without the timing).

    python examples/llamaindex_gmsa.py "who was the author of the art of war"
"""
import sys

from llama_index.core import VectorStoreIndex

from gmsa_rag.cache import SoftTokenCache, load_folder, make_splitter
from gmsa_rag.rag import bundled_docs_dir, load_embed_model, load_gmsa_model
from llama_index.llms.gmsa import GMSALLM, gmsa_query_engine_kwargs
from llama_index.postprocessor.gmsa import GMSACompressor, original_text


def main(question: str) -> None:
    info = load_gmsa_model()  # bundled checkpoint if any, else an untrained compressor
    if not info.trained:
        print("WARNING: untrained compressor: the answer is not meaningful\n")
    model = info.model
    # chunk with the model's tokenizer (the same splitter `python -m gmsa_rag.cache build` uses)
    nodes = make_splitter(model.tokenizer).get_nodes_from_documents(load_folder(bundled_docs_dir()))
    index = VectorStoreIndex(nodes, embed_model=load_embed_model())

    llm = GMSALLM(model, max_new_tokens=32)  # reads <gmsa:key> markers as soft tokens
    with SoftTokenCache() as cache:  # soft tokens computed once, reused by every later query/process
        compressor = GMSACompressor(model, rate=4, cache=cache, store=llm.store)
        engine = index.as_query_engine(
            llm=llm,
            similarity_top_k=3,
            node_postprocessors=[compressor],
            response_mode="compact",  # refine, tree_summarize, simple_summarize, accumulate work too
            **gmsa_query_engine_kwargs(),  # the prompt templates GMSALLM parses
        )
        response = engine.query(question)
    print("answer:", response.response)
    for n in response.source_nodes:
        print(f"  [{n.score:.3f}] {n.node.metadata['file_path']}: {' '.join(original_text(n).split())[:80]}...")
    print("decoder input:", llm.last_stats.prompt_positions, "positions, of which",
          llm.last_stats.soft_tokens, "soft tokens")


if __name__ == "__main__":
    main(" ".join(sys.argv[1:]) or "who was the author of the art of war")
