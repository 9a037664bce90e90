"""Train GMSA (or TCP-AE) in two stages: ``python -m gmsa_rag.train --stage ae|keft ...``.

Stage ``ae``: decoder frozen; encoder LoRA + LSA learn to make soft tokens from which the decoder restores
the chunk. Stage ``keft``: compressor frozen (loaded from a stage-1 checkpoint); the decoder's W_Q/W_K/W_V
learn to answer questions from the soft tokens of the retrieved documents. ``--no-compress`` fine-tunes the
same decoder parameters on the uncompressed prompt (the fair baseline). Rates are sampled per sample.

Runs as one CPU process, on one GPU, or on several with ``accelerate launch -m gmsa_rag.train ...``.
Flags may also come from a YAML/JSON file (``--config run.yaml``); flags on the command line win.
"""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_scheduler

from .checkpoint import attach_checkpoint, load_checkpoint, read_record, read_weights, save_checkpoint
from .config import GMSAConfig
from .data import DEFAULT_AE_CORPUS, DEFAULT_QA_DIR
from .data.corpus import chunk_corpus
from .data.qa import load_qa_jsonl
from .metrics import qa_metrics, reconstruction_metrics
from .model import GMSAModel
from .samples import Sample, sample_rate, build_prompts

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class TrainConfig:
    stage: Literal["ae", "keft"] = "ae"
    method: Literal["gmsa", "tcp"] = "gmsa"
    out_dir: str = "runs/gmsa-ae"
    base_model: str = "smollm2"
    init: str | None = field(default=None, metadata={"help": "stage-1 (ae) checkpoint that keft starts from"})
    no_compress: bool = field(default=False, metadata={"help": "keft on the uncompressed prompt (baseline)"})
    data: list[str] = field(default_factory=list, metadata={"help": "ae: text/jsonl corpus paths; keft: QA jsonl"})
    dev_data: str | None = field(default=None, metadata={"help": "dev set (ae: corpus path; keft: QA jsonl)"})
    # architecture (stage ae; keft inherits it from --init)
    encoder_layers: int = 8
    lsa_layers: int = 1
    rates: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    window: int = 512
    lora_rank: int = 32
    lora_alpha: int = 64
    decoder_tuning: Literal["qkv", "qkv_lora"] = "qkv"
    # data shaping
    min_chunk_tokens: int = 64
    max_chunk_tokens: int = 512
    # optimisation
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 50
    schedule: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = 1.0
    grad_checkpointing: bool = False
    # bookkeeping
    eval_every: int = 200
    eval_samples: int = 64
    eval_batch_size: int = 16
    save_every: int = 200
    log_every: int = 10
    save_dtype: Literal["float32", "bfloat16"] = "float32"
    precision: Literal["auto", "bf16", "fp32"] = field(default="auto", metadata={"help": "auto: bf16 on GPU, fp32 on CPU"})
    seed: int = 0
    time_limit_minutes: float = field(default=0.0, metadata={"help": "stop (and save) after this wall time; 0 = none"})
    config: str | None = field(default=None, metadata={"help": "YAML/JSON file of these flags"})


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags from an optional YAML/JSON file, overridden by the command line."""
    parser = HfArgumentParser(TrainConfig)
    argv = sys.argv[1:] if argv is None else argv
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**yaml.safe_load(Path(pre.config).read_text()))
    (cfg,) = parser.parse_args_into_dataclasses(argv)
    if cfg.stage == "keft" and not cfg.init and not cfg.no_compress:
        parser.error("--stage keft needs --init <stage-1 checkpoint> (or --no-compress)")
    return cfg


# ---------------------------------------------------------------------------------------------- data
def load_data(cfg: TrainConfig, tokenizer) -> tuple[list, list]:
    """Training and dev examples: text chunks (ae) or QA examples (keft)."""
    if cfg.stage == "ae":
        chunks = chunk_corpus(cfg.data or [DEFAULT_AE_CORPUS], tokenizer, cfg.min_chunk_tokens, cfg.max_chunk_tokens)
        if cfg.dev_data:
            return chunks, chunk_corpus([cfg.dev_data], tokenizer, cfg.min_chunk_tokens, cfg.max_chunk_tokens)
        random.Random(cfg.seed).shuffle(chunks)
        held_out = min(cfg.eval_samples, len(chunks) // 10)
        return chunks[held_out:], chunks[:held_out]
    train = [e for path in (cfg.data or [DEFAULT_QA_DIR / "train.jsonl.gz"]) for e in load_qa_jsonl(path)]
    dev = load_qa_jsonl(cfg.dev_data or DEFAULT_QA_DIR / "dev.jsonl.gz")
    return train, dev


def to_sample(example, stage: str, rate: int | None, with_target: bool = True) -> Sample:
    """A text chunk (ae) or QA example (keft) as a Sample at ``rate`` (None: documents stay text)."""
    if stage == "ae":
        return Sample(documents=[example], target=example if with_target else None, rate=rate)
    target = example.answers[0] if with_target else None
    return Sample(documents=example.contexts, target=target, question=example.question, rate=rate)


def batch_for(step: int, micro: int, examples: list, cfg: TrainConfig, rates: list[int], rank: int) -> list[Sample]:
    """The micro-batch of a given step: a pure function of (seed, step, micro, rank), so resume is exact."""
    rng = random.Random(hash((cfg.seed, step, micro, rank)))
    batch = []
    for _ in range(cfg.batch_size):
        example = examples[rng.randrange(len(examples))]
        batch.append(to_sample(example, cfg.stage, None if cfg.no_compress else sample_rate(rates, rng)))
    return batch


# ---------------------------------------------------------------------------------------------- model
def use_bf16(cfg: TrainConfig) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())


def build_model(cfg: TrainConfig, device: torch.device) -> GMSAModel:
    dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
    if cfg.stage == "keft" and cfg.init:
        model = load_checkpoint(cfg.init, device=device, dtype=dtype, decoder_tuning=cfg.decoder_tuning)
    else:
        config = GMSAConfig(
            base_model=cfg.base_model, method=cfg.method, encoder_layers=cfg.encoder_layers, lsa_layers=cfg.lsa_layers,
            rates=tuple(cfg.rates), window=cfg.window, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
            decoder_tuning=cfg.decoder_tuning if cfg.stage == "keft" else "none",
        )
        model = GMSAModel.from_base(config, device=device, dtype=dtype)
    model.set_stage(cfg.stage)
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


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: GMSAModel, dev: list, cfg: TrainConfig) -> dict[str, float]:
    """ae: reconstruction BLEU / ROUGE-L / prefix EM per rate; keft: EM / F1 / answer-in-output accuracy."""
    model.eval()
    examples = dev[: cfg.eval_samples]
    results: dict[str, float] = {}
    rates: list[int | None] = [None] if cfg.no_compress else list(model.config.rates)
    for rate in rates:
        preds, refs = [], []
        for start in range(0, len(examples), cfg.eval_batch_size):
            chunk = examples[start : start + cfg.eval_batch_size]
            prompts = build_prompts(model, [to_sample(e, cfg.stage, rate, with_target=False) for e in chunk])
            if cfg.stage == "ae":
                budget = max(len(model.tokenizer.encode(e, add_special_tokens=False)) for e in chunk) + 8
                preds += model.generate_from_segments(prompts, max_new_tokens=budget)
                refs += chunk
            else:
                preds += model.generate_from_segments(prompts, max_new_tokens=24)
                refs += [e.answers for e in chunk]
        scores = reconstruction_metrics(preds, refs) if cfg.stage == "ae" else qa_metrics(preds, refs)
        suffix = f"@{rate}x" if rate else ""
        results.update({f"{k}{suffix}": float(v) for k, v in scores.items()})
    model.train()
    return results


# ---------------------------------------------------------------------------------------------- checkpoints
def save(accelerator: Accelerator, model: GMSAModel, optimizer, scheduler, step: int, cfg: TrainConfig, metrics: dict) -> None:
    """Checkpoint = model weights (safetensors) + optimizer/scheduler state + step, written by the main process."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        path = Path(cfg.out_dir) / "checkpoints" / f"step-{step:07d}"
        extra = {"train_config": asdict(cfg), "step": step, "metrics": metrics}
        save_checkpoint(model, path, extra=extra, dtype=getattr(torch, cfg.save_dtype))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path / OPTIMIZER_FILE)
        (path / STATE_FILE).write_text(json.dumps({"step": step}))
        (Path(cfg.out_dir) / "latest").write_text(path.name)
    accelerator.wait_for_everyone()


def latest_checkpoint(out_dir: str) -> Path | None:
    pointer = Path(out_dir) / "latest"
    return Path(out_dir) / "checkpoints" / pointer.read_text().strip() if pointer.is_file() else None


def resume(model: GMSAModel, optimizer, scheduler, cfg: TrainConfig) -> int:
    """Restore weights, optimizer and scheduler from the run's latest checkpoint; return the step to start at."""
    path = latest_checkpoint(cfg.out_dir)
    if path is None:
        return 0
    attach_checkpoint(model, read_record(path), read_weights(path), path)
    state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)  # tensors only, no code
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return json.loads((path / STATE_FILE).read_text())["step"]


# ---------------------------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig) -> Path:
    """Run one stage to ``cfg.steps`` (resuming from ``cfg.out_dir`` if it holds a checkpoint); return the final checkpoint."""
    accelerator = Accelerator(
        mixed_precision="bf16" if use_bf16(cfg) else "no", gradient_accumulation_steps=cfg.grad_accum
    )
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, accelerator.device)
    train_set, dev_set = load_data(cfg, model.tokenizer)
    rates = list(model.config.rates)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    start = resume(model, optimizer, scheduler, cfg)
    # The scheduler stays unwrapped: every process draws its own batches, so one optimizer step is one
    # scheduler step (accelerate's wrapper would step it once per process).
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    log_file = Path(cfg.out_dir) / "metrics.jsonl"
    if accelerator.is_main_process:
        (Path(cfg.out_dir) / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
        print(f"{cfg.stage} {cfg.method}{' no-compress' if cfg.no_compress else ''}: {len(train_set)} train / "
              f"{len(dev_set)} dev examples, {sum(p.numel() for p in trainable):,} trainable parameters, "
              f"steps {start}->{cfg.steps}, {accelerator.num_processes} process(es) on {accelerator.device}", flush=True)

    wrapped.train()
    metrics: dict[str, float] = {}
    tokens, clock = 0, time.perf_counter()
    started = clock
    progress = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not accelerator.is_main_process)
    for step in progress:
        for micro in range(cfg.grad_accum):
            samples = batch_for(step, micro, train_set, cfg, rates, accelerator.process_index)
            with accelerator.accumulate(wrapped):
                loss = wrapped(samples)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            tokens += sum(_token_count(model, s) for s in samples)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            rate = tokens * accelerator.num_processes / (time.perf_counter() - clock)
            metrics = {"step": done, "loss": accelerator.reduce(loss.detach(), "mean").item(),
                       "lr": scheduler.get_last_lr()[0], "tokens_per_s": rate}
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{rate:,.0f}")
            _log(accelerator, log_file, metrics)
            tokens, clock = 0, time.perf_counter()
        out_of_time = cfg.time_limit_minutes > 0 and time.perf_counter() - started > 60 * cfg.time_limit_minutes
        out_of_time = accelerator.reduce(torch.tensor(float(out_of_time), device=accelerator.device), "sum").item() > 0
        last = done == cfg.steps or out_of_time
        if dev_set and (done % cfg.eval_every == 0 or last):
            if accelerator.is_main_process:
                with accelerator.autocast():  # fp32 trainable weights beside bf16 frozen ones
                    metrics = {"step": done, **evaluate(model, dev_set, cfg)}
                _log(accelerator, log_file, metrics)
                tqdm.write(json.dumps(metrics))
            accelerator.wait_for_everyone()
        if done % cfg.save_every == 0 or last:
            save(accelerator, model, optimizer, scheduler, done, cfg, metrics)
        if out_of_time:
            tqdm.write(f"time limit of {cfg.time_limit_minutes} min reached after step {done}")
            break
    return latest_checkpoint(cfg.out_dir)


def _token_count(model: GMSAModel, sample: Sample) -> int:
    """Tokens a sample feeds through the model (documents + question + target), for the tokens/s readout."""
    text = " ".join([*sample.documents, sample.question or "", sample.target or ""])
    return len(model.tokenizer.encode(text, add_special_tokens=False))


def _log(accelerator: Accelerator, path: Path, record: dict) -> None:
    if accelerator.is_main_process:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> None:
    final = train(parse_args(argv))
    print(f"final checkpoint: {final}")


if __name__ == "__main__":
    main()
