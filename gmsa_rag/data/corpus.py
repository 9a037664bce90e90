"""Plain-text corpus loading and token-bounded chunking for autoencoder pretraining.

Inputs (:func:`iter_documents` / :func:`load_texts`):

* a plain-text file (``.txt``, ``.md``, ``.rst``, ``.text``): one document per file;
* a JSON-lines file (``.jsonl``, ``.ndjson``): one document per record, read from the
  field ``text_field`` (default ``"text"``); blank lines are skipped;
* a folder: every supported file below it, recursively, in sorted path order;
* any of those files gzip-compressed (``.gz`` suffix).

Chunking (:func:`chunk_texts` / :func:`chunk_corpus`): each document is split into
paragraphs at blank lines (whitespace inside a paragraph is collapsed to single
spaces). Paragraphs longer than ``max_tokens`` are split at sentence boundaries, and
sentences still too long at word boundaries. The pieces are packed greedily, in order,
into chunks of at most ``max_tokens`` tokens (checked with the tokenizer on the final
chunk text, special tokens excluded). A chunk is closed at a document's end once it
holds at least ``min_tokens`` tokens; a shorter tail is carried on into the next
document. When a buffer below ``min_tokens`` cannot take the next paragraph whole, the
paragraph is added sentence by sentence. Text that still cannot make a chunk of
``min_tokens`` (the corpus' last tail, or a short buffer followed by a single sentence
too long to join it) is dropped. Paragraphs inside a
chunk are separated by a blank line. The output is deterministic and never contains
an empty chunk.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .jsonl import iter_records

__all__ = [
    "TEXT_SUFFIXES",
    "JSONL_SUFFIXES",
    "find_corpus_files",
    "iter_documents",
    "load_texts",
    "split_paragraphs",
    "split_sentences",
    "make_token_counter",
    "iter_chunks",
    "chunk_texts",
    "chunk_corpus",
]

PathLike = str | os.PathLike[str]
TEXT_SUFFIXES: tuple[str, ...] = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES: tuple[str, ...] = (".jsonl", ".ndjson")

PARAGRAPH_SEP = "\n\n"
SENTENCE_SEP = " "

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
# A sentence ends with . ! or ? (optionally followed by a closing quote or bracket),
# then whitespace, then something that looks like a sentence start.
_SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")


# ------------------------------------------------------------------------ loading


def _base_suffix(path: Path) -> str:
    """Lower-cased suffix, ignoring a trailing ``.gz``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _is_supported(path: Path) -> bool:
    return _base_suffix(path) in TEXT_SUFFIXES + JSONL_SUFFIXES


def find_corpus_files(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """Expand files and folders into the list of corpus files, folders sorted recursively.

    Files named explicitly are kept whatever their suffix (read as plain text unless
    they are ``.jsonl``/``.ndjson``); folders contribute only supported files.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file() and _is_supported(p))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"corpus path not found: {path}")
    return files


def _open_text(path: Path) -> TextIO:
    """Open a (possibly gzip-compressed) UTF-8 text file."""
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return path.open("r", encoding="utf-8")


def iter_documents(paths: PathLike | Iterable[PathLike], text_field: str = "text") -> Iterator[str]:
    """Yield the raw documents of the given files/folders (see module docstring)."""
    for path in find_corpus_files(paths):
        if _base_suffix(path) in JSONL_SUFFIXES:
            yield from (record[text_field] for _, record in iter_records(path, text_field))
        else:
            with _open_text(path) as fh:
                yield fh.read()


def load_texts(paths: PathLike | Iterable[PathLike], text_field: str = "text") -> list[str]:
    """Load all documents of the given files/folders as a list of strings."""
    return list(iter_documents(paths, text_field=text_field))


# ------------------------------------------------------------------- splitting


def split_paragraphs(text: str) -> list[str]:
    """Split at blank lines; collapse whitespace inside paragraphs; drop empty ones."""
    paragraphs = (" ".join(p.split()) for p in _BLANK_LINE.split(text.replace("\r\n", "\n")))
    return [p for p in paragraphs if p]


def split_sentences(paragraph: str) -> list[str]:
    """Split a paragraph into sentences with a light punctuation heuristic."""
    return [s for s in (part.strip() for part in _SENTENCE_BREAK.split(paragraph)) if s]


# ------------------------------------------------------------------- tokenizing


def _num_ids(encoded: Any) -> int:
    """Number of token ids in whatever a tokenizer returned."""
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    ids = getattr(encoded, "ids", None)  # tokenizers.Encoding
    return len(ids if ids is not None else encoded)


def make_token_counter(tokenizer: Any | None) -> Callable[[str], int]:
    """Return ``text -> number of tokens``.

    ``tokenizer`` may be ``None`` (whitespace words), a Hugging Face tokenizer (or any
    object with ``encode``; special tokens are not counted) or a callable returning a
    sequence of ids, an ``Encoding`` or a mapping with ``input_ids``.
    """
    if tokenizer is None:
        return lambda text: len(text.split())
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):

        def count_encode(text: str) -> int:
            try:
                return _num_ids(encode(text, add_special_tokens=False))
            except TypeError:
                return _num_ids(encode(text))

        return count_encode
    if callable(tokenizer):
        return lambda text: _num_ids(tokenizer(text))
    raise TypeError(f"unsupported tokenizer: {type(tokenizer).__name__}")


# --------------------------------------------------------------------- chunking


@dataclass(frozen=True)
class _Piece:
    """A unit of packing: a paragraph, a sentence or a word window."""

    text: str
    n_tokens: int
    joiner: str  # separator placed before it when it follows another piece


def _join(pieces: Sequence[_Piece]) -> str:
    parts = [pieces[0].text]
    for piece in pieces[1:]:
        parts.append(piece.joiner)
        parts.append(piece.text)
    return "".join(parts)


def _split_oversized_word(word: str, count: Callable[[str], int], max_tokens: int) -> Iterator[str]:
    """Split a single word that alone exceeds ``max_tokens`` into character slices."""
    if count(word) <= max_tokens or len(word) <= 1:
        yield word
        return
    half = len(word) // 2
    yield from _split_oversized_word(word[:half], count, max_tokens)
    yield from _split_oversized_word(word[half:], count, max_tokens)


def _split_long_sentence(sentence: str, count: Callable[[str], int], max_tokens: int) -> Iterator[str]:
    """Split a sentence longer than ``max_tokens`` into word windows that fit."""
    words = [w for word in sentence.split() for w in _split_oversized_word(word, count, max_tokens)]
    start = 0
    while start < len(words):
        end, budget = start, 0
        while end < len(words) and (end == start or budget + count(words[end]) <= max_tokens):
            budget += count(words[end])
            end += 1
        # Word-by-word counts are an estimate: shrink the window until the real count fits.
        while end - start > 1 and count(" ".join(words[start:end])) > max_tokens:
            end -= 1
        yield " ".join(words[start:end])
        start = end


def _document_pieces(text: str, count: Callable[[str], int], max_tokens: int) -> Iterator[_Piece]:
    """Paragraphs of a document, split further where they exceed ``max_tokens``."""
    for paragraph in split_paragraphs(text):
        n_tokens = count(paragraph)
        if n_tokens <= max_tokens:
            yield _Piece(paragraph, n_tokens, PARAGRAPH_SEP)
            continue
        joiner = PARAGRAPH_SEP
        for sentence in split_sentences(paragraph):
            for part in _split_long_sentence(sentence, count, max_tokens):
                yield _Piece(part, count(part), joiner)
                joiner = SENTENCE_SEP


class _Packer:
    """Greedy packer of pieces into token-bounded chunks (see module docstring)."""

    def __init__(self, count: Callable[[str], int], min_tokens: int, max_tokens: int) -> None:
        self.count = count
        self.min_tokens = min_tokens
        self.max_tokens = max_tokens
        self.pieces: list[_Piece] = []
        self.estimate = 0
        self.joiner_cost = {
            sep: max(0, count(f"word{sep}Word") - count("word") - count("Word"))
            for sep in (PARAGRAPH_SEP, SENTENCE_SEP)
        }

    def _cost(self, piece: _Piece) -> int:
        return piece.n_tokens + (self.joiner_cost[piece.joiner] if self.pieces else 0)

    def _pop_prefix(self) -> Iterator[str]:
        """Remove the longest buffered prefix that fits; yield it if long enough."""
        k = len(self.pieces)
        text = _join(self.pieces)
        n_tokens = self.count(text)
        while k > 1 and n_tokens > self.max_tokens:
            k -= 1
            text = _join(self.pieces[:k])
            n_tokens = self.count(text)
        rest = self.pieces[k:]
        self.pieces = []
        self.estimate = 0
        for piece in rest:
            self.estimate += self._cost(piece)
            self.pieces.append(piece)
        if n_tokens >= self.min_tokens:
            yield text

    def add(self, piece: _Piece) -> Iterator[str]:
        """Buffer a piece, first emitting what would overflow with it.

        When the buffer is still shorter than ``min_tokens`` and the piece does not fit
        whole, the piece is fed sentence by sentence so the buffer can fill up.
        """
        overflow = self.pieces and self.estimate + self._cost(piece) > self.max_tokens
        if overflow and self.estimate < self.min_tokens:
            sentences = split_sentences(piece.text)
            if len(sentences) > 1:
                for k, sentence in enumerate(sentences):
                    joiner = piece.joiner if k == 0 else SENTENCE_SEP
                    yield from self.add(_Piece(sentence, self.count(sentence), joiner))
                return
        while self.pieces and self.estimate + self._cost(piece) > self.max_tokens:
            yield from self._pop_prefix()
        if not self.pieces:
            piece = _Piece(piece.text, piece.n_tokens, PARAGRAPH_SEP)
        self.estimate += self._cost(piece)
        self.pieces.append(piece)

    def end_document(self) -> Iterator[str]:
        """Emit the buffer if it is long enough; otherwise carry it to the next document."""
        while self.pieces and self.count(_join(self.pieces)) >= self.min_tokens:
            yield from self._pop_prefix()
        if self.pieces:  # the next document starts a new paragraph
            first = self.pieces[0]
            self.pieces[0] = _Piece(first.text, first.n_tokens, PARAGRAPH_SEP)


def iter_chunks(
    texts: Iterable[str],
    tokenizer: Any | None = None,
    min_tokens: int = 64,
    max_tokens: int = 512,
) -> Iterator[str]:
    """Yield token-bounded chunks of ``texts`` (documents), in order."""
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    count = make_token_counter(tokenizer)
    packer = _Packer(count, min_tokens, max_tokens)
    for text in texts:
        for piece in _document_pieces(text, count, max_tokens):
            yield from packer.add(piece)
        yield from packer.end_document()


def chunk_texts(
    texts: Iterable[str],
    tokenizer: Any | None = None,
    min_tokens: int = 64,
    max_tokens: int = 512,
) -> list[str]:
    """Chunk in-memory documents; see :func:`iter_chunks`."""
    return list(iter_chunks(texts, tokenizer, min_tokens, max_tokens))


def chunk_corpus(
    paths: PathLike | Iterable[PathLike],
    tokenizer: Any | None = None,
    min_tokens: int = 64,
    max_tokens: int = 512,
    text_field: str = "text",
) -> list[str]:
    """Load the corpus at ``paths`` and chunk it; see the module docstring."""
    return chunk_texts(iter_documents(paths, text_field), tokenizer, min_tokens, max_tokens)
