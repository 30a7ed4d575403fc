"""The router's in-process detokenizer gives the tokenizer service's text byte for byte.

A real tokenizer service (its gRPC servicer, on a local port) and the router's tokenizer client in both
modes: `detokenize="service"` (the service's Detokenize stream) and `"local"` (the service's own
tokenizer.json loaded in the router, services/router/local_detokenizer.py). The same token ids, cut
into the same messages, go through both; every message's text must be equal, and the whole text must
equal a one-shot decode of all the ids (transformers' for the bundled model). Corpus: CJK, emoji whose
bytes are split across tokens, special tokens in the middle, random ids (lone bytes of multi-byte
characters), with skip_special_tokens both ways; on the bundled model's byte-level BPE and on a small
SentencePiece-style tokenizer (Metaspace, byte fallback, leading-space strip) built here.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil

import grpc
import pytest

from protos.gen.folio.v1 import tokenizer_pb2_grpc
from services.common.errors import InvalidArgument
from services.common.grpc_errors import ErrorInterceptor
from services.common.tokenizer import Tokenizer
from services.router.grpc_clients import GrpcDetokenizer, GrpcTokenizerClient
from services.router.local_detokenizer import LocalDetokenizer
from services.tokenizer.server import TokenizerServicer

TEXTS = [
    "café 日本語のテキスト 🙂 naïve",
    "emoji split: 👩‍👩‍👧 🇫🇷 🤖🤖 ∑∫ — “quotes” ½",
    "中文混合English and 한국어 text, ünïcödé ok",
    "code:\n\tdef f(x):\n\t\treturn x ** 2  # ✓\n",
]


def corpus(tok: Tokenizer, special: list[int], seed: int = 0) -> list[list[int]]:
    """Token id sequences: each text; texts joined by special tokens; seeded random ids over the vocab."""
    seqs = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    joined: list[int] = []
    for i, t in enumerate(TEXTS):
        joined += [special[i % len(special)]] + tok.encode(t, add_special_tokens=False)
    seqs.append(joined + [special[0]])
    rng = random.Random(seed)
    seqs.append([rng.randrange(tok.vocab_size) for _ in range(120)])
    return seqs


def cuts(ids: list[int], seed: int) -> list[list[int]]:
    """The ids as engine messages: one token each, then messages of 1-4 tokens (a batched stream)."""
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(ids):
        k = 1 if seed == 0 else rng.randint(1, 4)
        out.append(ids[i:i + k])
        i += k
    return out


async def stream(detok, messages: list[list[int]]) -> list[str]:
    detok.open_early()
    pieces = [await detok.add(m, flush=i == len(messages) - 1) for i, m in enumerate(messages)]
    await detok.finish()
    return pieces


async def compare(model_dir, reference, random_whole: bool = True) -> int:
    """Runs the corpus through the service and the local detokenizer; returns the sequences compared.
    `random_whole`: the random ids' whole text must equal `reference` too (not so under byte fallback,
    where a run of bytes that is no UTF-8 decodes to other replacement characters in pieces than at once)."""
    tok = Tokenizer(model_dir)
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(tok, "m"), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    service, local = GrpcTokenizerClient(f"127.0.0.1:{port}", "service"), GrpcTokenizerClient(f"127.0.0.1:{port}")
    try:
        await service.start(10)
        await local.start(10)
        assert local.local is not None and service.local is None
        special = sorted(tok.special_token_ids)
        n = 0
        for skip in (True, False):
            assert isinstance(local.detokenizer(skip), LocalDetokenizer)
            assert isinstance(service.detokenizer(skip), GrpcDetokenizer)
            seqs = corpus(tok, special)
            for ids in seqs:
                for seed in (0, 1):
                    msgs = cuts(ids, seed)
                    theirs = await stream(service.detokenizer(skip), msgs)
                    mine = await stream(local.detokenizer(skip), msgs)
                    assert [p.encode() for p in mine] == [p.encode() for p in theirs], (skip, ids)
                    if random_whole or ids is not seqs[-1]:
                        assert "".join(mine) == reference(ids, skip)
                    n += 1
                assert await local.decode(ids, skip) == await service.decode(ids, skip) == reference(ids, skip)
        # Out-of-vocabulary ids: the same refusal, naming the field.
        with pytest.raises(InvalidArgument, match="token_ids: token id"):
            await local.detokenizer(True).add([tok.vocab_size], flush=False)
        with pytest.raises(InvalidArgument, match="token_ids: token id"):
            await service.detokenizer(True).add([tok.vocab_size], flush=False)
        return n
    finally:
        await service.close()
        await local.close()
        await server.stop(None)


def test_bundled_model_local_text_is_the_services_byte_for_byte(model_dir, hf_tokenizer):
    n = asyncio.run(compare(model_dir, lambda ids, skip: hf_tokenizer.decode(ids, skip_special_tokens=skip)))
    assert n == 2 * 6 * 2


def sentencepiece_style(directory):
    """A small Llama-2-style tokenizer.json: characters, a few merges, `<0xNN>` byte fallback for everything
    else (so CJK and emoji become several byte tokens), Metaspace and a decoder that strips the first space."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, normalizers
    from tokenizers.models import BPE

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?()'\"#*-_=\n\té":
        vocab.setdefault(ch, len(vocab))
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("i", "n"), ("▁", "in")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = HFTokenizer(BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>", "<unk>"])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return directory


def test_sentencepiece_style_byte_fallback_local_text_is_the_services(tmp_path):
    model_dir = sentencepiece_style(tmp_path)
    tok = Tokenizer(model_dir)
    # "▁" then one CJK character as its three UTF-8 bytes: a character split across tokens
    assert [tok.id_to_token(i) for i in tok.encode("日")] == ["▁", "<0xE6>", "<0x97>", "<0xA5>"]
    # The whole text's reference: the tokenizers library's own decode of all the ids at once.
    n = asyncio.run(compare(model_dir, lambda ids, skip: tok.decode(ids, skip), random_whole=False))
    assert n == 2 * 6 * 2


def test_router_falls_back_to_the_service_when_it_cannot_read_the_files(model_dir, tmp_path, caplog):
    """The service reports a path the router cannot read (a remote model): the router says so and uses
    the service's stream; a different file at that path is refused too."""
    copy = tmp_path / "m"
    copy.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / f, copy / f)

    async def run(mutate) -> GrpcTokenizerClient:
        server = grpc.aio.server(interceptors=[ErrorInterceptor()])
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(Tokenizer(copy), "m"), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        mutate()
        client = GrpcTokenizerClient(f"127.0.0.1:{port}")
        try:
            await client.start(10)
            assert isinstance(client.detokenizer(True), GrpcDetokenizer)
            ids = Tokenizer(model_dir).encode("日本語 🙂")
            assert "".join(await stream(client.detokenizer(True), cuts(ids, 1))) == "日本語 🙂"
            return client
        finally:
            await client.close()
            await server.stop(None)

    def edit():  # the same path now holds another file (another revision of the model)
        data = json.loads((copy / "tokenizer.json").read_text())
        (copy / "tokenizer.json").write_text(json.dumps(data, indent=1))

    with caplog.at_level("WARNING", logger="folio.router"):
        asyncio.run(run(edit))
    assert "not the tokenizer service's file" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="folio.router"):
        asyncio.run(run(lambda: shutil.rmtree(copy)))
    assert "cannot load" in caplog.text and "through the tokenizer service" in caplog.text
