"""The OpenAI-compatible HTTP API (as vLLM serves it), a thin FastAPI layer over `RouterCore`; see docs/http.md.

One file per job: protocol.py (request bodies), errors.py (error bodies and the one exception
mapping), run.py (a request's generations merged, cancelled on disconnect), serving.py (steps both
endpoints share), logprobs.py, completions.py, chat.py, app.py (`build_app`: routes, middleware).
"""

from services.router.openai.app import build_app

__all__ = ["build_app"]
