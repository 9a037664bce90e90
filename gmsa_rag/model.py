"""The GMSA model: encoder (first k layers + LoRA) -> group merging -> LSA -> soft tokens -> decoder.

The TCP-AE baseline (ICAE-style learnable memory tokens) lives behind the same interface
(``GMSAConfig.method = "tcp"``) so that every benchmark compares the two at equal rates.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .backbone import load_backbone
from .config import GMSAConfig
from .engine import allow_recompiles
from .fingerprint import weights_fingerprint
from .group_merge import group_merge
from .layers import EmbeddingScaleNorm, copy_of_lowest_layers, inner_model, own_parameters, run_stack
from .prompt import (Context, DecoderBatch, Segment, assemble, flat_index, prompt_length, qa_instruction,
                     qa_segments, shared_tail, soft_token_groups, to_device)
from .samples import Sample, build_prompts, token_ids

logger = logging.getLogger(__name__)

Stage = Literal["ae", "keft", "frozen"]

ENCODER_ADAPTER = "gmsa_encoder"
DECODER_ADAPTER = "gmsa_decoder"
DECODER_MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


def stage2_training(extra: dict[str, Any] | None) -> dict[str, Any]:
    """The training config a checkpoint's ``extra`` metadata records for its stage 2 (keft); ``{}`` for any other."""
    train = (extra or {}).get("train_config") or {}
    return train if train.get("stage") == "keft" else {}


def recorded_document_order(extra: dict[str, Any] | None) -> str:
    """How a checkpoint's stage 2 ordered a prompt's documents (its recorded ``--doc_order``, one of
    :data:`gmsa_rag.lexical.DOCUMENT_ORDERS`), from its ``extra`` metadata: ``bm25_first`` / ``bm25_last`` readers
    expect retrieved chunks in BM25 order, as ``GMSACompressor`` hands them; ``given`` where nothing says."""
    return str(stage2_training(extra).get("doc_order") or "given")


class GMSAModel(nn.Module):
    """Compresses text into soft tokens and answers questions from them with the base LM as decoder."""

    def __init__(self, decoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: GMSAConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.decoder = decoder
        self.base_fingerprint = weights_fingerprint(decoder.state_dict().items())
        decoder.requires_grad_(False)

        self.encoder = copy_of_lowest_layers(decoder, config.encoder_layers, keep_norm=config.encoder_norm)
        self.prefix_ids: list[int] = (
            tokenizer.encode(config.encoder_prefix, add_special_tokens=False) if config.encoder_prefix else []
        )
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
        )
        inject_adapter_in_model(lora, self.encoder, adapter_name=ENCODER_ADAPTER)
        self.lsa = copy_of_lowest_layers(decoder, config.lsa_layers) if config.lsa_layers else None
        self.soft_norm = EmbeddingScaleNorm(self.embed_tokens.weight) if config.soft_token_norm else None
        embed = self.embed_tokens.weight
        self.soft_center = (nn.Parameter(torch.zeros(embed.shape[1], dtype=embed.dtype, device=embed.device))
                            if config.soft_token_center else None)

        hidden = decoder.config.hidden_size
        if config.method == "tcp":
            # ICAE-style memory slots, initialised from the embeddings of random vocabulary tokens.
            slots = config.max_soft_tokens(min(config.rates))
            generator = torch.Generator().manual_seed(0)
            ids = torch.randint(0, decoder.config.vocab_size, (slots,), generator=generator)
            embed = self.embed_tokens.weight
            self.memory = nn.Parameter(embed[ids.to(embed.device)].detach().clone())
        else:
            self.memory = None

        if config.decoder_tuning == "qkv_lora":
            mlp = DECODER_MLP_TARGETS if config.decoder_mlp_lora_rank else ()
            mlp_rank = config.decoder_mlp_lora_rank
            decoder_lora = LoraConfig(
                r=config.decoder_lora_rank,
                lora_alpha=config.decoder_lora_alpha,
                target_modules=[*config.decoder_targets, *mlp],
                rank_pattern={t: mlp_rank for t in mlp},  # the same alpha/r as the attention LoRA
                alpha_pattern={t: mlp_rank * config.decoder_lora_alpha / config.decoder_lora_rank for t in mlp},
            )
            inject_adapter_in_model(decoder_lora, self.decoder, adapter_name=DECODER_ADAPTER)
        # found once: decoder_adapter() switches them around every decoder call
        self._decoder_lora_layers = [m for m in self.decoder.modules() if isinstance(m, BaseTunerLayer)]
        self.set_stage("frozen")
        self.hidden_size = hidden
        self.loss_terms: dict[str, torch.Tensor] = {}  # the last distilled batch's terms, detached (for the logs)

    # ------------------------------------------------------------------ construction / persistence
    @classmethod
    def from_base(
        cls,
        config: GMSAConfig | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> "GMSAModel":
        """A fresh (untrained) compressor on top of ``config.base_model``."""
        config = config or GMSAConfig()
        decoder, tokenizer = load_backbone(config.base_model, device=device, dtype=dtype)
        return cls(decoder, tokenizer, config)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        base_model: str | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> "GMSAModel":
        """Load a checkpoint saved by :meth:`save_pretrained` (on ``base_model`` if given, else the recorded one)."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(path, base_model=base_model, device=device, dtype=dtype)

    def save_pretrained(self, path: str | Path, extra: dict | None = None) -> Path:
        """Save the trained parts as sharded safetensors + JSON config (see :mod:`gmsa_rag.checkpoint`)."""
        from .checkpoint import save_checkpoint

        return save_checkpoint(self, path, extra=extra)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def embed_tokens(self) -> nn.Embedding:
        return inner_model(self.decoder).embed_tokens

    # ------------------------------------------------------------------ which weights train
    def compressor_parameters(self) -> dict[str, nn.Parameter]:
        """Encoder LoRA, LSA and memory slots: what stage 1 (AE) trains."""
        params = {f"encoder.{n}": p for n, p in self.encoder.named_parameters() if "lora_" in n}
        if self.lsa is not None:
            params.update({f"lsa.{n}": p for n, p in own_parameters(self.lsa).items()})
        if self.soft_norm is not None:
            params["soft_norm.weight"] = self.soft_norm.weight
        if self.soft_center is not None:
            params["soft_center"] = self.soft_center
        if self.memory is not None:
            params["memory"] = self.memory
        return params

    def decoder_parameters(self) -> dict[str, nn.Parameter]:
        """Decoder W_Q/W_K/W_V, their LoRA, or all decoder weights but the embedding: what stage 2 (KEFT) trains;
        empty when not tuned."""
        tuning = self.config.decoder_tuning
        if tuning == "none":
            return {}
        targets = tuple(f"{t}." for t in self.config.decoder_targets)
        params = {}
        for name, p in self.decoder.named_parameters():
            is_lora = "lora_" in name
            if tuning == "full":
                wanted = not is_lora and p is not self.embed_tokens.weight
            else:
                wanted = is_lora if tuning == "qkv_lora" else not is_lora and any(t in name for t in targets)
            if wanted:
                params[f"decoder.{name}"] = p
        return params

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """Everything a checkpoint stores (all weights that differ from the base model)."""
        return {**self.compressor_parameters(), **self.decoder_parameters()}

    def set_decoder_lora_dropout(self, p: float) -> None:
        """Dropout on the soft-token adapter's input while training (peft's ``lora_dropout``; off in eval mode and for
        text prompts, whose adapter is off): a regulariser against memorising training questions. Not saved: a
        training setting (the run's ``train_config.json`` records it)."""
        if not 0 <= p < 1:
            raise ValueError(f"decoder LoRA dropout must be in [0, 1), got {p}")
        for layer in self._decoder_lora_layers:
            if DECODER_ADAPTER in layer.lora_dropout:
                layer.lora_dropout[DECODER_ADAPTER] = nn.Dropout(p) if p > 0 else nn.Identity()

    def set_stage(self, stage: Stage) -> None:
        """Freeze everything, then unfreeze what ``stage`` trains (ae: compressor, keft: decoder q/k/v)."""
        self.requires_grad_(False)
        trainable = {"ae": self.compressor_parameters, "keft": self.decoder_parameters}.get(stage)
        if trainable is not None:
            params = trainable()
            if not params:
                raise ValueError(f"stage {stage!r} has nothing to train (decoder_tuning={self.config.decoder_tuning!r})")
            for p in params.values():
                p.requires_grad_(True)

    @property
    def fingerprint(self) -> str:
        """Identifies what soft tokens depend on: base weights, compressor weights and architecture.

        ``GMSACompressor`` asks for it on every query, and sampling ~180 tensors costs milliseconds (5.7-8.4 ms on an
        H200, ~4 ms on 2 CPU cores), so it is computed again only when a compressor tensor changed: another tensor, a
        new storage, or an in-place write PyTorch counts (optimizer steps, ``load_state_dict``, ``copy_`` under
        ``no_grad``). Writes through ``.data`` are not counted by PyTorch: after one, call :meth:`forget_fingerprint`."""
        salt = f"{self.base_fingerprint}|{self.config.architecture_key}"
        named = list(self.compressor_parameters().items())
        state = (salt, tuple((name, t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for name, t in named))
        cached = self.__dict__.get("_fingerprint")
        if cached is None or cached[0] != state:
            cached = (state, weights_fingerprint(named, salt=salt))
            self.__dict__["_fingerprint"] = cached
        return cached[1]

    def forget_fingerprint(self) -> None:
        """Compute :attr:`fingerprint` afresh on its next use (after writing compressor weights through ``.data``)."""
        self.__dict__.pop("_fingerprint", None)

    def compile_blocks(self, backend: str = "inductor") -> int:
        """Compile every Transformer block of the encoder, LSA and decoder with ``torch.compile`` (regional
        compilation: the copies of a block share one compiled graph, sequence length and batch size stay dynamic);
        returns how many blocks. Small models train host-bound, launching one kernel per norm, rotary, LoRA and
        activation step; compiled blocks launch a few fused ones. Run under
        ``torch.compiler.set_stance("force_eager")`` where shapes change every call (generation)."""
        stacks = [self.encoder, self.decoder.get_decoder(), *([self.lsa] if self.lsa is not None else [])]
        blocks = [layer for stack in stacks for layer in stack.layers]
        allow_recompiles(64)  # a graph per kind of block and input (encoder, LSA, decoder; adapter on/off; grad)
        for block in blocks:
            block.compile(backend=backend, dynamic=True)
        return len(blocks)

    # ------------------------------------------------------------------ documents -> soft tokens
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens); rejects non-strings and empty text."""
        if isinstance(texts, str):
            raise TypeError("expected a list of texts, got a single string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}, expected str")
            if not text.strip():
                raise ValueError(f"text {i} is empty; there is nothing to compress")
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def windows(self, token_ids: Sequence[int]) -> list[list[int]]:
        """Split a chunk's tokens into encoder windows of at most ``config.window`` tokens."""
        w = self.config.window
        return [list(token_ids[i : i + w]) for i in range(0, len(token_ids), w)]

    def soft_tokens(self, windows: Sequence[Sequence[int]], rates: Sequence[int]) -> list[torch.Tensor]:
        """Compress token windows (each <= config.window) at per-window rates; differentiable.

        Returns one [ceil(n_i / r_i), H] tensor of soft tokens per window.
        """
        if len(windows) != len(rates):
            raise ValueError("one rate per window is needed")
        for r in rates:
            self.config.check_rate(r)
        if len(windows) > 1:  # encoder passes over windows of similar length, so little compute goes to padding
            groups = length_groups([len(w) for w in windows], self.config.encoder_tokens_per_pass)
            if len(groups) > 1:
                out: list[torch.Tensor | None] = [None] * len(windows)
                for group in groups:
                    for i, soft in zip(group, self._soft_tokens([windows[i] for i in group], [rates[i] for i in group])):
                        out[i] = soft
                return out
        return self._soft_tokens(windows, rates)

    def _soft_tokens(self, windows: Sequence[Sequence[int]], rates: Sequence[int]) -> list[torch.Tensor]:
        ids, mask = self.encoder_inputs(windows)
        counts = [-(-len(w) // r) for w, r in zip(windows, rates)]  # known on the host: no wait for the GPU
        soft, _ = self.soft_tokens_padded(ids, mask, to_device(torch.tensor(list(rates)), self.device), max(counts))
        return [soft[b, :n] for b, n in enumerate(counts)]

    def encoder_inputs(self, windows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded encoder input ids (prefix + window) and their mask, on the model's device."""
        return self._pad([self.prefix_ids + list(w) for w in windows])

    def soft_tokens_padded(
        self, ids: torch.Tensor, mask: torch.Tensor, rate: torch.Tensor, num_groups: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The compressor's device work on :meth:`encoder_inputs`: [B, G, H] soft tokens and their [B, G] mask.
        ``num_groups``, if the caller knows it (the most soft tokens of a row), saves reading it back from the GPU."""
        skip = len(self.prefix_ids)  # the prefix (and the attention sink on it) never enters a soft token
        if self.config.method == "gmsa":
            hidden = run_stack(self.encoder, self.embed_tokens(ids), mask)
            summary, summary_mask = group_merge(hidden[:, skip:], mask[:, skip:], rate, num_groups)
        else:
            summary, summary_mask = self._memory_summary(ids, mask, rate, skip)
        soft = run_stack(self.lsa, summary, summary_mask) if self.lsa is not None else summary
        if self.soft_center is not None:
            soft = soft - self.soft_center.to(soft.dtype)
        if self.soft_norm is not None:
            soft = self.soft_norm(soft)
        return soft, summary_mask

    @torch.no_grad()
    def calibrate_soft_center(self, token_windows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Set the soft-token centre to the mean uncentred soft token of ``token_windows`` at every configured rate
        (how a run with ``soft_token_center`` starts); returns it."""
        if self.soft_center is None:
            raise ValueError("this model has no soft-token centre (GMSAConfig.soft_token_center is off)")
        if not token_windows:
            raise ValueError("calibrate_soft_center needs at least one window of tokens")
        self.soft_center.zero_()
        windows = [list(w)[: self.config.window] for w in token_windows]
        total, count = torch.zeros(self.hidden_size, dtype=torch.float64), 0
        for rate in self.config.rates:
            for soft in self.soft_tokens(windows, [rate] * len(windows)):
                total += soft.double().sum(0).cpu()
                count += soft.shape[0]
        self.soft_center.copy_((total / count).to(self.soft_center.dtype))
        return self.soft_center.detach().clone()

    def _memory_summary(
        self, ids: torch.Tensor, mask: torch.Tensor, rate: torch.Tensor, skip: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """TCP-AE: append ceil(n/r) memory slots after each text (n excludes the ``skip`` prefix tokens);
        their encoder states are the summary."""
        lengths = mask.sum(1)
        slots = (lengths - skip + rate - 1) // rate
        batch, width = ids.shape[0], self.hidden_size
        total = int((lengths + slots).max())
        embeds = torch.zeros(batch, total, width, dtype=self.dtype, device=self.device)
        full_mask = torch.zeros(batch, total, dtype=torch.long, device=self.device)
        token_embeds = self.embed_tokens(ids)
        for b in range(batch):
            n, m = int(lengths[b]), int(slots[b])
            embeds[b, :n] = token_embeds[b, :n]
            embeds[b, n : n + m] = self.memory[:m].to(self.dtype)
            full_mask[b, : n + m] = 1
        hidden = run_stack(self.encoder, embeds, full_mask)
        num_slots = int(slots.max())
        index = (lengths[:, None] + torch.arange(num_slots, device=self.device)[None, :]).clamp(max=total - 1)
        summary = hidden.gather(1, index.unsqueeze(-1).expand(batch, num_slots, width))
        summary_mask = (torch.arange(num_slots, device=self.device)[None, :] < slots[:, None]).long()
        return summary * summary_mask.unsqueeze(-1), summary_mask

    def _pad(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        longest = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), longest), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(sequences), longest, dtype=torch.long)
        for b, seq in enumerate(sequences):
            ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[b, : len(seq)] = 1
        return to_device(ids, self.device), to_device(mask, self.device)

    @torch.no_grad()
    def compress(self, texts: Sequence[str], rate: int | Sequence[int], batch_size: int = 16) -> list[torch.Tensor]:
        """Compress each text into ~len/rate soft tokens ([m_i, H] tensors on the model's device); ``rate``: one for
        every text, or a list with one per text (texts at different rates still share encoder passes).

        Texts longer than the encoder window are split into windows whose soft tokens are concatenated in order.
        """
        if isinstance(rate, (list, tuple)):
            if len(rate) != len(texts):
                raise ValueError(f"one rate per text is needed: {len(rate)} rates for {len(texts)} texts")
            rates = [self.config.check_rate(r) for r in rate]
        else:
            rates = [self.config.check_rate(rate)] * len(texts)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        per_text = [self.windows(ids) for ids in self.tokenize(texts)]
        flat = [(t, w) for t, ws in enumerate(per_text) for w in ws]
        order = sorted(range(len(flat)), key=lambda i: len(flat[i][1]))  # similar lengths share a batch
        outputs: list[torch.Tensor | None] = [None] * len(flat)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            soft = self.soft_tokens([flat[i][1] for i in chunk], [rates[flat[i][0]] for i in chunk])
            for i, s in zip(chunk, soft):
                outputs[i] = s
        result: list[list[torch.Tensor]] = [[] for _ in texts]
        for (t, _), s in zip(flat, outputs):
            result[t].append(s)
        return [torch.cat(parts) for parts in result]

    # ------------------------------------------------------------------ prompt -> decoder
    def build_batch(self, prompts: Sequence[Sequence[Segment]], padding_side: str = "right") -> DecoderBatch:
        """Embed and pad segment lists into one decoder batch."""
        return assemble(prompts, self.embed_tokens, padding_side=padding_side)

    def forward(self, samples: Sequence[Sample], distill_weight: float = 0.0, teacher: "GMSAModel | None" = None,
                hidden_weight: float = 0.0, soft_weight: float = 0.0, restore_weight: float | None = None
                ) -> torch.Tensor:
        """Training loss of a batch of stage-1 / QA samples (what the trainer and DDP call).

        ``restore_weight`` (stage 2 with stage-1 samples mixed in): each kind of target, answers and stage-1 targets,
        weighs by its share of the batch's samples with its own mean token loss, the stage-1 kind times this weight
        (a restored document's ~150 tokens would otherwise outweigh a dozen answers); None: the mean over all target
        tokens.

        Distillation from a teacher reading the documents as text: ``teacher`` (e.g. a no-compress fine-tune, same
        base model and tokenizer) or, by default, this decoder with its adapter off (the base model).
        ``distill_weight`` w > 0: (1 - w) * cross-entropy on the targets + w * KL(teacher || student) on them.
        ``hidden_weight`` h > 0: + h * (1 - cosine) between the student's and the teacher's hidden states, every
        layer, at the positions after the documents (question, chat turn, answer), which both prompts share.
        ``soft_weight`` s > 0: + s * (1 - cosine) between each soft token's states and the teacher's mean state over
        the text tokens it stands for, every layer (the teacher then reads each document as the encoder tokenized it).
        """
        if restore_weight is not None:
            if distill_weight or hidden_weight or soft_weight:
                raise ValueError("stage-1 samples mixed into stage 2 cannot be distilled from a reader of the text")
            return self.loss(build_prompts(self, samples), [s.question is None for s in samples], restore_weight)
        if not (distill_weight or hidden_weight or soft_weight):
            return self.loss(build_prompts(self, samples))
        terms = self.distillation_terms(samples, teacher, hidden=bool(hidden_weight), soft=bool(soft_weight))
        self.loss_terms = {k: v.detach() for k, v in terms.items() if v.dim() == 0}
        loss = terms["ce"]
        if distill_weight:
            loss = (1 - distill_weight) * loss + distill_weight * terms["kl"]
        if hidden_weight:
            loss = loss + hidden_weight * terms["hidden"]
        if soft_weight:
            loss = loss + soft_weight * terms["soft"]
        return loss

    def distillation_terms(self, samples: Sequence[Sample], teacher: "GMSAModel | None" = None, hidden: bool = False,
                           soft: bool = False, text_samples: Sequence[Sample] | None = None) -> dict[str, torch.Tensor]:
        """The terms ``forward`` mixes: ``ce`` (answer cross-entropy), ``kl`` (KL(teacher || student) on the answer
        tokens); with ``hidden``, ``hidden`` (mean 1 - cosine over layers and the positions after the documents) and
        ``hidden_per_layer`` ([layers]); with ``soft``, ``soft`` and ``soft_per_layer`` (the same between each soft
        token and the teacher's mean state over its group of text tokens). The teacher reads ``text_samples``
        (default: ``samples``) as text; with ``soft``, each document as the encoder tokenized it."""
        prompts = build_prompts(self, samples)
        reader = self if teacher is None else teacher
        text_samples = list(samples if text_samples is None else text_samples)
        if soft:  # the student's own prompt with each document as text: soft tokens line up with their text
            text_prompts = [self.qa_prompt(s.question, token_ids(self, s.documents), s.target,
                                           question_first=self.config.question_first) for s in text_samples]
        else:
            text_prompts = build_prompts(reader, [replace(s, rate=None) for s in text_samples])
        gather: dict[str, tuple[list, list]] = {}
        if hidden:
            tails = [shared_tail(p, t) for p, t in zip(prompts, text_prompts)]
            gather["hidden"] = ([range(prompt_length(p) - k, prompt_length(p)) for p, k in zip(prompts, tails)],
                                [range(prompt_length(t) - k, prompt_length(t)) for t, k in zip(text_prompts, tails)])
        if soft:
            found = [soft_token_groups(p, t, self.config.window, s.document_rates or s.rate)
                     for p, t, s in zip(prompts, text_prompts, samples)]
            groups = [g for _, row_groups in found for g in row_groups]
            gather["soft"] = ([positions for positions, _ in found],
                              [[pos for g in row_groups for pos in g] for _, row_groups in found])
        with torch.no_grad(), self.decoder_adapter(False) if teacher is None else nullcontext():
            teacher_logits, _, teacher_states = reader.decode(text_prompts, {k: v[1] for k, v in gather.items()})
        logits, labels, states = self.decode(prompts, {k: v[0] for k, v in gather.items()})
        terms = {"ce": F.cross_entropy(logits.float(), labels),
                 "kl": F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(teacher_logits.float(), -1),
                                log_target=True, reduction="batchmean")}
        if soft:
            teacher_states["soft"] = group_means(teacher_states["soft"], [len(g) for g in groups])
        for name in gather:
            terms[f"{name}_per_layer"] = hidden_state_distance(states[name], teacher_states[name], per_layer=True)
            terms[name] = terms[f"{name}_per_layer"].mean()
        return terms

    def loss(self, prompts: Sequence[Sequence[Segment]], restoring: Sequence[bool] | None = None,
             restore_weight: float = 1.0) -> torch.Tensor:
        """Teacher-forced cross-entropy on the target segments of each prompt: the mean over all target tokens, or,
        given ``restoring`` (one flag a prompt: a stage-1 target, not an answer), the sum over the two kinds of
        share of the prompts x mean token loss, the restoring kind times ``restore_weight`` (per-kind means are
        kept in ``loss_terms`` as ``answer`` and ``restore``)."""
        logits, labels = self.target_logits(prompts)
        if restoring is None:
            return F.cross_entropy(logits.float(), labels)
        token_loss = F.cross_entropy(logits.float(), labels, reduction="none")
        counts = target_counts(prompts)
        kinds, means, shares = [], [], []  # per kind present: its name, per-prompt token weights, share of prompts
        for kind, flag in (("answer", False), ("restore", True)):
            members = [r == flag for r in restoring]
            tokens = sum(c for c, m in zip(counts, members) if m)
            if tokens:
                kinds.append(kind)
                means.append([1.0 / tokens if m else 0.0 for m in members])
                shares.append((restore_weight if flag else 1.0) * sum(members) / len(prompts))
        on_tokens = torch.repeat_interleave(torch.tensor(means), torch.tensor(counts), dim=1)  # [kinds, tokens]
        kind_losses = to_device(on_tokens, token_loss.device) @ token_loss  # each kind's mean token loss
        self.loss_terms = dict(zip(kinds, kind_losses.detach()))
        return sum(share * kind_loss for share, kind_loss in zip(shares, kind_losses))

    def target_logits(self, prompts: Sequence[Sequence[Segment]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits predicting each target token ([N, V], all prompts' targets in order) and those tokens ([N]).

        The LM head runs on the target positions only (a long prompt's full [B, T, V] logits would be gigabytes).
        """
        logits, labels, _ = self.decode(prompts)
        return logits, labels

    def decode(self, prompts: Sequence[Sequence[Segment]], gather: dict[str, Sequence[Sequence[int]]] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``target_logits`` and, for each entry of ``gather`` (positions per prompt), the hidden states of every
        decoder layer at those positions ([layers, n, H], prompt by prompt, in the order given)."""
        batch = self.build_batch(prompts)  # padded on the right: causal attention needs no mask (see run_stack)
        states: dict[str, torch.Tensor] = {}
        with self.decoder_adapter(self.adapter_wanted(prompts)):
            stack = self.decoder.get_decoder()
            if not gather:
                hidden = run_stack(stack, batch.inputs_embeds, batch.attention_mask)
            else:
                layers = run_stack(stack, batch.inputs_embeds, batch.attention_mask, every_layer=True)
                hidden, device = layers[-1], batch.inputs_embeds.device
                for name, positions in gather.items():
                    index = flat_index(prompts, positions, device)
                    states[name] = torch.stack([h.flatten(0, 1)[index] for h in layers])
            # the predicting positions were found on the host: no boolean mask, so no wait for the GPU
            logits = self.decoder.get_output_embeddings()(hidden.flatten(0, 1)[batch.predictors])
        return logits, batch.target_ids, states

    @torch.no_grad()
    def answer_losses(self, prompts: Sequence[Sequence[Segment]]) -> torch.Tensor:
        """Mean teacher-forced cross-entropy per target token of each prompt ([B], fp32): the answer-loss probe."""
        logits, labels = self.target_logits(prompts)
        token_loss = F.cross_entropy(logits.float(), labels, reduction="none")
        counts = torch.tensor(target_counts(prompts), device=labels.device)
        owner = torch.repeat_interleave(torch.arange(len(prompts), device=labels.device), counts)
        totals = torch.zeros(len(prompts), device=labels.device).index_add_(0, owner, token_loss)
        return totals / counts.clamp(min=1)

    def qa_prompt(self, question: str, contexts: Sequence[Context | list[int]], answer: str | None = None,
                  instruction: str | None = None, question_first: bool | None = None) -> list[Segment]:
        """The QA prompt in the layout this model was trained on: its instruction (a citing model's by default)
        and, where its adapter serves the prompt, the question stated before the documents too
        (``GMSAConfig.question_first``). Plain text read by the pristine base model keeps the base layout;
        ``question_first`` overrides that choice (a text twin of a soft-token prompt, position for position)."""
        if instruction is None:
            instruction = qa_instruction(self.config.answer_cites, self.config.answer_quotes)
        if question_first is None:
            question_first = self.config.question_first and (
                self.config.decoder_adapter == "always" or any(isinstance(c, torch.Tensor) for c in contexts))
        return qa_segments(self.tokenizer, question, contexts, answer, instruction=instruction,
                           question_first=question_first)

    def trained_max_documents(self) -> int | None:
        """The most documents a prompt held in this checkpoint's stage-2 training (its recorded ``--max_docs``), or
        ``None`` where nothing says (a stage-1 or untrained compressor, a no-compress fine-tune)."""
        train = stage2_training(self.config.extra)
        if train.get("no_compress") or not train.get("max_docs"):
            return None
        return int(train["max_docs"])

    def trained_document_order(self) -> str:
        """How this checkpoint's stage 2 ordered a prompt's documents (:func:`recorded_document_order`)."""
        return recorded_document_order(self.config.extra)

    def warn_if_untrained_shape(self, prompts: Sequence[Sequence[Segment]]) -> None:
        """Log once per model when a prompt holds more soft-token documents than stage 2 trained it on: such a
        reader answers far worse (a one-document checkpoint over five documents; its model card says how much)."""
        trained = None if self.__dict__.get("_warned_documents") else self.trained_max_documents()
        if trained is None:
            return
        most = max((sum(s.embeds is not None for s in p) for p in prompts), default=0)
        if most <= trained:
            return
        self.__dict__["_warned_documents"] = True
        logger.warning("this GMSA checkpoint was trained on prompts of at most %d document(s) and this one holds %d: "
                       "expect worse answers; keep the best-matching chunk(s) (GMSACompressor(top_n=%d), the default; "
                       "gmsa-rag ask --rerank-top %d)", trained, most, trained, trained)

    def adapter_wanted(self, prompts: Sequence[Sequence[Segment]]) -> bool:
        """Whether the decoder adapter serves these prompts (see ``GMSAConfig.decoder_adapter``)."""
        return self.config.decoder_adapter == "always" or has_soft_tokens(prompts)

    @contextmanager
    def decoder_adapter(self, enabled: bool) -> Iterator[None]:
        """Switch the decoder's KEFT LoRA adapter on (prompts with soft tokens) or off (plain text: the pristine
        base model) for the duration of the block. A no-op when the decoder has no adapter."""
        layers = self._decoder_lora_layers
        previous = [m.disable_adapters for m in layers]
        for m in layers:
            m._disable_adapters = not enabled  # peft's own switch; enable_adapters() would also flip requires_grad
        try:
            yield
        finally:
            for m, was in zip(layers, previous):
                m._disable_adapters = was

    def merge_decoder_adapter(self) -> None:
        """Fold the decoder's LoRA adapter into W_Q/W_K/W_V and drop it: the decoder becomes one plain model whose
        every weight can train (``decoder_tuning="full"``, the authors' stage 2). The text path then changes too."""
        if self.config.decoder_tuning != "qkv_lora":
            raise ValueError(f"the decoder has no LoRA adapter to merge (decoder_tuning={self.config.decoder_tuning!r})")
        for parent in list(self.decoder.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, BaseTunerLayer):
                    child._disable_adapters = False
                    child.merge(adapter_names=[DECODER_ADAPTER])
                    setattr(parent, name, child.get_base_layer())
        self._decoder_lora_layers = []
        self.config.decoder_tuning = "full"

    def max_context_tokens(self) -> int:
        return int(getattr(self.decoder.config, "max_position_embeddings", 0) or 0)

    @torch.no_grad()
    def generate(
        self,
        questions: str | Sequence[str],
        contexts: Sequence[Context] | Sequence[Sequence[Context]],
        max_new_tokens: int = 32,
        extract_from: Sequence[str] | Sequence[Sequence[str]] | None = None,
        per_document: bool = False,
        extract_top: int = 0,
        extract_sentences: int = 0,
        extract_penalty: float = float("inf"),
        contrast: float = 0.0,
        **generate_kwargs,
    ) -> str | list[str]:
        """Answer question(s) from their documents (soft-token tensors, or text for the uncompressed baseline).

        The decoder reads chat template + instruction + one span per document + question and decodes through
        :meth:`generate_from_segments` (the generation engine; ``generate_kwargs`` pass through, e.g. ``streamer``).
        ``extract_from``: each question's documents as text (those its soft tokens were made from): every answer
        is then a span of one of them (:mod:`gmsa_rag.extractive`; greedy decoding keeps the generation engine's path).
        ``extract_top``: with ``extract_from``, hold each answer to its question's ``extract_top`` documents of best
        BM25 match (:mod:`gmsa_rag.lexical`) instead of all of them; the prompt still holds every document.
        ``extract_sentences``: with ``extract_from``, hold each answer to the ``extract_sentences`` sentences of best
        BM25 match among those documents (after ``extract_top``).
        ``extract_penalty``: with ``extract_from``, the nats a token loses for continuing no span of the documents;
        ``inf`` (the default) forbids it, a finite penalty only leans the answers towards quoting (free otherwise).
        ``per_document``: answer from each document alone and keep the answer the decoder scores best
        (:mod:`gmsa_rag.per_document`).
        ``contrast``: alpha > 0 decodes each token from how much the documents raise it over the question alone
        (context-aware decoding, :mod:`gmsa_rag.contrast`; greedy, plain answers).
        """
        single = isinstance(questions, str)
        questions, contexts = self._as_batch(questions, contexts)
        documents = None if extract_from is None else ([extract_from] if single else extract_from)
        if documents is not None and not per_document and len(documents) != len(questions):
            raise ValueError(f"extract_from: {len(documents)} document lists for {len(questions)} questions")
        if extract_penalty != float("inf") and documents is None:
            raise ValueError("extract_penalty leans answers towards the documents' text: give it as extract_from")
        if extract_penalty != float("inf") and (per_document or self.config.answer_cites):
            raise ValueError("extract_penalty: not with per_document or a citing checkpoint (their answers quote)")
        if extract_top or extract_sentences:
            documents = self._best_matching(questions, documents, extract_top, extract_sentences, per_document)
        if contrast and (per_document or self.config.answer_cites or self.config.answer_quotes):
            raise ValueError("contrast: context-aware decoding answers plainly, not per document, citing or quoting")
        if per_document:
            from .per_document import answer_per_document

            texts = answer_per_document(self, questions, contexts, max_new_tokens, documents, **generate_kwargs)
            return texts[0] if single else texts
        prompts = [self.qa_prompt(q, ctx) for q, ctx in zip(questions, contexts)]
        if documents is not None and len({self.adapter_wanted([p]) for p in prompts}) > 1:
            raise ValueError("extract_from: give one batch soft-token documents only or text only")
        if self.config.answer_quotes:
            if documents is not None:
                raise ValueError("extractive answers (extract_from) are not available for a checkpoint that quotes its "
                                 "evidence (answer_quotes) yet: its answers are read from its own quote")
            from .evidence import QUOTE_TOKENS, split_quote

            raw = self.generate_from_segments(prompts, max_new_tokens=max_new_tokens + QUOTE_TOKENS, **generate_kwargs)
            texts = [split_quote(text)[1] for text in raw]
        elif self.config.answer_cites:
            from .citation import generate_cited

            texts = generate_cited(self, prompts, [len(c) for c in contexts], documents, max_new_tokens,
                                   **generate_kwargs)
        else:
            if documents is not None:
                from .extractive import extractive_processor

                generate_kwargs["logits_processor"] = extractive_processor(self, documents, generate_kwargs,
                                                                           extract_penalty)
            if contrast:
                from .contrast import generate_contrasted

                processors = generate_kwargs.pop("logits_processor", [])
                texts = generate_contrasted(self, questions, prompts, contrast, max_new_tokens, processors,
                                            **generate_kwargs)
            else:
                texts = self.generate_from_segments(prompts, max_new_tokens=max_new_tokens, **generate_kwargs)
        return texts[0] if single else texts

    def _best_matching(self, questions: Sequence[str], documents: Sequence[Sequence[str]] | None, top: int,
                       sentences: int, per_document: bool) -> list[list[str]]:
        """``generate(extract_top=top, extract_sentences=sentences)``: each question's documents narrowed to the
        ``top`` of best BM25 match (0: all), then to the ``sentences`` best-matching sentences among them (0: whole)."""
        name = "extract_sentences" if sentences and not top else "extract_top"
        if documents is None:
            raise ValueError(f"{name}: give the documents' text as extract_from")
        if per_document or self.config.answer_cites:
            raise ValueError(f"{name}: not with per_document or a citing checkpoint (they pair answers with "
                             "every document by place)")
        if top < 0 or sentences < 0:
            raise ValueError(f"extract_top and extract_sentences must be 0 (off) or more, got {top} and {sentences}")
        from .lexical import best_documents, best_sentences

        narrowed = [best_documents(q, docs, top) for q, docs in zip(questions, documents)]
        return [best_sentences(q, docs, sentences) for q, docs in zip(questions, narrowed)] if sentences else narrowed

    generation_engine: str = "auto"
    """Decoding path of :meth:`generate_from_segments` (see :mod:`gmsa_rag.engine`): ``auto`` (static KV cache,
    CUDA graphs on CUDA; on CPU the faster path measured there), ``static`` or ``hf`` (Hugging Face generate)."""
    generation_prefill: str = "prompt"
    """How the static path's prefill fills its cache: ``prompt``, ``bucket`` or ``graph`` (see
    :class:`gmsa_rag.engine.StaticCacheDecoder`)."""
    generation_compile: bool | None = None
    """Whether the static path compiles its decode step with ``torch.compile``: ``None`` on CUDA (CUDA graphs, when
    triton is there), ``True`` on any device. On the 2-core CPU (inductor, ``generation_engine = "static"``) SmolLM2
    decoded 11% faster per token than HF generate (50.0 against 55.9 ms), after a first call of 33-93 s that every new
    batch size and length bucket repeats (benchmarks/results/cpu-2core/decode-engine-choice.md): for a long-running
    CPU server, not a one-question command."""
    generation_tune_kernels: bool = False
    """Whether the static path's compiled decode step tunes its kernels (GEMM autotuning and coordinate descent;
    see :class:`gmsa_rag.engine.StaticCacheDecoder`): faster decode on a GPU for a longer first call."""
    generation_fuse_projections: bool | None = None
    """Whether generation first fuses the decoder's W_Q/W_K/W_V and gate/up projections into one matrix each, stored
    once (:mod:`gmsa_rag.fused_projections`; the same outputs, fewer and larger matrix multiplies per step). ``None``:
    on CUDA only, where it decodes faster (:func:`gmsa_rag.engine.should_fuse_projections`)."""

    @torch.no_grad()
    def generate_from_segments(
        self, prompts: Sequence[Sequence[Segment]], max_new_tokens: int = 32, adapter: bool | None = None,
        **generate_kwargs
    ) -> list[str]:
        """Greedy (by default) decoding from prebuilt prompts; returns the decoded new text of each.

        Decodes through :func:`gmsa_rag.engine.engine_for` (``generation_engine``); sampling or other Hugging Face
        ``generate`` kwargs fall back to ``generate``. ``eos_token_id`` overrides :meth:`stop_token_ids`.
        ``adapter``: the decoder adapter on or off for the whole batch (default: on for prompts with soft tokens,
        off for plain text, each group decoded apart).
        """
        from .engine import engine_for

        wanted = [self.adapter_wanted([p]) if adapter is None else adapter for p in prompts]
        if len(set(wanted)) > 1:  # text and soft prompts: adapter off / on
            soft = [i for i, w in enumerate(wanted) if w]
            text = [i for i, w in enumerate(wanted) if not w]
            answers: dict[int, str] = {}
            for group in (soft, text):
                outs = self.generate_from_segments([prompts[i] for i in group], max_new_tokens, **generate_kwargs)
                answers.update(zip(group, outs))
            return [answers[i] for i in range(len(prompts))]
        self.warn_if_untrained_shape(prompts)
        batch = self.build_batch(prompts, padding_side="left")
        self.check_length(batch.inputs_embeds.shape[1] + max_new_tokens)
        stop = generate_kwargs.pop("eos_token_id", None)
        with self.decoder_adapter(wanted[0] if wanted else self.adapter_wanted(prompts)):
            out = engine_for(self).generate(
                batch.inputs_embeds,
                batch.attention_mask,
                max_new_tokens,
                stop_token_ids=self.stop_token_ids() if stop is None else stop,
                pad_token_id=generate_kwargs.pop("pad_token_id", self.tokenizer.pad_token_id),
                **generate_kwargs,
            )
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def stop_token_ids(self) -> list[int]:
        """End of turn: the tokenizer's and generation config's EOS ids, plus BOS (which in chat templates such
        as SmolLM2's opens the next turn and never belongs inside an answer)."""
        ids = {self.tokenizer.eos_token_id, self.tokenizer.bos_token_id}
        configured = getattr(self.decoder.generation_config, "eos_token_id", None)
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
        return sorted(i for i in ids if i is not None)

    def check_length(self, total: int) -> None:
        """Refuse prompts (soft tokens + text + answer budget) longer than the decoder's window."""
        limit = self.max_context_tokens()
        if limit and total > limit:
            raise ValueError(f"prompt needs {total} positions but the decoder's window is {limit}; "
                             "retrieve fewer documents or compress at a higher rate")

    @staticmethod
    def _as_batch(questions, contexts) -> tuple[list[str], list[list[Context]]]:
        """One question and its documents, or lists of both; refuses what would be silently misread (a string of
        documents read one character each, a bare soft-token tensor read one row each)."""
        if isinstance(questions, str):
            questions, contexts = [questions], [contexts]
        questions, contexts = list(questions), list(contexts)
        if not questions:
            raise ValueError("no questions given")
        if len(questions) != len(contexts):
            raise ValueError(f"{len(questions)} questions but {len(contexts)} context lists")
        for docs in contexts:
            if isinstance(docs, (str, torch.Tensor)):
                raise TypeError(f"each question's contexts must be a list of documents (texts or [n, hidden] "
                                f"soft-token tensors), got one {type(docs).__name__}: wrap it in a list")
            for doc in docs:
                if isinstance(doc, torch.Tensor) and doc.dim() != 2:
                    raise ValueError(f"soft tokens must be [n, hidden] tensors, got shape {tuple(doc.shape)}")
        return questions, [list(c) for c in contexts]

    def __getstate__(self) -> dict:
        """For ``copy.deepcopy`` and pickling: the generation engine (its lock, threads and compiled steps) stays
        behind; the copy builds its own on its first generation."""
        state = self.__dict__.copy()
        state.pop("_generation_engine", None)
        return state


def target_counts(prompts: Sequence[Sequence[Segment]]) -> list[int]:
    """How many target tokens each prompt holds (its labelled answer or restored text)."""
    return [sum(len(seg) for seg in p if seg.is_target) for p in prompts]


def has_soft_tokens(prompts: Sequence[Sequence[Segment]]) -> bool:
    """Whether any prompt holds a soft-token span (then the decoder's KEFT adapter is on)."""
    return any(seg.embeds is not None for prompt in prompts for seg in prompt)


def length_groups(lengths: Sequence[int], tokens_per_pass: int) -> list[list[int]]:
    """Indices grouped for batched passes: sorted by length, each group padded to at most ``tokens_per_pass``
    (longest x count) positions, at least one item each."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] * (len(groups[-1]) + 1) <= tokens_per_pass:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def hidden_state_distance(student: torch.Tensor, teacher: torch.Tensor, per_layer: bool = False) -> torch.Tensor:
    """Mean 1 - cosine between matching hidden states ([layers, N, H] each; 0 for N = 0), or its [layers] means.
    Direction only: the scale of the states grows through the layers and the last ones come after the final norm."""
    if not student.shape[1]:
        zero = student.sum((1, 2)) * 0.0
        return zero if per_layer else zero.sum()
    distance = (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean(1)
    return distance if per_layer else distance.mean()


def group_means(states: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """[layers, N, H] states of consecutive groups of ``sizes`` positions -> [layers, len(sizes), H] fp32 means."""
    owner = to_device(torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)), states.device)
    sums = states.new_zeros(states.shape[0], len(sizes), states.shape[-1], dtype=torch.float32)
    sums.index_add_(1, owner, states.float())
    return sums / to_device(torch.tensor(sizes, dtype=torch.float32), states.device)[None, :, None]
