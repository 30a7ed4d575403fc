"""The router's in-process detokenization, over the very tokenizer files its tokenizer service uses.

Per engine message the router needs the text the new tokens complete. Asking the tokenizer service
(its `Detokenize` stream) costs a write and a read on the router's event loop and a hop through
another process per message, for a few microseconds of decoding; under load those hops queue
(docs/router.md). So the router loads the service's tokenizer.json itself (the path and SHA-256 the
service reports in `Info`) and runs the same `IncrementalDetokenizer` over the same `Tokenizer` the
service runs, which gives the same text byte for byte. When it cannot read those files (the service
is on another machine, the file differs), it says so in the log and uses the service's stream.
The tokenizer service keeps encoding, chat templates and every other client.
"""

from __future__ import annotations

from pathlib import Path

from services.common.tokenizer import IncrementalDetokenizer, Tokenizer


class LocalDetokenizer:
    """One sequence's incremental detokenization in this process (services/router/clients.py's
    `Detokenizer`): what the tokenizer service's Detokenize handler does per message, without the hop."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool):
        self._tok = tokenizer
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)

    def open_early(self) -> None:
        pass  # nothing to set up

    async def add(self, token_ids: list[int], flush: bool) -> str:
        self._tok.check_ids(token_ids)
        text = self._detok.add(list(token_ids)) if token_ids else ""
        if flush:
            text += self._detok.flush()
        return text

    async def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


def load_local_tokenizer(model_path: str, sha256: str) -> tuple[Tokenizer | None, str]:
    """The tokenizer the service reported (its directory and tokenizer.json's SHA-256), if this process
    can read the same file; else None and the reason, for the log."""
    if not model_path:
        return None, "the tokenizer service does not report its model path"
    path = Path(model_path) / "tokenizer.json"
    try:
        tok = Tokenizer(model_path)
        mine = tok.sha256()
    except Exception as e:  # noqa: BLE001 - whatever stops it loading here, the service still works
        return None, f"cannot load {path} here ({type(e).__name__}: {e})"
    if mine != sha256:
        return None, f"{path} here is not the tokenizer service's file (SHA-256 {mine[:12]} vs {sha256[:12]})"
    return tok, f"loaded {path}"
