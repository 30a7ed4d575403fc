"""Quantization configs and checkpoints that Folio must refuse, at load, with a ValueError naming the scheme,
the layer and the field; and the on-disk packings checked against the ecosystem's own code."""

from __future__ import annotations

import copy

import pytest
import torch

from services.engine.attention import get_attention_backend
from services.engine.model.loader import iter_tensors
from services.engine.model.quantization import get_quant_config
from services.engine.model.registry import build_model
from tests.quantization import quantizer as qz

HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
      "max_position_embeddings": 64, "rms_norm_eps": 1e-5}


def float_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (64, 64), "lm_head.weight": (64, 64), "model.norm.weight": (64,),
              "model.layers.0.input_layernorm.weight": (64,), "model.layers.0.post_attention_layernorm.weight": (64,),
              "model.layers.0.self_attn.q_proj.weight": (64, 64), "model.layers.0.self_attn.k_proj.weight": (32, 64),
              "model.layers.0.self_attn.v_proj.weight": (32, 64), "model.layers.0.self_attn.o_proj.weight": (64, 64),
              "model.layers.0.mlp.gate_proj.weight": (128, 64), "model.layers.0.mlp.up_proj.weight": (128, 64),
              "model.layers.0.mlp.down_proj.weight": (64, 128)}
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


def load(qc: dict | None, tensors: dict, quantization: str | None = None):
    hf = dict(HF, quantization_config=qc) if qc is not None else dict(HF)
    model = build_model(hf, get_attention_backend("torch"), torch.float32, torch.device("cpu"),
                        quantization=quantization)
    model.load_weights(iter_tensors(tensors))
    return model


@pytest.mark.parametrize("method, words", [("bitsandbytes", "bitsandbytes"), ("gguf", "GGUF"), ("aqlm", "AQLM"),
                                           ("squeezellm", "dropped by vLLM"), ("nonsense", "not a quantization")])
def test_unsupported_schemes_are_refused_by_name(method, words):
    with pytest.raises(ValueError, match=words) as e:
        get_quant_config({"quantization_config": {"quant_method": method}})
    assert method in str(e.value)


def test_override_must_agree_with_the_checkpoint():
    gptq = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}}
    assert get_quant_config(gptq, "gptq_marlin").name == "gptq"  # vLLM's kernel name for the same format
    with pytest.raises(ValueError, match="contradicts"):
        get_quant_config(gptq, "awq")
    with pytest.raises(ValueError, match="no quantization_config"):
        get_quant_config({}, "gptq")
    assert get_quant_config({}, "fp8").name == "fp8"


@pytest.mark.parametrize("qc, field", [
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "bits"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "zero_point"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}, "weight_block_size"),
    ({"quant_method": "fp8", "activation_scheme": "sometimes"}, "activation_scheme"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "int"}}}}, "config_groups.g"),
])
def test_bad_config_fields_are_named(qc, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        get_quant_config({"quantization_config": qc})


def test_group_size_that_does_not_divide_names_the_layer():
    tensors, qc, _ = qz.gptq(float_state(), 32, sym=True, desc_act=False)
    qc = dict(qc, group_size=48)  # 64 input features: 48 does not divide them
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.qkv_proj: quantization_config\.group_size"):
        load(qc, tensors)


def test_wrong_packing_names_the_tensor():
    tensors, qc, _ = qz.awq(float_state(), 32)  # AWQ's [K, N/8] words under a GPTQ config ([K/8, N])
    with pytest.raises(ValueError, match=r"q_proj\.qweight has shape"):
        load(dict(qc, quant_method="gptq", sym=False), tensors)


def test_missing_scales_names_the_layer_and_tensor():
    tensors, qc, _ = qz.gptq(float_state(), 32, sym=True, desc_act=False)
    del tensors["model.layers.0.mlp.down_proj.scales"]
    with pytest.raises(ValueError, match=r"down_proj\.scales"):
        load(qc, tensors)


def test_float_weights_under_an_fp8_config_are_refused():
    with pytest.raises(ValueError, match=r"q_proj\.weight is torch\.float32, expected float8"):
        load({"quant_method": "fp8", "activation_scheme": "dynamic"}, float_state())


def test_symmetric_config_with_asymmetric_zeros_is_refused():
    tensors, qc, _ = qz.gptq(float_state(), 32, sym=False, desc_act=False)
    with pytest.raises(ValueError, match=r"qkv_proj: quantization_config\.sym"):
        load(dict(qc, sym=True), tensors)


def test_act_order_g_idx_that_contradicts_the_group_size():
    tensors, qc, _ = qz.gptq(float_state(), 32, sym=True, desc_act=True)
    tensors["model.layers.0.self_attn.o_proj.g_idx"] = torch.zeros(64, dtype=torch.int32)  # one group of 64
    with pytest.raises(ValueError, match=r"o_proj: g_idx"):
        load(qc, tensors)


def test_ignored_layers_stay_unquantized_and_partial_fusion_is_refused():
    state = float_state()
    tensors, qc, _ = qz.fp8_vllm(state, static=False)
    for part in ("gate_proj", "up_proj"):
        tensors[f"model.layers.0.mlp.{part}.weight"] = state[f"model.layers.0.mlp.{part}.weight"]
        del tensors[f"model.layers.0.mlp.{part}.weight_scale"]
    model = load(dict(qc, ignored_layers=["gate_proj", "up_proj"]), tensors)
    assert model.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="only some of"):
        load(dict(qc, ignored_layers=["gate_proj"]), tensors)


def test_gptq_packing_agrees_with_compressed_tensors():
    """GPTQ's qweight is compressed-tensors' pack_to_int32 of the transposed matrix (both: value i of eight
    in bits 4i), after compressed-tensors' +8 offset for signed values."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = torch.randint(0, 16, (24, 64), generator=torch.Generator().manual_seed(1))  # [N, K]
    ours = qz.pack_along_rows(q.t())  # [K/8, N]
    theirs = pack_to_int32((q - 8).to(torch.int8), 4).t()
    assert torch.equal(ours, theirs)


def test_awq_interleaved_order():
    """AWQ's GEMM packing: columns 0..7 with values 0..7 land in nibbles in the order 0, 2, 4, 6, 1, 3, 5, 7."""
    q = torch.arange(8).reshape(8, 1)  # the eight output columns of one input row, as [N, 1]
    word = qz.pack_along_rows(q, qz.AWQ_ORDER).item()
    assert word == 0x75316420


def test_compressed_tensors_act_order_g_idx():
    """Older compressed-tensors checkpoints (actorder "group") store weight_g_idx: rows regrouped at load."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    state = float_state(2)
    g = torch.Generator().manual_seed(3)
    perms = {"attn": torch.randperm(64, generator=g), "mlp": torch.randperm(64, generator=g),
             "down": torch.randperm(128, generator=g), "o": torch.randperm(64, generator=g)}
    tensors, deq = dict(state), dict(state)
    for name in qz.linear_names(state):
        w = state[name + ".weight"]
        key = "attn" if "_proj" in name and name.split(".")[-1][0] in "qkv" else (
            "mlp" if name.endswith(("gate_proj", "up_proj")) else "down" if "down" in name else "o")
        perm, inv = perms[key], torch.argsort(perms[key])
        q_p, s, z = qz.int4_groups(w[:, perm], 32, sym=True, scale_dtype=torch.float32)
        deq[name + ".weight"] = qz.dequant(q_p, s, z, 32)[:, inv]
        del tensors[name + ".weight"]
        tensors[name + ".weight_packed"] = pack_to_int32((q_p[:, inv] - 8).to(torch.int8), 4)
        tensors[name + ".weight_scale"] = s  # [N, G], groups in permuted order
        tensors[name + ".weight_shape"] = torch.tensor(w.shape)
        tensors[name + ".weight_g_idx"] = (torch.arange(w.shape[1]) // 32)[inv].to(torch.int32)
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                            "group_size": 32, "actorder": "group"}}}}
    model = load(qc, tensors)
    x = torch.randn(3, 64, generator=g)
    o_proj = model.model.layers[0].self_attn.o_proj
    torch.testing.assert_close(o_proj(x), x @ deq["model.layers.0.self_attn.o_proj.weight"].t(), rtol=1e-5, atol=1e-5)
    gate_up = model.model.layers[0].mlp.gate_up_proj
    want = torch.cat([x @ deq[f"model.layers.0.mlp.{p}.weight"].t() for p in ("gate_proj", "up_proj")], dim=1)
    torch.testing.assert_close(gate_up(x), want, rtol=1e-5, atol=1e-5)


def test_weight_bytes_shrink():
    """What a user buys: 4-bit weights hold about an eighth of float32's bytes in the linear layers."""
    state = float_state()
    plain = load(None, state).weight_bytes()
    tensors, qc, _ = qz.gptq(copy.deepcopy(state), 32, sym=True, desc_act=False)
    quant = load(qc, tensors).weight_bytes()
    linear = sum(v.numel() * 4 for k, v in state.items() if k.split(".")[-2] in qz.LINEARS)
    assert plain - quant > 0.8 * linear


@pytest.mark.parametrize("qc", [{"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True},
                                {"quant_method": "awq", "bits": 4, "group_size": 32},
                                {"quant_method": "fp8", "activation_scheme": "dynamic"}])
def test_dummy_weights_in_the_loaded_form(qc):
    """load_format="dummy" (speed runs): random quantized weights near N(0, 0.02), the forward finite."""
    model = build_model(dict(HF, quantization_config=qc), get_attention_backend("torch"), torch.float32,
                        torch.device("cpu"))
    model.init_dummy()
    model.process_weights()
    layer = model.model.layers[0].mlp.down_proj
    x = torch.eye(128)
    w = layer(x)  # rows of the dequantized [K, N] matrix
    assert torch.isfinite(w).all() and 0.01 < w.std().item() < 0.04


def test_fp8_on_a_gpu_older_than_ada_is_refused_mocked_capability(monkeypatch):
    """No GPU here: the device's compute capability is faked (8.0, an A100) to reach the refusal."""
    from services.engine.model.quantization.fp8 import check_fp8_device

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=r"quantization 'fp8'.*8\.9.*8\.0"):
        check_fp8_device("fp8", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device("fp8", torch.device("cuda"))
