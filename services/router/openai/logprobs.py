"""Logprobs in OpenAI's two shapes: the completions (legacy) object and chat's `logprobs.content`."""

from __future__ import annotations

from services.common.outputs import Logprob
from services.router.core import RouterCore


def clip(lp: float) -> float:
    return max(lp, -9999.0)  # vLLM's floor: JSON has no -inf


async def token_text(core: RouterCore, model: str, token_id: int, entry: dict[int, Logprob] | None) -> str:
    """The token's own text: the engine's `decoded_token`, else a decode through the tokenizer service."""
    lp = entry.get(token_id) if entry else None
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return await core.decode(model, [token_id], skip_special_tokens=False)


async def completion_logprobs(core: RouterCore, model: str, token_ids: list[int], entries: list, offset: int) -> dict:
    """OpenAI's completions `logprobs` object for these tokens; text offsets start at `offset`."""
    out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for t, entry in zip(token_ids, entries):
        tok = await token_text(core, model, t, entry)
        out["tokens"].append(tok)
        out["text_offset"].append(offset)
        offset += len(tok)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(clip(entry[t].logprob))
        out["top_logprobs"].append({(lp.decoded_token if lp.decoded_token is not None else
                                     await token_text(core, model, tid, entry)): clip(lp.logprob)
                                    for tid, lp in entry.items()})
    return out


async def chat_logprobs(core: RouterCore, model: str, token_ids: list[int], entries: list, top: int) -> list[dict]:
    """Chat's `logprobs.content`: each token with its logprob, bytes and the `top` most likely tokens."""
    content = []
    for t, entry in zip(token_ids, entries):
        tok = await token_text(core, model, t, entry)
        alts = sorted(entry.items(), key=lambda kv: kv[1].rank or 1 << 30)[:top] if entry else []
        tops = []
        for tid, lp in alts:
            s = await token_text(core, model, tid, entry)
            tops.append({"token": s, "logprob": clip(lp.logprob), "bytes": list(s.encode())})
        content.append({"token": tok, "logprob": clip(entry[t].logprob) if entry else -9999.0,
                        "bytes": list(tok.encode()), "top_logprobs": tops})
    return content
