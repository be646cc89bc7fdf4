"""Pure-functional LLaMA in Flax linen (also Mistral, Qwen2 / Qwen2.5 and Qwen3: the switches
qkv_bias, qk_norm, sliding_window of `LlamaConfig`).

Parameters are a plain pytree in Hugging Face orientation except that dense kernels are stored
[in, out] (flax) where HF stores [out, in]; decoder layers are stacked on a leading axis L (the
layers run under `nn.scan`):

    embed_tokens/embedding [V, D]
    layers/input_layernorm/scale [L, D]
    layers/self_attn/{q,k,v}_proj/kernel [L, D, H*Dh | K*Dh]   (+ bias: attention_bias, qkv_bias)
    layers/self_attn/{q,k}_norm/scale [L, Dh]                  (qk_norm, Qwen3)
    layers/self_attn/o_proj/kernel [L, H*Dh, D]
    layers/post_attention_layernorm/scale [L, D]
    layers/mlp/{gate,up}_proj/kernel [L, D, F], layers/mlp/down_proj/kernel [L, F, D]
    norm/scale [D]
    lm_head/kernel [D, V]        (causal LM, untied)   |   score/kernel [D, 1]   (reward / value)

The rotary embedding uses HF's rotate-half layout, so conversion needs no q/k permutation.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from easyrl.model import lora, qlora
from easyrl.model.config import LlamaConfig, rope_attention_factor, rope_inv_freq
from easyrl.model.matmul import DENSE_OUT, dense_dot_general, dense_matmul
from easyrl.parallel import constrain_batch

Array = jax.Array
HEADS = ("lm", "score", "hidden")


def _dt(name: str):
    return jnp.dtype(name)


def rope_cos_sin(config: LlamaConfig, positions: Array) -> Tuple[Array, Array]:
    """cos, sin [B, T, Dh] float32 for integer positions [B, T] (rotate-half layout)."""
    inv = jnp.asarray(rope_inv_freq(config), jnp.float32)
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, T, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scale = rope_attention_factor(config)  # yarn's cos / sin scaling (1 otherwise)
    if scale == 1.0:
        return jnp.cos(emb), jnp.sin(emb)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, N, Dh]; cos/sin [B, T, Dh]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def remat_policy(name: str):
    """The dot-saving policies also save the dense layers' outputs: those come out of
    `dense_matmul` (a custom VJP), whose dots the dot policies cannot see."""
    cp = jax.checkpoint_policies
    dense = cp.save_only_these_names(DENSE_OUT)
    with_dense = lambda p: cp.save_from_both_policies(p, dense)  # noqa: E731
    return {
        "full": cp.nothing_saveable,
        "dots": with_dense(cp.checkpoint_dots),
        "dots_no_batch": with_dense(cp.checkpoint_dots_with_no_batch_dims),
        "minimal": with_dense(cp.dots_with_no_batch_dims_saveable),
    }[name]


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


def dense_module(cfg: LlamaConfig, features: int, bias: bool, name: str,
                 std: Optional[float] = None):
    kw = dict(use_bias=bias, dtype=_dt(cfg.dtype), param_dtype=_dt(cfg.param_dtype),
              kernel_init=nn.initializers.normal(std or cfg.initializer_range), name=name)
    if cfg.base_quant != "none" and name in qlora.PROJECTIONS:  # a quantized frozen kernel
        if lora.is_target(cfg, name):
            kw.update(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
        return qlora.QuantDense(features, config=cfg, **kw)
    if lora.is_target(cfg, name):  # same kernel/bias params plus lora_a, lora_b
        return lora.LoRADense(features, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                              dropout=cfg.lora_dropout, **kw)
    return nn.Dense(features, dot_general=dense_dot_general, **kw)


CAUSAL_CHUNK = 256  # query-block size of the causal block skipping in `attend`


def _attend_probs(q: Array, kt: Array, mask: Array) -> Array:
    """softmax(q k^T / sqrt(Dh)) over the unmasked keys, float32 [B,K,G,T,S]."""
    scores = jnp.einsum("bkgtd,bkds->bkgts", q, kt, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / np.sqrt(q.shape[-1]))
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def attend_core(q: Array, kt: Array, v: Array, mask: Array) -> Array:
    """The attention of `attend` and `attend_cached`, in their grouped layouts:
    q [B,K,G,T,Dh], kt [B,K,Dh,S] (keys transposed), v [B,K,S,Dh], mask [B,T,S] bool
    -> [B,K,G,T,Dh]. Both dots take their operands in canonical [batch, M, K] x [batch, K, N]
    layout, so XLA adds no transposed copies of the scores or the cache around them.
    bf16/f16 inputs take `_attend_lowp` (the same forward with a low-precision backward)."""
    if q.dtype in (jnp.bfloat16, jnp.float16) and kt.dtype == v.dtype == q.dtype:
        return _attend_lowp(q, kt, v, mask)
    probs = _attend_probs(q, kt, mask).astype(v.dtype)
    # float32 accumulation (and a low-precision result): bf16 x bf16 -> bf16 dots are upcast to
    # slow float32 ones on XLA:CPU, bf16 x bf16 -> f32 ones are not
    return jnp.einsum("bkgts,bksd->bkgtd", probs, v,
                      preferred_element_type=jnp.float32).astype(v.dtype)


@jax.custom_vjp
def _attend_lowp(q, kt, v, mask):
    """`attend_core` in bf16/f16 with a hand-written backward: autodiff of the float32-
    accumulating dots would run all four backward dots in float32 (their cotangents are
    float32); here they take low-precision operands and accumulate in float32, like
    `dense_matmul`. The softmax is recomputed in the backward (flash-attention style: the
    [.., T, S] probabilities are not kept)."""
    probs = _attend_probs(q, kt, mask).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, v,
                      preferred_element_type=jnp.float32).astype(v.dtype)


def _attend_lowp_fwd(q, kt, v, mask):
    return _attend_lowp(q, kt, v, mask), (q, kt, v, mask)


def _attend_lowp_bwd(res, dout):
    q, kt, v, mask = res
    f32, lp = jnp.float32, q.dtype
    p = _attend_probs(q, kt, mask)  # float32
    dout = dout.astype(lp)
    dv = jnp.einsum("bkgts,bkgtd->bksd", p.astype(lp), dout, preferred_element_type=f32)
    dp = jnp.einsum("bkgtd,bksd->bkgts", dout, v, preferred_element_type=f32)
    ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)) * (1.0 / np.sqrt(q.shape[-1]))
    ds = ds.astype(lp)
    dq = jnp.einsum("bkgts,bkds->bkgtd", ds, kt, preferred_element_type=f32)
    dkt = jnp.einsum("bkgtd,bkgts->bkds", q, ds, preferred_element_type=f32)
    return dq.astype(q.dtype), dkt.astype(kt.dtype), dv.astype(v.dtype), None


_attend_lowp.defvjp(_attend_lowp_fwd, _attend_lowp_bwd)


def attend(q: Array, k: Array, v: Array, mask: Array, impl: str = "xla",
           causal: bool = False) -> Array:
    """Grouped-query attention. q [B,T,H,Dh], k/v [B,S,K,Dh], mask [B,T,S] bool -> [B,T,H,Dh].

    causal=True promises that the mask hides every key s > t (T == S); the XLA path then skips
    the key blocks above the diagonal: query block i (CAUSAL_CHUNK rows) attends to keys
    [0, (i+1) * CAUSAL_CHUNK) only, about half the score FLOPs and bytes at long T. Skipped keys
    are masked anyway (their softmax weight is exactly 0), so the result is unchanged.
    """
    b, t, h, dh = q.shape
    s, kh = k.shape[1], k.shape[2]
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")
    qt = q.reshape(b, t, kh, h // kh, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
    kt = k.transpose(0, 2, 3, 1)  # [B, K, Dh, S]
    vt = v.transpose(0, 2, 1, 3)  # [B, K, S, Dh]
    c = CAUSAL_CHUNK
    if causal and t == s and t > c:
        outs = []
        for lo in range(0, t, c):
            hi = min(lo + c, t)
            outs.append(attend_core(qt[:, :, :, lo:hi], kt[..., :hi], vt[:, :, :hi],
                                     mask[:, lo:hi, :hi]))
        out = jnp.concatenate(outs, axis=3)
    else:
        out = attend_core(qt, kt, vt, mask)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


def cache_storage_dtype(dtype, as_bits: bool):
    """The dtype a KV cache of float `dtype` is held in: with `as_bits`
    (`platform_tuning.Tuning.kv_cache_as_bits`, set on CPU) a bfloat16 cache as uint16 bit
    patterns. XLA:CPU computes bf16 elementwise ops in float32, and its update of a bf16 cache
    slot became "convert the whole cache to f32, write one slot, convert back": a full copy of
    every layer's cache per decode step. An integer update is a plain in-place write."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if as_bits and dtype == jnp.bfloat16 else dtype


def cache_read(cache: Array) -> Array:
    """The cache as floats (a uint16 cache holds bfloat16 bits: see `cache_storage_dtype`)."""
    return jax.lax.bitcast_convert_type(cache, jnp.bfloat16) if cache.dtype == jnp.uint16 else cache


def cache_write(cache: Array, update: Array, index) -> Array:
    """`dynamic_update_slice` of float `update` into `cache` (either storage) at `index`."""
    if cache.dtype == jnp.uint16:
        update = jax.lax.bitcast_convert_type(update.astype(jnp.bfloat16), jnp.uint16)
    return jax.lax.dynamic_update_slice(cache, update.astype(cache.dtype), index)


def attend_cached(q: Array, ck: Array, cv: Array, mask: Array) -> Array:
    """Attention over a KV cache: q [B,T,H,Dh], ck [B,K,Dh,S] (keys transposed), cv [B,K,S,Dh],
    mask [B,T,S] bool -> [B,T,H,Dh]. The cache layouts are the canonical operands of the two
    dots, so a decode step reads the cache without a transposed copy."""
    b, t, h, dh = q.shape
    kh = ck.shape[1]
    q = q.reshape(b, t, kh, h // kh, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
    out = attend_core(q, ck, cv, mask)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


def project_qkv(cfg: LlamaConfig, x: Array, cos: Array, sin: Array):
    """q [B,T,H,Dh], k, v [B,T,K,Dh] of x [B,T,D], rotary applied: the q/k/v projections (with
    biases under attention_bias or qkv_bias) and, for qk_norm (Qwen3), an RMSNorm over each
    head's queries and keys before rotary. Call inside a compact module (the submodules are
    its q_proj, k_proj, v_proj, q_norm, k_norm)."""
    b, t, _ = x.shape
    h, kh, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    bias = cfg.attention_bias or cfg.qkv_bias
    q = dense_module(cfg, h * dh, bias, "q_proj")(x).reshape(b, t, h, dh)
    k = dense_module(cfg, kh * dh, bias, "k_proj")(x).reshape(b, t, kh, dh)
    v = dense_module(cfg, kh * dh, bias, "v_proj")(x).reshape(b, t, kh, dh)
    if cfg.qk_norm:
        dt, pdt = _dt(cfg.dtype), _dt(cfg.param_dtype)
        q = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="q_norm")(q)
        k = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="k_norm")(k)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def window_mask(cfg: LlamaConfig, mask: Array, q_start=0) -> Array:
    """mask [B,T,S] with the sliding window (`cfg.window`) applied: query t (cache index
    q_start + t) keeps keys at indices s > q_start + t - window, as transformers'
    `sliding_window_overlay`. Indices stand for positions: every caller lays a sequence's real
    tokens out contiguously (left-padded prompts, packed segments), so index distance is
    position distance wherever the mask lets a key through."""
    w = cfg.window
    if w is None:
        return mask
    t, s = mask.shape[-2:]
    q = q_start + jnp.arange(t)[:, None]
    return mask & (jnp.arange(s)[None, :] > q - w)[None]


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, cache_index=None):
        cfg = self.config
        b, t, _ = x.shape
        h, dh = cfg.num_attention_heads, cfg.head_dim
        q, k, v = project_qkv(cfg, x, cos, sin)
        new_cache = None
        if cache is not None:  # write this step's keys/values at cache_index, attend to all S
            ck, cv = cache  # [B, K, Dh, S], [B, K, S, Dh]: the layouts the two dots read directly
            ck = cache_write(ck, k.transpose(0, 2, 3, 1), (0, 0, 0, cache_index))
            cv = cache_write(cv, v.transpose(0, 2, 1, 3), (0, 0, cache_index, 0))
            new_cache = (ck, cv)
            out = attend_cached(q, cache_read(ck).astype(q.dtype), cache_read(cv).astype(q.dtype),
                                mask)
        else:
            out = attend(q, k, v, mask, cfg.attention, causal=True)  # masks are causal
        out = out.reshape(b, t, h * dh)
        return dense_module(cfg, cfg.hidden_size, cfg.attention_bias, "o_proj")(out), new_cache


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = dense_module(cfg, cfg.intermediate_size, cfg.mlp_bias, "gate_proj")(x)
        up = dense_module(cfg, cfg.intermediate_size, cfg.mlp_bias, "up_proj")(x)
        return dense_module(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask, cache_index):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, _dt(cfg.dtype), _dt(cfg.param_dtype), name=name)  # noqa: E731
        h, new_cache = Attention(cfg, name="self_attn")(
            norm("input_layernorm")(x), cos, sin, mask, layer_cache, cache_index)
        x = x + h
        x = x + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
        return constrain_batch(x), new_cache


class Llama(nn.Module):
    """LLaMA decoder with a head: `lm` (logits), `score` (a scalar per token), `hidden`."""
    config: LlamaConfig
    head: str = "lm"

    @nn.compact
    def __call__(self, input_ids, positions, mask, cache=None, cache_index=None):
        """input_ids/positions [B, T] int, mask [B, T, S] bool (S = T, or the cache length).

        The mask must be causal (a query never sees a later key, as `attention_mask_3d` and the
        sampler build it): without a cache, attention skips the key blocks above the diagonal.

        cache: (k, v), k [L, B, K, Dh, S] and v [L, B, K, S, Dh], or None (see `attend_cached`).
        Returns (output, new_cache).
        """
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=_dt(cfg.dtype),
                         param_dtype=_dt(cfg.param_dtype),
                         embedding_init=nn.initializers.normal(cfg.initializer_range),
                         name="embed_tokens")
        x = constrain_batch(embed(input_ids.astype(jnp.int32)))
        cos, sin = rope_cos_sin(cfg, positions)
        mask = window_mask(cfg, mask, 0 if cache_index is None else cache_index)
        layer = DecoderLayer
        if cfg.remat != "none":
            layer = nn.remat(layer, policy=remat_policy(cfg.remat), prevent_cse=False)
        stack = nn.scan(layer, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                        length=cfg.num_hidden_layers)
        x, new_cache = stack(cfg, name="layers")(x, cache, cos, sin, mask, cache_index)
        x = RMSNorm(cfg.rms_norm_eps, _dt(cfg.dtype), _dt(cfg.param_dtype), name="norm")(x)
        if self.head == "hidden":
            return x, new_cache
        if self.head == "score":
            std = 1.0 / np.sqrt(cfg.hidden_size + 1)
            return dense_module(cfg, 1, False, "score", std=std)(x)[..., 0].astype(jnp.float32), new_cache
        if cfg.tie_word_embeddings:  # as `lm_head_apply`
            logits = dense_matmul(x, embed.embedding.astype(x.dtype).T)
        else:
            logits = dense_module(cfg, cfg.vocab_size, False, "lm_head")(x)
        return logits.astype(jnp.float32), new_cache


# ---- decode without the layer scan ------------------------------------------------------------
def unstack_layers(params) -> list:
    """The stacked decoder parameters ``params['layers']`` ([L, ...] leaves) as L per-layer trees.

    Inside a jitted sampler this slices each layer out ONCE, before the decode loop, so the loop
    body reads every weight in place instead of copying layer l's slice out of the stacked array
    on every step (what a scanned layer stack does on CPU)."""
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    return [jax.tree.map(lambda p, i=i: p[i], params["layers"]) for i in range(n)]


def forward_unrolled(config: LlamaConfig, params, layer_params: list, input_ids, positions, mask,
                     caches: list, cache_index, head: str = "lm"):
    """The `Llama` forward as a Python loop over layers with one KV cache per layer.

    Same math and parameters as `Llama` (``layer_params`` from `unstack_layers`), for the
    sampler's decode step: each ``caches[l] = (k [B, K, Dh, S], v [B, K, S, Dh])`` (the layouts
    of `Llama`'s cache, one layer) is its own buffer, a loop carry updated in place at
    ``cache_index``, which attention reads without a copy.
    Returns (logits [B, T, V] float32 | hidden [B, T, D], new caches).
    """
    cfg = config
    dt, pdt = _dt(cfg.dtype), _dt(cfg.param_dtype)
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt)
    x = embed.apply({"params": params["embed_tokens"]}, input_ids.astype(jnp.int32))
    cos, sin = rope_cos_sin(cfg, positions)
    mask = window_mask(cfg, mask, cache_index)
    layer = DecoderLayer(cfg)
    new_caches = []
    for lp, cache in zip(layer_params, caches):
        x, cache = layer.apply({"params": lp}, x, cache, cos, sin, mask, cache_index)
        new_caches.append(cache)
    x = RMSNorm(cfg.rms_norm_eps, dt, pdt).apply({"params": params["norm"]}, x)
    if head == "hidden":
        return x, new_caches
    logits = lm_head_apply(cfg, params, x)
    return logits.astype(jnp.float32), new_caches


def lm_head_apply(cfg: LlamaConfig, params, x: Array) -> Array:
    """The LM head (or the tied embedding) on hidden states x [..., D] with the full params
    tree, as `Llama(head="lm")` computes it (through `dense_matmul`: a float32-accumulating dot
    in bf16, which XLA:CPU runs ~3x faster than the bf16-output one)."""
    dt = _dt(cfg.dtype)
    if cfg.tie_word_embeddings:
        kernel = params["embed_tokens"]["embedding"].T
    else:
        kernel = params["lm_head"]["kernel"]
    return dense_matmul(x.astype(dt), kernel.astype(dt))
