"""Train GMSA (or TCP-AE) in two stages: ``python -m gmsa_rag.train --stage ae|keft ...``.

Stage ``ae``: encoder LoRA + LSA learn to make soft tokens from which the decoder restores the passage
(autoencoding) or writes the text that follows it (continuation, ``--continuation_fraction``); by default the
decoder's soft-token adapter trains with them (``--ae_decoder_lora false``: the paper's frozen decoder).
Passages are cut from a tokenized corpus like RAG chunks; some samples hold several separately compressed
documents of which one is restored (``--multi_doc_fraction``). Stage ``keft``: compressor frozen (loaded from a
stage-1 checkpoint); a LoRA adapter on the decoder's W_Q/W_K/W_V (on only for prompts with soft tokens; the
stage-1 one, if the checkpoint has it) learns to answer questions from the soft tokens of the retrieved
documents, optionally distilled from the base model reading the same documents as text (``--distill_weight``: its
answer-token logits; ``--distill_hidden_weight``: its hidden states after the documents; ``--distill_soft_weight``:
its states over the text each soft token stands for; ``--distill_teacher``: a no-compress fine-tune instead), or with
stage 1's task kept on the same prompts' documents (``--restore_fraction``). ``--no-compress`` fine-tunes the same decoder
parameters on the uncompressed prompt (the fair baseline). Rates are drawn per sample (``--rate_weights``).

The learning-rate schedule runs on the fraction of the budget spent: the largest of steps, tokens
(``--max_tokens``) and wall time (``--time_limit_minutes``) done, so it ends where the budget ends.

Runs as one CPU process, on one GPU, or on several with ``accelerate launch -m gmsa_rag.train ...``.
Flags may also come from a YAML/JSON file (``--config run.yaml``); flags on the command line win.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from .citation import cited, split_citation
from .evidence import QUOTE_TOKENS, QUOTE_WORDS, quoted, split_quote
from .checkpoint import CheckpointError, attach_checkpoint, load_checkpoint, read_record, read_weights, save_checkpoint
from .config import GMSAConfig
from .backbone import RANDOM_PREFIX, cache_root, load_tokenizer
from .errors import UsageError
from .data import DEFAULT_AE_CORPUS, DEFAULT_QA_DIR
from .data.cloze import cloze_example
from .data.counterfactual import AnswerPool, counterfactual_example
from .data.passages import Passage, PassageCorpus
from .data.qa import QAExample, dev_layout, load_qa, question_share, reordered
from .lexical import DOCUMENT_ORDERS
from .metrics import qa_metrics, reconstruction_metrics
from .model import GMSAModel
from .samples import Sample, build_prompts, lead_rates, sample_rate, token_ids

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
COUNTS = ("steps", "batch_size", "grad_accum", "eval_every", "eval_batch_size", "save_every", "log_every")
POSITIVE = ("lr", "max_grad_norm")
NON_NEGATIVE = ("compressor_lr", "weight_decay", "warmup_steps", "distill_weight", "distill_hidden_weight",
                "distill_soft_weight", "quote_words", "restore_weight")
FRACTIONS = ("title_fraction", "continuation_fraction", "span_fraction", "multi_doc_fraction", "docs_curriculum",
             "min_lr_ratio", "lead_fraction", "restore_fraction")
NEW_MODEL_LORA_RANK, NEW_MODEL_LSA_LAYERS = 16, 1  # --lora_rank / --lsa_layers of a model trained from scratch
# what a run resumed into its --out_dir must keep: the flags that shape its model and prompts (whether the compressor
# trains decides the optimizer's parameter groups)
RUN_DEFINING = ("stage", "method", "base_model", "init", "no_compress", "encoder_layers", "lsa_layers", "rates",
                "window", "lora_rank", "lora_alpha", "encoder_prefix", "encoder_norm", "soft_token_norm",
                "soft_token_center", "decoder_tuning", "decoder_lora_rank", "decoder_mlp_lora_rank", "ae_decoder_lora",
                "cite_document", "question_first", "quote_evidence", "doc_order")


@dataclass
class TrainConfig:
    stage: Literal["ae", "keft"] = "ae"
    method: Literal["gmsa", "tcp"] = "gmsa"
    out_dir: str = "runs/gmsa-ae"
    base_model: str = "smollm2"
    init: str | None = field(default=None, metadata={"help": "keft: the stage-1 checkpoint it starts from (with --no_compress: a no-compress fine-tune to train further); ae: a stage-1 checkpoint to train further (its weights and architecture; fresh optimizer and schedule, e.g. more tokens, new data or another objective mix)"})
    no_compress: bool = field(default=False, metadata={"help": "keft on the uncompressed prompt (baseline)"})
    data: list[str] = field(default_factory=list, metadata={"help": "ae: jsonl(.gz)/text corpus files or folders; keft: QA jsonl or a pooled QA folder (data/qa-multidoc)"})
    dev_data: str | None = field(default=None, metadata={"help": "dev set (ae: corpus file kept out of training; keft: QA jsonl or pooled folder)"})
    token_cache: str = field(default="", metadata={"help": "where tokenized corpus files are kept (default ~/.cache/gmsa_rag/corpora)"})
    # architecture (stage ae; keft inherits it from --init, which --lora_rank and --lsa_layers may grow)
    encoder_layers: int = 12
    lsa_layers: int | None = field(default=None, metadata={"help": "LSA blocks (copies of the decoder's lowest layers); default 1 for a new model. With --init the checkpoint's: more than it has appends blocks that start as the identity (output projections at zero: the soft tokens are the checkpoint's until they train); fewer keeps the checkpoint's"})
    rates: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    window: int = 512
    lora_rank: int | None = field(default=None, metadata={"help": "rank of the encoder's LoRA (all linear layers); default 16 for a new model. With --init the checkpoint's: a rank above it widens it as --decoder_lora_rank widens the decoder adapter (new part at zero, alpha / r kept); a lower one keeps the checkpoint's"})
    lora_alpha: int = 32
    encoder_prefix: str = "Document:\n"
    encoder_norm: bool = False
    soft_token_norm: bool = False
    soft_token_center: bool = field(default=False, metadata={"help": "ae: subtract a learned vector from every soft token, started at the mean soft token of the first step's documents (with --init: added to a checkpoint without one). Measured: the same restoring, no better answers after stage 2 (benchmarks/results/h200-x4/stage1-same-article-and-centre.md)"})
    decoder_tuning: Literal["qkv", "qkv_lora", "full"] = field(default="qkv_lora", metadata={"help": "keft: LoRA on W_Q/W_K/W_V (adapter on for soft-token prompts only), full W_Q/W_K/W_V, or the full decoder (the authors' public code; a comparison: it changes the uncompressed path)"})
    decoder_lora_rank: int = field(default=16, metadata={"help": "rank of the soft-token adapter's LoRA on W_Q/W_K/W_V. With --init, a rank above the checkpoint's widens its adapter (the new part starts at zero: the model answers as the checkpoint does until it trains); a lower one keeps the checkpoint's"})
    decoder_lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the soft-token adapter's input while training (peft's lora_dropout), a regulariser: round 29 found the reader memorising its training questions (600 more steps: train-split accuracy up, dev down)"})
    decoder_mlp_lora_rank: int = field(default=0, metadata={"help": "rank of the soft-token adapter's LoRA on the decoder's MLP (gate/up/down) beside W_Q/W_K/W_V; 0: attention only. With --init it is added to a checkpoint without it (starting at zero)"})
    ae_decoder_lora: bool = field(default=True, metadata={"help": "ae: also train the soft-token decoder adapter (LoRA on W_Q/W_K/W_V, on only for prompts with soft tokens; stage 2 continues it; ignored by keft). A deviation from the paper's frozen stage-1 decoder (--ae_decoder_lora false), measured: dev BLEU@4x 61.6 vs 23.8 on an equal budget (benchmarks/results/h100/stage1-decoder-adapter.md). The text path stays the base model"})
    # data shaping
    rate_weights: list[float] = field(default_factory=list, metadata={"help": "relative frequency of each rate (default uniform)"})
    min_chunk_tokens: int = 32
    max_chunk_tokens: int = 512
    title_fraction: float = field(default=0.5, metadata={"help": "ae: share of passages with their 'Title:' line"})
    continuation_fraction: float = field(default=0.0, metadata={"help": "ae: share of samples whose target is the text that follows (0.5 in PISCO; autoencoding only restored better on an equal budget: benchmarks/results/h100-x2/stage1-ablations.md)"})
    continuation_tokens: int = 128
    span_fraction: float = field(default=0.0, metadata={"help": "ae: share of samples that quote 4-8 words of one document (which one unsaid) and ask for the up to span_tokens words that follow them there: finding a place by content and copying from the middle of a document, the two things extractive answers need and restoring does not teach (measured: it teaches quoting, and stage 2 from it answered no better: benchmarks/results/h200-x4/stage2-span-objective.md)"})
    span_tokens: int = field(default=32, metadata={"help": "ae: most target tokens of a span sample (at least 8)"})
    multi_doc_fraction: float = field(default=0.25, metadata={"help": "ae: share of samples with 2..max_docs documents, one restored"})
    multi_doc_distractors: str = field(default="random", metadata={"help": "ae: the other documents of a multi-document sample: random passages of the corpus, or other passages of the target's own article where it has them (same topic and entities, as retrieval's hard distractors). Measured with --multi_doc_fraction 0.75: restoring a passage among others of its article improves (dev among_bleu@4x +6.6), answers after 200 steps of stage 2 do not (benchmarks/results/h200-x4/stage1-same-article-and-centre.md)", "choices": ["random", "same_article"]})
    max_docs: int = field(default=5, metadata={"help": "ae: most documents per sample; keft: gold + distractors shown at most"})
    docs_curriculum: float = field(default=0.0, metadata={"help": "keft: share of the budget over which the number of documents ramps from gold-only to max_docs"})
    min_docs: int = field(default=1, metadata={"help": "keft: fewest documents a sample shows once the curriculum allows (max_docs: always the full prompt, as the product retrieves)"})
    train_fraction: float = field(default=1.0, metadata={"help": "keft: train on this share of the training questions, the same ones in every run (those whose question text hashes below it: a smaller share lies inside a larger; gmsa_rag.data.qa.question_share), for a curve of answers against distinct questions. Distractor passages stay the pool's"})
    cloze_fraction: float = field(default=0.0, metadata={"help": "keft: share of samples whose question is a fill-in-the-blank cut from the gold passage (a sentence with a number or name blanked, gmsa_rag.data.cloze) over the same documents: unlimited extra questions that need finding a sentence by content and copying from the middle of a document"})
    lead_rate: int = field(default=0, metadata={"help": "keft, with a ranked --doc_order: in --lead_fraction of the samples the best BM25 match (first with bm25_first, last with bm25_last) is compressed at this rate and the others at the sample's drawn rate, as GMSACompressor(lead_rate=, rate=) reads retrieved chunks; the dev log adds lead<R>_accuracy@<r>x (the lead at R, the others at each coarser rate r); 0: off"})
    lead_fraction: float = field(default=0.5, metadata={"help": "keft, with --lead_rate: the share of samples whose best match is at --lead_rate (the rest: every document at the drawn rate)"})
    counterfactual_fraction: float = field(default=0.0, metadata={"help": "keft: share of samples whose gold passage has its answer swapped, wherever the passage names it, for another training question's answer of the same kind (question word and shape: a year for a year, a 'who' name for a 'who' name), the substitute then the target (gmsa_rag.data.counterfactual). What the reader learnt by heart is wrong there: only the documents hold the answer. A new substitute each draw; samples whose gold passage does not name a short answer stay as they are. Measured (round 39, 0.5 from stage 1 beside a control): the reader followed swapped passages twice as often and read real dev questions no better (benchmarks/results/h100/stage2-counterfactual-r39.md)"})
    restore_fraction: float = field(default=0.0, metadata={"help": "keft: share of samples whose target is not the answer but stage 1's task over the same prompt's documents (same order and rates): restore one of them, drawn at random, word for word (or, with --restore_target span, the words after a few quoted ones). Keeps the reader copying the documents' words exactly while it learns to answer, and brings every passage of the prompts as a target where the answers are 17.6k short strings. A deviation from the paper's stage 2 (answers only). Measured (round 36, 0.25 from stage 1, either target): answers learned no faster per step; on one H100 the runs trained at half the speed of round 35's without it (cause not known), and at their 725 steps read under those controls (benchmarks/results/h100/stage2-restore-r36.md)"})
    restore_target: str = field(default="document", metadata={"help": "keft, with --restore_fraction: the whole document, or a span: 4-8 of its words quoted (which document unsaid) and the 8-16 words that follow them (finding a place by content and copying from it, as an answer does)", "choices": ["document", "span"]})
    restore_weight: float = field(default=1.0, metadata={"help": "keft, with --restore_fraction: weight of the stage-1 targets' mean token loss beside the answers' (each kind weighs by its share of the samples; without it a restored document's ~150 tokens would outweigh a dozen answers)"})
    cite_document: bool = field(default=False, metadata={"help": "keft: each answer opens with the number of the document that holds it (\"[3] Sun Tzu\"; the prompt asks for it, generation strips it, the checkpoint remembers it): choosing the document becomes a supervised first step (gmsa_rag.citation); the dev log adds cite_accuracy"})
    quote_evidence: bool = field(default=False, metadata={"help": "keft: each answer is given as a quote of the words that lead to it in the gold passage (up to --quote_words words of its sentence), the answer in bold (\"attributed to **Sun Tzu**\"; the prompt asks for it, generation returns the bold answer, the checkpoint remembers it): the decoder restores the answer's place, then reads the answer off its own text (gmsa_rag.evidence); costs the quote's decode steps (dev log: quote_tokens). Measured: far worse, the quote lands near the answer and the bold on the wrong words (one document at 4x: accuracy 10.5-16.5 against 32.5; benchmarks/results/h200/stage2-quote-evidence.md)"})
    quote_words: int = field(default=QUOTE_WORDS, metadata={"help": "keft, with --quote_evidence: most words of the answer's sentence quoted before it (fewer: fewer decode steps, less to locate the answer by)"})
    question_first: bool = field(default=False, metadata={"help": "keft: QA prompts state the question before the documents as well as after them, so the decoder reads the documents (soft tokens) knowing the question; the soft tokens and their cache do not change (the checkpoint remembers the layout; generation follows it)"})
    distractors: str = field(default="random", metadata={"help": "keft: which distractors a sample shows: random ones of the example's, or the hardest (stored order, as retrieval ranks them)", "choices": ["random", "hardest"]})
    doc_order: str = field(default="given", metadata={"help": "keft: the order of a prompt's documents, in training and dev alike: given (training: the gold passage at a random place; dev: at place i mod count), or by BM25 match to the question, best first (a reranker's order) or best last (nearest the question); the product orders retrieved chunks the same way (the checkpoint remembers it)", "choices": list(DOCUMENT_ORDERS)})
    eval_chunk_tokens: int = 128
    eval_among: bool = field(default=False, metadata={"help": "ae: also restore each dev passage among 3 other passages of its article, each compressed on its own, at place i mod 4 (among_bleu@r ...): telling documents apart, as a retrieved prompt needs"})
    eval_spans: bool = field(default=False, metadata={"help": "ae: also score quoting on the dev passages (span_bleu@r ...): 6 tokens from the middle of each, then the 16 that follow"})
    eval_gold_only: bool = field(default=False, metadata={"help": "keft: also score the dev questions with the gold passage alone (gold_accuracy@r ...): reading an answer, apart from finding its document"})
    # stage 2 options
    distill_weight: float = field(default=0.0, metadata={"help": "keft: weight of token-level KL to the base model reading the documents as text"})
    distill_hidden_weight: float = field(default=0.0, metadata={"help": "keft: weight of 1 - cosine between the decoder's hidden states reading soft tokens and the teacher's reading the text, every layer, at the question and answer positions after the documents (dense supervision beyond the few answer tokens)"})
    distill_soft_weight: float = field(default=0.0, metadata={"help": "keft: weight of 1 - cosine between each soft token's decoder states and the teacher's mean state over the text tokens it stands for, every layer (the decoder learns to process soft tokens as it processes the text they replace)"})
    distill_teacher: str = field(default="", metadata={"help": "keft: a no-compress checkpoint (--no_compress run on the same base model) whose fine-tuned decoder reading the text is the distillation teacher; default: the base model"})
    compressor_lr: float = field(default=0.0, metadata={"help": "keft: also train encoder LoRA + LSA at this lr (0: frozen, as in the paper)"})
    # optimisation
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    micro_batch_tokens: int = field(default=0, metadata={"help": "split a step's samples (sorted by length) into micro-batches of at most this many padded decoder positions (and at most --batch_size samples), each weighted by its share of the samples (a step still draws --batch_size x --grad_accum samples); 0: --grad_accum micro-batches of --batch_size. Bounds memory when a few prompts are long (qa-multidoc passages reach ~9k tokens as text)"})
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50
    schedule: Literal["cosine", "linear", "constant", "wsd"] = field(default="cosine", metadata={"help": "lr over the fraction of the budget spent, after warm-up: cosine / linear down to --min_lr_ratio, constant, or wsd (warmup-stable-decay: constant, then a 1-sqrt cooldown over the last --decay_fraction; a run may be extended while still stable, and a checkpoint from its stable phase cooled down on its own)"})
    decay_fraction: float = field(default=0.2, metadata={"help": "wsd: the share of the budget spent cooling down (1.0: all of it, e.g. cooling down a stable-phase checkpoint given as --init with --warmup_steps 0)"})
    min_lr_ratio: float = 0.1
    max_tokens: float = field(default=0, metadata={"help": "stop after this many encoder (ae) / prompt (keft) tokens; 0 = no limit"})
    max_grad_norm: float = 1.0
    grad_checkpointing: bool = False
    compile: bool = field(default=False, metadata={"help": "compile the Transformer blocks (torch.compile, dynamic shapes; generation for dev scores stays eager): fewer, fused kernels for host-bound small models. Costs compile time at the start"})
    # bookkeeping
    eval_every: int = 200
    eval_samples: int = 64
    eval_batch_size: int = 16
    save_every: int = 200
    log_every: int = 10
    save_dtype: Literal["float32", "bfloat16"] = "float32"
    precision: Literal["auto", "bf16", "fp32"] = field(default="auto", metadata={"help": "auto: bf16 on GPU, fp32 on CPU"})
    seed: int = 0
    time_limit_minutes: float = field(default=0.0, metadata={"help": "budget: training wall time over all resumed invocations; 0 = none"})
    stop_after_minutes: float = field(default=0.0, metadata={"help": "save and exit after this long in this invocation (the budget and schedule go on when resumed); 0 = never"})
    config: str | None = field(default=None, metadata={"help": "YAML/JSON file of these flags"})

    def __post_init__(self) -> None:
        if not self.init:  # a new model: the sizes it gets, recorded with the run (with --init: the checkpoint's, or grown)
            self.lora_rank = NEW_MODEL_LORA_RANK if self.lora_rank is None else self.lora_rank
            self.lsa_layers = NEW_MODEL_LSA_LAYERS if self.lsa_layers is None else self.lsa_layers


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags from an optional YAML/JSON file, overridden by the command line."""
    parser = HfArgumentParser(TrainConfig)
    argv = sys.argv[1:] if argv is None else argv
    pre, _ = parser.parse_known_args(argv)
    from_file: dict = {}
    if pre.config:
        try:
            from_file = yaml.safe_load(Path(pre.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            parser.error(f"--config {pre.config}: {' '.join(str(err).split())}")
        known = {f.name for f in TrainConfig.__dataclass_fields__.values()}
        if not isinstance(from_file, dict) or set(from_file) - known:
            parser.error(f"--config {pre.config}: expected a mapping of flag names; unknown: "
                         f"{sorted(set(from_file) - known) if isinstance(from_file, dict) else type(from_file).__name__}")
        parser.set_defaults(**from_file)
    (cfg,) = parser.parse_args_into_dataclasses(argv)
    for flag in COUNTS:
        if getattr(cfg, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(cfg, flag)}")
    for flag in POSITIVE:
        if not getattr(cfg, flag) > 0:
            parser.error(f"--{flag} must be above 0, got {getattr(cfg, flag)}")
    for flag in NON_NEGATIVE:
        if not getattr(cfg, flag) >= 0:
            parser.error(f"--{flag} must be 0 or more, got {getattr(cfg, flag)}")
    for flag in FRACTIONS:
        if not 0 <= getattr(cfg, flag) <= 1:
            parser.error(f"--{flag} is a share between 0 and 1, got {getattr(cfg, flag)}")
    if not 0 <= cfg.decoder_lora_dropout < 1:
        parser.error(f"--decoder_lora_dropout is a probability in [0, 1), got {cfg.decoder_lora_dropout}")
    for path in [*cfg.data, *([cfg.dev_data] if cfg.dev_data else [])]:
        if not Path(path).exists():
            parser.error(f"--{'data' if path in cfg.data else 'dev_data'} {path}: no such file or folder")
    if cfg.stage == "keft" and not cfg.init and not cfg.no_compress:
        parser.error("--stage keft needs --init <stage-1 checkpoint> (or --no-compress)")
    if cfg.cite_document and cfg.quote_evidence:
        parser.error("--cite_document and --quote_evidence: choose one answer form")
    if cfg.continuation_fraction + cfg.span_fraction > 1:
        parser.error("--continuation_fraction + --span_fraction must be at most 1")
    for flag in ("cite_document", "question_first", "quote_evidence"):
        if getattr(cfg, flag) and cfg.stage != "keft":
            parser.error(f"--{flag} is a stage-2 (keft) option")
    if cfg.doc_order != "given" and cfg.stage != "keft":
        parser.error("--doc_order is a stage-2 (keft) option")
    if cfg.restore_fraction and (cfg.stage != "keft" or cfg.no_compress or distills(cfg)):
        parser.error("--restore_fraction is a stage-2 (keft) option for soft tokens, without distillation")
    if not 0 < cfg.train_fraction <= 1 or (cfg.train_fraction < 1 and cfg.stage != "keft"):
        parser.error(f"--train_fraction is a share of the stage-2 (keft) training questions, in (0, 1]; got {cfg.train_fraction}")
    for flag in ("cloze_fraction", "counterfactual_fraction"):
        if not 0 <= getattr(cfg, flag) <= 1 or (getattr(cfg, flag) and cfg.stage != "keft"):
            parser.error(f"--{flag} is a share of stage-2 (keft) samples, between 0 and 1; got {getattr(cfg, flag)}")
    if cfg.span_tokens < 8:
        parser.error(f"--span_tokens must be at least 8, got {cfg.span_tokens}")
    if not 0 < cfg.decay_fraction <= 1:
        parser.error(f"--decay_fraction must be in (0, 1], got {cfg.decay_fraction}")
    if cfg.micro_batch_tokens < 0:
        parser.error(f"--micro_batch_tokens must be 0 (off) or a number of decoder positions, got {cfg.micro_batch_tokens}")
    if not 1 <= cfg.min_docs <= cfg.max_docs:
        parser.error(f"--min_docs must be between 1 and --max_docs ({cfg.max_docs}), got {cfg.min_docs}")
    for flag, least in (("lora_rank", 1), ("lsa_layers", 0)):
        if getattr(cfg, flag) is not None and getattr(cfg, flag) < least:
            parser.error(f"--{flag} must be at least {least}, got {getattr(cfg, flag)}")
    rates = cfg.rates
    if cfg.init:
        try:
            init_config = read_record(cfg.init)["config"]
        except CheckpointError as err:
            parser.error(f"--init: {err}")
        adapter, rates = init_config.get("decoder_adapter"), sorted(init_config["rates"])
        rates_given = any(a == "--rates" or a.startswith("--rates=") for a in argv) or "rates" in from_file
        if rates_given and sorted(cfg.rates) != rates:
            parser.error(f"--rates {' '.join(map(str, cfg.rates))}: the model of --init {cfg.init} has rates {rates} "
                         "(its architecture); leave --rates out and weigh its rates with --rate_weights")
        if cfg.no_compress and adapter != "always":
            parser.error(f"--init {cfg.init} with --no_compress must be a no-compress fine-tune (trained with --no_compress)")
        if not cfg.no_compress and adapter == "always":
            parser.error(f"--init {cfg.init} is a no-compress fine-tune; train soft tokens from a GMSA checkpoint")
    if cfg.lead_rate and (cfg.stage != "keft" or cfg.no_compress or cfg.doc_order == "given"
                          or cfg.lead_rate not in rates):
        parser.error(f"--lead_rate {cfg.lead_rate}: a stage-2 (keft) option for soft tokens with a ranked --doc_order "
                     f"(bm25_first or bm25_last), one of the model's rates {sorted(rates)}")
    if cfg.rate_weights and (len(cfg.rate_weights) != len(rates) or min(cfg.rate_weights) < 0
                             or not sum(cfg.rate_weights)):
        parser.error(f"--rate_weights needs one weight >= 0 per rate {sorted(rates)}, not all 0; got {cfg.rate_weights}")
    if cfg.distill_teacher:
        check_teacher(cfg, parser.error)
    check_resume(cfg, parser.error)
    return cfg


def check_resume(cfg: TrainConfig, error) -> None:
    """A run resumed into ``--out_dir`` keeps the flags that define its model; others may change (said here)."""
    path = latest_checkpoint(cfg.out_dir)
    if path is None:
        if unpointed := _unpointed_checkpoints(cfg.out_dir):
            error(unpointed)
        return
    try:
        before = read_record(path).get("extra", {}).get("train_config", {})
    except CheckpointError as err:
        error(f"cannot resume {cfg.out_dir}: {err}; {_earlier_checkpoints(cfg.out_dir, path)}")
    now = asdict(cfg)
    for flag in RUN_DEFINING:
        if flag in before and before[flag] != now[flag]:
            error(f"--{flag} {now[flag]!r} differs from the run in {cfg.out_dir} ({before[flag]!r}): resume it with "
                  f"the same value, or give another --out_dir")
    if "compressor_lr" in before and (before["compressor_lr"] > 0) != (cfg.compressor_lr > 0):
        error(f"--compressor_lr {cfg.compressor_lr}: the run in {cfg.out_dir} trained its compressor at "
              f"{before['compressor_lr']} (0: frozen); resume with it frozen or trained as before")
    changed = [f"{k} {before[k]!r} -> {now[k]!r}" for k in now if k in before and before[k] != now[k]
               and k not in ("out_dir", "config")]
    if changed:
        print(f"resuming {cfg.out_dir} from {path.name} with changed flags: {'; '.join(changed)}", flush=True)


def _saved_checkpoints(out_dir: str) -> list[str]:
    """The names of the run's checkpoint folders, oldest first."""
    return sorted(p.name for p in (Path(out_dir) / "checkpoints").glob("step-*"))


def _unpointed_checkpoints(out_dir: str) -> str:
    """Why a run folder holding checkpoints but no ``latest`` cannot start (afresh, it would write over them)."""
    saved = _saved_checkpoints(out_dir)
    if not saved:
        return ""
    return (f"{out_dir} holds checkpoints ({', '.join(saved[-3:])}) but no 'latest' naming the one to resume: "
            f"write its name into {Path(out_dir) / 'latest'}, or give another --out_dir")


def _earlier_checkpoints(out_dir: str, damaged: Path) -> str:
    others = [name for name in _saved_checkpoints(out_dir) if name != damaged.name]
    where = Path(out_dir) / "latest"
    if not others:
        return f"no other checkpoint there: remove {where} to start afresh"
    return f"write an intact one's name into {where} (earlier: {', '.join(others[-3:])})"


def check_teacher(cfg: TrainConfig, error) -> None:
    """Refuse a distillation teacher that cannot serve, before any model is loaded."""
    if cfg.stage != "keft" or cfg.no_compress or not distills(cfg):
        error("--distill_teacher needs --stage keft with soft tokens and a --distill_*weight > 0")
    try:
        config = read_record(cfg.distill_teacher)["config"]
    except CheckpointError as err:
        error(f"--distill_teacher: {err}")
    if config.get("decoder_adapter") != "always":
        error(f"--distill_teacher {cfg.distill_teacher} is not a no-compress fine-tune (train one with --no_compress)")


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    """What a stage draws its samples from: a passage corpus (ae) or QA examples (keft), and the dev set."""

    corpus: PassageCorpus | None
    qa: list[QAExample]
    dev: list
    dev_among: list = field(default_factory=list)  # ae with eval_among: 3 distractors (token ids) per dev passage

    @cached_property
    def answer_pool(self) -> AnswerPool:
        """The training answers counterfactual samples draw their substitutes from."""
        return AnswerPool.from_examples(self.qa)


def load_data(cfg: TrainConfig, tokenizer) -> Data:
    """Stage 1: the tokenized passage corpus and fixed dev passages; stage 2: QA train and dev examples.

    Raises :class:`UsageError` (one line naming the file) for data that cannot be read or holds nothing to train on.
    """
    try:
        data = _load_data(cfg, tokenizer)
    except (ValueError, OSError) as err:
        raise UsageError(f"{'--data' if cfg.data else 'the default data'}: {' '.join(str(err).split())}") from err
    if data.corpus is None and not data.qa:
        raise UsageError(f"--data {' '.join(cfg.data)}: no training examples")
    return data


def _load_data(cfg: TrainConfig, tokenizer) -> Data:
    if cfg.stage == "ae":
        cache = cfg.token_cache or str(cache_root() / "corpora")
        corpus = PassageCorpus.build(cfg.data or [DEFAULT_AE_CORPUS], tokenizer, cache)
        dev_corpus = PassageCorpus.build([cfg.dev_data], tokenizer, cache) if cfg.dev_data else corpus
        rng = random.Random(f"dev-{cfg.seed}")
        n = min(cfg.eval_chunk_tokens, cfg.max_chunk_tokens)
        passages = [dev_corpus.passage(rng, n, n, with_title=False) for _ in range(cfg.eval_samples)]
        among = [dev_distractors(dev_corpus, p, n, random.Random(f"dev-among-{cfg.seed}-{i}"))
                 for i, p in enumerate(passages)] if cfg.eval_among else []
        return Data(corpus, [], [p.token_ids for p in passages], among)
    train = [e for path in (cfg.data or [DEFAULT_QA_DIR / "train.jsonl.gz"]) for e in load_qa(path, "train")]
    train = question_share(train, cfg.train_fraction)
    return Data(None, train, load_qa(cfg.dev_data or DEFAULT_QA_DIR / "dev.jsonl.gz", "dev"))


def dev_distractors(corpus: PassageCorpus, passage: Passage, tokens: int, rng: random.Random,
                    count: int = 3) -> list[list[int]]:
    """Token ids of ``count`` passages of ``passage``'s own article (random passages where it has too few)."""
    found = [corpus.sibling(passage, rng, tokens, tokens, with_title=False) for _ in range(count)]
    return [(p or corpus.passage(rng, tokens, tokens, with_title=False)).token_ids for p in found]


def stage1_sample(corpus: PassageCorpus, cfg: TrainConfig, rate: int, rng: random.Random) -> Sample:
    """Restore (or continue) one document, alone or among others each compressed on its own."""
    def draw() -> Passage:
        return corpus.passage(rng, cfg.min_chunk_tokens, cfg.max_chunk_tokens, cfg.continuation_tokens,
                              with_title=rng.random() < cfg.title_fraction)

    count = rng.randint(2, cfg.max_docs) if cfg.max_docs > 1 and rng.random() < cfg.multi_doc_fraction else 1
    if cfg.multi_doc_distractors == "same_article" and count > 1:
        target = draw()
        others = [corpus.sibling(target, rng, cfg.min_chunk_tokens, cfg.max_chunk_tokens,
                                 with_title=rng.random() < cfg.title_fraction) for _ in range(count - 1)]
        passages = [o if o is not None else draw() for o in others]  # a one-paragraph article: random ones
        target_doc = rng.randint(0, len(passages))
        passages.insert(target_doc, target)
    else:
        passages = [draw() for _ in range(count)]
        target_doc = rng.randrange(count)
        target = passages[target_doc]
    documents = [p.token_ids for p in passages]
    if len(target.continuation) >= 16 and rng.random() < cfg.continuation_fraction:
        return Sample(documents, target.continuation, rate=rate, task="continue", target_doc=target_doc)
    span_chance = cfg.span_fraction / (1 - cfg.continuation_fraction) if cfg.span_fraction > 0 else 0.0
    if span_chance and len(target.token_ids) >= 16 and rng.random() < span_chance:  # (no draw when off: same batches)
        cue, follow = quote(target.token_ids, cfg.span_tokens, rng)
        return Sample(documents, follow, rate=rate, task="span", target_doc=target_doc, cue=cue)
    return Sample(documents, target.token_ids, rate=rate, target_doc=target_doc)


def quote(token_ids: list[int], most: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """A span sample's cue (4-8 tokens from anywhere in the passage) and the 8-``most`` tokens that follow it."""
    cue_length = rng.randint(4, 8)
    start = rng.randint(0, len(token_ids) - cue_length - 8)
    end = min(len(token_ids), start + cue_length + rng.randint(8, most))
    return token_ids[start : start + cue_length], token_ids[start + cue_length : end]


def restoring_sample(sample: Sample, target: str, rng: random.Random) -> Sample:
    """Stage 1's task over a QA sample's documents, kept in their order and at their rates: restore one of them
    (drawn at random) word for word, or with ``target="span"`` quote 4-8 of its words (which document unsaid) and
    ask for the 8-16 words that follow them there (a document under 16 words is restored whole)."""
    doc = rng.randrange(len(sample.documents))
    text = sample.documents[doc]
    words = text.split() if isinstance(text, str) else text
    if target == "span" and len(words) >= 16:
        cue, follow = quote(words, 16, rng)
        join = " ".join if isinstance(text, str) else list
        return replace(sample, question=None, task="span", target_doc=doc, cue=join(cue), target=join(follow))
    return replace(sample, question=None, task="restore", target_doc=doc, target=text)


def qa_sample(example: QAExample, rate: int | None, max_docs: int, rng: random.Random, min_docs: int = 1,
              hardest: bool = False, cite: bool = False, quote_words: int | None = None,
              order: str = "given") -> Sample:
    """A QA sample: the gold passage among ``min_docs - 1`` to ``max_docs - 1`` of the example's distractors (random
    ones, or with ``hardest`` the first in stored order, as retrieval ranks them), gold at a random place (examples
    without a marked gold passage keep their documents as they are). With ``cite`` the target opens with the gold
    passage's number; with ``quote_words`` it is up to that many words of the gold passage that lead to the answer,
    then the answer in bold (examples without a gold passage, or whose gold passage lacks the answer, answer plainly).
    ``order`` then orders the documents (:func:`gmsa_rag.lexical.ordered`; ``given`` keeps the random place)."""
    documents = list(example.contexts)
    answer = example.answers[0]
    if example.gold_index is not None:
        gold = documents[example.gold_index]
        others = [d for i, d in enumerate(documents) if i != example.gold_index]
        most = min(max_docs - 1, len(others))
        count = rng.randint(min(max(min_docs - 1, 0), most), most)
        keep = others[:count] if hardest else rng.sample(others, count)
        if hardest:
            rng.shuffle(keep)
        place = rng.randint(0, len(keep))
        keep.insert(place, gold)
        shown = reordered(QAExample(example.question, example.answers, keep, place), order)
        documents, place = shown.contexts, shown.gold_index
        answer = cited(answer, place) if cite else answer
        if quote_words is not None:
            answer = quoted(example.answers, gold, quote_words) or answer
    return Sample(documents=documents, target=answer, question=example.question, rate=rate)


def dev_qa_sample(example: QAExample, rate: int | None, max_docs: int, index: int, order: str = "given") -> Sample:
    """A fixed dev prompt: the gold passage among the example's first ``max_docs - 1`` distractors (the hardest,
    in stored order), gold at place ``index mod count`` so every place is scored equally often, then in ``order``."""
    documents = list(dev_layout(example, max_docs, index, order).contexts)
    return Sample(documents=documents, target=None, question=example.question, rate=rate)


def dev_gold_place(example: QAExample, max_docs: int, index: int, order: str = "given") -> int | None:
    """Where the gold passage stands among a dev prompt's documents (:func:`dev_qa_sample`), or None."""
    if example.gold_index is None:
        return None
    return dev_layout(example, max_docs, index, order).gold_index


def docs_cap(cfg: TrainConfig, progress: float) -> int:
    """keft curriculum: the most documents a sample may show at this point of the budget."""
    if cfg.docs_curriculum <= 0:
        return cfg.max_docs
    return 1 + int((cfg.max_docs - 1) * min(1.0, progress / cfg.docs_curriculum))


def step_batches(step: int, data: Data, cfg: TrainConfig, rates: list[int], rank: int,
                 progress: float = 1.0) -> list[list[Sample]]:
    """The ``grad_accum`` micro-batches of one optimizer step: a pure function of (seed, step, rank, progress), so
    resume is exact. With accumulation the step's samples are sorted by length before they are split, so each
    micro-batch pads little (measured on wiki passages: 37% of the decoder positions were real tokens in a batch
    of 32, 84% when 64 samples are sorted into 8 micro-batches)."""
    rng = random.Random(hash((cfg.seed, step, rank)))
    samples = []
    for _ in range(cfg.batch_size * cfg.grad_accum):
        rate = None if cfg.no_compress else sample_rate(rates, rng, cfg.rate_weights or None)
        if cfg.stage == "ae":
            samples.append(stage1_sample(data.corpus, cfg, rate, rng))
        else:
            example = data.qa[rng.randrange(len(data.qa))]
            if cfg.cloze_fraction and rng.random() < cfg.cloze_fraction:  # (no draw when off: the same batches)
                example = cloze_example(example, rng) or example
            if cfg.counterfactual_fraction and rng.random() < cfg.counterfactual_fraction:  # (no draw when off)
                example = counterfactual_example(example, data.answer_pool, rng) or example
            sample = qa_sample(example, rate, docs_cap(cfg, progress), rng, cfg.min_docs,
                               cfg.distractors == "hardest", cite=cfg.cite_document,
                               quote_words=cfg.quote_words if cfg.quote_evidence else None, order=cfg.doc_order)
            if cfg.lead_rate and rng.random() < cfg.lead_fraction:  # (no draw when off: the same batches)
                sample.document_rates = lead_rates(len(sample.documents), rate, cfg.lead_rate, cfg.doc_order)
            if cfg.restore_fraction and rng.random() < cfg.restore_fraction:  # (no draw when off: the same batches)
                sample = restoring_sample(sample, cfg.restore_target, rng)
            samples.append(sample)
    if cfg.grad_accum > 1 or cfg.micro_batch_tokens:
        samples.sort(key=decoder_positions)
    if cfg.micro_batch_tokens:
        return split_by_positions(samples, cfg.micro_batch_tokens, cfg.batch_size)
    return [samples[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(cfg.grad_accum)]


def split_by_positions(samples: list[Sample], max_positions: int, max_samples: int) -> list[list[Sample]]:
    """Consecutive micro-batches of ``samples`` (sorted by length, so each sample is the longest of its micro-batch so
    far) whose padded size, samples x the longest one's :func:`decoder_positions`, stays within ``max_positions``; a
    sample longer than that goes alone."""
    batches: list[list[Sample]] = []
    for sample in samples:
        if batches and len(batches[-1]) < max_samples and \
                (len(batches[-1]) + 1) * decoder_positions(sample) <= max_positions:
            batches[-1].append(sample)
        else:
            batches.append([sample])
    return batches


def decoder_positions(sample: Sample) -> int:
    """About how many decoder positions a sample takes (soft tokens or text, labels, target), for length sorting."""
    def tokens(text) -> int:
        return len(text) if isinstance(text, list) else len(text) // 4 + 1

    return (sum(-(-tokens(d) // (sample.rate_of(i) or 1)) + 8 for i, d in enumerate(sample.documents))
            + tokens(sample.target or "") + 25)


def lr_factor(cfg: TrainConfig, progress: float, step: int) -> float:
    """Warm-up over ``warmup_steps``, then the schedule over the fraction of the budget spent, down to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(progress, 1.0)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":  # 1-sqrt cooldown (Hagele et al. 2024, "Scaling laws and compute-optimal training
        # beyond fixed training durations"): level with cosine at the same budget, and the budget may grow mid-run
        cooled = max(0.0, progress - (1 - cfg.decay_fraction)) / cfg.decay_fraction
        shape = 1 - math.sqrt(cooled)
    elif cfg.schedule == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:
        shape = 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


# ---------------------------------------------------------------------------------------------- model
def use_bf16(cfg: TrainConfig) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())


def decoder_tuning(cfg: TrainConfig) -> str:
    """What a fresh model's decoder tunes: stage 2 its ``--decoder_tuning``; stage 1 nothing (the paper), or the
    soft-token LoRA adapter with ``--ae_decoder_lora``."""
    if cfg.stage == "keft":
        return cfg.decoder_tuning
    return "qkv_lora" if cfg.ae_decoder_lora else "none"


def build_model(cfg: TrainConfig, device: torch.device) -> GMSAModel:
    dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
    if cfg.init:  # architecture from the checkpoint; stage 1 may add the decoder adapter (no-compress: trained further)
        tuning = decoder_tuning(cfg)
        model = load_checkpoint(cfg.init, device=device, dtype=dtype, decoder_tuning=None if tuning == "none" else tuning,
                                decoder_lora_rank=cfg.decoder_lora_rank,
                                soft_token_center=cfg.stage == "ae" and cfg.soft_token_center,
                                decoder_mlp_lora_rank=cfg.decoder_mlp_lora_rank if tuning == "qkv_lora" else 0,
                                lora_rank=cfg.lora_rank, lsa_layers=cfg.lsa_layers)
    else:
        config = GMSAConfig(
            base_model=cfg.base_model, method=cfg.method, encoder_layers=cfg.encoder_layers, lsa_layers=cfg.lsa_layers,
            rates=tuple(cfg.rates), window=cfg.window, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
            encoder_prefix=cfg.encoder_prefix, encoder_norm=cfg.encoder_norm, soft_token_norm=cfg.soft_token_norm,
            soft_token_center=cfg.soft_token_center, decoder_tuning=decoder_tuning(cfg), decoder_lora_rank=cfg.decoder_lora_rank,
            decoder_lora_alpha=2 * cfg.decoder_lora_rank, decoder_adapter="always" if cfg.no_compress else "soft",
            decoder_mlp_lora_rank=cfg.decoder_mlp_lora_rank if decoder_tuning(cfg) == "qkv_lora" else 0,
        )
        model = GMSAModel.from_base(config, device=device, dtype=dtype)
    model.set_stage(cfg.stage)
    model.set_decoder_lora_dropout(cfg.decoder_lora_dropout)
    model.config.answer_cites = cfg.cite_document  # (saved with the checkpoint: generation then reads the citation)
    model.config.answer_quotes = cfg.quote_evidence  # (saved with the checkpoint: generation then reads the quote)
    model.config.question_first = cfg.question_first  # (saved with the checkpoint: generation keeps the layout)
    if cfg.stage == "keft" and cfg.compressor_lr > 0 and not cfg.no_compress:
        for p in model.compressor_parameters().values():
            p.requires_grad_(True)
    if cfg.stage == "ae" and cfg.ae_decoder_lora:
        for p in model.decoder_parameters().values():
            p.requires_grad_(True)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainable weights in fp32; bf16 autocast does the compute on GPU
    if cfg.grad_checkpointing:
        for part in (model.encoder, model.decoder):
            if hasattr(part, "activation_checkpointing_enable"):  # transformers >= 5.2x
                part.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                part.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def needs_calibration(model: GMSAModel, cfg: TrainConfig) -> bool:
    """Whether this stage-1 run's soft-token centre is new: still zero, as a fresh model or one added to its --init
    checkpoint has it (a loaded centre is the mean of real soft tokens, never exactly zero)."""
    return (cfg.stage == "ae" and not cfg.no_compress and model.soft_center is not None
            and not bool(model.soft_center.any()))


def calibrate(model: GMSAModel, data: Data, cfg: TrainConfig, rates: list[int], documents: int = 64) -> None:
    """Start the soft-token centre at the mean soft token of the first step's documents (the same on every process)."""
    samples = [s for batch in step_batches(0, data, cfg, rates, 0, 0.0) for s in batch]
    windows = [model.windows(ids)[0] for s in samples for ids in token_ids(model, s.documents)][:documents]
    center = model.calibrate_soft_center(windows)
    print(f"soft-token centre from {len(windows)} documents: RMS {center.float().pow(2).mean().sqrt().item():.2f}",
          flush=True)


def distills(cfg: TrainConfig) -> bool:
    """Whether any distillation term is on."""
    return max(cfg.distill_weight, cfg.distill_hidden_weight, cfg.distill_soft_weight) > 0


@dataclass
class Distillation:
    """What stage 2 distils from the teacher reading the documents as text (``GMSAModel.forward``'s options)."""

    distill_weight: float = 0.0  # KL on the answer tokens
    hidden_weight: float = 0.0  # hidden states after the documents
    soft_weight: float = 0.0  # hidden states of the soft tokens against those of the text they stand for
    teacher: GMSAModel | None = None  # None: the model's own decoder with its adapter off (the base model)

    @property
    def active(self) -> bool:
        """Whether any term is on (else the loss is the answer cross-entropy alone)."""
        return bool(self.distill_weight or self.hidden_weight or self.soft_weight)


def distillation(cfg: TrainConfig, model: GMSAModel) -> Distillation:
    """The distillation this run uses (none outside stage 2 with soft tokens) and its teacher: the
    ``--distill_teacher`` fine-tune, frozen, on the model's device (outside DDP, one per process), or None for
    the default teacher, the model's own decoder with its adapter off."""
    if cfg.stage != "keft" or cfg.no_compress or not distills(cfg):
        return Distillation()
    teacher = None
    if cfg.distill_teacher:
        teacher = load_checkpoint(cfg.distill_teacher, base_model=model.config.base_model, device=model.device,
                                  dtype=model.dtype)
        teacher.requires_grad_(False)
        teacher.eval()
    return Distillation(cfg.distill_weight, cfg.distill_hidden_weight, cfg.distill_soft_weight, teacher)


# ---------------------------------------------------------------------------------------------- evaluation
def shard_starts(items: int, size: int, shard: tuple[int, int]) -> range:
    """Where this process's dev batches of ``size`` start among ``items``: with ``shard=(i, n)``, every n-th batch from
    the i-th, so n processes share the batches and together see each once."""
    index, count = shard
    return range(index * size, items, count * size)


@torch.no_grad()
def evaluate(model: GMSAModel, dev: list, cfg: TrainConfig, among: list | None = None,
             shard: tuple[int, int] = (0, 1), gather: Callable[[list], list] | None = None) -> dict[str, float]:
    """ae: reconstruction BLEU / ROUGE-L / prefix EM per rate (and, with ``eval_spans``, the same for quoted spans,
    prefixed ``span_``; with ``among``, each dev passage's distractors, the same for restoring it among them, prefixed
    ``among_``); keft: EM / F1 / answer-in-output accuracy (and, with ``eval_gold_only``, the same from the
    gold passage alone, prefixed ``gold_``).

    Several processes share the generation: with ``shard=(i, n)`` this one generates every n-th dev batch from the
    i-th, and ``gather`` (this process's list -> all processes' lists concatenated, as accelerate's
    ``gather_object``) brings the batches together, so every process scores all of them alike."""
    model.eval()
    examples = dev[: cfg.eval_samples]
    results: dict[str, float] = {}
    rates: list[int | None] = [None] if cfg.no_compress else list(model.config.rates)
    if cfg.stage == "ae":  # (metric prefix, task, documents shown, dev items, lead rate)
        layouts = [("", "restore", 1, examples, 0)]
        if cfg.eval_spans:
            layouts.append(("span_", "span", 1, examples, 0))
        if among:
            layouts.append(("among_", "restore", 1 + len(among[0]), list(zip(examples, among)), 0))
    else:
        layouts = [("", "qa", cfg.max_docs, examples, 0)]
        if cfg.eval_gold_only:
            layouts.append(("gold_", "qa", 1, [e for e in examples if e.gold_index is not None], 0))
        if cfg.lead_rate:
            layouts.append((f"lead{cfg.lead_rate}_", "qa", cfg.max_docs, examples, cfg.lead_rate))
    for prefix, task, docs, items, lead in layouts:
        for rate in [r for r in rates if not lead or (r or 0) > lead]:
            size = cfg.eval_batch_size
            batches = []  # (start, predictions, references) of this process's batches
            for start in shard_starts(len(items), size, shard):
                samples, references, new_tokens = dev_batch(items[start : start + size], task, docs, rate, start, model,
                                                            cfg.doc_order, lead)
                batches.append((start, model.generate_from_segments(build_prompts(model, samples),
                                                                    max_new_tokens=new_tokens), references))
            if shard[1] > 1:
                batches = sorted(gather(batches), key=lambda batch: batch[0])
            preds = [p for _, predictions, _ in batches for p in predictions]
            refs = [r for _, _, references in batches for r in references]
            suffix = f"@{rate}x" if rate else ""
            if task == "qa" and model.config.answer_cites:
                places = [dev_gold_place(e, docs, j, cfg.doc_order) for j, e in enumerate(items)]
                cites, preds = zip(*(split_citation(p, docs) for p in preds)) if preds else ((), ())
                marked = [(c, g) for c, g in zip(cites, places) if g is not None]
                results[f"{prefix}cite_accuracy{suffix}"] = 100.0 * sum(c == g for c, g in marked) / max(len(marked), 1)
            if task == "qa" and model.config.answer_quotes:
                quotes, preds = zip(*(split_quote(p) for p in preds)) if preds else ((), ())
                lengths = [len(model.tokenizer.encode(q, add_special_tokens=False)) for q in quotes]
                results[f"{prefix}quote_tokens{suffix}"] = sum(lengths) / max(len(lengths), 1)
            scores = qa_metrics(list(preds), refs) if task == "qa" else reconstruction_metrics(preds, refs)
            results.update({f"{prefix}{k}{suffix}": float(v) for k, v in scores.items()})
    if cfg.stage == "ae" and not cfg.no_compress:
        for rate in rates:
            results[f"restore_loss@{rate}x"] = restore_loss(model, examples, rate, cfg.eval_batch_size, shard, gather)
    model.train()
    return results


@torch.no_grad()
def restore_loss(model: GMSAModel, passages: list[list[int]], rate: int, size: int, shard: tuple[int, int] = (0, 1),
                 gather: Callable[[list], list] | None = None) -> float:
    """Teacher-forced cross-entropy per token (nats) of restoring each dev passage alone from its soft tokens at
    ``rate``: a finer gauge than BLEU of what the soft tokens keep (every run of a comparison sees the same passages).
    Processes share the batches as in :func:`evaluate`."""
    parts = []  # (summed loss, target tokens) of this process's batches
    for start in shard_starts(len(passages), size, shard):
        samples = [Sample([ids], ids, rate=rate) for ids in passages[start : start + size]]
        logits, labels = model.target_logits(build_prompts(model, samples))
        parts.append((F.cross_entropy(logits.float(), labels, reduction="sum").item(), labels.numel()))
    if shard[1] > 1:
        parts = gather(parts)
    return sum(loss for loss, _ in parts) / max(sum(tokens for _, tokens in parts), 1)


def dev_batch(items: list, task: str, docs: int, rate: int | None, offset: int,
              model: GMSAModel, order: str = "given", lead_rate: int = 0) -> tuple[list[Sample], list, int]:
    """Generation prompts, references and an answer length for a slice of dev items: restore a passage, quote the
    16 tokens that follow 6 tokens from its middle (``span``), or answer a question over ``docs`` documents in
    ``order`` (with ``lead_rate``, the best match at that rate)."""
    if task == "restore":  # with docs > 1 items are (passage, its distractors), the passage at place (offset + j) mod docs
        pairs = items if docs > 1 else [(ids, []) for ids in items]
        samples = []
        for j, (ids, others) in enumerate(pairs):
            place = (offset + j) % docs
            samples.append(Sample([*others[:place], ids, *others[place:]], None, rate=rate, target_doc=place))
        return (samples, [model.tokenizer.decode(ids).strip() for ids, _ in pairs], max(len(i) for i, _ in pairs) + 8)
    if task == "span":
        starts = [max(len(ids) // 2 - 3, 0) for ids in items]
        return ([Sample([ids], None, rate=rate, task="span", cue=ids[s : s + 6]) for ids, s in zip(items, starts)],
                [model.tokenizer.decode(ids[s + 6 : s + 22]).strip() for ids, s in zip(items, starts)], 20)
    new_tokens = 24 + (QUOTE_TOKENS if model.config.answer_quotes else 0)
    samples = [dev_qa_sample(e, rate, docs, offset + j, order) for j, e in enumerate(items)]
    if lead_rate:
        for sample in samples:
            sample.document_rates = lead_rates(len(sample.documents), rate, lead_rate, order)
    return samples, [e.answers for e in items], new_tokens


# ---------------------------------------------------------------------------------------------- checkpoints
@dataclass
class Progress:
    """Where a run stands in its budget (saved with every checkpoint, so a resumed run continues the schedule)."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def fraction(self, cfg: TrainConfig) -> float:
        """Share of the budget spent: the largest of steps, tokens and wall time done."""
        parts = [self.step / cfg.steps]
        if cfg.max_tokens > 0:
            parts.append(self.tokens / cfg.max_tokens)
        if cfg.time_limit_minutes > 0:
            parts.append(self.seconds / (60 * cfg.time_limit_minutes))
        return max(parts)


def save(accelerator: Accelerator, model: GMSAModel, optimizer, progress: Progress, cfg: TrainConfig, metrics: dict) -> None:
    """Checkpoint = model weights (safetensors) + optimizer state + progress, written by the main process."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path = Path(cfg.out_dir) / "checkpoints" / f"step-{progress.step:07d}"
        extra = {"train_config": asdict(cfg), "step": progress.step, "tokens": progress.tokens, "metrics": metrics}
        save_checkpoint(model, path, extra=extra, dtype=getattr(torch, cfg.save_dtype))
        torch.save({"optimizer": optimizer.state_dict()}, path / OPTIMIZER_FILE)
        (path / STATE_FILE).write_text(json.dumps(asdict(progress)))
        pointer = Path(cfg.out_dir) / "latest"
        pointer.with_name("latest.tmp").write_text(path.name)
        os.replace(pointer.with_name("latest.tmp"), pointer)  # (a crash mid-write leaves the previous pointer)
    accelerator.wait_for_everyone()


def latest_checkpoint(out_dir: str) -> Path | None:
    pointer = Path(out_dir) / "latest"
    return Path(out_dir) / "checkpoints" / pointer.read_text().strip() if pointer.is_file() else None


def resume(model: GMSAModel, optimizer, cfg: TrainConfig) -> Progress:
    """Restore weights, optimizer and progress from the run's latest checkpoint (a fresh Progress if none)."""
    path = latest_checkpoint(cfg.out_dir)
    if path is None:
        if unpointed := _unpointed_checkpoints(cfg.out_dir):
            raise CheckpointError(unpointed)
        return Progress()
    try:
        attach_checkpoint(model, read_record(path), read_weights(path), path)
        state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)  # tensors only, no code
        optimizer.load_state_dict(state["optimizer"])
        return Progress(**json.loads((path / STATE_FILE).read_text()))
    except (CheckpointError, OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot resume from {path}: {' '.join(str(err).split())[:300]}; "
                              f"{_earlier_checkpoints(cfg.out_dir, path)}") from err


def keep_log_until(log_file: Path, step: int) -> None:
    """Drop the rows a resumed run will log again (those of steps after the checkpoint it resumes from)."""
    if not log_file.is_file():
        return

    def logged_step(line: str) -> float:
        try:
            return json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a row cut short when the run died
            return math.inf

    lines = log_file.read_text().splitlines()
    kept = [line for line in lines if logged_step(line) <= step]
    if len(kept) < len(lines):
        log_file.write_text("".join(line + "\n" for line in kept))


# ---------------------------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig) -> Path:
    """Run one stage until its budget (steps, tokens or time) is spent, resuming from ``cfg.out_dir`` if it holds a
    checkpoint; return the final checkpoint."""
    # (accumulation is done here: the micro-batches of a step may differ in number and size)
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16(cfg) else "no")
    torch.manual_seed(cfg.seed)
    # cuDNN's SDPA builds an execution plan for every new shape, and training shapes vary every micro-batch: on an
    # H200 it spent 5.7 s of host time per 64-sample KEFT step against 0.7 s of GPU work
    # (benchmarks/profile_train_step.py). Flash attention has no such per-shape cost.
    torch.backends.cuda.enable_cudnn_sdp(False)
    base = read_record(cfg.init)["base_model"] if cfg.init else cfg.base_model
    with accelerator.main_process_first():  # one process tokenizes the corpus; the others read its cache
        data = load_data(cfg, load_tokenizer(base.removeprefix(RANDOM_PREFIX)))  # (bad data fails before a model loads)
    model = build_model(cfg, accelerator.device)
    model.generation_engine = "hf"  # dev evaluation: varied shapes, under autocast, in this thread (no compiles)
    rates = list(model.config.rates)
    if cfg.rate_weights and len(cfg.rate_weights) != len(rates):
        raise ValueError(f"--rate_weights needs one weight per rate {rates}, got {cfg.rate_weights}")
    decoder_ids = {id(p) for p in model.decoder_parameters().values()}
    tuned = [p for p in model.parameters() if p.requires_grad and id(p) in decoder_ids]
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in decoder_ids]
    if cfg.stage == "keft" and cfg.compressor_lr > 0:
        groups = [{"params": tuned, "lr": cfg.lr}, {"params": rest, "lr": cfg.compressor_lr}]
    else:
        groups = [{"params": tuned + rest, "lr": cfg.lr}]
    trainable = tuned + rest
    for g in groups:
        g["base_lr"] = g["lr"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=accelerator.device.type == "cuda")  # one kernel for all parameters
    progress = resume(model, optimizer, cfg)
    if progress.step == 0 and needs_calibration(model, cfg):
        with accelerator.autocast():
            calibrate(model, data, cfg, rates)
    if cfg.compile:
        print(f"compiling {model.compile_blocks()} Transformer blocks (on first use)", flush=True)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    log_file = Path(cfg.out_dir) / "metrics.jsonl"
    if accelerator.is_main_process:
        keep_log_until(log_file, progress.step)  # rows of steps after the checkpoint ran again: logged again below
        (Path(cfg.out_dir) / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
        source = (f"{data.corpus.num_tokens:,} corpus tokens in {data.corpus.num_paragraphs:,} paragraphs"
                  if data.corpus else f"{len(data.qa)} train examples")
        print(f"{cfg.stage} {cfg.method}{' no-compress' if cfg.no_compress else ''}: {source} / {len(data.dev)} dev, "
              f"{sum(p.numel() for p in trainable):,} trainable parameters, from step {progress.step}, "
              f"{accelerator.num_processes} process(es) on {accelerator.device}", flush=True)

    wrapped.train()
    metrics: dict[str, float] = {}
    # since the last log line: tokens (the tokens/s figure) and the steps' summed mean loss (the logged loss: every
    # step and every micro-batch of it, weighted by its samples; not the last micro-batch alone)
    window_tokens, window_loss, window_steps, clock = 0.0, 0.0, 0, time.perf_counter()
    restore_weight = cfg.restore_weight if cfg.restore_fraction else None
    window_kinds: dict[str, list] = {}  # with stage-1 samples mixed in: each kind's summed mean loss x samples, samples
    bar = tqdm(total=100, initial=int(100 * progress.fraction(cfg)), unit="%", disable=not accelerator.is_main_process,
               bar_format="{l_bar}{bar}| {n:.0f}/100% [{elapsed}<{remaining}{postfix}]")
    distill = distillation(cfg, model)
    invocation_start = time.perf_counter()
    grad_norm = torch.tensor(float("nan"))
    while progress.fraction(cfg) < 1.0:
        started = time.perf_counter()
        fraction = progress.fraction(cfg)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(cfg, fraction, progress.step)
        micro_batches = step_batches(progress.step, data, cfg, rates, accelerator.process_index, fraction)
        step_samples = sum(map(len, micro_batches))
        local_tokens, step_loss = 0, torch.zeros((), device=accelerator.device)
        for index, samples in enumerate(micro_batches):  # gradients add up; synced across processes on the last
            with accelerator.no_sync(wrapped) if index < len(micro_batches) - 1 else nullcontext():
                loss = wrapped(samples, distill.distill_weight, distill.teacher, distill.hidden_weight,
                               distill.soft_weight, restore_weight)
                accelerator.backward(loss * (len(samples) / step_samples))
            step_loss += loss.detach() * (len(samples) / step_samples)
            if restore_weight is not None:
                for kind, term in model.loss_terms.items():
                    count = sum((s.question is None) == (kind == "restore") for s in samples)
                    total = window_kinds.setdefault(kind, [0.0, 0])
                    total[0], total[1] = total[0] + term * count, total[1] + count
            local_tokens += sum(_token_count(model, s) for s in samples)
        grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)  # (the norm before clipping)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_tokens = accelerator.reduce(torch.tensor(float(local_tokens), device=accelerator.device), "sum").item()
        progress.step += 1
        progress.tokens += int(step_tokens)
        window_tokens += step_tokens
        window_loss, window_steps = window_loss + step_loss, window_steps + 1
        progress.seconds += accelerator.reduce(
            torch.tensor(time.perf_counter() - started, device=accelerator.device), "max").item()
        done = progress.step
        if done % cfg.log_every == 0:
            rate = window_tokens / (time.perf_counter() - clock)
            mean_loss = accelerator.reduce(window_loss / window_steps, "mean").item()
            metrics = {"step": done, "tokens": progress.tokens, "loss": mean_loss,
                       "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": rate, "grad_norm": float(grad_norm)}
            if distill.active:  # each term of the last micro-batch, unweighted: is the distillation being learned?
                metrics.update({f"loss_{name}": accelerator.reduce(term, "mean").item()
                                for name, term in model.loss_terms.items()})
            for kind, (total, count) in window_kinds.items():  # answers and stage-1 targets, each its mean token loss
                metrics[f"loss_{kind}"] = accelerator.reduce(torch.as_tensor(total / count), "mean").item()
            window_kinds = {}
            if accelerator.device.type == "cuda":  # peak so far on this process's GPU (what a batch size needs)
                metrics["peak_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
            bar.set_postfix(step=done, loss=f"{metrics['loss']:.3f}", tok_s=f"{rate:,.0f}")
            bar.update(int(100 * progress.fraction(cfg)) - bar.n)
            _log(accelerator, log_file, metrics)
            window_tokens, window_loss, window_steps, clock = 0.0, 0.0, 0, time.perf_counter()
        last = progress.fraction(cfg) >= 1.0
        pause = cfg.stop_after_minutes > 0 and time.perf_counter() - invocation_start > 60 * cfg.stop_after_minutes
        pause = accelerator.reduce(torch.tensor(float(pause), device=accelerator.device), "sum").item() > 0
        if data.dev and (done % cfg.eval_every == 0 or last or pause):  # every process generates a share
            with accelerator.autocast(), torch.compiler.set_stance("force_eager"):  # (bf16 beside fp32 weights)
                scores = evaluate(model, data.dev, cfg, data.dev_among,
                                  shard=(accelerator.process_index, accelerator.num_processes), gather=gather_object)
            metrics = {"step": done, "tokens": progress.tokens, **scores}
            _log(accelerator, log_file, metrics)
            if accelerator.is_main_process:
                tqdm.write(json.dumps(metrics))
        if done % cfg.save_every == 0 or last or pause:
            save(accelerator, model, optimizer, progress, cfg, metrics)
        if pause and not last:
            tqdm.write(f"stopping after {cfg.stop_after_minutes} min at step {done} "
                       f"({100 * progress.fraction(cfg):.0f}% of the budget); run again to resume")
            break
    bar.close()
    return latest_checkpoint(cfg.out_dir)


def _token_count(model: GMSAModel, sample: Sample) -> int:
    """Document tokens a sample feeds through the encoder (or, uncompressed, the decoder): the budget's unit."""
    return sum(len(d) if isinstance(d, list) else len(model.tokenizer.encode(d, add_special_tokens=False))
               for d in sample.documents)


def _log(accelerator: Accelerator, path: Path, record: dict) -> None:
    if accelerator.is_main_process:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        final = train(cfg)
    except (UsageError, CheckpointError) as err:  # bad data or a damaged checkpoint: one line, nothing written
        sys.exit(f"error: {err}")
    print(f"final checkpoint: {final}")


if __name__ == "__main__":
    main()
