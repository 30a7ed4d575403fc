"""The `folio` command: start the local stack, stream a completion from it, prepare the bundled model."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
import time


def _engine_flags() -> list[str]:
    """`folio up` takes every EngineConfig field as a flag, except the model (--model serves the tokenizer too)."""
    from services.engine.config import EngineConfig

    return [f.name for f in dataclasses.fields(EngineConfig) if f.name != "model"]


def _prepare_model(args) -> int:
    from services.common.bundled_model import ensure_bundled_model

    ensure_bundled_model()
    return 0


def _model_path(args) -> int:
    from services.common.bundled_model import ensure_bundled_model

    print(ensure_bundled_model(quiet=True))
    return 0


def stack_config(args):
    """The StackConfig `folio up ARGS` runs: engine flags given (only those), then the extra
    --engine-arg / --router-arg / --tokenizer-arg flags, split as a shell would."""
    from folio.stack import StackConfig
    from services.common import config as cfg
    from services.engine.config import EngineConfig

    def extra(values):
        return [a for v in values or [] for a in shlex.split(v)]

    engine_args = cfg.to_argv(EngineConfig, args, only=_engine_flags())  # given flags only: engine defaults hold
    return StackConfig(
        engines=args.engines, model=args.model, served_model_name=args.served_model_name, host=args.host,
        router_port=args.port, http_port=None if args.no_http else args.http_port, redis_url=args.redis_url,
        engine_args=engine_args + extra(args.engine_arg), router_args=extra(args.router_arg),
        tokenizer_args=extra(args.tokenizer_arg), log_dir=args.log_dir, log_level=args.log_level,
        startup_timeout_s=args.startup_timeout,
        cuda_per_engine=getattr(args, "device", None) == "cuda" and args.engines > 1)


def _up(args) -> int:
    from folio.stack import Stack
    from folio.supervisor import GaveUp, Supervisor

    if args.model is None:  # convert once here rather than in every child
        from services.common.bundled_model import ensure_bundled_model

        ensure_bundled_model()
    config = stack_config(args)
    stack = Stack(config)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"folio: starting redis, tokenizer, {args.engines} engine(s) and the router (logs in {stack.log_dir})",
          file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        stack.start()
        model = args.served_model_name or args.model or "SmolLM2-135M-Instruct (bundled)"
        lines = [f"Folio is up in {time.monotonic() - t0:.1f}s, serving {model}",
                 f"  router     grpc://{stack.router_address}   (folio.v1.Router; health + reflection)"]
        if not args.no_http:
            lines.append(f"  http       http://{args.host}:{args.http_port}   (OpenAI-compatible: /v1/completions, "
                         "/v1/chat/completions, /v1/models, /metrics)")
        lines.append(f"  tokenizer  grpc://{stack.tokenizer_address}")
        lines += [f"  engine {i}   grpc://{a}" for i, a in enumerate(stack.engine_addresses)]
        lines += [f"  redis      {stack.redis_url}", f"  logs       {stack.log_dir}", "",
                  "Try:", f"  {_self_cmd()} complete \"The capital of France is\" --max-tokens 24 --router {stack.router_address}"]
        if not args.no_http:
            lines.append(f"  curl http://{args.host}:{args.http_port}/v1/completions -H \"Content-Type: application/json\" "
                         "-d '{\"prompt\": \"San Francisco is a\", \"max_tokens\": 7, \"temperature\": 0}'")
        lines += ["", "Ctrl-C stops everything."]
        print("\n".join(lines), flush=True)
        Supervisor(stack).run()  # a child that dies is restarted; one that keeps dying stops the stack
    except KeyboardInterrupt:
        print("\nfolio: stopping...", file=sys.stderr, flush=True)
        return 0
    except GaveUp as e:
        print(f"folio: {e}", file=sys.stderr, flush=True)
        return 1
    except (RuntimeError, TimeoutError) as e:
        print(f"folio: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        print("folio: stopped", file=sys.stderr, flush=True)


def _self_cmd() -> str:
    return "python -m folio" if not sys.argv[0].endswith("folio") else "folio"


def _complete(args) -> int:
    import grpc

    from protos.gen.folio.v1 import common_pb2, router_pb2, router_pb2_grpc
    from services.common.auth import bearer_metadata

    params = common_pb2.SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, top_p=args.top_p,
                                       stop=args.stop or [])
    if args.seed is not None:
        params.seed = args.seed
    req = router_pb2.GenerateRequest(model=args.model or "", params=params)
    if args.chat:
        req.chat.messages.add(role="user", content=args.prompt)
    else:
        req.text = args.prompt
    usage, reason = None, None
    t0 = time.monotonic()
    ttft = None
    with grpc.insecure_channel(args.router) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        try:
            for msg in stub.Generate(req, timeout=args.timeout,
                                     metadata=bearer_metadata(os.environ.get("FOLIO_API_KEY"))):
                for c in msg.choices:
                    if c.text:
                        if ttft is None:
                            ttft = time.monotonic() - t0
                        sys.stdout.write(c.text)
                        sys.stdout.flush()
                    if c.finish_reason:
                        reason = common_pb2.FinishReason.Name(c.finish_reason).removeprefix("FINISH_REASON_").lower()
                if msg.finished:
                    usage = msg.usage
        except grpc.RpcError as e:
            print(f"\nfolio: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nfolio: cancelled", file=sys.stderr)
            return 130
    print()
    if usage is not None and not args.quiet:
        total = time.monotonic() - t0
        print(f"[{reason}; {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens; "
              f"first text {1000 * (ttft or 0):.0f} ms, total {total:.2f}s]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from services.common import config as cfg
    from services.engine.config import SERVED_DEFAULTS, EngineConfig

    parser = argparse.ArgumentParser(prog="folio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare-model", help="fetch and convert the bundled model into the cache").set_defaults(fn=_prepare_model)
    sub.add_parser("model-path", help="print the bundled model's HF directory").set_defaults(fn=_model_path)

    up = sub.add_parser("up", help="start Redis, the tokenizer, engine(s) and the router on this machine")
    up.add_argument("--model", default=None,
                    help="HF model directory or hub id (default: the bundled SmolLM2-135M-Instruct)")
    up.add_argument("--served-model-name", default=None,
                    help="the model name clients send and /v1/models lists (default: the hub id, or the directory's name)")
    up.add_argument("--engines", type=int, default=1, help="engine processes (default 1)")
    up.add_argument("--host", default="127.0.0.1", help="address every service binds (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=50051, help="router gRPC port (default 50051; 0: any free port)")
    up.add_argument("--http-port", type=int, default=8000,
                    help="the router's OpenAI-compatible HTTP API port (default 8000; $FOLIO_API_KEY sets an API key)")
    up.add_argument("--no-http", action="store_true", help="serve gRPC only")
    up.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                    help="use this Redis (default: $REDIS_URL, else start the venv's redis-server on a free port)")
    up.add_argument("--engine-arg", action="append",
                    help="extra flags for every engine, e.g. --engine-arg='--metrics-port 9100'")
    up.add_argument("--router-arg", action="append",
                    help="extra flags for the router (python -m services.router --help), e.g. "
                         "--router-arg='--tool-call-parser mistral'")
    up.add_argument("--tokenizer-arg", action="append",
                    help="extra flags for the tokenizer service (python -m services.tokenizer --help)")
    up.add_argument("--log-dir", default=None, help="children's logs (default: a temporary directory)")
    up.add_argument("--log-level", default="INFO", help="every service's logging level (default INFO)")
    up.add_argument("--startup-timeout", type=float, default=300.0,
                    help="seconds for every service to answer SERVING (default 300)")
    engine = up.add_argument_group("engine", "passed to every engine (python -m services.engine --help); "
                                   "a flag not given leaves the engine's default")
    cfg.add_args(engine, EngineConfig, defaults=SERVED_DEFAULTS, only=_engine_flags(), forward=True)
    up.set_defaults(fn=_up)

    comp = sub.add_parser("complete", help="stream a completion from a running router")
    comp.add_argument("prompt")
    comp.add_argument("--router", default="127.0.0.1:50051", help="router address (default 127.0.0.1:50051)")
    comp.add_argument("--model", default=None)
    comp.add_argument("--max-tokens", type=int, default=64)
    comp.add_argument("--temperature", type=float, default=0.7)
    comp.add_argument("--top-p", type=float, default=1.0)
    comp.add_argument("--seed", type=int, default=None)
    comp.add_argument("--stop", action="append", help="stop string (repeatable)")
    comp.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    comp.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    comp.add_argument("--quiet", action="store_true", help="no usage line on stderr")
    comp.set_defaults(fn=_complete)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
