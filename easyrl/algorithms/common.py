"""Pieces the algorithm files share: iterator arguments and a model-forward wrapper."""
from __future__ import annotations

import jax

from easyrl import model as M


def iter_kwargs(c, split: str) -> dict:
    train = split == "train"
    return dict(seed=c.seed, shuffle=bool(c.data.shuffle) and train,
                num_epochs=None, process_index=jax.process_index(),
                process_count=jax.process_count())


def fmt(c):
    return c.data.format or None


def lm_logits(config, params, batch, prefix: str = "", rng=None):
    """Logits [B, T, V] for a right-padded / packed batch (uses positions & segments if present).
    `rng`: LoRA adapter dropout key (training)."""
    g = lambda k: batch.get(prefix + k)  # noqa: E731
    return M.forward(config, params, g("input_ids"), g("attention_mask"),
                     positions=g("positions"), segment_ids=g("segment_ids"), rng=rng)


def lm_hidden(config, params, batch, prefix: str = "", rng=None):
    """Final normed hidden states [B, T, D] of a batch, as `lm_logits` but without the LM head
    (`losses.lm_head_loss_sums` applies it fused with the cross-entropy)."""
    g = lambda k: batch.get(prefix + k)  # noqa: E731
    return M.hidden_states(config, params, g("input_ids"), g("attention_mask"),
                           positions=g("positions"), segment_ids=g("segment_ids"), rng=rng)
