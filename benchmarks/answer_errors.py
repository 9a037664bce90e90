#!/usr/bin/env python
"""What kind of wrong answer each system gives: a wrong document, a wrong place in the right one, or garble.

Reads the outputs that ``benchmarks/qa.py`` saved (its JSON: question, gold answers and every system's answer)
and the QA file they answered, and sorts every answer by what it is, after SQuAD normalisation:

  right                    a gold answer is in it (qa.py's accuracy)
  wrong span of the gold   wrong, and the whole answer is a span of the gold passage
  span of a distractor     wrong, and a span of another document shown
  mostly gold words        neither, but at least half its words are in the gold passage (more than in any other)
  mostly distractor words  the same for another document
  not in the documents     anything else: words the documents do not hold (garbled or made up)
  empty                    nothing

Picking the wrong document shows up as distractor spans; reading the right one badly, as gold spans, partial copies
and words from nowhere. ``--by-bm25-rank`` splits every system's row in two: the questions whose gold passage BM25
ranks first among their documents (what a reranker keeping one would keep) and the rest, so a reader of ranked
documents shows whether it reads past the first one. No model is run: the command takes seconds on any machine.

    python benchmarks/answer_errors.py --results benchmarks/results/cpu-2core/qa-stage2-continued.json \\
        --data data/nq-multidoc/dev.jsonl.gz --name answer-errors-stage2-continued
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402

NAME = "answer-errors"
KINDS = ("right", "wrong span of the gold", "span of a distractor", "mostly gold words", "mostly distractor words",
         "not in the documents", "empty")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_qa_outputs_args(p, NAME)
    p.add_argument("--gold-only", action="store_true", help="the outputs were made from the gold passage alone")
    p.add_argument("--by-bm25-rank", action="store_true",
                   help="a row per system for the questions whose gold passage BM25 ranks first among their documents "
                        "and one for the rest (gmsa_rag.lexical)")
    return p.parse_args(argv)


def error_kind(answer: str, answers: Sequence[str], gold: str | None, others: Sequence[str]) -> str:
    """One of :data:`KINDS` for ``answer`` given the gold ``answers``, the gold passage and the other documents."""
    from gmsa_rag.data.build_nq import contains_answer
    from gmsa_rag.metrics import answer_in_output, normalize_answer

    said = normalize_answer(answer)
    if not said:
        return "empty"
    if answer_in_output(answer, answers):  # qa.py's accuracy
        return "right"
    gold_text = normalize_answer(gold) if gold is not None else None
    other_texts = [normalize_answer(o) for o in others]
    if gold_text is not None and contains_answer(gold_text, [said]):
        return "wrong span of the gold"
    if any(contains_answer(o, [said]) for o in other_texts):
        return "span of a distractor"
    words = set(said.split())
    share = lambda text: len(words & set(text.split())) / len(words)  # noqa: E731
    in_gold = share(gold_text) if gold_text is not None else 0.0
    in_other = max((share(o) for o in other_texts), default=0.0)
    if max(in_gold, in_other) >= 0.5:
        return "mostly gold words" if in_gold >= in_other else "mostly distractor words"
    return "not in the documents"


def bm25_group(example: Any) -> str:
    """Whether BM25 ranks the example's gold passage first among its documents (``gmsa_rag.lexical.ranked``)."""
    from gmsa_rag.lexical import ranked

    if example.gold_index is None:
        return "gold unknown"
    first = ranked(example.question, example.contexts)[0] == example.gold_index
    return "gold ranked first by BM25" if first else "gold ranked lower by BM25"


def classify(results: Path, examples: Sequence[Any], gold_only: bool,
             by_bm25_rank: bool = False) -> dict[str, Counter]:
    """Counts of each kind per system of a qa.py JSON (``results``) against their ``examples``; with ``by_bm25_rank``
    per system and :func:`bm25_group` (``"<system>, <group>"``)."""
    systems, pairs = bc.qa_outputs(results, examples)
    counts: dict[str, Counter] = {}
    for record, example in pairs:
        gold = example.contexts[example.gold_index] if example.gold_index is not None else None
        others = [] if gold_only else [c for i, c in enumerate(example.contexts) if i != example.gold_index]
        group = f", {bm25_group(example)}" if by_bm25_rank else ""
        for system in systems:
            counts.setdefault(system + group, Counter())[error_kind(record[system], example.answers, gold, others)] += 1
    return dict(sorted(counts.items())) if by_bm25_rank else counts


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    examples = bc.qa_outputs_examples(args)
    counts: dict[str, Counter] = {}
    for path in args.results:
        for system, c in classify(path, examples, args.gold_only, args.by_bm25_rank).items():
            counts[system if len(args.results) == 1 else f"{path.stem}: {system}"] = c
    rows = [{"system": s, "n": sum(c.values()), **{k: 100 * c[k] / max(sum(c.values()), 1) for k in KINDS}}
            for s, c in counts.items()]
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for kind in KINDS:
        values = [r[kind] for r in rows]
        ax.barh([r["system"] for r in rows], values, left=left, label=kind)
        left = [a + b for a, b in zip(left, values)]
    ax.invert_yaxis()
    ax.set_xlabel("% of questions")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    meta = {"results": ", ".join(str(p) for p in args.results), "data": str(args.data),
            "documents": "gold passage only" if args.gold_only else "as in the file (gold among distractors)",
            "command": "answer_errors.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    notes = ["Kinds, in this order of precedence, after SQuAD normalisation: right = a gold answer is in the answer; "
             "wrong span of the gold / span of a distractor = the whole answer occurs (as whole tokens) in the gold "
             "passage / another document shown; mostly gold / distractor words = at least half of the answer's words "
             "are in that passage (the gold when tied); not in the documents = the rest; empty = no answer."]
    if args.by_bm25_rank:
        notes.append("Rows split by whether BM25 (gmsa_rag.lexical, the question against its own documents) ranks the "
                     "gold passage first.")
    columns = [bc.Column("system", "system"), bc.Column("n", "n", 0)] + [bc.Column(k, f"{k} %", 1) for k in KINDS]
    out = args.out or bc.default_out_dir(bc.resolve_device("cpu"))
    paths = bc.write_outputs(out, args.name, "Kinds of answers (from qa.py outputs)", meta,
                             [("Share of questions", columns, rows)], fig, notes, data={"rows": rows})
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
