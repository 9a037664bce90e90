"""Multi-document QA examples in the "Lost in the Middle" JSON-lines format.

One record per line (optionally gzip-compressed)::

    {"question": "...", "answers": ["...", ...],
     "ctxs": [{"title": "...", "text": "...", "isgold": true}, ...]}

Extra keys are ignored on reading. In a :class:`QAExample` each context is one string:
``"Title: {title}\\n{text}"`` when the passage has a non-empty title, else just the
text (see :func:`format_context`). ``gold_index`` is the position of the first context
flagged ``isgold`` (``None`` when there is none). :func:`save_qa_jsonl` splits the
contexts back into ``title``/``text`` so that a load/save round trip is lossless.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from gmsa_rag.data.corpus import PathLike
from gmsa_rag.data.jsonl import iter_records

__all__ = [
    "QAExample",
    "TITLE_PREFIX",
    "format_context",
    "split_context",
    "iter_qa_jsonl",
    "load_qa_jsonl",
    "save_qa_jsonl",
    "POOL_PASSAGES",
    "is_qa_pool",
    "load_qa_pool",
    "load_qa",
    "dev_layout",
    "reordered",
    "at_places",
    "question_share",
    "write_questions_main",
]

TITLE_PREFIX = "Title: "
#: File of a pooled QA folder (see :func:`load_qa_pool`) that holds every passage once.
POOL_PASSAGES = "passages.jsonl.gz"


@dataclass
class QAExample:
    """A question, its gold answers and the (retrieved) context passages."""

    question: str
    answers: list[str]
    contexts: list[str] = field(default_factory=list)
    gold_index: int | None = None

    def __post_init__(self) -> None:
        if self.gold_index is not None and not 0 <= self.gold_index < len(self.contexts):
            raise ValueError(f"gold_index {self.gold_index} out of range for {len(self.contexts)} contexts")

    @property
    def gold_context(self) -> str | None:
        """The gold passage, if known."""
        return None if self.gold_index is None else self.contexts[self.gold_index]


def dev_layout(example: QAExample, max_docs: int, index: int, order: str = "given") -> QAExample:
    """The example as a dev prompt shows it: its gold passage among its first ``max_docs - 1`` distractors (the
    hardest, in stored order) at place ``index mod count``, so that every place is scored equally often (examples
    without a marked gold passage are returned as they are); then ordered by ``order``
    (:data:`gmsa_rag.lexical.DOCUMENT_ORDERS`: ``given`` keeps that layout)."""
    if example.gold_index is None:
        return example
    others = [c for i, c in enumerate(example.contexts) if i != example.gold_index][: max_docs - 1]
    place = index % (len(others) + 1)
    laid_out = QAExample(example.question, example.answers, [*others[:place], example.gold_context, *others[place:]],
                         place)
    return reordered(laid_out, order)


def reordered(example: QAExample, order: str) -> QAExample:
    """``example`` with its documents in ``order`` (:func:`gmsa_rag.lexical.ordered`), the gold place following its
    passage."""
    if order == "given":
        return example
    from gmsa_rag.lexical import ordered

    return at_places(example, ordered(example.question, example.contexts, order))


def at_places(example: QAExample, places: Sequence[int]) -> QAExample:
    """``example`` showing only its documents at ``places``, in that order; the gold place follows its passage (None
    when it is left out)."""
    places = list(places)
    gold = places.index(example.gold_index) if example.gold_index in places else None
    return QAExample(example.question, example.answers, [example.contexts[i] for i in places], gold)


def format_context(title: str | None, text: str) -> str:
    """Render a passage as ``"Title: {title}\\n{text}"`` (just ``text`` without a title)."""
    title = (title or "").strip()
    return f"{TITLE_PREFIX}{title}\n{text}" if title else text


def split_context(context: str) -> tuple[str, str]:
    """Inverse of :func:`format_context`: return ``(title, text)``."""
    if context.startswith(TITLE_PREFIX) and "\n" in context:
        title, text = context[len(TITLE_PREFIX):].split("\n", 1)
        return title, text
    return "", context


def _open(path: Path, mode: str) -> TextIO:
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.GzipFile(path, mode[0] + "b", mtime=0), encoding="utf-8")
    return path.open(mode[0], encoding="utf-8")


def _example_from_record(record: Any) -> QAExample:
    """Validate one decoded JSON record and convert it (raises ValueError)."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    answers = record.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError("'answers' must be a non-empty list of strings")
    ctxs = record.get("ctxs", [])
    if not isinstance(ctxs, list):
        raise ValueError("'ctxs' must be a list")
    contexts: list[str] = []
    gold_index: int | None = None
    for i, ctx in enumerate(ctxs):
        if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str):
            raise ValueError(f"ctxs[{i}] must be an object with a string 'text'")
        title = ctx.get("title")
        if title is not None and not isinstance(title, str):
            raise ValueError(f"ctxs[{i}].title must be a string")
        contexts.append(format_context(title, ctx["text"]))
        if gold_index is None and ctx.get("isgold") is True:
            gold_index = i
    return QAExample(question=question, answers=list(answers), contexts=contexts, gold_index=gold_index)


def iter_qa_jsonl(path: PathLike) -> Iterator[QAExample]:
    """Yield the examples of a ``.jsonl`` / ``.jsonl.gz`` file; errors name the line."""
    for line_no, record in iter_records(path):
        try:
            yield _example_from_record(record)
        except ValueError as err:
            raise ValueError(f"{path}:{line_no}: {err}") from err


def load_qa_jsonl(path: PathLike, limit: int | None = None) -> list[QAExample]:
    """Load up to ``limit`` examples (all by default)."""
    examples: list[QAExample] = []
    for example in iter_qa_jsonl(path):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(example)
    return examples


def _record_from_example(example: QAExample) -> dict[str, Any]:
    ctxs = []
    for i, context in enumerate(example.contexts):
        title, text = split_context(context)
        ctxs.append({"title": title, "text": text, "isgold": i == example.gold_index})
    return {"question": example.question, "answers": list(example.answers), "ctxs": ctxs}


def save_qa_jsonl(examples: Iterable[QAExample], path: PathLike) -> int:
    """Write examples as JSON lines (gzip when the name ends in ``.gz``); return the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with _open(path, "w") as fh:
        for example in examples:
            fh.write(json.dumps(_record_from_example(example), ensure_ascii=False) + "\n")
            n += 1
    return n


def is_qa_pool(path: PathLike) -> bool:
    """True for a pooled QA folder (a directory holding :data:`POOL_PASSAGES`)."""
    return Path(path).is_dir() and (Path(path) / POOL_PASSAGES).is_file()


def load_qa_pool(folder: PathLike, split: str, limit: int | None = None) -> list[QAExample]:
    """Load ``{split}.jsonl.gz`` of a pooled QA folder (built by ``gmsa_rag.data.build_qa``).

    Records ``{"question", "answers", "gold": id, "distractors": [ids], ...}`` refer to
    ``passages.jsonl.gz`` (``{"id", "title", "text"}``). Each example's contexts are the gold passage
    followed by its distractors in stored (similarity) order, so ``gold_index`` is 0; training shuffles
    positions itself (``gmsa_rag.train.qa_sample``).
    """
    folder = Path(folder)
    passages: dict[int, str] = {}
    for line_no, record in iter_records(folder / POOL_PASSAGES):
        try:
            passages[int(record["id"])] = format_context(record.get("title"), record["text"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{folder / POOL_PASSAGES}:{line_no}: need 'id' and 'text'") from err
    path = folder / f"{split}.jsonl.gz"
    examples: list[QAExample] = []
    for line_no, record in iter_records(path):
        if limit is not None and len(examples) >= limit:
            break
        try:
            ids = [record["gold"], *record.get("distractors", [])]
            contexts = [passages[int(i)] for i in ids]
            example = _example_from_record({"question": record.get("question"), "answers": record.get("answers")})
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}:{line_no}: {err if isinstance(err, ValueError) else f'bad passage id {err}'}") from err
        example.contexts, example.gold_index = contexts, 0
        examples.append(example)
    return examples


def load_qa(path: PathLike, split: str = "train", limit: int | None = None) -> list[QAExample]:
    """Examples of a QA jsonl(.gz) file, or of split ``split`` of a pooled QA folder."""
    return load_qa_pool(path, split, limit) if is_qa_pool(path) else load_qa_jsonl(path, limit)


def question_share(examples: Sequence[QAExample], fraction: float) -> list[QAExample]:
    """The examples whose question text hashes below ``fraction`` (sha256, in [0, 1)), in their order.

    The draw depends on the question alone, not on a seed or the file's order: a smaller share lies inside every larger
    one, and every example of a question goes in or out together (nested subsets for a data-scaling curve).
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"a share of the questions is in (0, 1], got {fraction}")
    if fraction == 1:
        return list(examples)
    return [e for e in examples
            if int.from_bytes(hashlib.sha256(e.question.encode("utf-8")).digest()[:8], "big") < fraction * 2**64]


def load_as_shown(path: PathLike, split: str = "dev", limit: int | None = None, max_docs: int = 5) -> list[QAExample]:
    """Examples as an evaluation prompt shows them: a QA file's as stored; a pooled folder's split laid out as the
    trainer's dev evaluation lays it out (:func:`dev_layout`: the gold passage among the ``max_docs - 1`` hardest
    distractors, at place ``index mod count``), so benchmarks score the same prompts the trainer's dev does."""
    if not is_qa_pool(path):
        return load_qa_jsonl(path, limit)
    return [dev_layout(e, max_docs, i) for i, e in enumerate(load_qa_pool(path, split, limit))]


def write_questions_main(argv: list[str] | None, kind: str, description: str,
                         make: Callable[[list[QAExample], int, int], list[QAExample]]) -> int:
    """The command line of the modules that write probe questions over a QA split (``gmsa_rag.data.cloze``,
    ``gmsa_rag.data.counterfactual``): read ``data`` (``--split``, ``--limit``), write ``make(examples, max_docs, seed)``
    to ``--out`` in the QA format ``benchmarks/qa.py`` reads, and say how many ``kind`` questions it wrote."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("data", type=Path, help="QA jsonl(.gz) with gold passages marked, or a pooled QA folder")
    p.add_argument("--split", default="dev", help="split of a pooled folder (default dev)")
    p.add_argument("--out", type=Path, required=True, help="jsonl(.gz) to write (the QA format benchmarks/qa.py reads)")
    p.add_argument("--limit", type=int, default=None, help="first N examples")
    p.add_argument("--max_docs", type=int, default=5, help="documents per question (default 5)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.data.exists():
        raise SystemExit(f"no QA data at {args.data}")
    if args.max_docs < 1:
        raise SystemExit(f"--max_docs must be at least 1, got {args.max_docs}")
    examples = load_qa(args.data, args.split, args.limit)
    count = save_qa_jsonl(make(examples, args.max_docs, args.seed), args.out)
    print(f"{count} {kind} questions from {len(examples)} examples -> {args.out}")
    return 0
