"""The marker protocol between the LlamaIndex integrations: soft tokens travel by reference.

LlamaIndex moves text between its components, never tensors. So the postprocessor
(``llama_index.postprocessor.gmsa.GMSACompressor``) puts each retrieved chunk's soft tokens into a
:class:`SoftTokenStore` under its cache key and replaces the node's text by a short marker
``<gmsa:{key}>``; the LLM (``llama_index.llms.gmsa.GMSALLM``) finds the markers in the prompt it is
given, in order, resolves them through the same store, and builds the decoder input itself with
:meth:`gmsa_rag.model.GMSAModel.qa_prompt`.

To find the question and the documents reliably, the LLM owns the prompt templates
(:data:`QA_TEMPLATE`, :data:`REFINE_TEMPLATE`, :data:`SUMMARY_TEMPLATE`): they only tag the parts
(``<gmsa:context>``, ``<gmsa:question>``, ``<gmsa:existing_answer>``), and :func:`parse_prompt`
reads them back. A prompt without these tags is treated as a plain user message (markers in it are
still resolved, in place).

This module needs neither LlamaIndex nor a model: it is pure string/tensor plumbing.
"""
from __future__ import annotations

import ast
import hashlib
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from .prompt import Context

__all__ = [
    "MARKER_RE",
    "QA_TEMPLATE",
    "REFINE_TEMPLATE",
    "SUMMARY_TEMPLATE",
    "ParsedPrompt",
    "SoftTokenStore",
    "GMSAPromptError",
    "UnknownMarkerError",
    "marker",
    "parse_prompt",
    "split_context",
    "store_for",
    "text_key",
]

MARKER_TEMPLATE = "<gmsa:{key}>"
#: Anything that looks like a marker (malformed ones included, so that they are reported, not read as text).
MARKER_RE = re.compile(r"<gmsa:([^<>\s]{0,200})>")
#: A marker's start with no end: a chunk cut inside its marker (LlamaIndex repacks text to fit the window).
CUT_MARKER_RE = re.compile(r"<gmsa:[0-9a-f]{4,}(?![0-9a-f]*>)")
_TAGS = {"qa", "refine", "summary", "context", "question", "existing_answer"}

# The three templates the LLM understands. The section tags sit on their own lines; LlamaIndex fills
# the {placeholders}. Keep them in sync with _SECTION_RE below.
QA_TEMPLATE = (
    "<gmsa:qa>\n<gmsa:context>\n{context_str}\n</gmsa:context>\n"
    "<gmsa:question>\n{query_str}\n</gmsa:question>"
)
SUMMARY_TEMPLATE = (
    "<gmsa:summary>\n<gmsa:context>\n{context_str}\n</gmsa:context>\n"
    "<gmsa:question>\n{query_str}\n</gmsa:question>"
)
REFINE_TEMPLATE = (
    "<gmsa:refine>\n<gmsa:context>\n{context_msg}\n</gmsa:context>\n"
    "<gmsa:question>\n{query_str}\n</gmsa:question>\n"
    "<gmsa:existing_answer>\n{existing_answer}\n</gmsa:existing_answer>"
)
_SECTION_RE = re.compile(
    r"<gmsa:(?P<kind>qa|summary|refine)>\n<gmsa:context>\n(?P<context>.*?)\n?</gmsa:context>\n"
    r"<gmsa:question>\n(?P<question>.*?)\n?</gmsa:question>"
    r"(?:\n<gmsa:existing_answer>\n(?P<existing>.*)\n?</gmsa:existing_answer>)?",
    re.S,
)


class GMSAPromptError(RuntimeError):
    """A prompt cannot be turned into decoder input.

    Deliberately *not* a ValueError: LlamaIndex 0.14's refine/compact synthesizers catch ValueError and
    TypeError from the LLM, log a warning and answer "Empty Response"; these errors must reach the caller.
    """


class UnknownMarkerError(GMSAPromptError):
    """A prompt holds a ``<gmsa:...>`` marker that the LLM's soft-token store cannot resolve."""


def marker(key: str) -> str:
    """The text that stands for the soft tokens (or text) stored under ``key``."""
    if not key or MARKER_RE.fullmatch(MARKER_TEMPLATE.format(key=key)) is None or key in _TAGS:
        raise ValueError(f"invalid marker key {key!r}")
    return MARKER_TEMPLATE.format(key=key)


def text_key(text: str) -> str:
    """Key for an *uncompressed* chunk (the baseline that reads raw text through the same prompt builder)."""
    return hashlib.sha256(("gmsa_rag.text.v1\0" + text).encode("utf-8", "surrogatepass")).hexdigest()


class SoftTokenStore:
    """Thread-safe, bounded (least recently used out) map from marker key to a document.

    A document is a soft-token tensor ``[m, hidden]`` or, for the uncompressed baseline, its text.
    It is the in-memory hand-over between postprocessor and LLM; persistence across processes is the
    job of :class:`gmsa_rag.cache.SoftTokenCache`.
    """

    def __init__(self, max_entries: int = 1024) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = int(max_entries)
        self._data: OrderedDict[str, Context] = OrderedDict()
        self._sources: dict[str, str] = {}  # key -> the text its soft tokens were made from (extractive answers)
        self._lock = threading.Lock()

    def put(self, key: str, value: Context) -> None:
        if not isinstance(value, (torch.Tensor, str)):
            raise TypeError(f"a document is a soft-token tensor or a str, got {type(value).__name__}")
        if isinstance(value, torch.Tensor) and value.dim() != 2:
            raise ValueError(f"soft tokens must have shape [m, hidden], got {tuple(value.shape)}")
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                evicted, _ = self._data.popitem(last=False)
                self._sources.pop(evicted, None)

    def put_source(self, key: str, text: str) -> None:
        """Keep the text that the document under ``key`` was made from (for answers held to its spans); only for a
        key the store holds, and dropped with it."""
        if not isinstance(text, str):
            raise TypeError(f"a source is text, got {type(text).__name__}")
        with self._lock:
            if key in self._data:
                self._sources[key] = text

    def source(self, key: str) -> str | None:
        """The text the document under ``key`` was made from (the document itself if it is text), or None."""
        with self._lock:
            value = self._data.get(key)
            return value if isinstance(value, str) else self._sources.get(key)

    def put_many(self, items: Mapping[str, Context] | Iterable[tuple[str, Context]]) -> None:
        for key, value in (items.items() if isinstance(items, Mapping) else items):
            self.put(key, value)

    def get(self, key: str) -> Context | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def resolve(self, key: str) -> Context:
        """The document stored under ``key``; :class:`UnknownMarkerError` if there is none."""
        value = self.get(key) if key not in _TAGS else None
        if value is None:
            raise UnknownMarkerError(
                f"the prompt holds the marker <gmsa:{key[:80]}> but this LLM's soft-token store has no such "
                f"entry. Markers are produced by GMSACompressor: give it and GMSALLM the same model (or the "
                f"same store=), and keep the store large enough for one query (it holds at most "
                f"{self.max_entries} entries, now {len(self)})"
            )
        return value

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._sources.clear()

    def __repr__(self) -> str:
        return f"SoftTokenStore({len(self)}/{self.max_entries} entries)"


_STORE_ATTR = "_gmsa_soft_token_store"
_STORE_LOCK = threading.Lock()


def store_for(model: Any) -> SoftTokenStore:
    """The store owned by ``model`` (created on first use): the default meeting point of the
    compressor and the LLM built on the same :class:`~gmsa_rag.GMSAModel`."""
    with _STORE_LOCK:
        store = getattr(model, _STORE_ATTR, None)
        if store is None:
            store = SoftTokenStore()
            object.__setattr__(model, _STORE_ATTR, store)  # plain attribute, not an nn.Module child
        return store


_WORD_RE = re.compile(r"\w")


def _unwrap_list_repr(text: str) -> str:
    """LlamaIndex 0.14's ``simple_summarize`` fills ``{context_str}`` with ``str(list_of_chunks)``
    (``['chunk1\\nchunk2']``): turn such a Python list literal back into its chunks."""
    stripped = text.strip()
    if len(stripped) >= 4 and stripped[0] == "[" and stripped[-1] == "]" and stripped[1] in "'\"":
        try:
            value = ast.literal_eval(stripped)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return text
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return "\n\n".join(value)
    return text


def split_context(text: str, store: SoftTokenStore) -> list[Context]:
    """Documents of a context block, in order: each marker resolves to its stored document; each run of
    other text between markers is one text document, unless it holds no word character at all (then it
    is only a separator, e.g. the blank lines LlamaIndex joins chunks with)."""
    return [doc for doc, _ in context_documents(text, store)]


def context_documents(text: str, store: SoftTokenStore) -> list[tuple[Context, str | None]]:
    """:func:`split_context`'s documents, each with its source text (a marker's from ``store.source``; None if
    the store does not hold it)."""
    text = _unwrap_list_repr(text)
    cut = CUT_MARKER_RE.search(text)
    if cut:
        raise UnknownMarkerError(
            f"a soft-token marker was cut short in the prompt ({text[cut.start():cut.start() + 24]}...), most likely "
            "by LlamaIndex repacking the retrieved chunks to fit the context window: lower max_new_tokens or "
            "retrieve fewer documents")
    docs: list[tuple[Context, str | None]] = []
    pos = 0
    for match in MARKER_RE.finditer(text):
        before = text[pos : match.start()].strip()
        if _WORD_RE.search(before):
            docs.append((before, before))
        docs.append((store.resolve(match.group(1)), store.source(match.group(1))))
        pos = match.end()
    rest = text[pos:].strip()
    if _WORD_RE.search(rest):
        docs.append((rest, rest))
    return docs


def split_inline(text: str, store: SoftTokenStore) -> list[Context]:
    """Like :func:`split_context` but keeps the text verbatim (for plain prompts rendered as one message)."""
    parts: list[Context] = []
    pos = 0
    for match in MARKER_RE.finditer(text):
        if match.start() > pos:
            parts.append(text[pos : match.start()])
        parts.append(store.resolve(match.group(1)))
        pos = match.end()
    if pos < len(text):
        parts.append(text[pos:])
    return parts


@dataclass
class ParsedPrompt:
    """What the LLM reads out of a prompt string."""

    kind: str
    """``qa`` / ``summary`` (question + documents), ``refine`` (+ an existing answer) or ``plain``."""
    question: str = ""
    contexts: list[Context] = field(default_factory=list)
    existing_answer: str | None = None
    preamble: str = ""
    """Text around the tagged sections (e.g. an LLM ``system_prompt``), stripped."""
    parts: list[Context] = field(default_factory=list)
    """For ``plain``: the whole prompt as text and resolved documents, in order."""
    sources: list[str | None] = field(default_factory=list)
    """The text each of ``contexts`` was made from (None where the store does not keep it)."""

    @property
    def num_soft_documents(self) -> int:
        docs = self.parts if self.kind == "plain" else self.contexts
        return sum(isinstance(d, torch.Tensor) for d in docs)


def parse_prompt(prompt: str, store: SoftTokenStore) -> ParsedPrompt:
    """Read question, documents (resolved) and existing answer out of a prompt built from the templates."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    match = _SECTION_RE.search(prompt)
    if match is None:
        return ParsedPrompt(kind="plain", parts=split_inline(prompt, store))
    preamble = (prompt[: match.start()] + "\n" + prompt[match.end() :]).strip()
    if MARKER_RE.search(preamble):
        for m in MARKER_RE.finditer(preamble):
            store.resolve(m.group(1))  # unknown -> clear error
        raise GMSAPromptError("markers outside the <gmsa:context> section are not supported")
    existing = match.group("existing")
    documents = context_documents(match.group("context"), store)
    return ParsedPrompt(
        kind=match.group("kind"),
        question=match.group("question").strip(),
        contexts=[doc for doc, _ in documents],
        sources=[source for _, source in documents],
        existing_answer=existing.strip() if existing is not None else ("" if match.group("kind") == "refine" else None),
        preamble=preamble,
    )

