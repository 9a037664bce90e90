"""The marker protocol between GMSACompressor and GMSALLM (gmsa_rag.markers): no model needed."""
import threading

import pytest
import torch

from gmsa_rag.markers import (
    GMSAPromptError,
    QA_TEMPLATE,
    REFINE_TEMPLATE,
    SUMMARY_TEMPLATE,
    SoftTokenStore,
    UnknownMarkerError,
    marker,
    parse_prompt,
    split_context,
    store_for,
    text_key,
)


@pytest.fixture()
def store():
    s = SoftTokenStore()
    s.put("a" * 64, torch.ones(2, 4))
    s.put("b" * 64, torch.zeros(3, 4))
    s.put("c" * 64, "raw text document")
    return s


def test_marker_format_and_keys():
    assert marker("a" * 64) == f"<gmsa:{'a' * 64}>"
    with pytest.raises(ValueError):
        marker("has space")
    with pytest.raises(ValueError):
        marker("context")  # a section tag, not a key
    assert text_key("x") != text_key("y") and len(text_key("x")) == 64


def test_store_is_bounded_lru_and_typed():
    s = SoftTokenStore(max_entries=2)
    s.put("k1", torch.ones(1, 2))
    s.put("k2", torch.ones(1, 2))
    s.get("k1")  # k1 becomes most recent
    s.put("k3", torch.ones(1, 2))
    assert "k1" in s and "k3" in s and "k2" not in s and len(s) == 2
    with pytest.raises(TypeError):
        s.put("k", [1, 2])
    with pytest.raises(ValueError):
        s.put("k", torch.ones(3))


def test_store_for_is_one_per_model():
    class Dummy:
        pass

    a, b = Dummy(), Dummy()
    assert store_for(a) is store_for(a) and store_for(a) is not store_for(b)
    results = []
    threads = [threading.Thread(target=lambda: results.append(store_for(b))) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(r is results[0] for r in results)


def test_split_context_orders_documents(store):
    docs = split_context(f"{marker('b' * 64)}\n\n{marker('a' * 64)}\n\nA summary.\n\n{marker('c' * 64)}", store)
    assert [d.shape[0] if isinstance(d, torch.Tensor) else d for d in docs] == [3, 2, "A summary.", "raw text document"]
    # LlamaIndex simple_summarize's str(list) wrapping
    wrapped = str([f"{marker('a' * 64)}\n{marker('b' * 64)}"])
    assert [d.shape[0] for d in split_context(wrapped, store)] == [2, 3]


def test_parse_each_template(store):
    m = marker("a" * 64)
    qa = parse_prompt(QA_TEMPLATE.format(context_str=m, query_str="Who?"), store)
    assert qa.kind == "qa" and qa.question == "Who?" and len(qa.contexts) == 1 and qa.existing_answer is None
    summary = parse_prompt(SUMMARY_TEMPLATE.format(context_str=m, query_str="What?\nReally?"), store)
    assert summary.kind == "summary" and summary.question == "What?\nReally?"
    refine = parse_prompt(
        REFINE_TEMPLATE.format(context_msg=m, query_str="Who?", existing_answer="Line 1\nLine 2"), store
    )
    assert refine.kind == "refine" and refine.existing_answer == "Line 1\nLine 2" and refine.question == "Who?"
    plain = parse_prompt(f"Hello {m}!", store)
    assert plain.kind == "plain" and plain.parts[0] == "Hello " and plain.parts[2] == "!"
    wrapped = parse_prompt("System says hi\n\n" + QA_TEMPLATE.format(context_str=m, query_str="Q"), store)
    assert wrapped.preamble == "System says hi"


def test_errors_are_not_value_errors():
    # LlamaIndex's refine/compact synthesizers turn ValueError/TypeError from the LLM into "Empty Response"
    assert not issubclass(UnknownMarkerError, (ValueError, TypeError))
    assert not issubclass(GMSAPromptError, (ValueError, TypeError))


def test_unknown_and_misplaced_markers(store):
    with pytest.raises(UnknownMarkerError, match="no such entry"):
        parse_prompt(QA_TEMPLATE.format(context_str=marker("d" * 64), query_str="q"), store)
    # a chunk cut inside its marker (LlamaIndex repacking to fit the window) is not read as text
    cut = "Intro text.\n\n" + marker("d" * 64)[:30]
    with pytest.raises(UnknownMarkerError, match="cut short"):
        parse_prompt(QA_TEMPLATE.format(context_str=cut, query_str="q"), store)
    from gmsa_rag.errors import EXIT_USAGE, exit_status

    assert exit_status(GMSAPromptError("the decoder input needs 9000 positions")) == EXIT_USAGE  # one line, exit 2
    with pytest.raises(GMSAPromptError, match="outside"):
        parse_prompt(marker("a" * 64) + "\n" + QA_TEMPLATE.format(context_str="", query_str="q"), store)
