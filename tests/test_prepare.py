"""``quantize_(model, QAT2BitConfig())`` on a tiny Qwen3: which layers are swapped, and undoing the swap."""

import torch
from torchao.quantization import quantize_

from conftest import logits_of, tiny_qwen3
from peft_qat2bit import QAT2BitConfig, QATLinear, module_filter

PROJECTIONS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
NUM_LAYERS = 2
DECODER_LINEARS = {f"model.layers.{i}.{projection}" for i in range(NUM_LAYERS) for projection in PROJECTIONS}


def qat_names(model):
    return {name for name, module in model.named_modules() if isinstance(module, QATLinear)}


def test_prepare_swaps_decoder_linears(tiny_model):
    quantize_(tiny_model, QAT2BitConfig())

    assert qat_names(tiny_model) == DECODER_LINEARS


def test_prepare_skips_head_and_embeddings(tiny_model):
    embedding = tiny_model.model.embed_tokens
    head = tiny_model.lm_head

    quantize_(tiny_model, QAT2BitConfig())

    assert tiny_model.model.embed_tokens is embedding
    assert type(tiny_model.model.embed_tokens) is torch.nn.Embedding
    assert tiny_model.lm_head is head
    assert type(tiny_model.lm_head) is torch.nn.Linear


def test_prepare_shares_float_weights(tiny_model):
    modules = dict(tiny_model.named_modules())
    weights = {name: modules[name].weight for name in DECODER_LINEARS}

    quantize_(tiny_model, QAT2BitConfig())
    modules = dict(tiny_model.named_modules())

    for name in DECODER_LINEARS:
        assert modules[name].weight is weights[name], name


def test_prepare_names_quantizers(tiny_model):
    quantize_(tiny_model, QAT2BitConfig())

    for name, module in tiny_model.named_modules():
        if isinstance(module, QATLinear):
            assert module.weight_fake_quantizer.module_name == name


def test_prepare_initializes_f(tiny_model):
    quantize_(tiny_model, QAT2BitConfig())
    modules = dict(tiny_model.named_modules())

    for name in DECODER_LINEARS:
        f = modules[name].weight_fake_quantizer.f
        assert f.requires_grad, name
        assert 0.0 < f.item() < 1.0, name


def test_prepare_changes_logits(tiny_model):
    float_logits = logits_of(tiny_model)

    quantize_(tiny_model, QAT2BitConfig())

    assert not torch.allclose(logits_of(tiny_model), float_logits)


def test_exclude_empty_quantizes_head(tiny_model):
    quantize_(tiny_model, QAT2BitConfig(exclude_modules=()))

    assert qat_names(tiny_model) == DECODER_LINEARS | {"lm_head"}
    # The tiny model ties lm_head to the embedding, and the swap keeps that tie.
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight


def test_exclude_regex_skips_mlp(tiny_model):
    # A pattern replaces the default ("lm_head",), so the regex names lm_head again.
    quantize_(tiny_model, QAT2BitConfig(exclude_modules=r"lm_head|.*\.mlp\..*"))

    expected = {name for name in DECODER_LINEARS if ".self_attn." in name}
    assert qat_names(tiny_model) == expected


def test_filter_selects_q_and_v(tiny_model):
    quantize_(tiny_model, QAT2BitConfig(), filter_fn=module_filter(["q_proj", "v_proj"]))

    expected = {f"model.layers.{i}.self_attn.{proj}" for i in range(NUM_LAYERS) for proj in ("q_proj", "v_proj")}
    assert qat_names(tiny_model) == expected


def test_filter_regex_selects_layer(tiny_model):
    quantize_(tiny_model, QAT2BitConfig(), filter_fn=module_filter(r"model\.layers\.1\..*"))

    expected = {f"model.layers.1.{projection}" for projection in PROJECTIONS}
    assert qat_names(tiny_model) == expected


def test_to_linear_restores_float_logits(tiny_model):
    float_logits = logits_of(tiny_model)
    modules = dict(tiny_model.named_modules())
    weights = {name: modules[name].weight for name in DECODER_LINEARS}
    quantize_(tiny_model, QAT2BitConfig())

    modules = dict(tiny_model.named_modules())
    for name in DECODER_LINEARS:
        parent_name, _, child_name = name.rpartition(".")
        setattr(modules[parent_name], child_name, modules[name].to_linear())
    modules = dict(tiny_model.named_modules())

    assert qat_names(tiny_model) == set()
    for name in DECODER_LINEARS:
        assert type(modules[name]) is torch.nn.Linear, name
        assert modules[name].weight is weights[name], name
    assert torch.equal(logits_of(tiny_model), float_logits)


def test_second_prepare_keeps_modules(tiny_model):
    quantize_(tiny_model, QAT2BitConfig())
    first = {name: module for name, module in tiny_model.named_modules() if isinstance(module, QATLinear)}
    f_values = {name: module.weight_fake_quantizer.f.detach().clone() for name, module in first.items()}
    logits = logits_of(tiny_model)

    quantize_(tiny_model, QAT2BitConfig())
    second = {name: module for name, module in tiny_model.named_modules() if isinstance(module, QATLinear)}

    assert second.keys() == first.keys()
    for name, module in second.items():
        assert module is first[name], name
        assert type(module.weight) is torch.nn.Parameter, name
        assert torch.equal(module.weight_fake_quantizer.f.detach(), f_values[name]), name
    assert torch.equal(logits_of(tiny_model), logits)


def test_second_prepare_with_filter(tiny_model):
    quantize_(tiny_model, QAT2BitConfig(), filter_fn=module_filter(["q_proj"]))
    first = {name: module for name, module in tiny_model.named_modules() if isinstance(module, QATLinear)}

    quantize_(tiny_model, QAT2BitConfig(), filter_fn=module_filter(["q_proj", "k_proj"]))
    modules = dict(tiny_model.named_modules())

    expected = {f"model.layers.{i}.self_attn.{proj}" for i in range(NUM_LAYERS) for proj in ("q_proj", "k_proj")}
    assert qat_names(tiny_model) == expected
    for name, module in first.items():
        assert modules[name] is module, name


def test_prepare_f_follows_weights():
    # The Newton init reads the weights, so a model with another seed gets another f.
    model_a = tiny_qwen3(seed=0)
    model_b = tiny_qwen3(seed=1)

    quantize_(model_a, QAT2BitConfig())
    quantize_(model_b, QAT2BitConfig())

    f_a = model_a.model.layers[0].self_attn.q_proj.weight_fake_quantizer.f
    f_b = model_b.model.layers[0].self_attn.q_proj.weight_fake_quantizer.f
    assert not torch.equal(f_a, f_b)
