"""Tensor parallelism on CPU (gloo, 2 ranks = this process + one worker): the same tokens and logits as one
process, on a random-weight Llama whose heads divide by 2; refusal of a model whose heads do not."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from folio import LLM, SamplingParams
from services.engine.engine import EngineConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 1001  # odd: the vocabulary shards are padded (501 + 500 real rows)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=1024,
                      initializer_range=0.05, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    d = tmp_path_factory.mktemp("tiny_llama_tp")
    LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d)


def _requests():
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 40, 150, 9, 77)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    params = [greedy] * 5
    params[1] = SamplingParams(n=2, temperature=0.8, seed=7, max_tokens=24, ignore_eos=True)  # fork: block copies
    params[3] = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=1)
    return prompts, params


def _run(model_dir: str, tp: int):
    """Generate the workload; return (outputs, per-step logits, per-step query lengths, preemptions, worker procs)."""
    # A small step budget chunks the long prompts (mixed prefill + decode steps); a small pool forces preemption.
    llm = LLM(model_dir, tensor_parallel_size=tp, dtype="float32", max_num_batched_tokens=64, num_kv_blocks=20,
              max_model_len=256)
    runner = llm.engine.runner
    logits, q_lens = [], []
    execute = runner.execute

    def spy(inputs):
        out = execute(inputs)
        logits.append(out.clone())
        q_lens.append(list(inputs.meta.query_lens_cpu))
        return out

    runner.execute = spy
    try:
        prompts, params = _requests()
        outs = llm.generate(prompts, params, use_tqdm=False)
        preemptions = llm.engine.scheduler.num_preemptions
    finally:
        procs = list(getattr(runner, "_procs", []))
        llm.shutdown()
    return outs, logits, q_lens, preemptions, procs


def test_tp2_matches_tp1_tokens_and_logits(tiny_llama):
    outs1, logits1, q1, pre1, _ = _run(tiny_llama, 1)
    outs2, logits2, q2, pre2, procs = _run(tiny_llama, 2)

    assert [p.returncode for p in procs] == [0]  # the worker left cleanly on shutdown
    assert pre1 > 0 and pre2 == pre1  # the pool was too small: sequences were preempted and recomputed
    assert any(max(q) > 1 and min(q) == 1 for q in q1)  # some step mixed a prefill chunk with decodes
    assert q2 == q1  # the same schedule, step by step
    for a, b in zip(outs1, outs2):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
        assert len(a.outputs[0].token_ids) == 24
    assert len(outs2[1].outputs) == 2
    assert len(logits1) == len(logits2)
    for a, b in zip(logits1, logits2):
        assert a.shape == b.shape and a.shape[1] == VOCAB  # the padded vocabulary row is cut
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    lp1 = [{t: round(lp.logprob, 4) for t, lp in e.items()} for e in outs1[3].prompt_logprobs[1:]]
    lp2 = [{t: round(lp.logprob, 4) for t, lp in e.items()} for e in outs2[3].prompt_logprobs[1:]]
    assert lp2 == lp1


def test_heads_not_dividing_are_refused(model_dir):
    # The bundled SmolLM2-135M has 9 query heads and 3 KV heads: 2 ranks cannot split them.
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 .*9 query heads and 3 KV heads"):
        LLM(str(model_dir), tensor_parallel_size=2, dtype="float32")


def test_tensor_parallel_size_must_be_positive():
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1, got 0"):
        EngineConfig(tensor_parallel_size=0)


def test_worker_dies_with_rank0(tiny_llama):
    """SIGKILL rank 0 (no cleanup of any kind runs): its worker must exit on its own."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from folio import LLM
        llm = LLM({tiny_llama!r}, tensor_parallel_size=2, dtype="float32", num_kv_blocks=8, max_model_len=128)
        print(llm.engine.runner._procs[0].pid, flush=True)
        time.sleep(120)
    """)
    rank0 = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(rank0.stdout.readline())
        os.kill(worker_pid, 0)  # alive while rank 0 is
        rank0.send_signal(signal.SIGKILL)
        rank0.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(worker_pid):
            time.sleep(0.1)
        assert not _alive(worker_pid), "the tensor-parallel worker outlived rank 0"
    finally:
        rank0.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_a_worker_stuck_in_a_collective_ends_the_group_with_an_error_naming_rank_and_step(tiny_llama):
    """Issue 18, must-show 3: a worker that stops taking part (SIGSTOP: it never joins the step's
    collectives) makes the next step fail within the collective timeout, with an error naming the rank
    behind, its state and the step; the group is then torn down (no hang, no orphan)."""
    from services.engine.parallel import TensorParallelError

    llm = LLM(tiny_llama, tensor_parallel_size=2, dtype="float32", num_kv_blocks=16, max_model_len=128,
              tp_collective_timeout_s=4)
    worker = llm.engine.runner._procs[0]
    try:
        greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        assert len(llm.generate([[5, 6, 7]], greedy, use_tqdm=False)[0].outputs[0].token_ids) == 3
        os.kill(worker.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(TensorParallelError) as e:
            llm.generate([[8, 9, 10]], greedy, use_tqdm=False)
        took = time.monotonic() - t0
        msg = str(e.value)
        assert f"rank 1 (pid {worker.pid}, stopped) last finished step" in msg, msg
        assert "step " in msg and "the engine ends" in msg, msg
        assert took < 4 + 10, took  # the timeout, plus the steps before the stuck one
        llm.engine.shutdown()  # a broken group: its workers are killed, not asked
        assert worker.wait(10) is not None
    finally:
        worker.kill()
