"""Tokens per chunk of the chunked cross-entropy over lm_head: one rule for the engine (moefit.models.loss) and the
planner (moefit.plan.memory). torch-free.

A chunk is sized by the bytes of its fp32 logits, not by a fixed token count: at gpt-oss's or Llama 4's ~200k
vocabulary a 1,024-token chunk is 0.77 GiB of logits plus as much again for the softmax temporary, the peak of a
small model's step; 320 tokens hold it to a quarter of that at the same GEMM efficiency (each chunk is still a
[320 x hidden] x [hidden x vocab] product). Small vocabularies keep 1,024-token chunks.
"""

MAX_TOKENS = 1024
MIN_TOKENS = 128
LOGITS_BYTES = 256 * 2**20  # fp32 logits of one chunk
ALIGN = 64


def loss_chunk_tokens(vocab: int) -> int:
    """Tokens per lm_head chunk for a vocabulary of `vocab` entries."""
    fit = LOGITS_BYTES // (4 * max(vocab, 1)) // ALIGN * ALIGN
    return max(MIN_TOKENS, min(MAX_TOKENS, fit))
