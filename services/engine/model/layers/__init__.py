"""Building blocks of every architecture: linear layers that know their tensor-parallel sharding, norms,
activations, rotary variants, embeddings / LM head and the attention wrapper (docs/models.md)."""
