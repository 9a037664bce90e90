#!/usr/bin/env python
"""Accuracy by how much of the question the answer's sentence repeats word for word.

Reads the outputs that ``benchmarks/qa.py`` saved and the QA file they answered. For every question it finds the
answer's sentence (the first sentence of the gold passage that holds a gold answer; the whole passage if none does)
and measures the question's **overlap**: the share of its content words (SQuAD-normalised, function words and the
answer's own words left out) that this sentence holds. Questions are split into equal thirds by overlap (low /
middle / high), and each system's accuracy (qa.py's: a gold answer appears in the output) is given per third.

A reader that matches a question to the passage by meaning answers about as well in every third; one that finds
the passage by the question's words answers the high third far better. No model is run: seconds on any machine.

    python benchmarks/answer_overlap.py --results benchmarks/results/cpu-2core/qa-qamultidoc-dev200.json \\
        --data data/qa-multidoc --name answer-overlap-qamultidoc-dev200
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402

NAME = "answer-overlap"
THIRDS = ("low", "middle", "high")
#: Words that carry no content of a question (SQuAD normalisation has already removed a / an / the and punctuation).
FUNCTION_WORDS = frozenset(
    "who whom whose what which when where why how is are was were be been being do does did has have had of in on at "
    "to for from by with as and or but not no it its this that these those there their they he she his her him i you "
    "we us our my me your first last name many much".split())
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def content_words(text: str) -> set[str]:
    """The normalised words of ``text`` that are not function words."""
    from gmsa_rag.metrics import normalize_answer

    return {w for w in normalize_answer(text).split() if w not in FUNCTION_WORDS}


def answer_sentence(passage: str, answers: Sequence[str]) -> str:
    """The first sentence of ``passage`` that holds one of ``answers`` (normalised), else the whole passage."""
    from gmsa_rag.metrics import answer_in_output

    for sentence in _SENTENCE_END.split(passage):
        if answer_in_output(sentence, answers):
            return sentence
    return passage


def question_overlap(question: str, passage: str, answers: Sequence[str]) -> float:
    """Share of the question's content words (the answer's own words aside) found in the answer's sentence."""
    answer_words = set().union(*(content_words(a) for a in answers)) if answers else set()
    words = content_words(question) - answer_words
    if not words:
        return 0.0
    return len(words & content_words(answer_sentence(passage, answers))) / len(words)


def accuracy_by_third(overlaps: Sequence[float], correct: dict[str, Sequence[float]]) -> tuple[list[dict], list[float]]:
    """Per system, accuracy in each third of the questions ordered by overlap; and the thirds' overlap bounds."""
    order = sorted(range(len(overlaps)), key=lambda i: overlaps[i])
    cuts = [order[k * len(order) // 3:(k + 1) * len(order) // 3] for k in range(3)]
    rows = []
    for system, hits in correct.items():
        row: dict[str, Any] = {"system": system, "n": len(hits), "all": 100 * sum(hits) / max(len(hits), 1)}
        for third, idx in zip(THIRDS, cuts):
            row[third] = 100 * sum(hits[i] for i in idx) / max(len(idx), 1)
        rows.append(row)
    bounds = [overlaps[idx[-1]] for idx in cuts if idx]
    return rows, bounds


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_qa_outputs_args(p, NAME)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    from gmsa_rag.metrics import answer_in_output

    examples = bc.qa_outputs_examples(args)
    if any(e.gold_index is None for e in examples):
        raise SystemExit(f"{args.data}: every question needs a marked gold passage (isgold)")
    correct: dict[str, list[float]] = {}
    answered: int | None = None  # every file follows the data file (qa_outputs), so equal counts: the same questions
    for path in args.results:
        systems, pairs = bc.qa_outputs(path, examples)
        if answered is not None and len(pairs) != answered:
            raise SystemExit(f"{path}: answers other questions than {args.results[0]}")
        answered = len(pairs)
        for system in systems:
            name = system if len(args.results) == 1 else f"{path.stem}: {system}"
            correct[name] = [answer_in_output(r[system], e.answers) for r, e in pairs]
    overlaps = [question_overlap(e.question, e.gold_context, e.answers) for e in examples[:answered]]
    rows, bounds = accuracy_by_third(overlaps, correct)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5 + 0.15 * len(rows)))
    width = 0.8 / max(len(rows), 1)
    for k, row in enumerate(rows):
        ax.bar([t + k * width for t in range(3)], [row[t] for t in THIRDS], width, label=row["system"])
    ax.set_xticks([t + 0.4 - width / 2 for t in range(3)],
                  [f"{t} overlap\n(to {b:.2f})" for t, b in zip(THIRDS, bounds)])
    ax.set_ylabel("accuracy %")
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    meta = {"results": ", ".join(str(p) for p in args.results), "data": str(args.data),
            "questions": len(overlaps), "thirds_upper_overlap": [round(b, 3) for b in bounds],
            "command": "answer_overlap.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    notes = ["Overlap: the share of the question's content words (SQuAD-normalised; function words and the answer's "
             "own words left out) found in the answer's sentence, the first sentence of the gold passage holding a "
             "gold answer (else the whole passage). Thirds: the questions sorted by overlap, cut into three equal "
             "groups. Accuracy: a gold answer appears in the output (qa.py's). Thirds of ~67 questions are +-6 "
             "points at these accuracies."]
    columns = [bc.Column("system", "system"), bc.Column("n", "n", 0), bc.Column("all", "accuracy %", 1)] + \
        [bc.Column(t, f"{t} overlap %", 1) for t in THIRDS]
    out = args.out or bc.default_out_dir(bc.resolve_device("cpu"))
    paths = bc.write_outputs(out, args.name, "Accuracy by the question's word overlap with the answer's sentence",
                             meta, [("Accuracy per third of the questions", columns, rows)], fig, notes,
                             data={"rows": rows, "overlaps": overlaps})
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "bounds": bounds, "overlaps": overlaps}


if __name__ == "__main__":
    main()
