"""The transformers reference is the same function on the transformers versions Folio is tested with: the
GPU machine's image has 5.17, requirements.txt pins 5.23 (see harness.honour_swiglu_config)."""

from __future__ import annotations

import pytest
import torch

from tests.models import harness
from tests.models.architectures import ARCHITECTURES


def test_gpt_oss_reference_honours_swiglu_limit_where_transformers_hard_codes_it(tmp_path, monkeypatch):
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    arch = next(a for a in ARCHITECTURES if a.id == "gpt-oss")
    assert arch.config["swiglu_limit"] != 7.0  # else this test shows nothing
    prompt = harness.prompts(arch.config["vocab_size"], lens=(6,))[0]
    want = harness.hf_logits(harness.build_checkpoint(arch, tmp_path / "current"), prompt)

    init = gpt_oss.GptOssExperts.__init__

    def init_as_in_5_17(self, config):  # transformers 5.17's GptOssExperts: alpha and limit fixed
        init(self, config)
        self.alpha, self.limit = 1.702, 7.0

    monkeypatch.setattr(gpt_oss.GptOssExperts, "__init__", init_as_in_5_17)
    # The control: 5.17's experts on the same weights compute something else (the failure seen on the GPU).
    unpatched = gpt_oss.GptOssForCausalLM.from_pretrained(tmp_path / "current", dtype=torch.float32,
                                                          attn_implementation="eager").eval()
    assert (harness.hf_logits(unpatched, prompt) - want).abs().max().item() > 1e-3
    got = harness.hf_logits(harness.build_checkpoint(arch, tmp_path / "as_5_17"), prompt)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
