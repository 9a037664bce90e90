"""Shared pieces of the benchmark scripts (latency.py, qa.py, reconstruction.py).

* devices, dtypes and the machine name that picks ``benchmarks/results/<machine>/``;
* timing (warm-up runs, then the median of repeats, with ``torch.cuda.synchronize`` around each run on GPU)
  and peak GPU memory;
* loading backbones (SmolLM2, a LLaMA-2-7B-shaped random model, any Hugging Face id, tiny test models),
  untrained compressors and GMSA / TCP-AE checkpoints;
* reading passages and QA examples;
* writing each benchmark's three outputs: ``<name>.md`` (table), ``<name>.json`` (all numbers + settings)
  and ``<name>.png`` (plot, matplotlib's Agg backend).

Only torch, transformers, peft, numpy and matplotlib are needed; metric packages load where they are used.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"

# --------------------------------------------------------------------------- devices


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on accelerators, fp32 on CPU."""
    if name in (None, "", "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        return _DTYPES[name]
    except KeyError:
        raise SystemExit(f"unknown dtype {name!r}; use one of auto, {', '.join(sorted(_DTYPES))}") from None


def machine_name(device: torch.device | str) -> str:
    """Short name of the machine for result folders: ``h100``, ``h200``, ``a100``..., or ``cpu-<n>core``."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for known in ("h200", "h100", "gh200", "a100", "a10g", "l40s", "l4", "v100", "t4", "rtx 4090", "rtx 3090"):
            if known in name:
                return known.replace(" ", "")
        return re.sub(r"[^a-z0-9]+", "-", name.replace("nvidia", "")).strip("-") or "cuda"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return f"cpu-{cores}core"


def default_out_dir(device: torch.device) -> Path:
    return RESULTS_ROOT / machine_name(device)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_average() -> str:
    """1/5/15-minute load averages (other processes on a shared CPU machine distort CPU timings)."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def env_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    return {
        "machine": machine_name(device),
        "device": device_description(device),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average_at_start": load_average(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
    }


# --------------------------------------------------------------------------- argument parsing


def add_common_args(parser: argparse.ArgumentParser, backbone_default: str | None = "smollm2") -> None:
    """--device, --dtype, --out, --backbone, --tokenizer, --seed, --quick."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: benchmarks/results/<machine>/, e.g. h100 or cpu-2core)")
    if backbone_default is not None:
        parser.add_argument("--backbone", default=backbone_default,
                            help="smollm2 (offline default), llama7b-shape (LLaMA-2-7B-shaped, RANDOM weights: "
                                 "timing only), tiny (tests), or a Hugging Face id / local path")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer for llama7b-shape / tiny backbones (default: SmolLM2's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small sizes: a CPU run in a few minutes")


def parse_int_list(text: str) -> list[int]:
    """argparse type: integers >= 1 separated by commas or spaces (e.g. lengths, rates)."""
    try:
        values = [int(x) for x in re.split(r"[,\s]+", text.strip()) if x]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 such as 512,1024; got {text!r}")
    return values


def check_checkpoints(specs: Sequence["SystemSpec"]) -> None:
    """Refuse, in one line and before any model loads, a system whose checkpoint is missing or damaged or lacks
    the rate it is asked for."""
    from gmsa_rag.checkpoint import CheckpointError, read_record

    rates_of: dict[str, list[int]] = {}  # (a checkpoint evaluated at several rates is read once)
    for spec in specs:
        if spec.kind == "base" or not spec.path:
            continue
        if spec.path not in rates_of:
            try:
                rates_of[spec.path] = read_record(spec.path)["config"]["rates"]
            except CheckpointError as err:
                raise SystemExit(f"{spec.name}: {err}") from err
        rates = rates_of[spec.path]
        if spec.kind in ("gmsa", "tcp") and spec.rate is not None and spec.rate not in rates:
            raise SystemExit(f"{spec.label}: rate {spec.rate} is not one of {spec.path}'s rates {sorted(rates)}")


# --------------------------------------------------------------------------- timing and memory


@dataclass
class Timing:
    """Wall-clock seconds of the timed repeats (warm-up runs excluded)."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repeats were."""
        if len(self.samples) < 2 or not self.median:
            return 0.0
        return (max(self.samples) - min(self.samples)) / self.median

    def to_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "samples_s": self.samples}


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 1, repeats: int = 3) -> tuple[Timing, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed (synchronising the GPU around each).

    Returns the timings and the last result.
    """
    result = None
    for _ in range(warmup):
        result = fn()
    sync(device)
    timing = Timing()
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        timing.samples.append(time.perf_counter() - start)
    return timing, result


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float | None, float | None]:
    """Run ``fn`` once; on GPU return (result, peak allocated GiB, peak GiB above what was allocated before)."""
    if device.type != "cuda":
        return fn(), None, None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return result, peak / 2**30, (peak - before) / 2**30


def kv_cache_mib(decoder, positions: int, dtype: torch.dtype) -> float:
    """Size of the decoder's KV cache for ``positions`` positions (analytic; batch 1)."""
    cfg = decoder.config.get_text_config() if hasattr(decoder.config, "get_text_config") else decoder.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    size = torch.tensor([], dtype=dtype).element_size()
    return positions * cfg.num_hidden_layers * 2 * kv_heads * head_dim * size / 2**20


# --------------------------------------------------------------------------- models


def build_llama7b_shape(vocab_size: int, device: torch.device, dtype: torch.dtype,
                        max_positions: int = 8192, **overrides):
    """A LLaMA-2-7B-shaped causal LM with RANDOM weights, initialised on ``device`` directly (timing only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=vocab_size, max_position_embeddings=max(8192, max_positions),
                 tie_word_embeddings=False)
    shape.update(overrides)
    config = AutoConfig.for_model("llama", **shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def load_decoder(backbone: str, device: torch.device, dtype: torch.dtype, tokenizer_name: str | None = None,
                 max_positions: int = 0) -> tuple[Any, Any, list[str]]:
    """(decoder, tokenizer, notes) for a backbone name; see ``add_common_args`` for the names."""
    from gmsa_rag.backbone import load_backbone, load_tokenizer, tiny_backbone

    notes: list[str] = []
    if backbone == "llama7b-shape":
        tokenizer = load_tokenizer(tokenizer_name or "smollm2")
        decoder = build_llama7b_shape(len(tokenizer), device, dtype, max_positions=max_positions)
        notes.append("Backbone: LLaMA-2-7B-shaped model (32 layers, hidden 4096, MHA 32 heads) with RANDOM weights, "
                     f"vocabulary sized to the tokenizer ({len(tokenizer)} ids, SmolLM2's tokenizer), "
                     f"max positions {decoder.config.max_position_embeddings}: valid for timing only.")
    elif backbone == "tiny" or backbone.startswith("tiny-"):
        family = backbone.split("-", 1)[1] if "-" in backbone else "llama"
        tokenizer = load_tokenizer(tokenizer_name or "smollm2")
        decoder = tiny_backbone(family).to(device=device, dtype=dtype)
        notes.append(f"Backbone: tiny random {family} model (tests only).")
    else:
        decoder, tokenizer = load_backbone(backbone, device=device, dtype=dtype)
        if tokenizer_name:
            tokenizer = load_tokenizer(tokenizer_name)
    decoder.eval()
    return decoder, tokenizer, notes


def untrained_compressor(decoder, tokenizer, method: str, rates: Iterable[int], base_name: str,
                         encoder_layers: int = 8, lsa_layers: int = 1, window: int = 512):
    """A GMSA / TCP-AE compressor with freshly initialised (untrained) LoRA, LSA and memory slots."""
    from gmsa_rag import GMSAConfig
    from gmsa_rag.model import GMSAModel

    layers = len(decoder.get_decoder().layers)
    config = GMSAConfig(base_model=base_name, method=method, rates=tuple(sorted(set(rates) | {2, 4, 8, 16})),
                        encoder_layers=min(encoder_layers, layers), lsa_layers=min(lsa_layers, layers),
                        window=window)
    return GMSAModel(decoder, tokenizer, config).eval()  # layer copies are built on the decoder's device


def load_system(checkpoint: str | Path, device: torch.device, dtype: torch.dtype, backbone: str | None = None,
                tokenizer_name: str | None = None, decoder=None, tokenizer=None):
    """Load a GMSA / TCP-AE checkpoint on its recorded base model (or ``backbone``); returns a GMSAModel.

    Unlike ``GMSAModel.from_pretrained`` this also resolves this module's backbone names (tiny, llama7b-shape).
    A ``decoder`` passed in is used as is (and modified in place if the checkpoint tunes the decoder).
    """
    from gmsa_rag import GMSAConfig
    from gmsa_rag.checkpoint import attach_checkpoint, read_record, read_weights
    from gmsa_rag.model import GMSAModel

    record = read_record(checkpoint)
    state = read_weights(checkpoint)
    config = GMSAConfig.from_dict(record["config"])
    if backbone:
        config.base_model = backbone
    if decoder is None:
        decoder, tokenizer, _ = load_decoder(config.base_model, device, dtype, tokenizer_name)
    model = GMSAModel(decoder, tokenizer, config)
    return attach_checkpoint(model, record, state, checkpoint).eval()


def add_probe_args(parser: argparse.ArgumentParser, name: str, limit_help: str, limit_default: int | None = None,
                   checkpoint_help: str = "GMSA checkpoint (default: the bundled one)") -> None:
    """The arguments every QA probe shares: the common ones, --checkpoint, --backbone, --data, --limit, --split,
    --name (read back with ``probe_inputs``)."""
    add_common_args(parser, backbone_default=None)
    parser.add_argument("--checkpoint", default=None, help=checkpoint_help)
    parser.add_argument("--backbone", default=None,
                        help="base model to load checkpoints on (default: the recorded one; tiny in tests)")
    parser.add_argument("--data", default=None, help="QA jsonl(.gz) with gold passages marked, or a pooled QA folder "
                                                     "(its dev split); default: the bundled dev split")
    parser.add_argument("--limit", type=int, default=limit_default, help=limit_help)
    parser.add_argument("--split", default="dev", choices=["dev", "train"],
                        help="the split of a pooled QA folder to probe (default dev; train: the questions a checkpoint "
                             "trained on, to tell underfitting from overfitting)")
    parser.add_argument("--name", default=name)


def probe_inputs(args: argparse.Namespace) -> tuple[Path, Path]:
    """(checkpoint, QA data) of a probe: ``--checkpoint`` or the bundled one, ``--data`` or the bundled dev split."""
    from gmsa_rag.checkpoint import default_checkpoint
    from gmsa_rag.data import DEFAULT_QA_DIR

    checkpoint = args.checkpoint or default_checkpoint()
    if checkpoint is None:
        raise SystemExit("no --checkpoint given and no bundled checkpoint found")
    return Path(checkpoint), Path(args.data) if args.data else DEFAULT_QA_DIR / "dev.jsonl.gz"


def probe_setup(args: argparse.Namespace, cpu_limit: int, gpu_limit: int) -> tuple[torch.device, torch.dtype, Path, Path, int]:
    """(device, dtype, checkpoint, QA data, question limit) of a probe: ``--limit`` or the device's default."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    checkpoint, data = probe_inputs(args)
    return device, dtype, checkpoint, data, args.limit or (cpu_limit if device.type == "cpu" else gpu_limit)


def gold_questions(data: Path, split: str = "dev") -> list:
    """The questions of a QA file (or of a pooled QA folder's ``split``) that mark a gold passage; a clear exit if
    none does."""
    from gmsa_rag.data.qa import load_qa

    examples = [e for e in load_qa(data, split) if e.gold_context is not None]
    if not examples:
        raise SystemExit(f"{data} has no questions with a marked gold passage")
    return examples


def add_reading_args(parser: argparse.ArgumentParser) -> None:
    """The arguments of the probes that answer from gold passages (read_back, answer_position): --text-checkpoint,
    --max-passage-tokens, --batch-size, --max-new-tokens."""
    parser.add_argument("--text-checkpoint", default=None,
                        help="optional no-compress fine-tune (--no_compress run) answering from the same passages as text")
    parser.add_argument("--max-passage-tokens", type=int, default=256,
                        help="keep questions whose gold passage has at most this many tokens (default 256, the "
                             "product's chunk size; 0: all)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per generate call (default 8 CPU, 64 GPU)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="answer length limit")


def progress(items: Sequence, desc: str, unit: str = "batch") -> Iterator:
    """``items`` one by one, with a progress line on stderr (count, rate, time left) for long benchmark loops; the line
    refreshes at most every few seconds, so logs of runs without a terminal stay short."""
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=desc, unit=unit, file=sys.stderr, mininterval=5.0, leave=True, dynamic_ncols=True))


def passages_within(model, examples: Sequence, cap: int) -> Iterator:
    """The examples whose gold passage has at most ``cap`` tokens (every one with ``cap`` 0), in order, lazily: a
    caller that stops early tokenizes no more passages than it reads."""
    return (e for e in examples if not cap or len(model.tokenize([e.gold_context])[0]) <= cap)


def parse_compare_args(argv: list[str] | None, description: str, script: str, what: str, name: str,
                       title: str) -> argparse.Namespace:
    """The arguments of the scripts that set runs of ``script`` side by side (qa_compare, decode_compare): ``--run
    LABEL=FILE.json[:WHAT]`` (repeated; read as (label, file, row or None: the file's only row)), --name, --title,
    --out."""
    metavar = f"LABEL=FILE.json[:{what.upper()}]"

    def run(text: str) -> tuple[str, Path, str | None]:
        label, sep, rest = text.partition("=")
        if not sep or not label or not rest:
            raise argparse.ArgumentTypeError(f"expected {metavar}, got {text!r}")
        path, _, row = rest.partition(".json")
        return label, Path(path + ".json"), row.removeprefix(":") or None

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--run", type=run, action="append", required=True, metavar=metavar,
                   help=f"a row: a {script} JSON and one of its {what}s (may be left out when the file has one)")
    p.add_argument("--name", default=name, help=f"output file stem (default {name})")
    p.add_argument("--title", default=title)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    args = p.parse_args(argv)
    written = (args.out / f"{args.name}.json").resolve()
    for _, path, _ in args.run:
        if path.resolve() == written:  # the table would overwrite the run it reads (and its per-question answers)
            p.error(f"--name {args.name} in {args.out} would overwrite the run {path}: choose another --name")
    return args


def labelled_file(text: str) -> tuple[str, Path, str | None]:
    """``LABEL=FILE.json[:SYSTEM]`` as (label, file, system or None), for a ``--run``-style argparse type."""
    label, sep, rest = text.partition("=")
    path, dot, system = rest.partition(".json")
    if not sep or not label or not dot:
        raise argparse.ArgumentTypeError(f"expected LABEL=FILE.json[:SYSTEM], got {text!r}")
    return label, Path(path + ".json"), system.removeprefix(":") or None


def run_row(path: Path, key: str, wanted: str | None, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A benchmark run's JSON payload at ``path`` and its row whose ``key`` is ``wanted`` (None: the run's only row),
    for the scripts that set runs side by side; a missing file, row or choice ends in one line naming the fix."""
    if not path.is_file():
        raise SystemExit(f"no such file: {path}")
    payload = json.loads(path.read_text())
    rows = {r[key]: r for r in payload["rows"]}
    if wanted is None and len(rows) != 1:
        raise SystemExit(f"{path} holds {len(rows)} {what}s ({', '.join(rows)}): name one as {path}:{what.upper()}")
    row = rows.get(wanted) if wanted else next(iter(rows.values()))
    if row is None:
        raise SystemExit(f"{path} has no {what} {wanted!r} (it has {', '.join(rows)})")
    return payload, row


def free(*objects) -> None:
    """Drop references and return cached GPU memory (best effort)."""
    del objects
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- data


def open_text(path: Path):
    path = Path(path)
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl(path: Path) -> Iterator[dict]:
    with open_text(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def find_qa_file(split: str = "dev") -> Path | None:
    """The bundled multi-document QA file of ``split`` (``gmsa_rag.data.DEFAULT_QA_DIR``), if present."""
    from gmsa_rag.data import DEFAULT_QA_DIR

    for name in (f"{split}.jsonl.gz", f"{split}.jsonl"):
        if (Path(DEFAULT_QA_DIR) / name).is_file():
            return Path(DEFAULT_QA_DIR) / name
    matches = sorted(Path(DEFAULT_QA_DIR).glob(f"*{split}*.jsonl*")) if Path(DEFAULT_QA_DIR).is_dir() else []
    return matches[0] if matches else None


_DOC_KEYS = ("documents", "docs", "ctxs", "contexts", "passages")


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        if isinstance(obj, dict) and name in obj:
            return obj[name]
        if not isinstance(obj, dict) and hasattr(obj, name):
            return getattr(obj, name)
    return default


def add_qa_outputs_args(parser: argparse.ArgumentParser, name: str) -> None:
    """Arguments of the scripts that read ``benchmarks/qa.py``'s saved outputs (no model run)."""
    parser.add_argument("--results", type=Path, nargs="+", required=True,
                        help="qa.py JSON files (their 'outputs'); with several, each system is named "
                             "'<file stem>: <system>'")
    parser.add_argument("--data", type=Path, required=True,
                        help="the QA file (or pooled QA folder, its dev split) those outputs answered (same order)")
    parser.add_argument("--max-docs", type=int, default=5,
                        help="documents per question of a pooled QA folder, as qa.py's --max-docs (default 5)")
    parser.add_argument("--name", default=name)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<machine>/)")


def qa_outputs_examples(args: argparse.Namespace) -> list:
    """The QA examples behind ``--results``, as the prompts showed them; a missing file is a one-line exit."""
    from gmsa_rag.data.qa import is_qa_pool, load_as_shown

    for path in args.results:
        if not path.is_file():
            raise SystemExit(f"no such file: {path}")
    if not args.data.exists():
        raise SystemExit(f"no QA data at {args.data}")
    for path in args.results:  # a pooled folder is laid out per --max-docs: the same layout as the outputs'
        meta = json.loads(path.read_text()).get("meta", {})
        shown = meta.get("documents_per_question")
        if (is_qa_pool(args.data) and isinstance(shown, int) and shown != args.max_docs
                and meta.get("documents") == "as in the file (gold among distractors)"):
            raise SystemExit(f"{path} answered {shown} documents per question: pass --max-docs {shown}")
    return load_as_shown(args.data, max_docs=args.max_docs)


def qa_outputs(results: Path, examples: Sequence[Any]) -> tuple[list[str], list[tuple[dict[str, Any], Any]]]:
    """The systems of a ``benchmarks/qa.py`` JSON and its saved outputs paired with the QA ``examples`` they answered
    (same order; a question that differs raises ``ValueError``)."""
    outputs = json.loads(Path(results).read_text())["outputs"]
    if len(outputs) > len(examples):
        raise ValueError(f"{len(outputs)} outputs but only {len(examples)} questions in the data file")
    for record, example in zip(outputs, examples):
        if record["question"] != example.question:
            raise ValueError(f"the outputs do not follow the data file: {record['question']!r} against "
                             f"{example.question!r}")
    systems = [k for k in outputs[0] if k not in ("question", "answers")] if outputs else []
    return systems, list(zip(outputs, examples))


def document_texts(example: Any) -> list[str]:
    """Plain text of each document of a QA example (dict or object; ``text`` of each document, else the item)."""
    docs = _get(example, *_DOC_KEYS, default=[]) or []
    texts = []
    for doc in docs:
        text = doc if isinstance(doc, str) else _get(doc, "text", "passage", "content", default="")
        if text and text.strip():
            texts.append(text.strip())
    return texts


def load_passages(data: str | Path | None = None, limit: int | None = None) -> tuple[list[str], str]:
    """Unique passages from a QA jsonl (documents' text), a jsonl corpus (``text``), or plain-text files.

    Without ``data``: the bundled QA dev split, else ``shared/data/nq-open-oracle*.jsonl.gz`` next to the repo.
    Returns (passages, description of the source).
    """
    candidates: list[Path] = []
    if data is not None:
        candidates = [Path(data)]
    else:
        dev = find_qa_file("dev")
        if dev is not None:
            candidates.append(dev)
        for root in (REPO_ROOT / "shared" / "data", REPO_ROOT.parent / "shared" / "data"):
            candidates += sorted(root.glob("nq-open-oracle*.jsonl*")) if root.is_dir() else []
    for path in candidates:
        if not path.exists():
            raise SystemExit(f"data file {path} does not exist")
        passages: list[str] = []
        seen: set[str] = set()
        if ".jsonl" in path.name or ".ndjson" in path.name:
            for record in read_jsonl(path):
                texts = document_texts(record) or ([record["text"]] if isinstance(record.get("text"), str) else [])
                for t in texts:
                    if t not in seen:
                        seen.add(t)
                        passages.append(t)
                if limit and len(passages) >= limit:
                    break
        else:
            from gmsa_rag.data.corpus import load_texts

            passages = [t for t in load_texts(path) if t.strip()]
        if passages:
            return passages[:limit] if limit else passages, str(path)
    raise SystemExit("no passages found: pass --data FILE (a QA jsonl with documents, a jsonl with 'text', or "
                     "plain text); looked for the bundled dev split and shared/data/nq-open-oracle*")


def token_stream(tokenizer, passages: Sequence[str], needed: int) -> list[int]:
    """Token ids of the passages joined by blank lines, at least ``needed`` long (recycled if short)."""
    ids: list[int] = []
    sep = tokenizer.encode("\n\n", add_special_tokens=False)
    while len(ids) < needed:
        before = len(ids)
        for p in passages:
            ids += tokenizer.encode(p, add_special_tokens=False) + sep
            if len(ids) >= needed:
                break
        if len(ids) == before:
            raise ValueError("passages yield no tokens")
    return ids


# --------------------------------------------------------------------------- output


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}f}"
    return str(value)


@dataclass
class Column:
    key: str
    header: str
    digits: int = 2


def markdown_table(columns: Sequence[Column], rows: Sequence[dict]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i, _ in enumerate(columns)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c.key), c.digits) for c in columns) + " |")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    return value


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 6.0, height: float = 4.5):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes


def write_outputs(out_dir: Path, name: str, title: str, meta: dict[str, Any], tables: Sequence[tuple[str, Sequence[Column], Sequence[dict]]],
                  figure, notes: Sequence[str] = (), data: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``<name>.md`` (settings, notes, tables), ``<name>.json`` (meta + data) and ``<name>.png``."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("md", "json", "png")}
    md = [f"# {title}", ""]
    md += [f"- **{k}**: {v}" for k, v in meta.items() if not isinstance(v, (dict, list))]
    if notes:
        md += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    for heading, columns, rows in tables:
        md += ["", f"## {heading}" if heading else "", "", markdown_table(columns, rows)]
    md += ["", f"![{name}]({name}.png)", ""]
    paths["md"].write_text("\n".join(md))
    payload = {"meta": meta, "notes": list(notes), **(data or {})}
    paths["json"].write_text(json.dumps(_jsonable(payload), indent=1))
    figure.tight_layout()
    figure.savefig(paths["png"], dpi=120)
    plt.close(figure)
    return paths


# --------------------------------------------------------------------------- systems (qa.py, reconstruction.py)


@dataclass
class SystemSpec:
    """One evaluated system: ``kind`` is base (uncompressed, base model), text (uncompressed prompt on a
    checkpoint's fine-tuned decoder), or gmsa / tcp (soft tokens from a checkpoint, or untrained when ``path``
    is empty and ``untrained`` is set)."""

    name: str
    kind: str
    path: str | None = None
    rate: int | None = None
    untrained: bool = False

    @property
    def label(self) -> str:
        return self.name if self.rate is None or f"r={self.rate}" in self.name else f"{self.name} r={self.rate}"


SYSTEM_KINDS = ("base", "text", "gmsa", "tcp")


def parse_system(text: str) -> SystemSpec:
    """``name=kind:path[:rate]`` (``base`` takes an optional backbone instead of a path)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--system {text!r}: expected name=kind:path[:rate]")
    name, spec = text.split("=", 1)
    kind, _, rest = spec.partition(":")
    if kind not in SYSTEM_KINDS:
        raise argparse.ArgumentTypeError(f"--system {text!r}: kind must be one of {SYSTEM_KINDS}")
    rate = None
    head, sep, tail = rest.rpartition(":")
    if sep and tail.isdigit():
        rest, rate = head, int(tail)
    if kind in ("text", "gmsa", "tcp") and not rest:
        raise argparse.ArgumentTypeError(f"--system {text!r}: {kind} needs a checkpoint path")
    return SystemSpec(name=name, kind=kind, path=rest or None, rate=rate)


def expand_rates(specs: Sequence[SystemSpec], rates: Sequence[int]) -> list[SystemSpec]:
    """Give compressed systems without a rate one entry per rate in ``rates``."""
    out: list[SystemSpec] = []
    for s in specs:
        if s.kind in ("gmsa", "tcp") and s.rate is None:
            out += [SystemSpec(s.name, s.kind, s.path, r, s.untrained) for r in rates]
        else:
            out.append(s)
    return out
