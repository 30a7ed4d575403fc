"""Build a tiny random-weight model with transformers, and run it through Folio and through transformers."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.models.architectures import Arch

PROMPT_LENS = (1, 4, 9, 17, 30, 45)
NEW_TOKENS = 10


def build_checkpoint(arch: Arch, directory: Path, seed: int = 0):
    """Save the reference model (float32) into `directory`; return it in eval mode (eager attention)."""
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, arch.config_class)(**arch.config)
    config.architectures = [arch.architecture]
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                          dtype=torch.float32)
    honour_swiglu_config(model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: perturb all, so a misplaced one shows
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    model.save_pretrained(directory)
    return model


def honour_swiglu_config(model) -> None:
    """gpt-oss's experts compute with config.swiglu_alpha / swiglu_limit in transformers 5.23
    (requirements.txt), as Folio does; transformers 5.17 (the GPU machine's image) ignores both fields and
    hard-codes 1.702 and 7.0, the released checkpoints' values. The test model sets swiglu_limit 0.2 so the
    clamps bite, so under 5.17 the reference was another function: set the experts' values from the config,
    making the reference the same on either version."""
    cfg = model.config
    for m in model.modules():
        if type(m).__name__ == "GptOssExperts":
            m.alpha = float(getattr(cfg, "swiglu_alpha", m.alpha))
            m.limit = float(getattr(cfg, "swiglu_limit", m.limit))


def prompts(vocab: int, lens=PROMPT_LENS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def hf_greedy(model, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    return hf_greedy_many(model, [prompt], n)[0]


@torch.no_grad()
def hf_greedy_many(model, prompt_batch: list[list[int]], n: int = NEW_TOKENS) -> list[list[int]]:
    """Greedy by full forwards (no HF cache): the reference depends only on the model's forward. Each step runs
    every sequence so far in one right-padded batch with no attention mask and reads each sequence's logits at its
    own last position. Causal attention keeps a position from seeing the padding after it, so each row's logits
    are its unpadded forward's (up to float32 summation order); one forward a step instead of one per prompt."""
    seqs = [list(p) for p in prompt_batch]
    for _ in range(n):
        width = max(map(len, seqs))
        ids = torch.tensor([s + [s[-1]] * (width - len(s)) for s in seqs])
        logits = model(ids).logits
        for i, s in enumerate(seqs):
            s.append(int(logits[i, len(s) - 1].argmax()))
    return [s[len(p):] for s, p in zip(seqs, prompt_batch)]


@torch.no_grad()
def hf_logits(model, prompt: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt])).logits[0].float()


@torch.no_grad()
def folio_prefill_logits(runner, prompt_batch: list[list[int]]) -> list[torch.Tensor]:
    """Every position's logits for several prompts prefilled together in one step (one batch, paged KV)."""
    from services.engine.attention.metadata import AttentionMetadata

    bs = runner.block_size
    ids, pos, slots, tables = [], [], [], []
    next_block = 0
    for p in prompt_batch:
        nblk = -(-len(p) // bs)
        table = list(range(next_block, next_block + nblk))
        next_block += nblk
        tables.append(table)
        ids += p
        pos += range(len(p))
        slots += [table[i // bs] * bs + i % bs for i in range(len(p))]
    if next_block > runner.kv_caches[0].shape[1]:
        raise ValueError("prompt batch does not fit the test's KV pool")
    width = max(map(len, tables))
    bt = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, :len(t)] = torch.tensor(t)
    lens = [len(p) for p in prompt_batch]
    dev = runner.device
    meta = AttentionMetadata(
        num_seqs=len(lens), num_tokens=len(ids),
        query_start_loc=torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev), block_tables=bt.to(dev),
        slot_mapping=torch.tensor(slots, device=dev), max_query_len=max(lens), max_seq_len=max(lens),
        query_lens_cpu=lens, seq_lens_cpu=lens)
    model = runner.model
    hidden = model.forward(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), runner.kv_caches, meta)
    logits = model.logits(hidden).cpu()
    return list(logits.split(lens))
