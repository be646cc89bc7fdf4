"""The engine's device programs: block-buffer attention, the decode layer, prefill, admit
and the decode chunk (see `easyrl.engine` for how they fit together)."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from easyrl.generate import sample_logits
from easyrl.model.config import LlamaConfig
from easyrl.model.llama import (MLP, Llama, RMSNorm, cache_read, dense_module, lm_head_apply,
                                project_qkv, rope_cos_sin, unstack_layers)


_MIN = float(np.finfo(np.float32).min)


# ---- the decode step's attention over block buffers -------------------------------------------
def _write(buf, update, rows, offset, is_key: bool):
    """Scatter update [B, K, Dh] into block buffer `buf` (keys [B, K, Dh, blk] / values
    [B, K, blk, Dh]) at row rows[b], in-block index offset[b]; rows >= B are dropped."""
    if buf.dtype == jnp.uint16:  # bf16 bits (`cache_storage_dtype`)
        update = jax.lax.bitcast_convert_type(update.astype(jnp.bfloat16), jnp.uint16)
    update = update.astype(buf.dtype)
    if is_key:
        return buf.at[rows, :, :, offset].set(update, mode="drop")
    return buf.at[rows, :, offset, :].set(update, mode="drop")


class _BlockAttention(nn.Module):
    """`llama.Attention` for one decode token per row over the block-buffer cache (same
    parameters: q/k/v/o_proj)."""
    config: LlamaConfig
    block: int
    skip_blocks: bool

    @nn.compact
    def __call__(self, x, cos, sin, kbs, vbs, wblk, woff, key_ok, nb_live):
        cfg = self.config
        b, t, _ = x.shape  # t == 1
        h, kh, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, k, v = project_qkv(cfg, x, cos, sin)
        nb = len(kbs)
        rows = jnp.arange(b)
        kbs, vbs = list(kbs), list(vbs)
        for j in range(nb):  # each live row writes its key / value into the block holding it
            rj = jnp.where(wblk == j, rows, b)
            kbs[j] = _write(kbs[j], k[:, 0], rj, woff, True)
            vbs[j] = _write(vbs[j], v[:, 0], rj, woff, False)
        qg = q.reshape(b, t, kh, h // kh, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, 1, Dh]
        scale = 1.0 / np.sqrt(dh)
        dt = q.dtype

        def scores(kb):
            s = jnp.einsum("bkgtd,bkds->bkgts", qg, cache_read(kb).astype(dt),
                           preferred_element_type=jnp.float32)
            return s * scale

        masked = jnp.full((b, kh, h // kh, t, self.block), _MIN, jnp.float32)
        ss = []
        for j in range(nb):
            if self.skip_blocks:
                ss.append(jax.lax.cond(j < nb_live, scores, lambda kb: masked, kbs[j]))
            else:
                ss.append(scores(kbs[j]))
        s = jnp.concatenate(ss, axis=-1)  # [B, K, G, 1, NB * blk]
        s = jnp.where(key_ok[:, None, None, None, :], s, _MIN)
        p = jax.nn.softmax(s, axis=-1).astype(dt)
        out = jnp.zeros((b, kh, h // kh, t, dh), jnp.float32)
        for j in range(nb):
            pj = p[..., j * self.block:(j + 1) * self.block]

            def add(o, pj, vb):
                return o + jnp.einsum("bkgts,bksd->bkgtd", pj, cache_read(vb).astype(dt),
                                      preferred_element_type=jnp.float32)
            if self.skip_blocks:
                out = jax.lax.cond(j < nb_live, add, lambda o, pj, vb: o, out, pj, vbs[j])
            else:
                out = add(out, pj, vbs[j])
        out = out.astype(dt).transpose(0, 3, 1, 2, 4).reshape(b, t, h * dh)
        out = dense_module(cfg, cfg.hidden_size, cfg.attention_bias, "o_proj")(out)
        return out, (kbs, vbs)


class _DecodeLayer(nn.Module):
    """`llama.DecoderLayer` (same parameters) with `_BlockAttention`."""
    config: LlamaConfig
    block: int
    skip_blocks: bool

    @nn.compact
    def __call__(self, x, cos, sin, kbs, vbs, wblk, woff, key_ok, nb_live):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, jnp.dtype(cfg.dtype),  # noqa: E731
                                    jnp.dtype(cfg.param_dtype), name=name)
        h, cache = _BlockAttention(cfg, self.block, self.skip_blocks, name="self_attn")(
            norm("input_layernorm")(x), cos, sin, kbs, vbs, wblk, woff, key_ok, nb_live)
        x = x + h
        x = x + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
        return x, cache


# ---- the jitted programs ----------------------------------------------------------------------
class Static:
    """The static settings every program is compiled for (hashable: the jit / lru key)."""

    def __init__(self, config, slots, nblocks, block, chunk, temperature, top_k, top_p,
                 storage, mesh, skip_blocks):
        self.config, self.slots, self.nblocks, self.block, self.chunk = (
            config, slots, nblocks, block, chunk)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.storage, self.mesh, self.skip_blocks = storage, mesh, skip_blocks
        self._key = (config, slots, nblocks, block, chunk, temperature, top_k, top_p,
                     jnp.dtype(storage).name, mesh, skip_blocks)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, Static) and self._key == other._key


def _block_sharding(st: Static):
    from jax.sharding import NamedSharding, PartitionSpec as P

    from easyrl.parallel import BATCH, data_parallel_size
    mesh = st.mesh
    b_ax = BATCH if st.slots % data_parallel_size(mesh) == 0 else None
    k_ax = "tp" if st.config.num_key_value_heads % mesh.shape["tp"] == 0 else None
    return NamedSharding(mesh, P(b_ax, k_ax, None, None))


def _pin(st: Static, caches):
    if st.mesh is None:
        return caches
    sh = _block_sharding(st)
    return jax.tree.map(lambda c: jax.lax.with_sharding_constraint(c, sh), caches)


def _row_keys(base, req, samp):
    """Per-sample keys fold_in(fold_in(base, r), g) [A, 2] for request / sample ids [A]."""
    return jax.vmap(lambda r, g: jax.random.fold_in(jax.random.fold_in(base, r), g))(req, samp)


def _draw(st: Static, logits, keys, t):
    """(token [B], logprob [B]) of each row from logits [B, V], row b with key
    fold_in(keys[b], t[b]) (greedy: argmax, no key)."""
    if st.temperature == 0:
        return sample_logits(logits, None, 0.0)
    step_keys = jax.vmap(jax.random.fold_in)(keys, t)

    def one(lg, key):
        tok, lp = sample_logits(lg[None], key, st.temperature, st.top_k, st.top_p)
        return tok[0], lp[0]
    return jax.vmap(one)(logits, step_keys)


def _init_impl(st: Static):
    cfg, b, blk = st.config, st.slots, st.block
    kh, dh = cfg.num_key_value_heads, cfg.head_dim
    caches = [([jnp.zeros((b, kh, dh, blk), st.storage) for _ in range(st.nblocks)],
               [jnp.zeros((b, kh, blk, dh), st.storage) for _ in range(st.nblocks)])
              for _ in range(cfg.num_hidden_layers)]
    state = dict(tok=jnp.zeros((b,), jnp.int32), length=jnp.zeros((b,), jnp.int32),
                 count=jnp.zeros((b,), jnp.int32), limit=jnp.zeros((b,), jnp.int32),
                 key=jnp.zeros((b, 2), jnp.uint32), active=jnp.zeros((b,), bool))
    return _pin(st, caches), state


def _prefill_impl(params, ids, lens, *, st: Static):
    """ids [Bp, Pb] right-padded prompts of lengths lens [Bp] -> (k [L, Bp, K, Dh, Pb],
    v [L, Bp, K, Pb, Dh]) in the storage dtype and the last-position logits [Bp, V] float32."""
    cfg = st.config
    bp, pb = ids.shape
    l, kh, dh = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    cache = (jnp.zeros((l, bp, kh, dh, pb), st.storage), jnp.zeros((l, bp, kh, pb, dh), st.storage))
    q_idx = jnp.arange(pb)[:, None]
    k_idx = jnp.arange(pb)[None, :]
    # causal over the real tokens; pad queries attend to themselves (finite, unused)
    mask = ((k_idx <= q_idx)[None] & (k_idx[None] < lens[:, None, None])) | (k_idx == q_idx)[None]
    positions = jnp.broadcast_to(jnp.arange(pb, dtype=jnp.int32)[None], (bp, pb))
    h, cache = Llama(cfg, head="hidden").apply({"params": params}, ids, positions, mask, cache,
                                               jnp.int32(0))
    last = jnp.take_along_axis(h, (lens - 1)[:, None, None], axis=1)[:, 0]  # [Bp, D]
    logits = lm_head_apply(cfg, params, last).astype(jnp.float32)
    return cache, logits


def _admit_impl(caches, state, prefix, logits, rows, slots, n_prompt, limit, req, samp, n_new,
                base, eos, *, st: Static):
    """Copy prefix rows `rows[:n_new]` of a prefill batch into slots `slots[:n_new]` (the rest of
    the [A] entries are padding, slot >= B) and draw each sample's first token. Returns (caches,
    state, first token [A], its logprob [A])."""
    blk = st.block
    pk, pv = prefix  # [L, Bp, K, Dh, Pb], [L, Bp, K, Pb, Dh]
    pb = pk.shape[-1]
    spans = [(j * blk, min((j + 1) * blk, pb)) for j in range(-(-pb // blk))]

    def copy_one(i, caches):
        # one sample: in-place slices (a gather of the prefix rows ran at a fraction of memcpy
        # speed on XLA:CPU)
        row, slot = rows[i], slots[i]
        new = []
        for li, (kbs, vbs) in enumerate(caches):
            kbs, vbs = list(kbs), list(vbs)
            for j, (lo, hi) in enumerate(spans):
                kk = jax.lax.dynamic_slice(pk, (li, row, 0, 0, lo),
                                           (1, 1, pk.shape[2], pk.shape[3], hi - lo))
                vv = jax.lax.dynamic_slice(pv, (li, row, 0, lo, 0),
                                           (1, 1, pv.shape[2], hi - lo, pv.shape[4]))
                kbs[j] = jax.lax.dynamic_update_slice(kbs[j], kk[0], (slot, 0, 0, 0))
                vbs[j] = jax.lax.dynamic_update_slice(vbs[j], vv[0], (slot, 0, 0, 0))
            new.append((kbs, vbs))
        return new

    caches = jax.lax.fori_loop(0, n_new, copy_one, caches)
    keys = _row_keys(base, req, samp)
    tok, lp = _draw(st, logits[rows], keys, jnp.zeros_like(req))
    done = jnp.isin(tok, eos) | (limit <= 1)
    upd = dict(tok=tok, length=n_prompt, count=jnp.ones_like(n_prompt), limit=limit, key=keys,
               active=~done)
    state = {k: state[k].at[slots].set(upd[k].astype(state[k].dtype), mode="drop") for k in state}
    return _pin(st, caches), state, tok, lp


def _chunk_impl(rest, layer_params, caches, state, eos, pad, *, st: Static):
    """Up to `chunk` decode steps over all slots (stops early once no slot is live). Returns
    (caches, state, tokens [B, chunk], logprobs [B, chunk], emitted [B, chunk] bool, steps)."""
    cfg, b, blk, nb = st.config, st.slots, st.block, st.nblocks
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt)
    final_norm = RMSNorm(cfg.rms_norm_eps, dt, pdt)
    layer = _DecodeLayer(cfg, blk, st.skip_blocks)
    kidx = jnp.arange(nb * blk)[None, :]

    def cond(carry):
        i, _, state, _ = carry
        return (i < st.chunk) & jnp.any(state["active"])

    def body(carry):
        i, caches, s, out = carry
        act, length = s["active"], s["length"]
        x = embed.apply({"params": rest["embed_tokens"]}, s["tok"][:, None])
        cos, sin = rope_cos_sin(cfg, length[:, None])  # position == cache index
        wblk = jnp.where(act, length // blk, nb)  # finished / empty rows write nowhere
        woff = length % blk
        key_ok = kidx <= length[:, None]  # [B, NB * blk]: the prompt, the response so far, this
        if cfg.window is not None:  # position == cache index: `llama.window_mask`'s rule
            key_ok = key_ok & (kidx > length[:, None] - cfg.window)
        nb_live = (jnp.max(jnp.where(act, length, 0)) + blk) // blk  # blocks holding live keys
        new = []
        for lp_, (kbs, vbs) in zip(layer_params, caches):
            x, c = layer.apply({"params": lp_}, x, cos, sin, kbs, vbs, wblk, woff, key_ok, nb_live)
            new.append(c)
        hdn = final_norm.apply({"params": rest["norm"]}, x)[:, 0]
        logits = lm_head_apply(cfg, rest, hdn).astype(jnp.float32)
        tok, lp = _draw(st, logits, s["key"], s["count"])
        count = s["count"] + act
        fin = act & (jnp.isin(tok, eos) | (count >= s["limit"]))
        s = dict(s, tok=jnp.where(act, tok, s["tok"]), length=length + act, count=count,
                 active=act & ~fin)
        otok, olp, omask = out
        otok = otok.at[:, i].set(jnp.where(act, tok, pad))
        olp = olp.at[:, i].set(jnp.where(act, lp, 0.0))
        omask = omask.at[:, i].set(act)
        return i + 1, _pin(st, new), s, (otok, olp, omask)

    out0 = (jnp.full((b, st.chunk), pad, jnp.int32), jnp.zeros((b, st.chunk), jnp.float32),
            jnp.zeros((b, st.chunk), bool))
    i, caches, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), caches, state, out0))
    return caches, state, out[0], out[1], out[2], i


@functools.lru_cache(maxsize=32)
def programs(st: Static):
    """The jitted init / prefill / admit / chunk for one set of static settings (shared by every
    Engine with the same settings, so a trainer re-creating its engine never recompiles)."""
    init = jax.jit(functools.partial(_init_impl, st))
    prefill = jax.jit(functools.partial(_prefill_impl, st=st))
    admit = jax.jit(functools.partial(_admit_impl, st=st), donate_argnums=(0, 1))
    chunk = jax.jit(functools.partial(_chunk_impl, st=st), donate_argnums=(2, 3))
    return init, prefill, admit, chunk


unstack = jax.jit(unstack_layers)  # the per-layer weight slices, once per run
