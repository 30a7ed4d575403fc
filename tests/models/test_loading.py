"""Loading checkpoints: sharded safetensors with an index, and every bad input refused with a ValueError that
names the file, tensor or field (never a torch shape error, never a half-loaded model)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from folio import LLM
from tests.models import harness
from tests.models.architectures import ARCHITECTURES

LLAMA = next(a for a in ARCHITECTURES if a.id == "llama")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_ok")
    ref = harness.build_checkpoint(LLAMA, d)
    return d, ref


def _copy(src, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _llm(d):
    return LLM(str(d), dtype="float32", num_kv_blocks=16, max_model_len=64)


def _edit_tensors(d, edit):
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_sharded_checkpoint_with_index_loads(llama_dir, tmp_path):
    src, ref = llama_dir
    d = tmp_path / "sharded"
    ref.save_pretrained(d, max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("*.safetensors"))) > 2
    llm = _llm(d)
    prompt = harness.prompts(LLAMA.config["vocab_size"], lens=(9,))[0]
    got = harness.folio_prefill_logits(llm.engine.runner, [prompt])[0]
    assert (got - harness.hf_logits(ref, prompt)).abs().max() <= 1e-4
    llm.shutdown()


def test_bin_only_checkpoint_is_refused(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path)
    (d / "model.safetensors").unlink()
    torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only PyTorch pickle weights \(pytorch_model.bin\).*safetensors"):
        _llm(d)


def test_index_naming_a_missing_shard_is_refused(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="model.safetensors.index.json: lists .*model-00002-of-00002"):
        _llm(d)


def test_wrong_tensor_shape_names_the_tensor(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path)
    _edit_tensors(d, lambda t: t.update({"model.layers.1.mlp.down_proj.weight": torch.zeros(64, 80)}))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.layers.1.mlp.down_proj.weight has shape "
                                         r"\(64, 80\), expected size 96 in dimension 1"):
        _llm(d)


def test_missing_tensor_is_named(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path)
    _edit_tensors(d, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*model.layers.0.self_attn.qkv_proj.weight"):
        _llm(d)


def test_unknown_tensor_is_named(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path)
    _edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"tensor model.layers.0.self_attn.extra.weight is not part of a LlamaForCausalLM"):
        _llm(d)


@pytest.mark.parametrize("edit,message", [
    ({"architectures": ["FancyNewForCausalLM"]}, r"architecture FancyNewForCausalLM is not supported"),
    ({"architectures": ["BaichuanForCausalLM"]}, r"Baichuan.*trust_remote_code.*docs/models.md"),
    ({"architectures": ["DeciLMForCausalLM"]}, r"DeciLM.*trust_remote_code"),
    ({"architectures": ["OrionForCausalLM"]}, r"Orion.*trust_remote_code"),
    ({"architectures": ["JAISLMHeadModel"]}, r"Jais \(1; Jais 2 is native.*trust_remote_code"),
    ({"architectures": None}, r"config.json: field 'architectures' is missing"),
    ({"num_hidden_layers": None}, r"config.json: field 'num_hidden_layers' is missing"),
    ({"num_key_value_heads": 3}, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    ({"vocab_size": -5}, r"field 'vocab_size' must be a positive integer, got -5"),
    ({"rope_parameters": {"rope_type": "warp", "rope_theta": 1.0}}, r"rope scaling type 'warp' is not supported"),
    ({"hidden_act": "swoosh"}, r"activation 'swoosh' is not supported"),
])
def test_bad_config_is_refused_by_field(llama_dir, tmp_path, edit, message):
    d = _copy(llama_dir[0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in edit.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        _llm(d)


def test_config_that_disagrees_with_the_tensors_is_refused(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor model.layers.0.mlp.(gate|up|down)_proj.weight has shape"):
        _llm(d)


def test_falcon_with_alibi_is_refused_by_field():
    from services.engine.model.registry import model_config

    hf = {"architectures": ["FalconForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "vocab_size": 512, "alibi": True}
    with pytest.raises(ValueError, match=r"x/config.json: Falcon with alibi: true \(Falcon-RW\) is not supported"):
        model_config(hf, "x/config.json")
    hf.update(alibi=False, new_decoder_architecture=True, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be a multiple of num_kv_heads \(3\)"):
        model_config(hf, "x/config.json")


def test_gpt_families_read_their_kv_heads_as_transformers_does():
    """GPT-2-style configs: a stray num_key_value_heads is ignored (transformers ignores it); multi_query means
    one K/V head; config.json without tie_word_embeddings is tied, as GPT2Config defaults."""
    from services.engine.model.registry import model_config

    base = {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512, "num_key_value_heads": 2}
    gpt2 = model_config({"architectures": ["GPT2LMHeadModel"], **base})
    assert (gpt2.num_key_value_heads, gpt2.hidden_size, gpt2.tie_word_embeddings) == (4, 64, True)
    assert model_config({"architectures": ["GPTBigCodeForCausalLM"], **base}).num_key_value_heads == 1
    mqa_off = model_config({"architectures": ["GPTBigCodeForCausalLM"], "multi_query": False, **base})
    assert mqa_off.num_key_value_heads == 4
