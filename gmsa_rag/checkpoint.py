"""GMSA checkpoints: the trained weights as sharded safetensors + a JSON record of config and base model.

Layout of a checkpoint directory::

    gmsa_config.json          GMSAConfig, base model name + weight fingerprint, compressor fingerprint, extra
    model.safetensors.index.json   tensor -> shard map and the sha256 of every shard
    model-00001-of-0000N.safetensors ...   shards under 15 MiB each (no pickle anywhere)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import LEGACY_FIELDS, GMSAConfig

if TYPE_CHECKING:
    from .model import GMSAModel

CONFIG_FILE = "gmsa_config.json"
INDEX_FILE = "model.safetensors.index.json"
SHARD_PATTERN = "model{suffix}.safetensors"
MAX_SHARD_BYTES = 14 * 1024 * 1024
FORMAT_VERSION = 2
"""2: encoder prefix, encoder norm and soft-token norm recorded in the config. 1 (no such fields) still loads."""
REPO_CHECKPOINTS = Path(__file__).resolve().parent.parent / "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupted, or belongs to another base model."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    model: "GMSAModel", path: str | Path, extra: dict[str, Any] | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Write ``model``'s trained weights (optionally cast to ``dtype``) and config to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().to("cpu", dtype=dtype or p.dtype).contiguous() for n, p in model.trained_parameters().items()}
    split = split_torch_state_dict_into_shards(state, filename_pattern=SHARD_PATTERN, max_shard_size=MAX_SHARD_BYTES)
    for old in path.glob("model*.safetensors"):
        old.unlink()
    shards = {}
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, path / filename, metadata={"format": "pt"})
        shards[filename] = _sha256(path / filename)
    index = {"weight_map": split.tensor_to_filename, "shards": shards}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True))
    record = {
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "base_model": model.config.base_model,
        "base_fingerprint": model.base_fingerprint,
        "fingerprint": model.fingerprint,
        "extra": extra or {},
    }
    (path / CONFIG_FILE).write_text(json.dumps(record, indent=1))
    return path


def read_record(path: str | Path) -> dict[str, Any]:
    """The JSON record of a checkpoint (config, base model, fingerprints, extra metadata)."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} is not a GMSA checkpoint (no {CONFIG_FILE})")
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from err
    version = record.get("format_version") if isinstance(record, dict) else None
    if version not in (1, FORMAT_VERSION):
        raise CheckpointError(f"{file}: unsupported checkpoint format {version!r} (this gmsa_rag reads 1 and "
                              f"{FORMAT_VERSION}); upgrade gmsa_rag to load it")
    for key, kind in (("config", dict), ("base_model", str), ("base_fingerprint", str)):
        if not isinstance(record.get(key), kind):
            raise CheckpointError(f"{file}: damaged record, {key!r} missing or not a {kind.__name__}")
    if version == 1:  # built before the prefix/norm options existed: rebuild it the way it was trained
        record["config"] = {**LEGACY_FIELDS, **record["config"]}
    if not isinstance(record["config"].get("rates", []), list):
        raise CheckpointError(f"{file}: damaged record, config 'rates' is not a list")
    try:
        GMSAConfig.from_dict(record["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: damaged record, its config does not build: {err}") from err
    return record


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, after checking every shard against its recorded sha256."""
    path = Path(path)
    try:
        index = json.loads((path / INDEX_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: missing or unreadable {INDEX_FILE}: {err}") from err
    state: dict[str, torch.Tensor] = {}
    for filename, expected in index["shards"].items():
        shard = path / filename
        if not shard.is_file():
            raise CheckpointError(f"{path}: shard {filename} is missing")
        if _sha256(shard) != expected:
            raise CheckpointError(f"{path}: shard {filename} is corrupted (checksum mismatch)")
        try:
            state.update(load_file(shard))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: shard {filename} is unreadable: {err}") from err
    if set(state) != set(index["weight_map"]):
        raise CheckpointError(f"{path}: shards do not hold the tensors the index lists")
    return state


def load_checkpoint(
    path: str | Path,
    base_model: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    decoder_tuning: str | None = None,
    decoder_lora_rank: int | None = None,
    soft_token_center: bool = False,
    decoder_mlp_lora_rank: int = 0,
    lora_rank: int | None = None,
    lsa_layers: int | None = None,
) -> "GMSAModel":
    """Rebuild a GMSAModel from a checkpoint; fails clearly if the base model's weights are not the recorded ones.

    ``soft_token_center`` adds a soft-token centre to a checkpoint without one; it starts at zero (the
    checkpoint's soft tokens unchanged) until :meth:`GMSAModel.calibrate_soft_center` sets it.

    ``decoder_tuning`` adds decoder parameters for KEFT on top of a stage-1 (AE) checkpoint; those start
    from the base model since the checkpoint has none. ``"full"`` on a checkpoint with a decoder LoRA adapter
    folds the adapter into the weights first. ``decoder_mlp_lora_rank`` adds LoRA on the decoder's MLP to a
    soft-token adapter without it (starting at zero: the loaded model answers as the checkpoint does).
    ``decoder_lora_rank`` above a soft-token adapter's rank widens its W_Q/W_K/W_V LoRA: the checkpoint's factors fill
    the first rows of A and columns of B, the new columns of B start at zero and alpha / r is kept, so the loaded model
    answers as the checkpoint does until it trains (a smaller rank keeps the checkpoint's).

    The compressor grows the same way: ``lora_rank`` above the checkpoint's widens the encoder LoRA (alpha / r kept),
    ``lsa_layers`` above its count appends LSA blocks copied from the base model's next layers with their attention
    and MLP output projections at zero, so each new block passes its input through unchanged; the soft tokens are the
    checkpoint's until the new capacity trains. Lower values keep the checkpoint's.
    """
    from .backbone import load_backbone
    from .model import DECODER_MLP_TARGETS, GMSAModel

    record = read_record(path)
    state = read_weights(path)
    config = GMSAConfig.from_dict(record["config"])
    if base_model is not None:
        config.base_model = base_model
    merge_adapter = decoder_tuning == "full" and config.decoder_tuning == "qkv_lora"  # the adapter folds into q/k/v
    new_decoder_params = decoder_tuning is not None and decoder_tuning != config.decoder_tuning and not merge_adapter
    if new_decoder_params:
        if config.decoder_tuning != "none":
            raise CheckpointError(f"{path} already tunes the decoder ({config.decoder_tuning}); cannot switch to {decoder_tuning}")
        config.decoder_tuning = decoder_tuning
        if decoder_lora_rank:
            config.decoder_lora_rank, config.decoder_lora_alpha = decoder_lora_rank, 2 * decoder_lora_rank
    widen = (not new_decoder_params and config.decoder_tuning == "qkv_lora" and decoder_lora_rank is not None
             and decoder_lora_rank > config.decoder_lora_rank)
    if widen:  # the same scale alpha / r on the wider adapter
        config.decoder_lora_alpha = config.decoder_lora_alpha * decoder_lora_rank / config.decoder_lora_rank
        config.decoder_lora_rank = decoder_lora_rank
    new_mlp = bool(decoder_mlp_lora_rank) and decoder_mlp_lora_rank != config.decoder_mlp_lora_rank
    if new_mlp:
        if config.decoder_mlp_lora_rank:
            raise CheckpointError(f"{path} already has a decoder MLP adapter of rank {config.decoder_mlp_lora_rank}; "
                                  f"cannot switch to rank {decoder_mlp_lora_rank}")
        if config.decoder_tuning != "qkv_lora":
            raise CheckpointError(f"{path}: a decoder MLP adapter needs decoder_tuning 'qkv_lora', "
                                  f"not {config.decoder_tuning!r}")
        config.decoder_mlp_lora_rank = decoder_mlp_lora_rank
    widen_encoder = lora_rank is not None and lora_rank > config.lora_rank
    if widen_encoder:
        config.lora_alpha = config.lora_alpha * lora_rank / config.lora_rank
        config.lora_rank = lora_rank
    grown_from = config.lsa_layers
    if lsa_layers is not None and lsa_layers > config.lsa_layers:
        if not config.lsa_layers:
            raise CheckpointError(f"{path} has no LSA blocks to grow (lsa_layers 0)")
        config.lsa_layers = lsa_layers
    new_center = soft_token_center and not config.soft_token_center
    if new_center:
        config.soft_token_center = True
    decoder, tokenizer = load_backbone(config.base_model, device=device, dtype=dtype)
    model = GMSAModel(decoder, tokenizer, config)
    partial = set(model.decoder_parameters()) if new_decoder_params else set()
    if new_mlp:
        partial |= {n for n in model.decoder_parameters() if any(f".{t}." in n for t in DECODER_MLP_TARGETS)}
    widened = ({n for n in model.decoder_parameters() if any(f".{t}.lora_" in n for t in config.decoder_targets)}
               if widen else set())
    if widen_encoder:
        widened |= {n for n in model.compressor_parameters() if n.startswith("encoder.") and ".lora_" in n}
    grown = grown_lsa_parameters(model, grown_from)
    model = attach_checkpoint(model, record, state, path,
                              partial=partial | set(grown) | ({"soft_center"} if new_center else set()), widened=widened)
    with torch.no_grad():  # a new block adds nothing to the residual stream until it trains
        for name, p in grown.items():
            if name.endswith((".o_proj.weight", ".down_proj.weight", ".o_proj.bias", ".down_proj.bias")):
                p.zero_()
    if merge_adapter:
        model.merge_decoder_adapter()
    return model


def grown_lsa_parameters(model: "GMSAModel", kept_layers: int) -> dict[str, torch.nn.Parameter]:
    """The parameters of the model's LSA blocks past the first ``kept_layers`` (those a grown checkpoint lacks)."""
    params = {n: p for n, p in model.compressor_parameters().items() if n.startswith("lsa.layers.")}
    grown = {n: p for n, p in params.items() if int(n.split(".")[2]) >= kept_layers}
    outputs = [n for n in grown if n.endswith((".o_proj.weight", ".down_proj.weight"))]
    if grown and len(outputs) != 2 * (model.config.lsa_layers - kept_layers):
        raise CheckpointError(f"cannot grow the LSA of a {model.config.base_model!r} model: its blocks have no "
                              f"o_proj / down_proj output projections to start at zero")
    return grown


def attach_checkpoint(
    model: "GMSAModel", record: dict[str, Any], state: dict[str, torch.Tensor], path: Any, partial: set[str] = frozenset(),
    widened: set[str] = frozenset(),
) -> "GMSAModel":
    """Check the base fingerprint, then copy the checkpoint's tensors into ``model`` (``partial``: may be absent;
    ``widened``: LoRA factors of a higher rank in the model, filled from the first rows of A / columns of B)."""
    if model.base_fingerprint != record["base_fingerprint"]:
        raise CheckpointError(
            f"checkpoint {path} was trained on base model {record['base_model']!r} "
            f"(weights {record['base_fingerprint'][:12]}), but the loaded base model {model.config.base_model!r} "
            f"has other weights ({model.base_fingerprint[:12]}); load it with the base model it was trained on"
        )
    params = model.trained_parameters()
    missing, unexpected = set(params) - set(state) - set(partial), set(state) - set(params)
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the model (missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]})")
    with torch.no_grad():
        for name, tensor in state.items():
            if name in widened:
                target = params[name][: tensor.shape[0]] if "lora_A" in name else params[name][:, : tensor.shape[1]]
                if "lora_B" in name:
                    params[name].zero_()  # the new columns: the wider adapter adds nothing until it trains
                if target.shape == tensor.shape:
                    target.copy_(tensor)
                    continue
            if params[name].shape != tensor.shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, model expects {tuple(params[name].shape)}")
            params[name].copy_(tensor)
    model.config.extra = record.get("extra", {})
    return model


def default_checkpoint(method: str = "gmsa") -> Path | None:
    """The best checkpoint bundled with the repository (``checkpoints/smollm2-<method>``), if any."""
    candidate = REPO_CHECKPOINTS / f"smollm2-{method}"
    return candidate if (candidate / CONFIG_FILE).is_file() else None
