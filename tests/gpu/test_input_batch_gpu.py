"""On CUDA (decode graphs, pinned input buffers, the sampled tokens fed back on the device), the steady decode
batch gives the general pass's outputs. The CPU twin is tests/test_input_batch.py, whose runs this repeats:
sync by the general pass only (the reference), then sync and async with the steady path, each steady step's
carried arrays and inputs checked against ones built from scratch."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_steady_batch_on_cuda_graphs(tmp_path):
    from tests.test_input_batch import check_runs, tiny_llm

    llm = tiny_llm(tmp_path, device="cuda", block_size=16, num_kv_blocks=14)  # 8 x 64 tokens want 32: preemption
    graphs = llm.engine.runner.graphs
    assert graphs is not None and graphs.decode, "decode graphs captured"
    replays, replay = [0], graphs._replay_decode

    def counted(inputs, b):
        replays[0] += 1
        return replay(inputs, b)

    graphs._replay_decode = counted
    checks = check_runs(llm)
    assert replays[0] > checks["steady"], "steady steps replayed decode graphs"
    del llm
    torch.cuda.empty_cache()
