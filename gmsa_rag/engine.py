"""Generation engine: greedy decoding of a left-padded batch of decoder input embeddings.

One interface (:class:`GenerationEngine`), two paths:

* ``static``: a transformers ``StaticCache`` (one per batch size and length bucket, kept and reused) filled by a
  prefill, then a one-token decode step. On CUDA the step is compiled with ``torch.compile(mode="reduce-overhead")``,
  which records it as CUDA graphs; elsewhere it runs eagerly. The prefill is one of :data:`PREFILL_MODES`: eagerly
  over the prompt's own length (the default), eagerly straight into the static cache, or left-padded to a multiple
  of positions and compiled with the step (see :class:`StaticCacheDecoder`).
  Greedy only: stop tokens per row, ``BaseStreamer`` streaming, no logits processors.
* ``hf``: Hugging Face ``generate`` (dynamic cache): everything else (sampling, beams, logits processors).

:func:`select_engine` chooses between them; ``GMSAModel.generate_from_segments`` decodes through
:func:`engine_for`, so ``GMSAModel.generate``, ``GMSALLM`` and ``gmsa-rag ask`` share this code.
"""
from __future__ import annotations

import collections
import inspect
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator, Literal, Sequence

import torch
from torch.profiler import record_function
from transformers import LogitsProcessorList

from .fused_projections import KeptFused

logger = logging.getLogger(__name__)

EngineChoice = Literal["auto", "hf", "static"]
EngineKind = Literal["hf", "static"]
ENGINE_CHOICES: tuple[str, ...] = ("auto", "hf", "static")
PrefillMode = Literal["prompt", "bucket", "graph"]
PREFILL_MODES: tuple[str, ...] = ("prompt", "bucket", "graph")

#: What ``auto`` picks on CPU: HF ``generate``, which decoded SmolLM2-135M ~2% faster than the eager static-cache
#: path on the project's 2-core machine (benchmarks/results/cpu-2core/decode-engine-choice.md).
CPU_ENGINE: EngineKind = "hf"

#: Smallest static-cache length; longer prompts round up to the next power of two (few buckets, few recompiles).
MIN_BUCKET = 256

#: The ``graph`` prefill's padding: prompts left-padded to a multiple of this many positions, one CUDA graph per
#: (batch size, padded length, cache bucket), at most this many - 1 masked positions of extra prefill work.
PREFILL_MULTIPLE = 64

# Generation kwargs the static path honours (or that change nothing in greedy decoding); anything else -> HF.
_IGNORED_IN_GREEDY = ("temperature", "top_p", "top_k", "typical_p", "min_p")


def prepare_cudagraph_thread() -> None:
    """Give the calling thread the CUDA-graph-tree registry of torch.compile's ``reduce-overhead`` mode. Torch
    releases without ``cudagraph_trees._initialize_tls`` set it up only in the thread that imported the module (and
    in autograd's threads), so a graph recorded from any other thread failed with a bare ``AssertionError`` in
    ``get_obj``; newer releases set it up on first use, and this then does nothing."""
    from collections import defaultdict

    from torch._inductor import cudagraph_trees as trees

    key = "tree_manager_containers"
    if hasattr(trees.local, key) or torch._C._is_key_in_tls(key):
        return
    if hasattr(trees, "_initialize_tls"):
        trees._initialize_tls(trees.local)
        return
    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls(key, trees.local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", trees.local.tree_manager_locks)


def allow_recompiles(at_least: int) -> None:
    """Let torch.compile keep at least this many graphs per compiled function (past its limit, 8 by default, it
    silently runs the function eagerly)."""
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):  # (names across versions)
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), at_least))


def compile_settings(mode: str, tune_kernels: bool = False) -> dict[str, Any]:
    """``torch.compile`` keyword arguments: ``mode``, or with ``tune_kernels`` that mode's inductor options plus
    inductor's kernel tuning: each matrix multiply's kernel chosen by timing (``max_autotune``) and the generated
    kernels tuned by coordinate descent, as ``max-autotune`` mode does (torch.compile takes a mode or options, not
    both)."""
    if not tune_kernels:
        return {"mode": mode}
    from torch._inductor import list_mode_options

    return {"options": {**list_mode_options(mode), "max_autotune": True, "coordinate_descent_tuning": True}}


def select_engine(device: torch.device | str, choice: str = "auto") -> EngineKind:
    """The decoding path for a decoder on ``device``: ``choice`` itself, or for ``auto`` the static path on CUDA,
    :data:`CPU_ENGINE` on CPU and HF ``generate`` elsewhere."""
    if choice not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {ENGINE_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice  # type: ignore[return-value]
    kind = torch.device(device).type
    if kind == "cuda":
        return "static"
    return CPU_ENGINE if kind == "cpu" else "hf"


def should_fuse_projections(device: torch.device | str, request: bool | None = None) -> bool:
    """Whether generation on ``device`` fuses the decoder's sibling projections: ``request`` itself, or for ``None``
    on CUDA only. There the static step decoded 15% faster fused (LLaMA-2-7B shape, one H200: 5.40 -> 4.60
    ms/token; benchmarks/results/h200/decode-7b-r23-compare.md) and fusing holds no second copy of the weights; on
    the 2-core CPU it changed nothing (benchmarks/results/cpu-2core/decode-fused.md), so the CPU path stays plain."""
    if request is not None:
        return bool(request)
    return torch.device(device).type == "cuda"


def is_greedy(generate_kwargs: dict[str, Any]) -> bool:
    """Whether ``generate_kwargs`` ask for greedy decoding, all the static path does: plain, or over scores that
    ``logits_processor`` reshapes (such as extractive answers' spans)."""
    for key, value in generate_kwargs.items():
        if key in _IGNORED_IN_GREEDY or key == "logits_processor" or (key == "do_sample" and not value):
            continue
        if (key == "num_beams" and value in (None, 1)) or (key == "use_cache" and value in (None, True)):
            continue
        return False
    return True


def cache_bucket(positions: int, minimum: int = MIN_BUCKET) -> int:
    """Static cache length for ``positions`` positions: the next power of two, at least ``minimum``."""
    size = max(int(minimum), 1)
    while size < positions:
        size *= 2
    return size


class _HostReader:
    """Device-to-host copies of each step's tokens and "all rows finished" flag.

    On CUDA a step is read one step late, so the host never waits for the step it has just queued (the flag of
    step i is read while step i+1 runs); elsewhere at once.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: collections.deque = collections.deque()

    def push(self, step: int, tokens: torch.Tensor, finished: torch.Tensor) -> None:
        if self.cuda:
            host = torch.empty(tokens.shape[0] + 1, dtype=torch.long, pin_memory=True)
            host[:-1].copy_(tokens, non_blocking=True)
            host[-1:].copy_(finished.view(1).long(), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((step, host, event))
        else:
            self.pending.append((step, torch.cat([tokens, finished.view(1).long()]), None))

    def ready(self, drain: bool = False) -> Iterator[tuple[int, torch.Tensor, bool]]:
        """(step, host tokens [B], all finished) of each step whose copy may be read now (all, if ``drain``)."""
        lag = 0 if drain or not self.cuda else 1
        while len(self.pending) > lag:
            step, host, event = self.pending.popleft()
            if event is not None:
                event.synchronize()
            yield step, host[:-1], bool(host[-1])


def cache_keyword(decoder: torch.nn.Module) -> str:
    """The keyword a decoder's forward takes its KV cache by (``past_key_values`` renamed ``cache`` in transformers
    5.x)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class StaticCacheDecoder:
    """Greedy decoding with a static KV cache; the one-token step optionally compiled (CUDA graphs on CUDA).

    Args:
        decoder: a Hugging Face causal LM whose architecture supports ``StaticCache``.
        compile_step: compile the decode step with ``torch.compile(mode=mode)``.
        mode: ``torch.compile`` mode; ``reduce-overhead`` records CUDA graphs.
        min_bucket: smallest cache length (see :func:`cache_bucket`).
        max_caches: static caches kept (least recently used dropped first).
        prefill: how the prompt fills the cache. ``prompt``: eagerly over the prompt's own length, its keys and
            values then copied in (fused causal attention over the prompt only; models with sliding-window layers
            use ``bucket``). ``bucket``: eagerly straight into the static cache, attending over the whole bucket
            through an explicit mask. ``graph``: the prompt left-padded to a multiple of ``prefill_multiple``
            positions, then as ``bucket`` but compiled with the step (a CUDA graph per shape: no per-layer launch
            overhead, most of a short prompt's prefill on a large model). Measured on one H200, 7B-shaped decoder
            (benchmarks/results/h200/latency-7b-prefill-graph.md): a 695-position GMSA prompt's TTFT 21.3 ms with
            ``graph`` against 45.9 ms with ``prompt`` (an earlier H200 run); a 4,294-position text prompt 157.4 ms
            against 137.6 ms for HF's eager prefill in the same run (the whole-bucket mask costs more than the launch
            overhead saves). ``graph`` compiles once per (batch size, padded length, bucket): worth it where prompt
            shapes repeat; ``prompt`` stays the default.
        prefill_multiple: the ``graph`` prefill's padding multiple.
        tune_kernels: with ``compile_step``, let torch.compile tune the kernels it compiles for their shapes
            (:func:`compile_settings`: each matrix multiply's kernel picked by timing, the generated kernels tuned by
            coordinate descent; for these compiles only). Measured on one H200, 7B-shaped decoder, 704-position prompt
            (benchmarks/results/h200/decode-7b-*.md): decode 4.45 ms/token against 5.18 on the same machine (1.60x
            the weight-read limit against 1.86x), the first call 109 s against 44 s (with ``max_autotune`` set
            process-wide and coordinate descent through this option). Coordinate descent alone: 4.73-4.79 against
            5.05. Off by default: worth it for a server, not for a one-question command.
    """

    def __init__(self, decoder: Any, compile_step: bool = False, mode: str = "reduce-overhead",
                 min_bucket: int = MIN_BUCKET, max_caches: int = 4, prefill: str = "prompt",
                 prefill_multiple: int = PREFILL_MULTIPLE, tune_kernels: bool = False) -> None:
        if prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {PREFILL_MODES}, got {prefill!r}")
        if prefill_multiple < 1:
            raise ValueError(f"prefill_multiple must be >= 1, got {prefill_multiple}")
        self.decoder = decoder
        self.min_bucket = min_bucket
        self.max_caches = max_caches
        self.prefill_multiple = prefill_multiple
        self.compiled = compile_step
        self._caches: collections.OrderedDict = collections.OrderedDict()
        self._cache_arg = cache_keyword(decoder)
        layer_types = getattr(decoder.config.get_text_config(decoder=True), "layer_types", None) or ()
        if prefill == "prompt" and not all(kind == "full_attention" for kind in layer_types):
            prefill = "bucket"  # copying a prompt's keys and values in assumes every layer keeps all positions
        self.prefill: PrefillMode = prefill  # type: ignore[assignment]
        self.tune_kernels = tune_kernels
        if compile_step:
            allow_recompiles(256)  # every (batch size, bucket) compiles once; keep them all
            how = compile_settings(mode, tune_kernels)
            self.step = torch.compile(self._step, dynamic=False, **how)
            self.step_scores = torch.compile(self._step_scores, dynamic=False, **how)  # compiled on first use
            self.prefill_step = (torch.compile(self._prefill_direct, dynamic=False, **how)
                                 if prefill == "graph" else self._prefill_direct)
        else:
            self.step = self._step
            self.step_scores = self._step_scores
            self.prefill_step = self._prefill_direct

    def _step(self, token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        return self._step_scores(token, position, mask, cache).argmax(-1)

    def _step_scores(self, token: torch.Tensor, position: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        """The next-token logits [B, V] of one decode step (for logits processors; :meth:`_step` keeps argmax inside
        the compiled graph)."""
        out = self.decoder(input_ids=token, position_ids=position, attention_mask=mask, use_cache=True,
                           **{self._cache_arg: cache})
        return out.logits[:, -1]

    def _cache_for(self, batch: int, positions: int, dtype: torch.dtype, device: torch.device) -> tuple[Any, torch.Tensor]:
        """A reset static cache of at least ``positions`` positions and its [batch, size] attention-mask buffer."""
        from transformers import StaticCache

        size = cache_bucket(positions, self.min_bucket)
        key = (batch, size, dtype, device)
        if key in self._caches:
            self._caches.move_to_end(key)
            cache, mask = self._caches[key]
            cache.reset()
        else:
            config = self.decoder.config.get_text_config(decoder=True)
            cache = StaticCache(config=config, max_cache_len=size)
            if self.prefill == "graph":  # the compiled prefill may be the first to fill it
                _allocate(cache, config, batch, dtype, device)
            mask = torch.ones(batch, size, dtype=torch.bool, device=device)
            if self.compiled:
                torch._dynamo.mark_static_address(mask)  # updated in place, never copied into the graph
            self._caches[key] = (cache, mask)
            while len(self._caches) > self.max_caches:
                self._caches.popitem(last=False)
        return cache, mask

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 stop_token_ids: Sequence[int] = (), pad_token_id: int | None = None,
                 streamer: Any = None, logits_processor: Any = None) -> torch.Tensor:
        """New token ids [B, n] (n <= ``max_new_tokens``), rows padded with ``pad_token_id`` after their stop token;
        the same as Hugging Face greedy ``generate`` with ``eos_token_id=stop_token_ids``. ``logits_processor``
        (Hugging Face's interface: the new ids so far and float32 scores) reshapes each step's scores before argmax,
        as in ``generate``; the step then returns its logits and the host applies it, one step at a time."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if self.prefill == "graph":
            inputs_embeds, attention_mask = left_pad(inputs_embeds, attention_mask, self.prefill_multiple)
        batch, length, _ = inputs_embeds.shape
        device = inputs_embeds.device
        cache, mask = self._cache_for(batch, length + max_new_tokens, inputs_embeds.dtype, device)
        prompt_mask = attention_mask.to(device=device, dtype=torch.bool)
        mask[:, :length] = prompt_mask
        mask[:, length:] = True  # later positions: the causal mask keeps each step from seeing beyond itself
        # Position ids as Hugging Face generate makes them for left padding: count real tokens only.
        positions = (prompt_mask.long().cumsum(-1) - 1).masked_fill(~prompt_mask, 0)
        next_position = positions[:, -1:] + 1
        stop = torch.tensor(list(stop_token_ids), dtype=torch.long, device=device) if stop_token_ids else None
        pad = pad_token_id if pad_token_id is not None else (int(stop_token_ids[0]) if stop_token_ids else 0)
        reader = _HostReader(device) if (streamer is not None or stop is not None) else None
        if streamer is not None:
            streamer.put(torch.empty(batch, 0, dtype=torch.long))  # generate() puts the (empty) prompt ids first

        processor = LogitsProcessorList(logits_processor) if logits_processor else None  # (empty: plain greedy)
        tokens: list[torch.Tensor] = []

        def choose(scores: torch.Tensor) -> torch.Tensor:  # the processed scores' argmax, as generate() takes it
            ids = torch.stack(tokens, dim=1) if tokens else torch.empty(batch, 0, dtype=torch.long, device=device)
            return processor(ids, scores.float()).argmax(-1)

        with record_function("gmsa.prefill"):
            token = self._prefill(inputs_embeds, prompt_mask, positions, cache, mask, scores=processor is not None)
        if processor is not None:
            token = choose(token)
        step_fn = self.step if processor is None else self.step_scores  # argmax in the graph, or logits out
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        kept = None  # steps kept, once every row has stopped
        for step in range(max_new_tokens):
            if step > 0:
                with record_function("gmsa.decode_step"):
                    if self.compiled:
                        torch.compiler.cudagraph_mark_step_begin()
                    token = step_fn(token[:, None], next_position + (step - 1), mask, cache).clone()
                if processor is not None:
                    token = choose(token)
            if stop is not None:
                token = torch.where(unfinished, token, pad)
                unfinished = unfinished & ~torch.isin(token, stop)
            tokens.append(token)
            if reader is not None:
                reader.push(step, token, ~unfinished.any())
                kept = self._read(reader, streamer, drain=False)
                if kept is not None:
                    break
        if reader is not None and kept is None:
            kept = self._read(reader, streamer, drain=True)
        if streamer is not None:
            streamer.end()
        return torch.stack(tokens[:kept] if kept is not None else tokens, dim=1)

    def _prefill(self, inputs_embeds: torch.Tensor, prompt_mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                 bucket_mask: torch.Tensor, scores: bool = False) -> torch.Tensor:
        """The first new token, or with ``scores`` its logits [B, V]. ``prompt``: the prompt runs over its own length
        with a dynamic cache (a causal mask of [length, length], SDPA's fused kernels when no row is padded) and its
        keys and values are then copied into the static cache; on the 2-core CPU 2,100 positions in a 4,096 bucket
        took 0.50 s against 0.92 s straight into the cache. ``bucket`` / ``graph``: straight into the static cache,
        attending over the whole bucket through an explicit [length, bucket] mask (twice the attention work at 4k
        tokens in an 8k bucket, no fused kernel), in one static shape that a CUDA graph can replay (``graph``; with
        ``scores``, eagerly)."""
        if self.prefill != "prompt":
            if scores:
                return self._prefill_scores(inputs_embeds, bucket_mask, positions, cache)
            if self.prefill == "graph" and self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            return self.prefill_step(inputs_embeds, bucket_mask, positions, cache).clone()
        from transformers import DynamicCache

        prompt_cache = DynamicCache()
        logits = self.decoder(inputs_embeds=inputs_embeds, attention_mask=prompt_mask, position_ids=positions,
                              use_cache=True, logits_to_keep=1, **{self._cache_arg: prompt_cache}).logits
        where = {"cache_position": torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)}
        for index, layer in enumerate(prompt_cache.layers):
            cache.update(layer.keys, layer.values, index, where)
        return logits[:, -1] if scores else logits[:, -1].argmax(-1)

    def _prefill_direct(self, inputs_embeds: torch.Tensor, bucket_mask: torch.Tensor, positions: torch.Tensor,
                        cache: Any) -> torch.Tensor:
        """The first new token from a prefill straight into the static cache, attending over its whole bucket."""
        return self._prefill_scores(inputs_embeds, bucket_mask, positions, cache).argmax(-1)

    def _prefill_scores(self, inputs_embeds: torch.Tensor, bucket_mask: torch.Tensor, positions: torch.Tensor,
                        cache: Any) -> torch.Tensor:
        """The first new token's logits [B, V] from a prefill straight into the static cache."""
        logits = self.decoder(inputs_embeds=inputs_embeds, attention_mask=bucket_mask, position_ids=positions,
                              use_cache=True, logits_to_keep=1, **{self._cache_arg: cache}).logits
        return logits[:, -1]

    @staticmethod
    def _read(reader: _HostReader, streamer: Any, drain: bool) -> int | None:
        """Stream the steps that are ready; the number of steps to keep once all rows have stopped, else None."""
        for step, host_tokens, finished in reader.ready(drain):
            if streamer is not None:
                streamer.put(host_tokens)
            if finished:
                return step + 1
        return None


def _allocate(cache: Any, config: Any, batch: int, dtype: torch.dtype, device: torch.device) -> None:
    """Allocate a new static cache's tensors now, eagerly, through one update and a reset. transformers allocates
    them (and marks their addresses static) on the first update; inside a recorded CUDA graph that would make them
    graph-owned memory, which the next graph replay overwrites."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    states = torch.zeros(batch, heads, 1, head_dim, dtype=dtype, device=device)
    where = {"cache_position": torch.zeros(1, dtype=torch.long, device=device)}
    for index in range(len(cache.layers)):
        cache.update(states, states, index, where)
    cache.reset()


def left_pad(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch padded further on the left (zero embeddings, masked) to a multiple of ``multiple``
    positions. Masked positions change no real position's output, so greedy decoding is unchanged."""
    length = inputs_embeds.shape[1]
    extra = -length % multiple
    if not extra:
        return inputs_embeds, attention_mask
    batch, _, hidden = inputs_embeds.shape
    pad = inputs_embeds.new_zeros(batch, extra, hidden)
    return (torch.cat([pad, inputs_embeds], dim=1),
            torch.cat([attention_mask.new_zeros(batch, extra), attention_mask], dim=1))


class GenerationEngine:
    """Decodes for a decoder through the path :func:`select_engine` picks for its device.

    The static path is used for greedy requests (:func:`is_greedy`, logits processors included); others fall back
    to Hugging Face ``generate``.
    On CUDA with compilation, every call runs on one engine-owned thread: CUDA-graph trees belong to the thread
    that recorded them, and callers such as ``GMSALLM.stream_complete`` decode from a new thread each time.
    With ``fuse_projections`` every call first makes sure the decoder's sibling projections are fused in place
    (:class:`gmsa_rag.fused_projections.KeptFused`: W_Q/W_K/W_V and gate/up stored once, one matrix multiply each;
    the same outputs), on either path. ``None`` (the default): on CUDA only (:func:`should_fuse_projections`: 15% off the
    decode step on an H200; on the 2-core CPU no change, a memory-bound step reads the same bytes).

    Attributes:
        kind: ``static`` or ``hf``, the path greedy requests take.
        last_path: the path the latest call took.
    """

    def __init__(self, decoder: Any, choice: str = "auto", compile_step: bool | None = None,
                 min_bucket: int = MIN_BUCKET, prefill: str = "prompt", tune_kernels: bool = False,
                 fuse_projections: bool | None = None) -> None:
        self.decoder = decoder
        self.device = torch.device(decoder.device)
        self.fuse_request = fuse_projections
        self.fuse_projections = should_fuse_projections(self.device, fuse_projections)
        self._fused = KeptFused(decoder) if self.fuse_projections else None
        self.compile_request = compile_step
        self.choice = choice
        self.kind: EngineKind = select_engine(self.device, choice)
        if choice == "auto" and self.kind == "static" and not getattr(decoder, "_can_compile_fullgraph", False):
            self.kind = "hf"  # an architecture transformers does not mark as compilable with a static cache
        self.last_path: EngineKind | None = None
        self.static: StaticCacheDecoder | None = None
        self._executor: ThreadPoolExecutor | None = None
        if self.kind == "static":
            if compile_step is None:
                compile_step = self.device.type == "cuda" and _has_triton()
                if self.device.type == "cuda" and not compile_step:
                    logger.warning("triton is missing: the static decode step runs eagerly, without CUDA graphs")
            self.static = StaticCacheDecoder(decoder, compile_step=compile_step, min_bucket=min_bucket,
                                             prefill=prefill, tune_kernels=tune_kernels)
            if compile_step and self.device.type == "cuda":
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="gmsa-decode",
                                                    initializer=prepare_cudagraph_thread)
        self.prefill = prefill
        self.tune_kernels = tune_kernels
        self._lock = threading.Lock()

    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 stop_token_ids: Sequence[int] | int | None = (), pad_token_id: int | None = None,
                 streamer: Any = None, **generate_kwargs: Any) -> torch.Tensor:
        """New token ids [B, n] for a left-padded batch; rows that stopped early are padded with ``pad_token_id``.

        ``stop_token_ids`` end a row (kept in its output); empty: exactly ``max_new_tokens`` tokens. ``streamer``
        gets Hugging Face's calls: ``put`` of the (empty) prompt ids, then of each step's tokens, then ``end``.
        """
        if self._fused is not None:
            self._fused.ensure()  # (again, where a move or a merge undid it; otherwise a quick check)
        if isinstance(stop_token_ids, int):
            stop_token_ids = [stop_token_ids]
        stop = [int(t) for t in (stop_token_ids or ())]
        if self.static is None or not is_greedy(generate_kwargs):
            self.last_path = "hf"
            return self._hf(inputs_embeds, attention_mask, max_new_tokens, stop, pad_token_id, streamer,
                            **generate_kwargs)
        self.last_path = "static"
        call = (self.static.generate, inputs_embeds, attention_mask, max_new_tokens, stop, pad_token_id, streamer,
                generate_kwargs.get("logits_processor"))
        with self._lock:
            if self._executor is None:
                return call[0](*call[1:])
            return self._executor.submit(*call).result()

    @torch.no_grad()
    def _hf(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
            stop: list[int], pad_token_id: int | None, streamer: Any, **generate_kwargs: Any) -> torch.Tensor:
        """Hugging Face ``generate`` (greedy unless sampling kwargs say otherwise); returns the new ids only."""
        generate_kwargs.setdefault("do_sample", False)
        if not generate_kwargs["do_sample"]:
            for key in ("temperature", "top_p", "top_k"):
                generate_kwargs.setdefault(key, None)
        with record_function("gmsa.hf_generate"):
            return self.decoder.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                         max_new_tokens=max_new_tokens, eos_token_id=stop or None,
                                         pad_token_id=pad_token_id, streamer=streamer, **generate_kwargs)

    def matches(self, decoder: Any, choice: str, prefill: str = "prompt", tune_kernels: bool = False,
                fuse_projections: bool | None = None, compile_step: bool | None = None) -> bool:
        """Whether this engine serves ``decoder`` as it is now (same object and device) with ``choice``, ``prefill``,
        ``tune_kernels``, ``fuse_projections`` and ``compile_step``."""
        return (decoder is self.decoder and choice == self.choice and prefill == self.prefill
                and tune_kernels == self.tune_kernels and fuse_projections == self.fuse_request
                and compile_step == self.compile_request and torch.device(decoder.device) == self.device)


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton

        return bool(has_triton())
    except Exception:  # pragma: no cover - very old torch
        return False


def engine_for(model: Any) -> GenerationEngine:
    """The engine of a ``GMSAModel`` for its ``generation_engine`` choice, ``generation_prefill`` mode,
    ``generation_compile``, ``generation_tune_kernels`` and ``generation_fuse_projections`` settings, built once and
    kept on the model (its static caches and compiled step are reused), rebuilt when one of them or the decoder's
    device changes."""
    choice = getattr(model, "generation_engine", "auto")
    prefill = getattr(model, "generation_prefill", "prompt")
    tune = bool(getattr(model, "generation_tune_kernels", False))
    fuse = getattr(model, "generation_fuse_projections", None)
    compile_step = getattr(model, "generation_compile", None)
    engine = model.__dict__.get("_generation_engine")
    if engine is None or not engine.matches(model.decoder, choice, prefill, tune, fuse, compile_step):
        engine = GenerationEngine(model.decoder, choice, compile_step=compile_step, prefill=prefill, tune_kernels=tune,
                                  fuse_projections=fuse)
        model.__dict__["_generation_engine"] = engine
    return engine
