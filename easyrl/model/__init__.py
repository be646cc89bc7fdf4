"""The model API: `forward`, `score`, `values` over a params pytree (see `llama.py` for the layout)."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from easyrl.model.config import PRESETS, LlamaConfig, get_preset
from easyrl.model.llama import Llama

KINDS = ("causal_lm", "reward", "value")

__all__ = ["LlamaConfig", "PRESETS", "get_preset", "Llama", "KINDS", "module", "init_params",
           "param_shapes", "forward", "score", "values", "hidden_states", "positions_from_mask",
           "attention_mask_3d", "last_token_index", "lm_head_kernel"]


def head_for(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    return "lm" if kind == "causal_lm" else "score"


def module(config: LlamaConfig, kind: str = "causal_lm") -> Llama:
    return Llama(config, head=head_for(kind))


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Positions [B, T]: cumsum(mask) - 1, clipped at 0, so left padding does not shift tokens."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention_mask_3d(attention_mask: jax.Array, segment_ids: Optional[jax.Array] = None):
    """[B, T, T] bool: causal, keys must be real tokens, and (packed rows) in the same segment."""
    t = attention_mask.shape[-1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    mask = causal & (attention_mask[:, None, :] > 0)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    # a query on a pad position attends to itself so its softmax stays finite (output unused)
    return mask | jnp.eye(t, dtype=bool)[None]


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index [B] of the last real token (right or left padding)."""
    t = attention_mask.shape[-1]
    idx = jnp.arange(t)[None, :] * (attention_mask > 0)
    return jnp.max(idx, axis=-1)


def _inputs(input_ids, attention_mask, positions, segment_ids):
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if positions is None:
        positions = positions_from_mask(attention_mask)
    return positions, attention_mask_3d(attention_mask, segment_ids)


def apply(config: LlamaConfig, params, input_ids, attention_mask=None, *, kind="causal_lm",
          head=None, positions=None, segment_ids=None, rng=None):
    """`rng`: dropout key (LoRA adapter dropout while training); None = deterministic."""
    positions, mask = _inputs(input_ids, attention_mask, positions, segment_ids)
    m = Llama(config, head=head or head_for(kind))
    rngs = {"dropout": rng} if rng is not None and config.lora_rank and config.lora_dropout else None
    out, _ = m.apply({"params": params}, input_ids, positions, mask, rngs=rngs)
    return out


def forward(config: LlamaConfig, params, input_ids, attention_mask=None, *, positions=None,
            segment_ids=None, rng=None) -> jax.Array:
    """Logits [B, T, V] float32. Positions default to cumsum(mask) - 1 (left padding safe).
    With LoRA, `params` may carry adapters that a rank-0 config simply ignores."""
    return apply(config, params, input_ids, attention_mask, kind="causal_lm",
                 positions=positions, segment_ids=segment_ids, rng=rng)


def hidden_states(config, params, input_ids, attention_mask=None, *, positions=None,
                  segment_ids=None, rng=None) -> jax.Array:
    """Final normed hidden states [B, T, D] (compute dtype)."""
    return apply(config, params, input_ids, attention_mask, head="hidden", positions=positions,
                 segment_ids=segment_ids, rng=rng)


def lm_head_kernel(config: LlamaConfig, params) -> jax.Array:
    """The LM head as a [D, V] kernel in the compute dtype (the transposed embedding when tied):
    logits = hidden_states(...) @ lm_head_kernel(...), as `forward` computes them."""
    if config.tie_word_embeddings:
        kernel = params["embed_tokens"]["embedding"].T
    else:
        kernel = params["lm_head"]["kernel"]
    return kernel.astype(config.dtype)


def values(config, params, input_ids, attention_mask=None, *, positions=None,
           segment_ids=None, rng=None) -> jax.Array:
    """Per-token scalar head [B, T] float32 (PPO critic; reward-model head at every token)."""
    return apply(config, params, input_ids, attention_mask, kind="value", positions=positions,
                 segment_ids=segment_ids, rng=rng)


def score(config, params, input_ids, attention_mask=None, *, rng=None) -> jax.Array:
    """Sequence score [B]: the score head at the last real token (LlamaForSequenceClassification)."""
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    v = values(config, params, input_ids, attention_mask, rng=rng)
    return jnp.take_along_axis(v, last_token_index(attention_mask)[:, None], axis=-1)[:, 0]


def init_params(config: LlamaConfig, rng=None, kind: str = "causal_lm"):
    """Unsharded random init (see `easyrl.parallel.sharded_init` for the sharded version)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    ids = jnp.zeros((1, 2), jnp.int32)
    mask = attention_mask_3d(jnp.ones((1, 2), jnp.int32))
    return module(config, kind).init(rng, ids, jnp.zeros((1, 2), jnp.int32), mask)["params"]


def param_shapes(config: LlamaConfig, kind: str = "causal_lm"):
    """ShapeDtypeStruct pytree of the parameters, without allocating them."""
    return jax.eval_shape(lambda r: init_params(config, r, kind), jax.random.PRNGKey(0))
