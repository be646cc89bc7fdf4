"""Jitted KV-cache sampler: batched prefill of LEFT-padded prompts, then a `lax.while_loop` decode.

    out = generate(config, params, input_ids, attention_mask, rng, max_new_tokens=N,
                   temperature=0.7, top_k=0, top_p=1.0, eos_token_id=2, pad_token_id=0)
    out["tokens"] [B, P+N]   prompt (as given) followed by the response
    out["response"] [B, N]   sampled ids; pad_token_id after a row's first EOS
    out["response_mask"] [B, N] int32: 1 on generated tokens up to and including the first EOS
    out["logprobs"] [B, N] float32: log-prob of the sampled token under the distribution it
                     was drawn from: softmax(logits / T) over the top-k / top-p kept tokens
                     (T = 1, unfiltered, when greedy), so it equals what a scoring pass over
                     `tokens` computes with the same temperature, top_k and top_p
                     (`rollout.response_logprobs`); 0 where the mask is 0
    out["has_eos"] [B] bool

Layout: one KV cache of length S = P + N per layer, keys [B, K, Dh, S] (transposed) and values
[B, K, S, Dh]: the operand layouts of the two attention dots, so no step copies the cache into
another layout. Prompt token j sits in slot j (pads included, masked out of attention);
generated token i is written to slot P + i when it is fed back. The prefill runs the scanned
layer stack (caches stacked on a leading L axis); the decode loop then runs the layers unrolled
(`llama.forward_unrolled`) over per-layer weights sliced out once before the loop and per-layer
caches carried by it, so a step updates one cache slot in place and reads every weight where it
lies (on CPU 3.4x faster per step than the scanned stack; slicing inside the loop instead was
1.4x slower). The price: while sampling, the decoder weights exist twice (stacked + sliced).
decode="auto" (the default) takes `platform_tuning.Tuning.decode` of the platform the sampler
runs on ("unrolled" on CPU, "scan" elsewhere), and the cache's storage dtype its
`kv_cache_as_bits`: both resolved once by `make_sampler` from its mesh's devices (the default
backend without a mesh), not at trace time. Positions: prompt positions are cumsum(mask) - 1;
generated token i of row b has position n_prompt_b + i, so left padding changes nothing. The
loop exits early once every row has emitted EOS. `make_sampler` returns the compiled callable
(jit cached on the static settings) so a trainer can call it every iteration without retracing;
`generate` uses the same cache.

Sharded params (any `dp/fsdp/tp` mesh) work through plain jit propagation; pass `mesh` to also pin
the KV cache to batch x kv-head sharding (`P(None, ('dp','fsdp'), 'tp', None, None)`).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from easyrl.losses.common import keep_mask
from easyrl.model import positions_from_mask
from easyrl.model.config import LlamaConfig
from easyrl.model.llama import (Llama, cache_storage_dtype, forward_unrolled, lm_head_apply,
                                unstack_layers)
from easyrl.platform_tuning import tuning_for_mesh

__all__ = ["generate", "make_sampler", "sample_logits", "filter_logits", "normalize_eos"]

EosArg = Optional[Union[int, Sequence[int]]]


def normalize_eos(eos_token_id: EosArg, config: Optional[LlamaConfig] = None) -> Tuple[int, ...]:
    """EOS ids as a tuple. None -> the config's eos ids (or none); () disables stopping."""
    if eos_token_id is None:
        eos_token_id = None if config is None else config.eos_token_id
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, (int,)) or hasattr(eos_token_id, "__index__"):
        return (int(eos_token_id),)
    return tuple(sorted({int(e) for e in eos_token_id}))


def check_settings(max_new_tokens, temperature, top_k, top_p):
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


# ---- sampling -------------------------------------------------------------------------------
def filter_logits(scaled: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Top-k then top-p (nucleus) filtering of temperature-scaled logits [B, V]: dropped entries
    become the dtype's lowest finite value. Exactly Hugging Face's `TopKLogitsWarper` then
    `TopPLogitsWarper` (min_tokens_to_keep=1), see `losses.common.keep_mask`: top-k keeps the
    ties of the k-th logit; nucleus keeps the smallest prefix of the tokens in descending (stable)
    order whose (renormalized after top-k) probability sums to >= top_p, so tokens tied with the
    cut-off logit are not all kept ([.4, .2, .2, .2], top_p = 0.5: two); the most likely token is
    always kept."""
    keep = keep_mask(scaled, top_k, top_p)
    if keep is None:
        return scaled
    return jnp.where(keep, scaled, jnp.finfo(scaled.dtype).min)


def sample_logits(logits: jax.Array, rng, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> Tuple[jax.Array, jax.Array]:
    """logits [B, V] float32 -> (token [B] int32, logprob [B] float32).

    Greedy when temperature == 0: the logprob is log softmax(logits) (T = 1, no filtering).
    Otherwise the token is drawn from softmax(logits / T) restricted to the top-k / top-p kept
    tokens, and the logprob is that of the distribution actually sampled from: log softmax over
    the kept tokens (`losses.common.filtered_logprobs`; with top_k = 0 and top_p = 1, plain
    log softmax(logits / T))."""
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / jnp.float32(temperature)
        keep = keep_mask(scaled, top_k, top_p)
        if keep is None:
            logp = jax.nn.log_softmax(scaled, axis=-1)
            tok = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
        else:
            filtered = jnp.where(keep, scaled, -jnp.inf)
            logp = jax.nn.log_softmax(filtered, axis=-1)  # -inf off the kept set, never drawn
            tok = jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
    lp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    return tok, lp


# ---- model pieces ---------------------------------------------------------------------------
def _cache_sharding(config: LlamaConfig, mesh, batch: int, stacked: bool = True):
    """Cache [L, B, K, ., .] (stacked, prefill) or [B, K, ., .] (one layer, decode): batch over
    (dp, fsdp), kv heads over tp (when divisible)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from easyrl.parallel import BATCH, data_parallel_size
    b_ax = BATCH if batch % data_parallel_size(mesh) == 0 else None
    k_ax = "tp" if config.num_key_value_heads % mesh.shape["tp"] == 0 else None
    spec = (b_ax, k_ax, None, None)
    return NamedSharding(mesh, P(None, *spec) if stacked else P(*spec))


def _generate_impl(params, input_ids, attention_mask, rng, eos_ids, pad_id, *,
                   config: LlamaConfig, max_new_tokens: int, temperature: float, top_k: int,
                   top_p: float, cache_dtype, mesh, decode: str, kv_cache_as_bits: bool,
                   num_samples: int = 1):
    b, p = input_ids.shape
    n = max_new_tokens
    s = p + n
    cfg = config
    input_ids = input_ids.astype(jnp.int32)
    pmask = attention_mask.astype(jnp.int32) > 0  # [B, P]
    n_prompt = jnp.sum(pmask, axis=-1).astype(jnp.int32)  # [B]
    cdt = jnp.dtype(cache_dtype or cfg.dtype)
    l, kh, dh = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    sdt = cache_storage_dtype(cdt, kv_cache_as_bits)  # bf16 on CPU: uint16 bits (in-place writes)
    cache = (jnp.zeros((l, b, kh, dh, s), sdt), jnp.zeros((l, b, kh, s, dh), sdt))  # k^T, v
    if mesh is not None:
        sh = _cache_sharding(cfg, mesh, b)
        cache = jax.tree.map(lambda c: jax.lax.with_sharding_constraint(c, sh), cache)
    eos_arr = jnp.asarray(eos_ids, jnp.int32)  # [E], -1 entries never match
    pad = jnp.asarray(pad_id, jnp.int32)

    # ---- prefill: prompt slots [0, P); pad queries attend to themselves (finite, unused)
    positions = positions_from_mask(pmask)
    q_idx = jnp.arange(p)[:, None]
    k_idx = jnp.arange(s)[None, :]
    causal = (k_idx <= q_idx) & (k_idx < p)  # [P, S]
    prompt_keys = jnp.concatenate([pmask, jnp.zeros((b, n), bool)], axis=-1)  # [B, S]
    mask = (causal[None] & prompt_keys[:, None, :]) | (k_idx == q_idx)[None]
    hidden_model = Llama(cfg, head="hidden")
    h, cache = hidden_model.apply({"params": params}, input_ids, positions, mask, cache,
                                  jnp.int32(0))
    # left padding: the last slot is the last token
    logits = lm_head_apply(cfg, params, h[:, -1]).astype(jnp.float32)
    if num_samples > 1:  # shared prefix: each prompt prefilled once, its cache copied G times
        g = num_samples
        rep = lambda x, axis=0: jnp.repeat(x, g, axis=axis)  # noqa: E731  rows b*G .. b*G+G-1
        cache = tuple(rep(c_, 1) for c_ in cache)
        if mesh is not None:
            cache = jax.tree.map(lambda c_: jax.lax.with_sharding_constraint(
                c_, _cache_sharding(cfg, mesh, b * g)), cache)
        logits, input_ids, n_prompt, prompt_keys = (rep(logits), rep(input_ids), rep(n_prompt),
                                                    rep(prompt_keys))
        b = b * g

    def pick(logits, step, finished):
        key = jax.random.fold_in(rng, step)
        tok, lp = sample_logits(logits, key, temperature, top_k, top_p)
        live = ~finished
        tok = jnp.where(live, tok, pad)
        lp = jnp.where(live, lp, 0.0)
        finished = finished | (live & jnp.isin(tok, eos_arr))
        return tok, lp, live, finished

    finished0 = jnp.zeros((b,), bool)
    tok, lp, live, finished = pick(logits, 0, finished0)
    response = jnp.full((b, n), pad, jnp.int32).at[:, 0].set(tok)
    logprobs = jnp.zeros((b, n), jnp.float32).at[:, 0].set(lp)
    rmask = jnp.zeros((b, n), jnp.int32).at[:, 0].set(live.astype(jnp.int32))
    if decode == "unrolled":
        # layers unrolled over per-layer weights (sliced out once, here) and per-layer caches
        # carried by the loop, so each step updates its cache slot in place and copies no weights
        layer_params = unstack_layers(params)
        caches = [(cache[0][i], cache[1][i]) for i in range(cfg.num_hidden_layers)]
        if mesh is not None:
            lsh = _cache_sharding(cfg, mesh, b, stacked=False)
            caches = jax.tree.map(lambda c: jax.lax.with_sharding_constraint(c, lsh), caches)

        def step(tok, pos, key_ok, cache, slot):
            return forward_unrolled(cfg, params, layer_params, tok, pos, key_ok, cache, slot)
    else:  # "scan": the scanned layer stack over the stacked cache; no second copy of the weights
        caches = cache
        lm_model = Llama(cfg, head="lm")

        def step(tok, pos, key_ok, cache, slot):
            return lm_model.apply({"params": params}, tok, pos, key_ok, cache, slot)
    slots = jnp.arange(s)[None, :]

    def cond(state):
        i, _, _, finished, _, _, _ = state
        return (i < n) & ~jnp.all(finished)

    def body(state):
        i, cache, tok, finished, response, logprobs, rmask = state
        slot = p + i - 1  # where the previous token (fed now) is written
        pos = (n_prompt + i - 1)[:, None]
        key_ok = prompt_keys | ((slots >= p) & (slots <= slot))  # [B, S]
        logits, cache = step(tok[:, None], pos, key_ok[:, None, :], cache, slot)
        tok, lp, live, finished = pick(logits[:, 0], i, finished)
        response = jax.lax.dynamic_update_slice(response, tok[:, None], (0, i))
        logprobs = jax.lax.dynamic_update_slice(logprobs, lp[:, None], (0, i))
        rmask = jax.lax.dynamic_update_slice(rmask, live.astype(jnp.int32)[:, None], (0, i))
        return i + 1, cache, tok, finished, response, logprobs, rmask

    state = (jnp.int32(1), caches, tok, finished, response, logprobs, rmask)
    _, _, _, finished, response, logprobs, rmask = jax.lax.while_loop(cond, body, state)
    return {
        "tokens": jnp.concatenate([input_ids, response], axis=-1),
        "response": response,
        "response_mask": rmask,
        "logprobs": logprobs,
        "has_eos": finished,
    }


@functools.lru_cache(maxsize=64)
def _compiled(config, max_new_tokens, temperature, top_k, top_p, cache_dtype, mesh, decode,
              kv_cache_as_bits, num_samples=1):
    """The jitted sampler for one set of static settings (EOS / pad ids are traced inputs)."""
    fn = functools.partial(_generate_impl, config=config, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_k=top_k, top_p=top_p,
                           cache_dtype=cache_dtype, mesh=mesh, decode=decode,
                           kv_cache_as_bits=kv_cache_as_bits, num_samples=num_samples)
    return jax.jit(fn)


def _eos_array(eos: Tuple[int, ...]) -> np.ndarray:
    """EOS ids padded with -1 to a multiple of 8, so most settings share one compilation."""
    n = max(8, -(-len(eos) // 8) * 8)
    return np.asarray(list(eos) + [-1] * (n - len(eos)), np.int32)


def make_sampler(config: LlamaConfig, *, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, eos_token_id: EosArg = None,
                 pad_token_id: Optional[int] = None, cache_dtype=None,
                 mesh=None, decode: str = "auto", num_samples: int = 1) -> Callable:
    """`sample(params, input_ids [B,P], attention_mask [B,P], rng) -> dict` (see module doc).

    num_samples G > 1: G samples of every prompt from ONE prefill (its KV cache and last logits
    are copied G times on device); the outputs have B*G rows, rows b*G .. b*G+G-1 prompt b's
    samples, and `tokens` repeats the prompt.

    The jit is cached on the static settings (config, max_new_tokens, temperature, top_k, top_p,
    cache dtype, mesh, decode loop, cache storage); EOS and pad ids are traced inputs. Repeated
    calls with the same shapes never retrace, whichever sampler object makes them.

    eos_token_id: int or ints; None uses `config.eos_token_id`; () never stops early.
    pad_token_id: None uses `config.pad_token_id`, else 0.
    decode: "unrolled" (layers unrolled over per-layer weight slices: 3.4x faster per step on
    CPU, but the decoder weights exist twice while sampling), "scan" (the scanned layer stack:
    no extra copy, what large models on GPU/TPU want), or "auto" (unrolled on CPU, scan elsewhere).

    Platform settings (`platform_tuning.Tuning`: what decode="auto" means, whether a bfloat16 KV
    cache is held as uint16 bits) are resolved here, once, from the platform of `mesh`'s devices
    (the default backend when mesh is None).
    """
    check_settings(max_new_tokens, temperature, top_k, top_p)
    eos = normalize_eos(eos_token_id, config)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    cdt = None if cache_dtype is None else jnp.dtype(cache_dtype).name
    if decode not in ("auto", "unrolled", "scan"):
        raise ValueError(f"decode must be 'auto', 'unrolled' or 'scan', got {decode!r}")
    tuning = tuning_for_mesh(mesh)
    if decode == "auto":
        decode = tuning.decode
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    fn = _compiled(config, int(max_new_tokens), float(temperature), int(top_k), float(top_p), cdt,
                   mesh, decode, tuning.kv_cache_as_bits, int(num_samples))
    eos_arr, pad = _eos_array(eos), np.int32(pad_token_id)

    def sample(params, input_ids, attention_mask, rng) -> dict:
        return fn(params, input_ids, attention_mask, rng, eos_arr, pad)

    sample.jitted = fn  # the shared compiled function (for inspection / cache checks)
    return sample


def generate(config: LlamaConfig, params, input_ids, attention_mask, rng, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id: EosArg = None, pad_token_id: Optional[int] = None, cache_dtype=None,
             mesh=None, decode: str = "auto", num_samples: int = 1) -> dict:
    """Sample `max_new_tokens` continuations of LEFT-padded prompts (see the module doc)."""
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, P]; got "
                         f"{input_ids.shape} and {attention_mask.shape}")
    fn = make_sampler(config, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                      cache_dtype=cache_dtype, mesh=mesh, decode=decode, num_samples=num_samples)
    return fn(params, input_ids, attention_mask, rng)
