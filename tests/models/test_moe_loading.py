"""Mixture-of-experts checkpoints whose config.json disagrees with the tensors (expert count, top-k,
intermediate sizes), and quantized expert formats Folio does not run: a ValueError at load that names the
config field and the tensor, never a torch shape error or a half-loaded model."""

from __future__ import annotations

import json
import shutil

import pytest

from services.engine.attention.torch_backend import TorchAttentionBackend
from services.engine.model.loader import iter_checkpoint, read_config
from services.engine.model.registry import build_model
from tests.models import harness
from tests.models.architectures import ARCHITECTURES

ARCH = {a.id: a for a in ARCHITECTURES}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for aid in ("mixtral", "qwen2-moe", "gpt-oss"):
        d = tmp_path_factory.mktemp(aid)
        harness.build_checkpoint(ARCH[aid], d)
        out[aid] = d
    return out


def _load(src, tmp_path, **edits):
    d = tmp_path / "m"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edits)
    (d / "config.json").write_text(json.dumps(cfg))
    import torch

    hf = read_config(d)
    model = build_model(hf, TorchAttentionBackend(), torch.float32, torch.device("cpu"))
    model.load_weights(iter_checkpoint(d))
    return model


def test_unedited_checkpoints_load(checkpoints, tmp_path):
    for aid, d in checkpoints.items():
        _load(d, tmp_path / aid)


@pytest.mark.parametrize("experts", [2, 6])
def test_expert_count_that_disagrees_with_the_tensors(checkpoints, tmp_path, experts):
    with pytest.raises(ValueError, match=r"num_local_experts") as e:
        _load(checkpoints["mixtral"], tmp_path, num_local_experts=experts)
    assert "tensor model.layers.0.block_sparse_moe." in str(e.value), str(e.value)


def test_stacked_experts_count_that_disagrees(checkpoints, tmp_path):
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.(experts|router)\.\S+ .*num_local_experts"):
        _load(checkpoints["gpt-oss"], tmp_path, num_local_experts=3)


def test_top_k_above_the_expert_count(checkpoints, tmp_path):
    with pytest.raises(ValueError, match=r"'num_experts_per_tok' \(7\) must be <= 'num_experts' \(6\)"):
        _load(checkpoints["qwen2-moe"], tmp_path, num_experts_per_tok=7)


@pytest.mark.parametrize("field,value", [("moe_intermediate_size", 16), ("shared_expert_intermediate_size", 40)])
def test_intermediate_size_that_disagrees(checkpoints, tmp_path, field, value):
    with pytest.raises(ValueError) as e:
        _load(checkpoints["qwen2-moe"], tmp_path, **{field: value})
    msg = str(e.value)
    assert "tensor model.layers.0.mlp." in msg and f"config.json's {field!r}" in msg, msg


def test_mxfp4_gpt_oss_is_refused_with_a_way_out(checkpoints, tmp_path):
    with pytest.raises(ValueError, match=r"quantization_config.*MXFP4.*bf16"):
        _load(checkpoints["gpt-oss"], tmp_path, quantization_config={"quant_method": "mxfp4"})
