"""Text <-> token ids for one model directory: encoding, chat templates and incremental detokenization.

Shared by the engine (prompt encoding), the output processor (text) and the tokenizer service. Uses the
`tokenizers` library on the model's tokenizer.json and jinja2 for the chat template, so it needs no
transformers import on the hot path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from services.common.errors import InvalidArgument


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise ValueError(f"model: no tokenizer.json in {model_dir}")
        self._tok = HFTokenizer.from_file(str(path))
        self.model_dir = model_dir
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.chat_template: str | None = cfg.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take the default one
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default")
        tmpl_file = model_dir / "chat_template.jinja"
        if self.chat_template is None and tmpl_file.exists():
            self.chat_template = tmpl_file.read_text()

        def token_str(v):
            return v.get("content") if isinstance(v, dict) else v

        self.bos_token = token_str(cfg.get("bos_token"))
        self.eos_token = token_str(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        gen_cfg = model_dir / "generation_config.json"
        eos_ids: set[int] = set()
        if gen_cfg.exists():
            e = json.loads(gen_cfg.read_text()).get("eos_token_id")
            eos_ids.update(e if isinstance(e, list) else ([e] if e is not None else []))
        if self.eos_token_id is not None:
            eos_ids.add(self.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        )
        self.model_max_length = cfg.get("model_max_length")
        self._template = None
        self._max_token_bytes: int | None = None

    # --- encoding -------------------------------------------------------------------------------
    def max_text_bytes(self, max_tokens: int) -> int:
        """Bytes of UTF-8 text beyond which encoding must give more than `max_tokens` tokens, so such
        text can be refused without encoding it. A token stands for at most as many bytes as its
        vocabulary string has in UTF-8 (byte-level BPE, Metaspace and byte-fallback tokens all spell
        their bytes at least once); a normalizer may shrink text first (composing, stripping accents),
        so with one the bound is widened fourfold."""
        if self._max_token_bytes is None:
            vocab = self._tok.get_vocab(with_added_tokens=True)
            self._max_token_bytes = max((len(s.encode("utf-8")) for s in vocab), default=1)
        widen = 1 if self._tok.normalizer is None else 4
        return max_tokens * self._max_token_bytes * widen

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id] + ids
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        if not self.chat_template:
            raise ValueError("messages: this model has no chat template")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(msg):
                raise ValueError(f"messages: {msg}")

            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}]: each message needs 'role' and 'content'")
        if tools and "tools" not in self.chat_template:
            messages = [_tools_system_message(tools)] + list(messages)
        if "tool_calls" not in self.chat_template and any(m.get("tool_calls") for m in messages):
            messages = [_calls_as_text(m) if m.get("tool_calls") else m for m in messages]
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", tools=tools,
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # The template already writes any BOS it wants; don't add another.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    # --- decoding -------------------------------------------------------------------------------
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def check_ids(self, ids) -> None:
        """InvalidArgument naming the first id outside the vocabulary (the decoders would drop it silently)."""
        if ids and max(ids) >= self.vocab_size:
            bad = next(t for t in ids if t >= self.vocab_size)
            raise InvalidArgument(f"token_ids: token id {bad} is outside the vocabulary [0, {self.vocab_size})")

    def sha256(self) -> str:
        """SHA-256 (hex) of the tokenizer.json this was loaded from: which tokenizer this is, exactly."""
        return hashlib.sha256((self.model_dir / "tokenizer.json").read_bytes()).hexdigest()

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def decode_token(self, i: int) -> str:
        """One token's text as shown beside a logprob (lone bytes of a multi-byte char stay raw)."""
        return self._tok.decode([i], skip_special_tokens=False)


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a multi-byte character.

    Decodes a small window of recent tokens twice (with and without the new ones) and emits the
    difference once it no longer ends in a replacement character: byte-level BPE tokens can hold
    part of a UTF-8 sequence, and some tokenizers change a token's spacing by its left neighbour.
    """

    tokenizer: Tokenizer
    skip_special_tokens: bool = True
    token_ids: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0

    def add(self, new_ids: list[int]) -> str:
        self.token_ids.extend(new_ids)
        delta = ""
        tok = self.tokenizer
        prefix = tok.decode(self.token_ids[self._prefix_offset:self._read_offset], self.skip_special_tokens)
        full = tok.decode(self.token_ids[self._prefix_offset:], self.skip_special_tokens)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
        return delta

    def flush(self) -> str:
        """At the end of a stream: emit whatever is held back (possibly a lone replacement char)."""
        tok = self.tokenizer
        prefix = tok.decode(self.token_ids[self._prefix_offset:self._read_offset], self.skip_special_tokens)
        full = tok.decode(self.token_ids[self._prefix_offset:], self.skip_special_tokens)
        delta = full[len(prefix):] if len(full) > len(prefix) else ""
        self._prefix_offset = self._read_offset = len(self.token_ids)
        return delta


def _tools_system_message(tools: list[dict]) -> dict:
    """For a chat template that ignores `tools`: the tools as a system message, in the Hermes format
    the router's default tool-call parser reads, so tools are never dropped without a trace."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return {"role": "system", "content": (
        "You may call one or more functions to assist with the user query. The functions:\n<tools>\n"
        f"{listing}\n</tools>\nFor each function call, reply with a JSON object with the function name "
        'and arguments within <tool_call></tool_call> tags: <tool_call>{"name": <function-name>, '
        '"arguments": <args-json-object>}</tool_call>')}


def _calls_as_text(m: dict) -> dict:
    """An assistant message's tool calls written into its content (Hermes format), for a chat
    template that ignores `tool_calls`."""
    parts = [m.get("content") or ""]
    for c in m["tool_calls"]:
        fn = c.get("function", {}) if isinstance(c, dict) else {}
        parts.append("<tool_call>" + json.dumps({"name": fn.get("name"), "arguments": fn.get("arguments")},
                                                 ensure_ascii=False) + "</tool_call>")
    return {**m, "content": "\n".join(p for p in parts if p)}

