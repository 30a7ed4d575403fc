"""Must-show 6: each kind of bad request gets its status code, and none disturbs requests in flight."""

from __future__ import annotations

import sys
import time

import grpc
import pytest

from folio import SamplingParams
from folio.stack import free_port
from protos.gen.folio.v1 import common_pb2, engine_pb2, router_pb2
from tests.integration.helpers import (
    engine_stats, engine_stub, generate, generate_in_thread, params, random_prompt, start_stack, wait_for,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def small_queue_stack(tmp_path_factory):
    # One sequence at a time and one waiting slot: the third concurrent request finds the queue full.
    metrics_port = free_port()
    s = start_stack(tmp_path_factory, "errors", engines=1,
                    engine_args=["--num-kv-blocks", "64", "--max-model-len", "512", "--dtype", "float32",
                                 "--max-num-seqs", "1", "--max-waiting-requests", "1",
                                 "--metrics-port", str(metrics_port)])
    s.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield s
    s.stop()


def status_of(address: str, **req) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        generate(address, timeout=30, **req)
    return e.value.code(), e.value.details()


def test_errors_map_to_status_codes_without_disturbing_requests_in_flight(small_queue_stack, offline_llm):
    stack = small_queue_stack
    engine = stack.engine_addresses[0]
    prompt = "The capital of France is"
    in_flight, res = generate_in_thread(stack.router_address, text=prompt,
                                        params=params(temperature=0, max_tokens=80, ignore_eos=True))
    wait_for(lambda: res.messages, timeout=30, what="the in-flight request to stream")

    # Bad input: INVALID_ARGUMENT naming the field.
    for p, field in [(params(temperature=-1.0), "temperature"), (params(top_p=0.0), "top_p"),
                     (params(top_k=0), "top_k"), (params(logprobs=50), "logprobs"),
                     (params(min_tokens=5, max_tokens=2), "min_tokens")]:
        code, msg = status_of(stack.router_address, text="Hi", params=p)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith(field), (field, msg)
    code, msg = status_of(stack.router_address, token_ids=router_pb2.TokenIds(ids=random_prompt(600)), params=params())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("prompt"), msg
    code, msg = status_of(stack.router_address, token_ids=router_pb2.TokenIds(ids=[1, 999_999]), params=params())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt_token_ids" in msg, msg
    code, msg = status_of(stack.router_address, params=params())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("prompt"), msg
    code, msg = status_of(stack.router_address, chat=common_pb2.ChatMessages(), params=params())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("messages"), msg

    # Unknown model: NOT_FOUND.
    code, msg = status_of(stack.router_address, model="gpt-17", text="Hi", params=params())
    assert code == grpc.StatusCode.NOT_FOUND and "gpt-17" in msg

    # A full waiting queue: RESOURCE_EXHAUSTED.
    waiter, wres = generate_in_thread(stack.router_address, text="Hello", params=params(temperature=0, max_tokens=3))
    wait_for(lambda: engine_stats(engine).waiting == 1, timeout=10, what="the second request to wait")
    code, msg = status_of(stack.router_address, text="One more", params=params(max_tokens=3))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, msg)
    ch, stub = engine_stub(engine)  # the engine says the same to a direct caller
    with pytest.raises(grpc.RpcError) as e:
        for _ in stub.Generate(engine_pb2.EngineGenerateRequest(request_id="x", prompt_token_ids=[1, 2],
                                                                params=params(max_tokens=1)), timeout=10):
            pass
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ch.close()

    # The requests in flight were not disturbed.
    in_flight.join(120)
    waiter.join(120)
    assert res.error is None and wres.error is None
    want = offline_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=80, ignore_eos=True),
                                use_tqdm=False)[0].outputs[0]
    assert res.token_ids[0] == want.token_ids and res.text[0] == want.text
    assert wres.usage.completion_tokens == 3


def test_no_engine_for_the_model_is_unavailable(small_queue_stack, tmp_path):
    """A router whose registry has no engine (here: an empty Redis database) answers UNAVAILABLE."""
    import subprocess

    stack = small_queue_stack
    port = free_port()
    empty_db = stack.redis_url.rsplit("/", 1)[0] + "/5"
    log = open(tmp_path / "router.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "services.router", "--port", str(port), "--tokenizer",
                          stack.tokenizer_address, "--redis-url", empty_db], stdout=log, stderr=subprocess.STDOUT)
    try:
        from grpc_health.v1 import health_pb2

        from tests.integration.helpers import wait_health_status

        # Honest readiness: with no engine to route to, the router is up but NOT_SERVING.
        assert wait_health_status(f"127.0.0.1:{port}") == health_pb2.HealthCheckResponse.NOT_SERVING
        code, msg = status_of(f"127.0.0.1:{port}", text="Hi", params=params(max_tokens=2))
        assert code == grpc.StatusCode.UNAVAILABLE and "no live engine" in msg
        # The first router is unaffected.
        assert generate(stack.router_address, text="Hi", params=params(max_tokens=2)).usage.completion_tokens == 2
    finally:
        p.terminate()
        t0 = time.monotonic()
        try:  # the router's own guard ends it 40 s after SIGTERM (grace + margin): wait past that, then say why
            p.wait(45)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        took = time.monotonic() - t0
        log.close()
        tail = (tmp_path / "router.log").read_text(errors="replace")[-3000:]
    # Nothing in flight: SIGTERM ends it at once (not at the 30 s drain grace, nor the guard's 40 s).
    assert p.returncode == 0 and took < 30, f"router exit {p.returncode} after {took:.1f}s; its log ends:\n{tail}"


def test_engine_metrics_use_vllm_names(small_queue_stack):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    stack = small_queue_stack
    generate(stack.router_address, text="Hi", params=params(temperature=0, max_tokens=3, ignore_eos=True))
    model = (("model_name", "SmolLM2-135M-Instruct"),)
    deadline = time.monotonic() + 10
    while True:  # the gauges are set by the engine loop after the stream's last message: give it a moment
        text = urllib.request.urlopen(stack.metrics_url, timeout=5).read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for fam in text_string_to_metric_families(text) for s in fam.samples}
        if samples.get(("vllm:num_requests_running", model)) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert samples[("vllm:num_requests_running", model)] == 0
    assert samples[("vllm:num_requests_waiting", model)] == 0
    assert 0 <= samples[("vllm:kv_cache_usage_perc", model)] <= 1
    assert samples[("vllm:request_success_total", tuple(sorted(model + (("finished_reason", "length"),))))] >= 1
    assert samples[("vllm:time_to_first_token_seconds_count", model)] >= 1
    assert samples[("vllm:inter_token_latency_seconds_count", model)] >= 2
    assert samples[("vllm:generation_tokens_total", model)] >= 3
