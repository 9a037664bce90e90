"""Configuration of a GMSA (or TCP-AE) compressor."""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any, Literal

Method = Literal["gmsa", "tcp"]
DecoderTuning = Literal["none", "qkv", "qkv_lora", "full"]


@dataclass
class GMSAConfig:
    """Everything that defines the architecture of a compressor on top of a base causal LM.

    The defaults suit SmolLM2-135M (30 layers); for 7B-class models the paper uses ~8 encoder layers.
    """

    base_model: str = "smollm2"
    """Hugging Face model id or local path of the base causal LM; ``"smollm2"`` is the offline default."""
    method: Method = "gmsa"
    """``gmsa``: group merging of all token states; ``tcp``: ICAE-style learnable memory tokens (baseline)."""
    encoder_layers: int = 8
    """k: the encoder is a copy of the base LM's first k layers (adapted with LoRA)."""
    lsa_layers: int = 1
    """L: Layer Semantic Alignment blocks, initialised as copies of the decoder's lowest L layers (0 = none)."""
    rates: tuple[int, ...] = (2, 4, 8, 16)
    """Compression rates the model is trained for; ``compress`` refuses any other."""
    window: int = 512
    """Encoder window in tokens; longer chunks are split into windows compressed one after another."""
    encoder_tokens_per_pass: int = 16384
    """Windows are run through the encoder in groups of similar length padded to at most this many positions
    (a performance setting: the soft tokens do not depend on it)."""
    encoder_prefix: str = "Document:\n"
    """Fixed text the encoder reads before every window. Its first token becomes the attention sink (a state of
    huge norm shared by every input); its states are dropped before group merging, so no soft token carries it.
    ``""`` reads the bare window (checkpoints of format 1)."""
    encoder_norm: bool = False
    """Apply (a frozen copy of) the base model's final norm to the encoder output, as the authors' code does.
    Off by default: on SmolLM2 the raw residual stream learned faster (benchmarks/results: stage-1 ablations)."""
    soft_token_norm: bool = False
    """End with an RMSNorm whose gain starts at the per-dimension RMS of the token embeddings, so soft tokens
    live on the scale of the decoder's input embeddings. Off by default: on SmolLM2 it stopped stage 1 from
    learning at all within the ablation budget (dev BLEU@2x 0.2 vs 18.5 without), see the stage-1 ablations."""
    soft_token_center: bool = False
    """Subtract a learned vector from every soft token, started at the mean soft token of the training data (see
    :meth:`GMSAModel.calibrate_soft_center`). On SmolLM2 that mean (the base model's massive activations) holds ~90%
    of a soft token's energy (RMS ~14 against 0.13 for token embeddings), and the decoder's layers barely change soft
    tokens; centring keeps everything that differs between them. Off by default: measured, it trains but restores and
    answers no better, and the encoder and LSA learn the shared vector back (benchmarks/results/h200-x4/
    stage1-same-article-and-centre.md, cpu-2core/soft-token-states-stage1-centre-23m.md)."""
    lora_rank: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    decoder_tuning: DecoderTuning = "none"
    """Which decoder parameters KEFT trains: none, full W_Q/W_K/W_V, LoRA on q/k/v, or ``full``: every decoder
    weight but the token embedding (shared with the encoder and tied to the LM head), as in the authors' code."""
    decoder_adapter: Literal["soft", "always"] = "soft"
    """When the decoder's LoRA adapter is on: ``soft``, only for prompts with soft tokens (plain-text prompts run
    on the pristine base model); ``always`` (the uncompressed fine-tuning baseline, trained on text)."""
    decoder_lora_rank: int = 16
    decoder_lora_alpha: float = 32
    decoder_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    decoder_mlp_lora_rank: int = 0
    """Rank of the soft-token adapter's LoRA on the decoder's MLP (gate/up/down projections) beside W_Q/W_K/W_V;
    0: attention only (the paper's KEFT targets). Attention LoRA can only change what a soft-token position is read
    as; MLP LoRA can also change what the decoder writes at it. Only with ``decoder_tuning="qkv_lora"``."""
    answer_cites: bool = False
    """Stage 2 trained the decoder to open each answer with the number of the document that holds it ("[3] Sun
    Tzu", ``--cite_document``): prompts then ask for it and generation strips it (:mod:`gmsa_rag.citation`)."""
    answer_quotes: bool = False
    """Stage 2 trained the decoder to quote the words that lead to the answer, then the answer in bold
    (``--quote_evidence``): prompts then ask for it and generation returns the bold answer
    (:mod:`gmsa_rag.evidence`)."""
    question_first: bool = False
    """Stage 2 trained on prompts that state the question before the documents as well as after them
    (``--question_first``): the decoder then reads each soft token knowing what is asked. Every QA prompt of the
    model follows it (:meth:`GMSAModel.qa_prompt`); the soft tokens and their cache do not change."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata (training command, data description, metrics) saved with checkpoints."""

    def __post_init__(self) -> None:
        self.rates = tuple(sorted(int(r) for r in self.rates))
        self.lora_targets = tuple(self.lora_targets)
        self.decoder_targets = tuple(self.decoder_targets)
        if self.method not in ("gmsa", "tcp"):
            raise ValueError(f"method must be 'gmsa' or 'tcp', got {self.method!r}")
        if self.decoder_tuning not in ("none", "qkv", "qkv_lora", "full"):
            raise ValueError(f"decoder_tuning must be none, qkv, qkv_lora or full, got {self.decoder_tuning!r}")
        if self.decoder_mlp_lora_rank < 0 or (self.decoder_mlp_lora_rank and self.decoder_tuning != "qkv_lora"):
            raise ValueError(f"decoder_mlp_lora_rank needs decoder_tuning='qkv_lora' and a rank >= 0, got "
                             f"{self.decoder_mlp_lora_rank} with {self.decoder_tuning!r}")
        if self.decoder_adapter not in ("soft", "always"):
            raise ValueError(f"decoder_adapter must be soft or always, got {self.decoder_adapter!r}")
        if not self.rates or any(r < 1 for r in self.rates):
            raise ValueError(f"rates must be positive integers, got {self.rates}")
        if self.encoder_layers < 1:
            raise ValueError("encoder_layers must be >= 1")
        if self.lsa_layers < 0:
            raise ValueError("lsa_layers must be >= 0")
        if self.window < max(self.rates):
            raise ValueError(f"window ({self.window}) must be at least the largest rate ({max(self.rates)})")

    def check_rate(self, rate: int) -> int:
        """Return ``rate`` if the model was configured for it, else raise a ValueError naming the allowed ones."""
        try:  # (numpy and 0-d tensor integers too)
            value = None if isinstance(rate, bool) else operator.index(rate)
        except TypeError:
            value = None
        if value not in self.rates:
            raise ValueError(f"compression rate {rate!r} is not allowed; this model supports {list(self.rates)}")
        return value

    def max_soft_tokens(self, rate: int) -> int:
        """Soft tokens one encoder window yields at ``rate``."""
        return -(-self.window // rate)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rates"] = list(self.rates)
        d["lora_targets"] = list(self.lora_targets)
        d["decoder_targets"] = list(self.decoder_targets)
        return d

    @property
    def architecture_key(self) -> str:
        """Everything besides weights that changes the soft tokens a chunk gets (part of the cache fingerprint)."""
        return (f"{self.method}|{self.encoder_layers}|{self.lsa_layers}|{self.window}|{self.encoder_prefix!r}|"
                f"{self.encoder_norm}|{self.soft_token_norm}" + ("|center" if self.soft_token_center else ""))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GMSAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown GMSAConfig fields: {sorted(unknown)}")
        return cls(**data)


LEGACY_FIELDS: dict[str, Any] = {"encoder_prefix": "", "encoder_norm": False, "soft_token_norm": False}
"""What checkpoints written before these options existed (format 1) were built with."""
