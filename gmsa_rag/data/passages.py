"""Stage-1 training passages: a jsonl(.gz) corpus tokenized once into a reusable cache, cut like RAG chunks.

Each input file (records ``{title?, text}``, e.g. the Wikipedia parts, or any corpus of that shape; plain-text
files work too, without titles) is tokenized paragraph by paragraph into its own cache file under
``cache_dir`` (``<file stem>.<hash>.npz``: tokens, paragraph starts, article ends, title tokens). A file already
in the cache is never tokenized again, so an interrupted build resumes file by file, and later runs start
at once. Tokenization runs in parallel, one process per file.

:class:`PassageCorpus` then draws passages the way a RAG store holds chunks: starting at a paragraph,
a length from ``min_tokens`` to ``max_tokens`` (log-uniform, so short and long chunks are equally common
on a log scale), with the article's title line ``Title: <title>`` in front as in the QA documents. The
draw is a pure function of the random generator handed in, so a resumed run sees exactly the passages an
uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from .corpus import find_corpus_files, iter_documents, split_paragraphs
from .jsonl import iter_records
from .qa import TITLE_PREFIX

CACHE_VERSION = 1


@dataclass
class Passage:
    """A chunk as token ids (title line included) and, when the article goes on, the tokens that follow; ``source``
    = (corpus part, article, first token) says where it was cut."""

    token_ids: list[int]
    continuation: list[int]
    source: tuple[int, int, int] = (-1, -1, -1)


def _tokenizer_key(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr(vocab[:: max(1, len(vocab) // 2000)]).encode() + str(len(vocab)).encode()).hexdigest()[:12]


def cache_file_for(path: Path, cache_dir: Path, tokenizer_key: str) -> Path:
    """Where the tokenized form of ``path`` lives (keyed by the file's size/mtime and the tokenizer)."""
    stat = path.stat()
    key = hashlib.sha256(f"{CACHE_VERSION}|{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}|{tokenizer_key}".encode())
    return cache_dir / f"{path.name.split('.')[0]}.{key.hexdigest()[:12]}.npz"


def _records(path: Path):
    """(title, text) pairs of a corpus file: jsonl records with ``title``/``text``, or a whole text file."""
    if ".jsonl" in path.name or ".ndjson" in path.name:
        for _, record in iter_records(path):
            if isinstance(record.get("text"), str) and record["text"].strip():
                yield str(record.get("title") or ""), record["text"]
    else:
        for text in iter_documents(path):
            yield "", text


def tokenize_file(path: Path, out: Path, tokenizer_dir: str) -> Path:
    """Tokenize one corpus file into ``out`` (npz); run in a worker process."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    tokens: list[np.ndarray] = []
    para_starts, article_ends, title_tokens, title_offsets = [], [], [], [0]
    position = 0
    batch: list[tuple[str, list[str]]] = []

    def flush() -> None:
        nonlocal position
        if not batch:  # (the file ended right after a full batch, or held no text)
            return
        flat = [p for _, paras in batch for p in paras]
        encoded = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
        titles = tokenizer([t for t, _ in batch], add_special_tokens=False)["input_ids"]
        k = 0
        for (title, paras), title_ids in zip(batch, titles):
            for i in range(len(paras)):
                ids = encoded[k] + (newline if i < len(paras) - 1 else [])
                k += 1
                para_starts.append(position)
                tokens.append(np.asarray(ids, dtype=np.uint32))
                position += len(ids)
            article_ends.append(position)
            title_tokens.extend(title_ids)
            title_offsets.append(len(title_tokens))
        batch.clear()

    for title, text in _records(path):
        paras = split_paragraphs(text.replace("\n", "\n\n"))
        if paras:
            batch.append((title, paras))
        if len(batch) >= 256:
            flush()
    flush()
    dtype = np.uint16 if len(tokenizer) <= 65535 else np.uint32
    all_tokens = np.concatenate(tokens).astype(dtype) if tokens else np.zeros(0, dtype=dtype)
    para_article = np.searchsorted(np.asarray(article_ends), np.asarray(para_starts), side="right")
    tmp = out.with_name(out.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, tokens=all_tokens, para_starts=np.asarray(para_starts, dtype=np.int64),
             para_article=para_article.astype(np.int64), article_ends=np.asarray(article_ends, dtype=np.int64),
             title_tokens=np.asarray(title_tokens, dtype=np.int64), title_offsets=np.asarray(title_offsets, dtype=np.int64))
    os.replace(tmp, out)
    return out


def tokenize_corpus(paths: Sequence[str | Path], tokenizer, cache_dir: str | Path, workers: int | None = None) -> list[Path]:
    """Tokenized cache files of every corpus file under ``paths`` (building the missing ones in parallel)."""
    files = find_corpus_files(paths)
    if not files:
        raise FileNotFoundError(f"no corpus files (.jsonl[.gz], .txt, ...) found under {list(map(str, paths))}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _tokenizer_key(tokenizer)
    outs = [cache_file_for(f, cache_dir, key) for f in files]
    todo = [(f, o) for f, o in zip(files, outs) if not o.is_file()]
    if todo:
        tokenizer_dir = cache_dir / f"tokenizer-{key}"
        if not (tokenizer_dir / "tokenizer_config.json").is_file():
            tokenizer.save_pretrained(tokenizer_dir)
        workers = workers or min(len(todo), os.cpu_count() or 1)
        progress = tqdm(total=len(todo), desc="tokenizing corpus files", unit="file")
        if workers == 1:
            for f, o in todo:
                tokenize_file(f, o, str(tokenizer_dir))
                progress.update()
        else:
            with ProcessPoolExecutor(workers) as pool:
                for _ in pool.map(tokenize_file, [f for f, _ in todo], [o for _, o in todo], [str(tokenizer_dir)] * len(todo)):
                    progress.update()
        progress.close()
    return outs


class PassageCorpus:
    """Tokenized corpus files, drawn from as RAG-sized passages (see the module docstring)."""

    def __init__(self, cache_files: Sequence[Path], tokenizer) -> None:
        self.parts = [dict(np.load(f)) for f in cache_files]
        self.title_prefix = tokenizer.encode(TITLE_PREFIX, add_special_tokens=False)
        self.newline = tokenizer.encode("\n", add_special_tokens=False)
        sizes = [len(p["para_starts"]) for p in self.parts]
        self.cumulative = np.cumsum(sizes)
        if not sizes or self.cumulative[-1] == 0:
            raise ValueError("the corpus holds no paragraphs")

    @classmethod
    def build(cls, paths: Sequence[str | Path], tokenizer, cache_dir: str | Path, workers: int | None = None) -> "PassageCorpus":
        return cls(tokenize_corpus(paths, tokenizer, cache_dir, workers), tokenizer)

    @property
    def num_tokens(self) -> int:
        return int(sum(len(p["tokens"]) for p in self.parts))

    @property
    def num_paragraphs(self) -> int:
        return int(self.cumulative[-1])

    def passage(self, rng: random.Random, min_tokens: int, max_tokens: int, continuation_tokens: int = 0,
                with_title: bool = True) -> Passage:
        """One passage: a paragraph start, a log-uniform length in [min, max] tokens (cut at the article's end;
        drawn again if that leaves fewer than ``min_tokens``), and up to ``continuation_tokens`` that follow."""
        for _ in range(1000):
            index = rng.randrange(self.num_paragraphs)
            part_index = int(np.searchsorted(self.cumulative, index, side="right"))
            local = index - (int(self.cumulative[part_index - 1]) if part_index else 0)
            passage = self._cut(part_index, local, rng, min_tokens, max_tokens, continuation_tokens, with_title)
            if passage is not None:
                return passage
        raise ValueError(f"no passage of at least {min_tokens} tokens found; is the corpus made of short texts?")

    def sibling(self, of: Passage, rng: random.Random, min_tokens: int, max_tokens: int,
                with_title: bool = True) -> Passage | None:
        """Another passage of the same article as ``of``, starting at a different paragraph (a hard distractor:
        same topic, same entities, often the same title line); None if the article has no such passage."""
        part_index, article, start = of.source
        if part_index < 0:
            return None
        para_article = self.parts[part_index]["para_article"]
        first, last = np.searchsorted(para_article, [article, article + 1])
        candidates = [i for i in range(int(first), int(last)) if int(self.parts[part_index]["para_starts"][i]) != start]
        rng.shuffle(candidates)
        for local in candidates[:8]:
            passage = self._cut(part_index, local, rng, min_tokens, max_tokens, 0, with_title)
            if passage is not None:
                return passage
        return None

    def _cut(self, part_index: int, local: int, rng: random.Random, min_tokens: int, max_tokens: int,
             continuation_tokens: int, with_title: bool) -> Passage | None:
        """The passage starting at paragraph ``local`` of a part, of a log-uniform length cut at the article's end;
        None if that leaves fewer than ``min_tokens``."""
        part = self.parts[part_index]
        start, article = int(part["para_starts"][local]), int(part["para_article"][local])
        end_of_article = int(part["article_ends"][article])
        length = int(round(math.exp(rng.uniform(math.log(min_tokens), math.log(max_tokens)))))
        end = min(start + length, end_of_article)
        if end - start < min_tokens:
            return None
        body = part["tokens"][start:end].tolist()
        follow = part["tokens"][end : min(end + continuation_tokens, end_of_article)].tolist()
        title = part["title_tokens"][part["title_offsets"][article] : part["title_offsets"][article + 1]].tolist()
        head = self.title_prefix + title + self.newline if with_title and title else []
        return Passage(head + body, follow, (part_index, article, start))
