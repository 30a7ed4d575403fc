"""Tokenizer service process: serves one model's tokenizer (Encode, Decode, Detokenize stream, Info)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from protos.gen.folio.v1 import tokenizer_pb2 as pb, tokenizer_pb2_grpc
from services.common import config as cfg, telemetry
from services.common.errors import InvalidArgument, NotFound, quote
from services.common.model_location import resolve_model_path, served_name
from services.common.server import GrpcServer, configure_logging
from services.common.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("folio.tokenizer")


@dataclass
class TokenizerConfig:
    model: str | None = None
    """HF model directory or hub id (default: the bundled model)."""
    served_model_name: str | None = None
    """Model name clients use (default: the hub id as given, else the directory's name)."""
    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = 50052
    """gRPC port (0: any free port)."""
    grace_s: float = 5.0
    """Seconds in-flight calls get on SIGTERM."""
    log_level: str = "INFO"
    """Logging level."""


def model_dir_of(model: str | None) -> Path:
    if model is None:
        from services.common.bundled_model import ensure_bundled_model

        return ensure_bundled_model(quiet=True)
    p = resolve_model_path(model)  # a directory or a hub id
    if not (p / "tokenizer.json").exists():
        raise ValueError(f"model: no tokenizer.json in {p}")
    return p


def context_length(model_dir: Path) -> int | None:
    """The model's context length from its config.json (None when it does not say)."""
    path = model_dir / "config.json"
    if not path.exists():
        return None
    cfg = json.loads(path.read_text())
    cfg = cfg.get("text_config", cfg)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key]
    return None


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, tokenizer: Tokenizer, model_name: str, max_tokens: int | None = None):
        self.tok = tokenizer
        self.model_name = model_name
        # Text longer than this cannot fit the model's context: refused before it is encoded (a 10 MB
        # prompt would otherwise cost seconds and gigabytes here before its length could be checked).
        self.max_text_bytes = tokenizer.max_text_bytes(max_tokens) if max_tokens else None
        self.sha256 = tokenizer.sha256()

    def _check_fits(self, text: str, field: str) -> None:
        if self.max_text_bytes is None or len(text) * 4 <= self.max_text_bytes:
            return  # a character is at most 4 bytes: no need to count them
        n = len(text.encode("utf-8"))
        if n > self.max_text_bytes:
            raise InvalidArgument(
                f"{field}: {n} bytes of text cannot fit this model's context (at most {self.max_text_bytes} "
                "bytes could encode to the model's context length in tokens)")

    def _check_model(self, model: str) -> None:
        if model and model != self.model_name:
            raise NotFound(f"model: {quote(model)} is not served by this tokenizer (it serves {self.model_name!r})")

    async def Encode(self, request: pb.EncodeRequest, context) -> pb.EncodeResponse:
        self._check_model(request.model)
        t0 = time.perf_counter_ns()
        which = request.WhichOneof("input")
        if which == "chat":
            messages = [_message(i, m) for i, m in enumerate(request.chat.messages)]
            tools = _json_list(request.chat.tools_json, "tools") if request.chat.tools_json else None
            if not messages:
                raise InvalidArgument("messages: at least one message is required")
        gen_prompt = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        if which == "chat":
            for i, m in enumerate(messages):
                self._check_fits(m["content"], f"messages[{i}].content")
            text = self.tok.apply_chat_template(messages, gen_prompt, tools=tools)
            self._check_fits(text, "messages")
            add_special = False  # the template already writes any BOS it wants
        elif which == "text":
            text = request.text
            self._check_fits(text, "prompt")
        else:
            raise InvalidArgument("input: give text or chat messages")
        # Encoding runs off the event loop, so one long prompt does not stall every other call.
        ids = await asyncio.to_thread(self.tok.encode, text, add_special)
        return pb.EncodeResponse(token_ids=ids, prompt_text=text, encode_ns=time.perf_counter_ns() - t0)

    async def Decode(self, request: pb.DecodeRequest, context) -> pb.DecodeResponse:
        self._check_model(request.model)
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        self.tok.check_ids(request.token_ids)
        return pb.DecodeResponse(text=self.tok.decode(list(request.token_ids), skip))

    async def Detokenize(self, request_iterator, context):
        detok = None
        async for req in request_iterator:
            t0 = time.perf_counter_ns()
            if detok is None:
                self._check_model(req.model)
                skip = req.skip_special_tokens if req.HasField("skip_special_tokens") else True
                detok = IncrementalDetokenizer(self.tok, skip)
            self.tok.check_ids(req.token_ids)
            text = detok.add(list(req.token_ids)) if req.token_ids else ""
            if req.flush:
                text += detok.flush()
            yield pb.DetokenizeResponse(text=text, detokenize_ns=time.perf_counter_ns() - t0)

    async def Info(self, request, context) -> pb.TokenizerInfoResponse:
        t = self.tok
        r = pb.TokenizerInfoResponse(
            model=self.model_name, vocab_size=t.vocab_size, eos_token_ids=sorted(t.eos_token_ids),
            special_token_ids=sorted(t.special_token_ids), max_length=int(t.model_max_length or 0)
            if isinstance(t.model_max_length, int) and t.model_max_length < 2**63 else 0,
            has_chat_template=bool(t.chat_template), model_path=str(t.model_dir.resolve()),
            tokenizer_sha256=self.sha256)
        if t.bos_token_id is not None:
            r.bos_token_id = t.bos_token_id
        return r


async def serve(c: TokenizerConfig) -> None:
    model_dir = model_dir_of(c.model)
    name = c.served_model_name or served_name(c.model, model_dir)
    servicer = TokenizerServicer(Tokenizer(model_dir), name, context_length(model_dir))
    server = GrpcServer([pb.DESCRIPTOR.services_by_name["Tokenizer"].full_name], c.host, c.port)
    tokenizer_pb2_grpc.add_TokenizerServicer_to_server(servicer, server.server)
    log.info("tokenizer for %s (%s)", name, model_dir)
    await server.run(c.grace_s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.tokenizer", description=__doc__)
    cfg.add_args(parser, TokenizerConfig)
    return parser


def parse_config(argv: list[str] | None = None) -> TokenizerConfig:
    return cfg.from_args(TokenizerConfig, build_parser().parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    c = parse_config(argv)
    configure_logging(c.log_level)
    telemetry.setup("folio-tokenizer", os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    try:
        asyncio.run(serve(c))
    finally:
        telemetry.shutdown()
    return 0


def _json_list(text: str, field: str) -> list:
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{field}: not valid JSON ({e.msg})") from None
    if not isinstance(v, list):
        raise InvalidArgument(f"{field}: must be a JSON list")
    return v


def _message(i: int, m) -> dict:
    """A chat message as templates take it: tool calls with their arguments decoded to objects (as
    transformers passes them), a tool message's call id."""
    msg = {"role": m.role, "content": m.content}
    if m.tool_calls_json:
        calls = _json_list(m.tool_calls_json, f"messages[{i}].tool_calls")
        for c in calls:
            fn = c.get("function") if isinstance(c, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except json.JSONDecodeError:
                    pass
        msg["tool_calls"] = calls
    if m.tool_call_id:
        msg["tool_call_id"] = m.tool_call_id
    return msg

