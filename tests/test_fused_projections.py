"""Fused sibling projections (W_Q/W_K/W_V, gate/up stored once): same outputs, fewer matrix multiplies, safe to move,
merge, train through and save."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch.overrides import TorchFunctionMode

from gmsa_rag.backbone import tiny_backbone
from gmsa_rag.engine import engine_for, should_fuse_projections
from gmsa_rag import fused_projections as fp
from gmsa_rag.fused_projections import FusedHead, KeptFused, fuse_projections, is_fused, unfuse_projections
from gmsa_rag.prompt import qa_segments
from gmsa_rag.testing import SAMPLE_TEXT, lively, tiny_gmsa

LAYERS = 4  # tiny_backbone's


class CountLinear(TorchFunctionMode):
    """Counts F.linear calls (every nn.Linear forward and every fused product)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is F.linear
        return func(*args, **(kwargs or {}))


def random_decoder(family: str = "llama", lora: bool = True):
    """A tiny decoder with large random weights and, with ``lora``, a non-zero LoRA adapter on q/k/v and gate/up."""
    decoder = tiny_backbone(family, vocab_size=512)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in decoder.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    if lora:
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                            target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
        inject_adapter_in_model(config, decoder, adapter_name="keft")
    return decoder


def logits(decoder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return decoder(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: biases on q/k/v
@pytest.mark.parametrize("lora", [False, True])
def test_fused_decoder_gives_the_same_logits_with_fewer_matrix_multiplies(family, lora):
    decoder = random_decoder(family, lora)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with CountLinear() as plain:
        reference = logits(decoder, ids)
    assert fuse_projections(decoder) == 2 * LAYERS and is_fused(decoder)
    with CountLinear() as fused:
        out = logits(decoder, ids)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert plain.calls - fused.calls == 3 * LAYERS  # q/k/v: 3 -> 1, gate/up: 2 -> 1, per layer
    assert fuse_projections(decoder) == 0  # already fused and intact: nothing to do
    head = next(m for m in decoder.modules() if isinstance(m, FusedHead))
    q, k, v = (decoder.model.layers[0].self_attn.__getattr__(n) for n in ("q_proj", "k_proj", "v_proj"))
    weights = [getattr(p, "base_layer", p).weight for p in (q, k, v)]
    assert weights[0].data_ptr() == head._fused.weight.data_ptr()  # stored once: the weights are views into it
    assert weights[1].data_ptr() == weights[0].data_ptr() + weights[0].numel() * weights[0].element_size()


def test_adapter_switch_still_works_on_fused_projections():
    decoder = random_decoder()
    ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(1))
    lora_layers = [m for m in decoder.modules() if hasattr(m, "_disable_adapters")]
    with_adapter = logits(decoder, ids)
    for m in lora_layers:
        m._disable_adapters = True
    without = logits(decoder, ids)
    fuse_projections(decoder)
    torch.testing.assert_close(logits(decoder, ids), without, rtol=1e-5, atol=1e-5)
    for m in lora_layers:
        m._disable_adapters = False
    torch.testing.assert_close(logits(decoder, ids), with_adapter, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_adapter, without)  # (the adapter matters)


def test_a_compiled_graph_multiplies_by_the_fused_matrices():
    decoder = random_decoder(lora=False)
    ids = torch.randint(0, 512, (1, 5))
    counts = []

    def count_linear_nodes(graph_module, example_inputs):
        counts.append(sum(node.op == "call_function" and "linear" in str(node.target)
                          for node in graph_module.graph.nodes))
        return graph_module

    fuse_projections(decoder)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: decoder(input_ids=x).logits, fullgraph=True, backend=count_linear_nodes)
    with torch.no_grad():
        out = compiled(ids)
    torch.testing.assert_close(out, logits(decoder, ids))
    assert counts == [4 * LAYERS + 1]  # per layer: fused q/k/v, o, fused gate/up, down; then the output layer
    torch._dynamo.reset()


def test_casting_unfuses_and_fusing_again_restores():
    decoder = random_decoder()
    ids = torch.randint(0, 512, (1, 6))
    reference = logits(decoder, ids).double()
    fuse_projections(decoder)
    decoder.double()
    head = next(m for m in decoder.modules() if isinstance(m, FusedHead))
    assert not is_fused(decoder) and head._fused.weight is None  # the old fused matrix is let go
    torch.testing.assert_close(logits(decoder, ids), reference, rtol=1e-6, atol=1e-6)  # unfused, still right
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: decoder(input_ids=x).logits, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), reference, rtol=1e-6, atol=1e-6)  # compiled code as well
    torch._dynamo.reset()
    assert fuse_projections(decoder) == 2 * LAYERS and is_fused(decoder)
    assert head._fused.weight.dtype == torch.float64
    torch.testing.assert_close(logits(decoder, ids), reference, rtol=1e-6, atol=1e-6)


def test_a_replaced_weight_is_noticed_and_fused_again():
    decoder = random_decoder()
    ids = torch.randint(0, 512, (1, 6))
    fuse_projections(decoder)
    for module in decoder.modules():  # peft's safe merge gives each weight new data
        if hasattr(module, "merge") and hasattr(module, "base_layer"):
            module.merge(safe_merge=True)
    merged = logits(decoder, ids)
    assert not is_fused(decoder)
    with torch.no_grad():
        q = decoder.model.layers[0].self_attn.q_proj.base_layer
        expected = F.linear(torch.ones(1, q.in_features), q.weight, q.bias)
        assert torch.equal(q(torch.ones(1, q.in_features)), expected)  # its own (merged) weight, not the stale matrix
    assert fuse_projections(decoder) == 2 * LAYERS
    torch.testing.assert_close(logits(decoder, ids), merged, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_projection_weights_of_a_fused_decoder():
    plain, fused = random_decoder(lora=False), random_decoder(lora=False)
    fuse_projections(fused)
    ids = torch.randint(0, 512, (2, 5))
    for decoder in (plain, fused):
        decoder.model.layers[1].self_attn.k_proj.weight.requires_grad_(True)
        decoder(input_ids=ids).logits.square().mean().backward()
    grad = fused.model.layers[1].self_attn.k_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    torch.testing.assert_close(grad, plain.model.layers[1].self_attn.k_proj.weight.grad)


def test_unfuse_gives_plain_linears_with_weights_of_their_own():
    decoder = random_decoder(lora=False)
    ids = torch.randint(0, 512, (1, 4))
    reference = logits(decoder, ids)
    fuse_projections(decoder)
    assert unfuse_projections(decoder) == 2 * LAYERS and not is_fused(decoder)
    attn = decoder.model.layers[0].self_attn
    assert type(attn.q_proj) is torch.nn.Linear
    assert attn.q_proj.weight.data_ptr() + attn.q_proj.weight.numel() * 4 != attn.k_proj.weight.data_ptr()
    torch.testing.assert_close(logits(decoder, ids), reference)


@pytest.mark.parametrize("choice", ["hf", "static"])
def test_generation_with_fused_projections_gives_the_same_tokens(tokenizer, choice):
    model = lively(tiny_gmsa(tokenizer, decoder_tuning="qkv_lora"))
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    soft = model.compress([SAMPLE_TEXT], 4)
    prompts = [qa_segments(tokenizer, "Who designed the tower?", soft),  # adapter on
               qa_segments(tokenizer, "Who designed the tower?", [SAMPLE_TEXT])]  # plain text: adapter off
    model.generation_engine = choice
    expected = [model.generate_from_segments([p], max_new_tokens=8) for p in prompts]
    model.generation_fuse_projections = True
    assert engine_for(model).fuse_projections
    assert [model.generate_from_segments([p], max_new_tokens=8) for p in prompts] == expected
    assert is_fused(model.decoder)


def test_projections_are_fused_by_default_on_cuda_only():
    assert should_fuse_projections("cuda") and should_fuse_projections(torch.device("cuda", 1))
    assert not should_fuse_projections("cpu") and not should_fuse_projections("mps")
    assert not should_fuse_projections("cuda", False) and should_fuse_projections("cpu", True)  # a request wins


def test_the_product_engine_fuses_by_default_on_cuda_and_not_on_cpu(tokenizer, monkeypatch):
    model = lively(tiny_gmsa(tokenizer))
    model.generation_engine = "hf"  # (the device below is only reported: nothing may run on it)
    assert model.generation_fuse_projections is None
    cpu_engine = engine_for(model)
    assert not cpu_engine.fuse_projections
    model.generate("Who built it?", model.compress([SAMPLE_TEXT], 4), max_new_tokens=2)
    assert not is_fused(model.decoder)  # the CPU path stays plain
    monkeypatch.setattr(type(model.decoder), "device", property(lambda self: torch.device("cuda")))
    cuda_engine = engine_for(model)  # the device changed: a new engine, which fuses
    assert cuda_engine is not cpu_engine and cuda_engine.fuse_projections
    cuda_engine._fused.ensure()  # what its every call does first
    assert is_fused(model.decoder)
    model.generation_fuse_projections = False  # an explicit choice is kept on CUDA too
    assert not engine_for(model).fuse_projections


def test_a_checkpoint_of_a_fused_trained_decoder_saves_and_loads(tokenizer, tmp_path):
    from gmsa_rag.checkpoint import attach_checkpoint, read_record, read_weights

    model = tiny_gmsa(tokenizer, decoder_tuning="qkv")  # W_Q/W_K/W_V themselves are trained and saved
    with torch.no_grad():
        for p in model.trained_parameters().values():
            p.add_(torch.randn_like(p) * 0.01)
    fuse_projections(model.decoder)
    model.save_pretrained(tmp_path)  # q/k/v weights are views into one tensor
    fresh = tiny_gmsa(tokenizer, decoder_tuning="qkv")
    loaded = attach_checkpoint(fresh, read_record(tmp_path), read_weights(tmp_path), tmp_path)
    for name, p in model.trained_parameters().items():
        assert torch.equal(p, loaded.trained_parameters()[name]), name


def test_layers_that_accelerate_dispatches_or_with_a_bias_on_some_members_are_left_alone():
    decoder = random_decoder(lora=False)
    decoder.model.layers[0].self_attn.k_proj._hf_hook = object()  # as accelerate's device_map hooks mark them
    decoder.model.layers[1].self_attn.q_proj.bias = torch.nn.Parameter(torch.randn(decoder.config.hidden_size))
    ids = torch.randint(0, 512, (1, 5))
    reference = logits(decoder, ids)
    assert fuse_projections(decoder) == 2 * LAYERS - 2  # those two layers' q/k/v stay as they are
    assert type(decoder.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(decoder.model.layers[1].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(decoder, ids), reference, rtol=1e-5, atol=1e-5)


def test_kept_fused_walks_the_model_once_and_fuses_again_what_was_undone(monkeypatch):
    decoder = random_decoder()
    walks = []
    walk = fp.fuse_projections
    monkeypatch.setattr(fp, "fuse_projections", lambda model: walks.append(model) or walk(model))
    kept = KeptFused(decoder)
    kept.ensure()
    kept.ensure()
    assert len(walks) == 1 and is_fused(decoder)  # the second call only checked the groups found by the first
    decoder.double()  # undoes the fusion
    kept.ensure()
    assert len(walks) == 2 and is_fused(decoder)
