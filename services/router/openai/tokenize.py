"""POST /tokenize and /detokenize, in vLLM's shapes (lm-eval and other clients count and score tokens with them)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from services.common.errors import InvalidArgument
from services.common.sampling_params import SamplingParams
from services.router.core import GenerateInput, RouterCore
from services.router.openai.protocol import DetokenizeRequest, TokenizeRequest


class Tokenize:
    def __init__(self, core: RouterCore):
        self.core = core

    async def tokenize(self, req: TokenizeRequest) -> JSONResponse:
        """A prompt (text) or messages (through the chat template, as chat completions renders them)."""
        if (req.prompt is None) == (req.messages is None):
            raise InvalidArgument("prompt: give exactly one of prompt or messages")
        if req.messages is not None:
            self.core.limits.check_count("messages", req.messages, "max_messages")
            messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                         "\n".join(p.text or "" for p in (m.content or []))} for m in req.messages]
            inp = GenerateInput(params=SamplingParams(), model=req.model, messages=messages,
                                add_generation_prompt=req.add_generation_prompt)
        else:
            inp = GenerateInput(params=SamplingParams(), model=req.model, prompt=req.prompt,
                                add_special_tokens=req.add_special_tokens)
        model, ids = await self.core.encode(inp)
        return JSONResponse({"count": len(ids), "max_model_len": self.core.max_model_len(model), "tokens": ids,
                             "token_strs": None})

    async def detokenize(self, req: DetokenizeRequest) -> JSONResponse:
        model = self.core.resolve_model(req.model)
        return JSONResponse({"prompt": await self.core.decode(model, req.tokens, skip_special_tokens=False)})
