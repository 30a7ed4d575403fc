"""The `folio` command: prepare the bundled model, print its path, start the local stack."""

from __future__ import annotations

import argparse
import sys


def _prepare_model(args) -> int:
    from folio.bundled_model import ensure_bundled_model

    ensure_bundled_model()
    return 0


def _model_path(args) -> int:
    from folio.bundled_model import ensure_bundled_model

    print(ensure_bundled_model(quiet=True))
    return 0


def _up(args) -> int:
    # Until the services exist: show the offline API on the bundled model.
    from folio import LLM, SamplingParams

    llm = LLM(args.model)
    prompts = ["The capital of France is", "San Francisco is a", "The three primary colors are"]
    for out in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens), use_tqdm=False):
        print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="folio", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare-model", help="fetch and convert the bundled model into the cache").set_defaults(fn=_prepare_model)
    sub.add_parser("model-path", help="print the bundled model's HF directory").set_defaults(fn=_model_path)
    up = sub.add_parser("up", help="start Folio on this machine")
    up.add_argument("--model", default=None, help="HF model directory or hub id (default: the bundled model)")
    up.add_argument("--max-tokens", type=int, default=24)
    up.set_defaults(fn=_up)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
