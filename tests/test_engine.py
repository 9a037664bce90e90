"""The generation engine (static KV cache vs Hugging Face generate) and the batched prompt assembly, on CPU."""
from __future__ import annotations

import pytest
import torch
from transformers import TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from gmsa_rag import engine as eng
from gmsa_rag.engine import GenerationEngine, StaticCacheDecoder, cache_bucket, engine_for, is_greedy, select_engine
from gmsa_rag.prompt import DecoderBatch, Segment, assemble, qa_segments
from gmsa_rag.testing import SAMPLE_TEXT, lively, tiny_gmsa


class Recorder(BaseStreamer):
    """Keeps every put() and whether end() came."""

    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ended += 1


@pytest.fixture(scope="module")
def model(tokenizer):
    return lively(tiny_gmsa(tokenizer))


@pytest.fixture(scope="module")
def batch(model, tokenizer) -> DecoderBatch:
    """Three prompts of different lengths (so the shorter ones are left-padded): soft tokens and text."""
    soft = model.compress([SAMPLE_TEXT, "Paris is the capital of France."], 4)
    prompts = [
        qa_segments(tokenizer, "Who designed the tower?", soft),
        qa_segments(tokenizer, "Where?", soft[1:]),
        qa_segments(tokenizer, "What is the capital of France, and what river flows through it?", ["Paris."]),
    ]
    batch = model.build_batch(prompts, padding_side="left")
    lengths = batch.attention_mask.sum(1)
    assert len(set(lengths.tolist())) == 3  # really different lengths: left padding in two rows
    free = GenerationEngine(model.decoder, "hf").generate(batch.inputs_embeds, batch.attention_mask, 12)
    assert len(set(free.flatten().tolist())) > 20  # varied tokens
    return batch


def hf(model, batch, n, stop=(), streamer=None):
    return GenerationEngine(model.decoder, "hf").generate(batch.inputs_embeds, batch.attention_mask, n,
                                                          stop_token_ids=stop, pad_token_id=0, streamer=streamer)


def static(model, batch, n, stop=(), streamer=None, decoder=None):
    decoder = decoder or StaticCacheDecoder(model.decoder, min_bucket=16)
    return decoder.generate(batch.inputs_embeds, batch.attention_mask, n, stop_token_ids=stop, pad_token_id=0,
                            streamer=streamer)


def test_static_cache_greedy_equals_hf_generate_with_left_padding(model, batch):
    expected = hf(model, batch, 12)
    assert expected.shape == (3, 12)
    decoder = StaticCacheDecoder(model.decoder, min_bucket=16)  # 16 < prompt + 12: a bucket above the minimum
    assert torch.equal(static(model, batch, 12, decoder=decoder), expected)
    assert torch.equal(static(model, batch, 12, decoder=decoder), expected)  # the reused cache is reset
    one = DecoderBatch(batch.inputs_embeds[2:], batch.attention_mask[2:], batch.labels[2:])
    assert torch.equal(static(model, one, 12, decoder=decoder), expected[2:])  # another batch size: own cache
    assert len(decoder._caches) == 2


@pytest.mark.parametrize("prefill,multiple", [("bucket", 1), ("graph", 16), ("graph", 7)])
def test_every_prefill_mode_equals_hf_generate(model, batch, prefill, multiple):
    """Straight into the static cache, and (the compiled path's prefill, run eagerly here) left-padded further to a
    multiple of positions: HF's greedy tokens, with and without stop tokens."""
    decoder = StaticCacheDecoder(model.decoder, min_bucket=16, prefill=prefill, prefill_multiple=multiple)
    assert prefill == "bucket" or batch.inputs_embeds.shape[1] % multiple  # really padded further
    assert torch.equal(static(model, batch, 12, decoder=decoder), hf(model, batch, 12))
    stop = [int(hf(model, batch, 12)[0, 3])]
    assert torch.equal(static(model, batch, 12, stop=stop, decoder=decoder), hf(model, batch, 12, stop=stop))
    if prefill == "bucket":
        return
    embeds, mask = eng.left_pad(batch.inputs_embeds, batch.attention_mask, multiple)
    extra = embeds.shape[1] - batch.inputs_embeds.shape[1]
    assert embeds.shape[1] % multiple == 0 and 0 < extra < multiple
    assert not mask[:, :extra].any() and not embeds[:, :extra].any() and torch.equal(mask[:, extra:], batch.attention_mask)


def test_with_a_padded_prefill_a_new_static_cache_is_allocated_before_it(model):
    """Its tensors exist (zeroed, nothing cached) before the first prefill, which may then run inside a CUDA graph."""
    decoder = StaticCacheDecoder(model.decoder, min_bucket=16, prefill="graph", prefill_multiple=8)
    cache, _ = decoder._cache_for(2, 20, torch.float32, torch.device("cpu"))
    assert all(layer.is_initialized and layer.keys.shape[0] == 2 and not layer.keys.any() for layer in cache.layers)
    assert cache.get_seq_length() == 0
    assert GenerationEngine(model.decoder, "static").static.prefill == "prompt"  # the default
    with pytest.raises(ValueError, match="prefill must be one of"):
        StaticCacheDecoder(model.decoder, prefill="padded")
    with pytest.raises(ValueError, match="prefill_multiple must be >= 1"):
        StaticCacheDecoder(model.decoder, prefill="graph", prefill_multiple=0)


def test_stop_tokens_end_each_row_as_hf_does(model, batch):
    free = hf(model, batch, 12)
    # stop on row 0's third token: row 0 ends there, rows where it never comes run to the end (padded rows of
    # finished sequences, as HF pads them)
    stop_token = int(free[0, 2])
    others = int(free[1, 5])
    expected = hf(model, batch, 12, stop=[stop_token, 7])
    got = static(model, batch, 12, stop=[stop_token, 7])
    assert torch.equal(got, expected)
    assert got[0, 2] == stop_token and (got[0, 3:] == 0).all()
    # all rows stop: generation ends at the last row's stop token, before max_new_tokens
    first_stop = [int(free[b, 1]) for b in range(3)]
    expected = hf(model, batch, 12, stop=first_stop + [others])
    got = static(model, batch, 12, stop=first_stop + [others])
    assert torch.equal(got, expected) and got.shape[1] < 12


def test_streaming_puts_what_hf_puts(model, batch):
    one = DecoderBatch(batch.inputs_embeds[:1], batch.attention_mask[:1], batch.labels[:1])
    stop = [int(hf(model, one, 8)[0, 4])]
    a, b = Recorder(), Recorder()
    out_hf = hf(model, one, 8, stop=stop, streamer=a)
    out_static = static(model, one, 8, stop=stop, streamer=b)
    assert torch.equal(out_hf, out_static)
    assert len(a.puts) == len(b.puts) == 1 + out_hf.shape[1] and a.ended == b.ended == 1
    for x, y in zip(a.puts, b.puts):
        assert x.shape == y.shape and torch.equal(x, y)


def test_streamed_text_is_the_same(model, tokenizer, batch):
    one = DecoderBatch(batch.inputs_embeds[:1], batch.attention_mask[:1], batch.labels[:1])
    texts = []
    for run in (hf, static):
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        run(model, one, 10, streamer=streamer)
        texts.append("".join(streamer))
    assert texts[0] == texts[1] and texts[0]


def test_selection_by_device():
    # GMSALLM and `gmsa-rag ask --device cuda` decode through GMSAModel.generate_from_segments -> engine_for,
    # which picks select_engine(<decoder's device>, model.generation_engine): the fast path on any CUDA device.
    for device in ("cuda", "cuda:0", "cuda:3", torch.device("cuda", 1)):
        assert select_engine(device) == "static"
    assert select_engine("cpu") == eng.CPU_ENGINE
    assert select_engine("mps") == "hf"
    assert select_engine("cuda", "hf") == "hf" and select_engine("cpu", "static") == "static"
    with pytest.raises(ValueError, match="engine"):
        select_engine("cpu", "fast")


def test_auto_on_cuda_needs_a_compilable_architecture(model, monkeypatch):
    class OnCuda:
        """The tiny decoder as GenerationEngine sees it on a GPU (only device and forward are read)."""

        device = torch.device("cuda", 0)
        config = model.decoder.config
        forward = model.decoder.forward

    monkeypatch.setattr(eng, "_has_triton", lambda: False)  # no compilation needed to check the choice
    assert type(model.decoder)._can_compile_fullgraph
    OnCuda._can_compile_fullgraph = True
    assert GenerationEngine(OnCuda(), "auto").kind == "static"
    OnCuda._can_compile_fullgraph = False
    assert GenerationEngine(OnCuda(), "auto").kind == "hf"
    assert GenerationEngine(OnCuda(), "static").kind == "static"  # asked for: no second-guessing


class Chained:
    """A logits processor that reads the ids so far: the next token t must have (t + previous token) % 7 == 0."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(input_ids.shape))
        assert scores.dtype == torch.float32
        previous = input_ids[:, -1:] if input_ids.shape[1] else torch.zeros_like(scores[:, :1], dtype=torch.long)
        allowed = (torch.arange(scores.shape[1], device=scores.device)[None] + previous) % 7 == 0
        return scores.masked_fill(~allowed, float("-inf"))


@pytest.mark.parametrize("prefill", ["prompt", "bucket"])
def test_static_greedy_through_a_logits_processor_equals_hf_generate(model, batch, prefill):
    expected = GenerationEngine(model.decoder, "hf").generate(batch.inputs_embeds, batch.attention_mask, 10,
                                                              pad_token_id=0, logits_processor=[Chained()])
    assert not torch.equal(expected, hf(model, batch, 10))  # the processor changes the answers
    assert ((expected[:, 1:] + expected[:, :-1]) % 7 == 0).all()
    engine = GenerationEngine(model.decoder, "static", min_bucket=16, prefill=prefill)
    processor = Chained()
    got = engine.generate(batch.inputs_embeds, batch.attention_mask, 10, pad_token_id=0, logits_processor=[processor])
    assert engine.last_path == "static" and torch.equal(got, expected)
    assert processor.calls == [(3, n) for n in range(10)]  # the new ids so far, as generate() passes them
    stop = [int(expected[0, 3])]  # stop tokens too: rows end as HF ends them
    hf_engine = GenerationEngine(model.decoder, "hf")
    assert torch.equal(engine.generate(batch.inputs_embeds, batch.attention_mask, 10, stop_token_ids=stop,
                                       pad_token_id=0, logits_processor=[Chained()]),
                       hf_engine.generate(batch.inputs_embeds, batch.attention_mask, 10, stop_token_ids=stop,
                                          pad_token_id=0, logits_processor=[Chained()]))


def test_sampling_and_processors_fall_back_to_hf():
    assert is_greedy({}) and is_greedy({"do_sample": False, "temperature": None, "num_beams": 1})
    assert is_greedy({"logits_processor": [Chained()]})  # greedy over reshaped scores: the static path
    assert not is_greedy({"do_sample": True})
    assert not is_greedy({"suppress_tokens": [1]}) and not is_greedy({"min_new_tokens": 4})


def test_bucket_lengths_are_few():
    assert [cache_bucket(n) for n in (1, 256, 257, 600, 4097)] == [256, 256, 512, 1024, 8192]
    assert cache_bucket(20, minimum=16) == 32


def test_model_generation_goes_through_the_engine(tokenizer, monkeypatch):
    from llama_index.llms.gmsa import GMSALLM

    from gmsa_rag.markers import QA_TEMPLATE, marker

    model = lively(tiny_gmsa(tokenizer))
    llm = GMSALLM(model, max_new_tokens=6)
    soft = model.compress([SAMPLE_TEXT], 4)
    llm.store.put_many([("a" * 64, soft[0])])
    prompt = QA_TEMPLATE.format(context_str=marker("a" * 64), query_str="Who built it?")
    answers = {}
    for choice in ("hf", "static"):
        model.generation_engine = choice
        answers[choice] = (llm.complete(prompt).text, "".join(c.delta for c in llm.stream_complete(prompt)).strip())
        engine = engine_for(model)
        assert engine.kind == choice and engine.last_path == choice
    assert answers["hf"] == answers["static"]
    model.generation_engine = "auto"
    assert engine_for(model).kind == select_engine("cpu")
    assert engine_for(model) is engine_for(model)  # kept: its caches (and compiled step) are reused
    model.generation_engine, model.generation_prefill = "static", "graph"
    assert engine_for(model).static.prefill == "graph"  # another prefill mode: another engine
    assert llm.complete(prompt).text == answers["static"][0]
    model.generation_tune_kernels = True
    assert engine_for(model).static.tune_kernels  # tuned kernels: another engine
    model.generation_engine, model.generation_prefill, model.generation_tune_kernels = "auto", "prompt", False
    model.generate("Who?", soft, max_new_tokens=2, do_sample=True)  # sampling: HF generate, whatever the choice
    assert engine_for(model).last_path == "hf"


def test_tuned_kernels_compile_the_step_with_the_modes_options_plus_kernel_tuning(model, monkeypatch):
    from gmsa_rag import engine as engine_module

    assert engine_module.compile_settings("reduce-overhead") == {"mode": "reduce-overhead"}
    tuned = engine_module.compile_settings("reduce-overhead", tune_kernels=True)
    assert tuned == {"options": {"triton.cudagraphs": True, "max_autotune": True, "coordinate_descent_tuning": True}}
    calls = []
    monkeypatch.setattr(engine_module.torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    StaticCacheDecoder(model.decoder, compile_step=True, tune_kernels=True, prefill="graph")
    assert calls and all(c == {"dynamic": False, **tuned} for c in calls)  # step, scored step, graph prefill
    calls.clear()
    StaticCacheDecoder(model.decoder, compile_step=True)
    assert calls and all(c == {"dynamic": False, "mode": "reduce-overhead"} for c in calls)  # as before


# ----------------------------------------------------------------------------------- prompt assembly


def reference_assemble(prompts, embed, padding_side):
    """The obvious per-segment implementation."""
    rows, label_rows = [], []
    for segments in prompts:
        pieces, labels = [], []
        for seg in segments:
            if seg.token_ids is not None:
                ids = torch.tensor(seg.token_ids)
                pieces.append(embed(ids))
                labels.append(ids if seg.is_target else torch.full_like(ids, -100))
            else:
                pieces.append(seg.embeds.to(embed.weight.dtype))
                labels.append(torch.full((len(seg),), -100))
        rows.append(torch.cat(pieces))
        label_rows.append(torch.cat(labels))
    longest = max(r.shape[0] for r in rows)
    embeds = torch.zeros(len(rows), longest, rows[0].shape[1])
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    labels = torch.full((len(rows), longest), -100)
    for b, (row, lab) in enumerate(zip(rows, label_rows)):
        n = row.shape[0]
        span = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        embeds[b, span], mask[b, span], labels[b, span] = row, 1, lab
    return embeds, mask, labels


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_assembly_in_one_pass_equals_per_segment(model, tokenizer, padding_side):
    soft = model.compress([SAMPLE_TEXT, "Paris is the capital of France."], 4)
    soft = [soft[0], soft[1].to(torch.float64)]  # another dtype: cast
    prompts = [
        qa_segments(tokenizer, "Who designed the tower?", soft, answer="Gustave Eiffel"),
        qa_segments(tokenizer, "Where?", ["Paris is in France."]),
        [Segment(embeds=soft[1]), Segment(token_ids=[5, 6, 7], is_target=True)],
    ]
    got = assemble(prompts, model.embed_tokens, padding_side=padding_side)
    embeds, mask, labels = reference_assemble(prompts, model.embed_tokens, padding_side)
    assert torch.equal(got.inputs_embeds, embeds)
    assert torch.equal(got.attention_mask, mask) and torch.equal(got.labels, labels)
    assert (got.labels != -100).sum() == len(tokenizer.encode("Gustave Eiffel" + tokenizer.eos_token,
                                                              add_special_tokens=False)) + 3
    # the host-planned targets (what the training loss reads) are the labels, at the positions one before them
    assert torch.equal(got.target_ids, got.labels.flatten()[got.predictors + 1])
    assert torch.equal(got.labels.flatten()[got.labels.flatten() != -100], got.target_ids)


def test_assembly_is_differentiable_in_the_soft_tokens(model, tokenizer):
    soft = torch.randn(5, model.hidden_size, requires_grad=True)
    batch = assemble([[Segment(token_ids=[1, 2]), Segment(embeds=soft)]], model.embed_tokens, "left")
    (batch.inputs_embeds * torch.arange(7.0)[None, :, None]).sum().backward()
    assert torch.equal(soft.grad, torch.arange(2.0, 7.0)[:, None].expand(5, model.hidden_size))
    with pytest.raises(ValueError, match="padding_side"):
        assemble([[Segment(token_ids=[1])]], model.embed_tokens, "middle")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_compiled_engine_on_cuda_equals_hf_generate(tokenizer):
    """On a GPU: the compiled step and compiled, padded prefill (CUDA graphs) give HF's greedy tokens (fp32), twice
    (the second call replays the recorded graphs) and for another prompt length (another padded shape)."""
    model = lively(tiny_gmsa(tokenizer)).to("cuda")
    engine = GenerationEngine(model.decoder, "auto", prefill="graph")
    assert engine.static is not None and engine.static.compiled and engine.static.prefill == "graph"
    prompts = [qa_segments(tokenizer, "Who designed the tower?", [SAMPLE_TEXT]),
               qa_segments(tokenizer, "Where is Paris?", ["Paris is the capital of France."])]
    for prompt in prompts:
        one = model.build_batch([prompt], padding_side="left")
        expected = GenerationEngine(model.decoder, "hf").generate(one.inputs_embeds, one.attention_mask, 10)
        for _ in range(2):
            got = engine.generate(one.inputs_embeds, one.attention_mask, 10)
            assert engine.last_path == "static" and torch.equal(got, expected)
        expected = GenerationEngine(model.decoder, "hf").generate(one.inputs_embeds, one.attention_mask, 10,
                                                                  logits_processor=[Chained()])
        for _ in range(2):  # the compiled logits step, the processor applied on the host between replays
            got = engine.generate(one.inputs_embeds, one.attention_mask, 10, logits_processor=[Chained()])
            assert engine.last_path == "static" and torch.equal(got, expected)


def test_engine_thread_gets_the_cudagraph_registry(monkeypatch):
    """The compiled decode runs on an engine-owned thread. Torch releases without ``_initialize_tls`` (2.11, the GPU
    image's) set up the CUDA-graph-tree registry only in the importing thread and asserted it in any other, which
    failed the first extractive answer on an H200; the thread's initializer sets it up, also on those releases."""
    import threading

    from torch._inductor import cudagraph_trees as trees

    monkeypatch.delattr(trees, "_initialize_tls", raising=False)  # as on the older releases
    seen: dict[str, bool] = {}

    def fresh_thread() -> None:
        seen["before"] = torch._C._is_key_in_tls("tree_manager_containers")
        eng.prepare_cudagraph_thread()
        seen["after"] = torch._C._is_key_in_tls("tree_manager_containers")
        seen["usable"] = trees.get_obj(trees.local, "tree_manager_containers") == {}
        eng.prepare_cudagraph_thread()  # a second call keeps what is there

    worker = threading.Thread(target=fresh_thread)
    worker.start()
    worker.join()
    assert seen == {"before": False, "after": True, "usable": True}


def test_generation_compile_compiles_the_static_step_on_cpu_too(tokenizer, monkeypatch):
    from gmsa_rag import engine as engine_module

    model = lively(tiny_gmsa(tokenizer))
    soft = model.compress([SAMPLE_TEXT], 4)
    model.generation_engine = "static"
    eager = model.generate("Who built it?", soft, max_new_tokens=6)
    assert not engine_for(model).static.compiled  # the default on CPU: eager
    compiled = []
    monkeypatch.setattr(engine_module.torch, "compile", lambda fn, **kwargs: compiled.append(fn) or fn)
    model.generation_compile = True
    engine = engine_for(model)
    assert engine.static.compiled and compiled  # a new engine, its step handed to torch.compile
    assert model.generate("Who built it?", soft, max_new_tokens=6) == eager
    model.generation_compile = None
    assert not engine_for(model).static.compiled
