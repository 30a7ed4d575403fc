"""A prompt that cannot fit the model's context is refused before it is encoded: fast, and with the
tokenizer service's memory unchanged (issue: a 10 MB prompt used to cost 2.5 GB and 10 s)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import pytest

from folio.stack import free_port
from protos.gen.folio.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def tokenizer():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "services.tokenizer", "--port", str(port)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ch = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)])
    stub = tokenizer_pb2_grpc.TokenizerStub(ch)
    deadline = time.monotonic() + 60
    while True:
        try:
            stub.Info(tokenizer_pb2.TokenizerInfoRequest(), timeout=1)
            break
        except grpc.RpcError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tokenizer did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)
    yield proc, stub
    proc.terminate()
    proc.wait(10)
    ch.close()


def test_a_10mb_prompt_is_refused_quickly_with_memory_unchanged(tokenizer):
    proc, stub = tokenizer
    huge = "The capital of France is Paris. " * (10_000_000 // 32)
    with pytest.raises(grpc.RpcError):  # the first large message sizes gRPC's and malloc's buffers
        stub.Encode(tokenizer_pb2.EncodeRequest(text=huge), timeout=30)
    before = _rss_mb(proc.pid)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        with pytest.raises(grpc.RpcError) as e:
            stub.Encode(tokenizer_pb2.EncodeRequest(text=huge), timeout=30)
        times.append(time.perf_counter() - t0)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("prompt: 1000") and "cannot fit" in e.value.details()
    after = _rss_mb(proc.pid)
    # The refusal itself is microseconds; the rest is moving 10 MB over loopback: ~60 ms on an idle
    # 2-core machine (the bound leaves room for a loaded one). Before the bound: ~10 s and 2.5 GB.
    print(f"refusal: {[round(t * 1000) for t in times]} ms; RSS {before:.0f} -> {after:.0f} MB")
    assert min(times) < 0.2, f"refusal took {min(times) * 1000:.0f} ms"
    assert after - before < 50, f"tokenizer RSS grew {after - before:.0f} MB ({before:.0f} -> {after:.0f})"


def test_chat_content_is_bounded_too(tokenizer):
    _, stub = tokenizer
    msg = common_pb2.ChatMessage(role="user", content="x" * 5_000_000)
    with pytest.raises(grpc.RpcError) as e:
        stub.Encode(tokenizer_pb2.EncodeRequest(chat=common_pb2.ChatMessages(messages=[msg])), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("messages[0].content:")


def test_a_prompt_that_fits_still_encodes(tokenizer):
    _, stub = tokenizer
    r = stub.Encode(tokenizer_pb2.EncodeRequest(text="The capital of France is"))
    assert list(r.token_ids) == [504, 3575, 282, 4649, 314]  # FACTS.md's reference ids


def test_undecodable_bytes_are_invalid_argument_not_unknown(tokenizer):
    proc, _ = tokenizer
    port = next(a for a in proc.args if a.isdigit())
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        garbage = b"\xff\xff\xff\xff\x0f"  # field 0x1fffffff... with a truncated varint: not a message
        encode = ch.unary_unary("/folio.v1.Tokenizer/Encode")
        with pytest.raises(grpc.RpcError) as e:
            encode(garbage, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("request: the message's bytes are not a valid protobuf message")
        detok = ch.stream_stream("/folio.v1.Tokenizer/Detokenize")
        with pytest.raises(grpc.RpcError) as e:
            list(detok(iter([garbage]), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert proc.poll() is None


def test_a_huge_model_name_is_not_found_with_a_short_message(tokenizer):
    _, stub = tokenizer
    with pytest.raises(grpc.RpcError) as e:
        stub.Encode(tokenizer_pb2.EncodeRequest(model="m" * 20_000, text="Hi"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(e.value.details()) < 300 and "more characters" in e.value.details()
