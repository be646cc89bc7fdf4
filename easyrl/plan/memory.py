"""Bytes: per-device bytes of a pytree under the partition rules, and the activation / KV-cache
formulas.

Memory model, per device (b = rows of one micro-batch on a device = rows / (dp*fsdp), T = tokens
per row, a = bytes of the compute dtype, 4 = float32; D hidden, F intermediate, L layers, H / K
query / kv heads, Dh head dim, V vocab; under tensor parallelism q = H*Dh/tp, k = K*Dh/tp,
f = F/tp, v = V/tp, h = H/tp whenever tp divides them, as the partition rules shard them):

  parameters, optimizer state  exact: eval_shape pytrees x partition specs (AdamW: mu and nu in
                               the parameter dtype + int32 counts; PPO: policy and value)
                               LoRA: parameters = frozen base (in model.lora.base_dtype when set)
                               + adapters; optimizer state of the trainable leaves only (adapters
                               + a reward / value model's score head)
  gradients                    = trainable parameter bytes (param dtype, sharded like them);
                               x2 with gradient accumulation (accumulator + this micro-batch);
                               with exactly 2 micro-steps activations count twice (XLA overlaps
                               them: measured with --compile)
  activations (training)       b*T * [ L * S(remat) + W + head ] (+ the fused head's chunk and
                               kernel-gradient terms, SFT)  where, per token,
      S(none)          = W = a*(4D + 2q + 2k + 4f) + 16D + (4 + a)*h*T + T
                         (every residual of the layer: norm inputs / float32 copies, rotated q,k,
                         v, float32 softmax probs and their compute-dtype copy, the mask,
                         attention output, gate, up, silu(gate), silu*up)
      S(dots)          = a*(3D + 2q + 2k + 2f) + 4*h*T  (every matmul output incl. the float32
                         attention scores, + the layer input)
      S(dots_no_batch) = S(minimal) = a*(3D + q + 2k + 2f)  (projection outputs, + layer input)
      S(full)          = a*D  (the layer input only)
      LoRA             per targeted kernel (in -> out): + a*r to S(none) = W (x A, for B's
                         gradient; (x A) B is only added to x W), + a*(r + out) to S(dots*)
                         (both matmul outputs are saved to recompute their sum); while training
                         with model.lora.dropout > 0 also + a*in to both (the dropped input).
                         S(full) unchanged. The frozen base's weight gradients are never formed
                         (gradients: trainable leaves only). Checked with --compile (small
                         preset, 7 targets, seq 256, float32), XLA's temporaries vs the
                         estimate in GiB: 0.104 vs 0.104 (remat none), 0.077 vs 0.086 (dots;
                         full weights 0.062 vs 0.069); dropout 0.1: 0.116 vs 0.125, 0.096 vs
                         0.107.
      W                = one layer's working set while its backward runs (recomputed forward or
                         gradient buffers)
      head             = 10*D*a (embedding output, final norm) + the head's own term:
        full logits    (a + 3*4)*v (DPO, RRHF, PPO: `M.forward` builds [B,T,V]): logits in the
                         compute dtype + float32 logits, float32 softmax for the backward,
                         float32 gradient;
        fused LM head  (SFT: `losses.lm_head_loss_sums`, the LM head fused with the cross-entropy
                         in a lax.scan over T in chunks of c = min(max(1, 512 // b), T) positions,
                         512 = losses.LM_HEAD_CHUNK_TOKENS; no [B,T,V] array) per token
                         (4 + a)*D: the gradient w.r.t. the hidden states, formed in the forward
                         (the scan's float32 output + its compute-dtype residual), and once (not
                         per token)  b*c*(4 + a)*v  (one chunk's float32 logits + their gradient
                         softmax - onehot in the compute dtype, the softmax fused into it)
                         + (4 + a')*D*v  (the float32 kernel-gradient accumulator + its
                         compute-dtype residual, a' = a below float32 else 0; none when the
                         head is frozen: LoRA). Checked with --compile (small preset, V 8192 ->
                         32000, 4 rows x 256, c = 128): XLA's temporaries grow 8.6 B (float32) /
                         6.4 B (bfloat16) per chunk position and vocab entry beyond the kernel
                         terms, vs 8 / 6 here;
        score head     ~0 (RM, value, reward: a scalar per token).
  forward-only passes          b*T * [ W + 10*D*a + (a + 2*4)*v ] (DPO's live reference, PPO
                               scoring; full logits)
                               LoRA: the reference is the policy with its adapters off (no
                               parameters of its own)
  PPO                          resident: policy, reference (a copy of the policy; none under
                               LoRA: the policy with its adapters off), reward and
                               value parameters, policy and value optimizer states; then the peak
                               phase of: rollout = KV cache 2*L*B*(P+N)*K*Dh*a (batch over
                               dp*fsdp, kv heads over tp, as the sampler pins it; a bf16 cache
                               held as uint16 bits on CPU is the same bytes) + a prefill
                               forward + when the decode loop is unrolled (the trainer's
                               decode="auto" resolves to `platform_tuning.tuning_for(platform)
                               .decode`: "unrolled" on CPU) a second copy of the decoder-layer
                               weights, their per-device elements x a (`decode_copy_bytes`);
                               scoring = the largest forward-only pass over the rollout
                               batch (rollout: as configured by rollout.engine, see "rollout
                               engine" below); update = policy + value gradients and training activations
                               of one minibatch (batch / ppo.num_minibatches rows, both models).
  GRPO                         train.batch_size counts prompts, each with G = grpo.num_generations
                               completions. resident: policy + its optimizer state, a reference
                               copy only when grpo.beta > 0 (none under LoRA: adapters off), a
                               frozen reward model only when reward.path is set; NO value model.
                               Phases: rollout = as PPO's over B*G rows; rewards = the reward
                               model's forward over the whole rollout batch (rl_loop.HostRewards,
                               one call); scoring = the larger forward (old / reference log-probs)
                               over one micro-batch; update = policy gradients (x2 when a
                               minibatch of B*G / grpo.num_minibatches rows is accumulated over
                               several micro-batches of train.micro_batch_size*G rows; 0 = the
                               whole minibatch) + training activations of one micro-batch.
  rollout engine               PPO / GRPO, rollout.engine: "static" (the sampler above: one
                               batch of B*G rows; GRPO's shared prefixes when B divides over
                               dp*fsdp: the prefix cache before its copy + a prefill over the B
                               prompts) or "continuous" (`easyrl.engine.Engine` as rl_loop.run
                               builds it, rollout.slots S, 0 = one per rollout row; block 64,
                               prefill_batch 8: the engine's defaults):
      KV cache         S*NB*block*2*L*K*Dh*a, NB = ceil((P+N)/block) block buffers per layer
                       for keys and values (slots over dp*fsdp when they divide, kv heads over
                       tp: the engine pins them so)
      prefix store     prefilled prompts' KV 2*L*K*Dh*Pb*a + last logits V*4 per prefill-batch
                       row (Pb: the prompt bucket of a P-token prompt), kept until their G
                       samples are admitted. Bound (`engine_prefix_rows`): the host loop
                       prefills only while fewer samples wait than slots are free, so a round
                       prefills <= ceil(S/G) prompts (batches of <= prefill_batch rows,
                       padded to a power of two) alive with one older batch; ceil(S/G) >= the
                       prompts: every prompt before the first admission. A batch is split over dp*fsdp
                       only when it divides it (`parallel.constrain_batch`), else whole on
                       every device; kv heads over tp
      prefill          one prefill call: its rows x Pb x (W + 10*D*a), key length Pb
      weight copy      always (the engine's decode is unrolled on every platform): the stacked
                       decoder layers sliced per layer once per run (`jit(unstack_layers)`:
                       the leaves' own dtype, not the compute dtype); LoRA: + the kernels
                       `lora.merge` rebuilds (W + s*A*B)
  peak                         resident + the largest phase; "fits" = peak <= (1 - headroom) *
                               device memory (default headroom 10%: XLA temporaries, fragmentation).

Activations are assumed sharded over the batch (dp*fsdp) as the design intends. Checked with
`--compile` on 8 simulated CPU devices (bench_100m, seq 512): on dp-only meshes the estimate is
within ~10% of XLA's; on fsdp meshes XLA's temporaries were ~3-4x larger because the model puts no
sharding constraint on the hidden state (the fsdp-sharded embedding table pulls it off the batch
axis); with `with_sharding_constraint(x, P(('dp','fsdp'), None, None))` at the decoder-layer
boundary they matched the estimate again (1.15 vs 1.06 GiB).

The activation terms are estimates (XLA fuses and rematerializes on its own); `--compile` (models
under 2B parameters) lowers and compiles the real train step / PPO update with abstract inputs and
prints XLA's memory analysis next to the estimate.
"""
from __future__ import annotations

import math
import types
from typing import Dict, Optional, Tuple

import jax
import numpy as np

from easyrl.platform_tuning import tuning_for

GiB = 2 ** 30


def count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def fake_mesh(sizes: dict):
    """What `easyrl.parallel.spec_for` reads of a mesh: `.shape[axis]`."""
    return types.SimpleNamespace(shape=dict(sizes), axis_names=tuple(sizes))


def per_device_bytes(tree, mesh_sizes: dict) -> int:
    """Bytes of `tree` on one device when placed by the partition rules on a mesh of that shape
    (sharded dims count 1/axis size; replicated dims fully)."""
    from easyrl import parallel
    mesh = fake_mesh(mesh_sizes)
    specs = parallel.partition_specs(tree, mesh)
    total = 0
    for x, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(
            specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))):
        n = 1
        for i, dim in enumerate(x.shape):
            ax = spec[i] if i < len(spec) else None
            axes = () if ax is None else (ax if isinstance(ax, tuple) else (ax,))
            div = int(np.prod([mesh_sizes[a] for a in axes])) if axes else 1
            n *= dim // div
        total += n * np.dtype(x.dtype).itemsize
    return int(total)


def _split(n: int, tp: int) -> float:
    """n per device when tp shards it (only if divisible, as the partition rules do)."""
    return n / tp if tp > 1 and n % tp == 0 else float(n)


def lora_bytes_per_token(cfg, tp: int, train: bool = True) -> Tuple[float, float]:
    """Extra per-token bytes of one decoder layer's LoRA adapters: (saved without remat, saved
    under the dots policies). See the module docstring."""
    if not getattr(cfg, "lora_rank", 0):
        return 0.0, 0.0
    from easyrl.model.lora import target_names
    a = np.dtype(cfg.dtype).itemsize
    D, F, H, K, Dh = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                      cfg.num_key_value_heads, cfg.head_dim)
    q, k, f = _split(H * Dh, tp), _split(K * Dh, tp), _split(F, tp)
    dims = {"q": (D, q), "k": (D, k), "v": (D, k), "o": (q, D), "gate": (D, f), "up": (D, f),
            "down": (f, D)}  # (in, out) per device, as the partition rules shard kernel and B
    targets = [dims[t] for t in target_names(cfg.lora_targets)]
    r = cfg.lora_rank
    drop = sum(a * i for i, _ in targets) if train and cfg.lora_dropout > 0 else 0.0
    return float(a * r * len(targets) + drop), float(sum(a * (r + o) for _, o in targets) + drop)


def layer_bytes_per_token(cfg, tp: int, key_len: int, train: bool = True) -> Dict[str, float]:
    """Per-token bytes of one decoder layer: saved residuals per remat policy and the working set
    W (see the module docstring; LoRA adapters included)."""
    a = np.dtype(cfg.dtype).itemsize
    D, F, H, K, Dh = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                      cfg.num_key_value_heads, cfg.head_dim)
    q, k, f, h = _split(H * Dh, tp), _split(K * Dh, tp), _split(F, tp), _split(H, tp)
    t = key_len
    lo_none, lo_dots = lora_bytes_per_token(cfg, tp, train)
    w = a * (4 * D + 2 * q + 2 * k + 4 * f) + 16 * D + (4 + a) * h * t + t + lo_none
    saved = {
        "none": w,
        "dots": a * (3 * D + 2 * q + 2 * k + 2 * f) + 4 * h * t + lo_dots,
        "dots_no_batch": a * (3 * D + q + 2 * k + 2 * f) + lo_dots,
        "minimal": a * (3 * D + q + 2 * k + 2 * f) + lo_dots,
        "full": a * D,
    }
    return dict(saved=saved, working=w)


def head_bytes_per_token(cfg, kind: str, tp: int, train: bool, fused: bool = False) -> float:
    """Per-token bytes of the head: 10*D*a (embedding output, final norm) + full logits
    (a + (3 if train else 2)*4)*v for a LM head, or with `fused` (SFT's chunked LM head + CE) only
    the hidden-state gradient (4 + a)*D (its chunk: `fused_head_bytes`); ~0 for a score head."""
    a = np.dtype(cfg.dtype).itemsize
    other = 10 * cfg.hidden_size * a  # embedding output, final norm (+ float32 copies)
    if kind != "causal_lm":
        return other + 8
    if fused:
        return other + ((4 + a) * cfg.hidden_size if train else 0)
    v = _split(cfg.vocab_size, tp)
    return other + (a + (3 if train else 2) * 4) * v


def head_chunk(rows: float, seq: int) -> int:
    """Positions per row in one chunk of the fused LM head, as `algorithms.sft.make_loss` sizes
    it and `losses.sft.head_scan` clips it: c = min(max(1, LM_HEAD_CHUNK_TOKENS // b), T)."""
    from easyrl.losses import LM_HEAD_CHUNK_TOKENS
    return int(min(max(1, LM_HEAD_CHUNK_TOKENS // max(int(math.ceil(rows)), 1)), seq))


def fused_head_bytes(cfg, rows: float, seq: int, tp: int, train: bool = True) -> float:
    """Per-device bytes of the fused LM head + cross-entropy beyond its per-token term (see the
    module docstring): one chunk b*c*(4 + a)*v (forward only: b*c*4*v), plus while training
    the kernel gradient (4 + a')*D*v (float32 accumulator + compute-dtype residual, a' = a below
    float32 else 0), not formed when the LM head is frozen (LoRA trains adapters only)."""
    a = np.dtype(cfg.dtype).itemsize
    v = _split(cfg.vocab_size, tp)
    chunk = rows * head_chunk(rows, seq) * ((4 + a) if train else 4) * v
    if not train or getattr(cfg, "lora_rank", 0):
        return float(chunk)
    return float(chunk + (4 + (a if a < 4 else 0)) * cfg.hidden_size * v)


def activation_bytes(cfg, kind: str, rows: float, seq: int, remat: str, tp: int,
                     train: bool = True, fused_head: bool = False) -> float:
    """Per-device activation bytes of one forward(+backward) over `rows` rows of `seq` tokens.
    `fused_head`: the LM head fused with the cross-entropy in chunks (SFT), no [B,T,V] logits."""
    lb = layer_bytes_per_token(cfg, tp, seq, train)
    fused = fused_head and kind == "causal_lm"
    per_token = lb["working"] + head_bytes_per_token(cfg, kind, tp, train, fused)
    if train:
        per_token += cfg.num_hidden_layers * lb["saved"][remat]
    return rows * seq * per_token + (fused_head_bytes(cfg, rows, seq, tp, train) if fused else 0.0)


def kv_cache_bytes(cfg, batch: int, seq: int, mesh: dict, dtype=None) -> Tuple[float, float]:
    """(total, per device) bytes of the sampler's KV cache 2 x [L, B, S, K, Dh] (batch over
    dp*fsdp when divisible, kv heads over tp when divisible, as `generate.make_sampler` pins it
    on a mesh)."""
    item = np.dtype(dtype or cfg.dtype).itemsize
    total = 2.0 * cfg.num_hidden_layers * batch * seq * cfg.num_key_value_heads * cfg.head_dim * item
    dpf = mesh["dp"] * mesh["fsdp"]
    div = (dpf if batch % dpf == 0 else 1) * (mesh["tp"] if cfg.num_key_value_heads % mesh["tp"] == 0 else 1)
    return total, total / div


def decode_copy_bytes(params, mesh: dict, dtype) -> float:
    """Per-device bytes of the unrolled decode loop's second copy of the decoder-layer weights:
    `generate` with decode="unrolled" slices `params['layers']` ([L, ...] leaves, adapters
    included) into L per-layer arrays once per call (`llama.unstack_layers`), and XLA keeps the
    slices in the compute dtype (slice + cast hoisted out of the loop): per-device elements of the
    stacked layers (sharded as the partition rules shard them) x a. Embeddings / LM head are not
    copied. Checked by compiling the sampler (8 layers, D 256, F 1024): unrolled - scan
    temporaries = 0.99x this (float32), 0.99x (bfloat16), 0.49x the float32 layer bytes with
    float32 parameters and bfloat16 compute."""
    return float(per_device_bytes(decode_copy_tree(params, dtype), mesh))


def decode_copy_tree(params, dtype) -> dict:
    """{'layers': the stacked decoder-layer leaves as ShapeDtypeStructs in `dtype`}: the unrolled
    decode loop's copy, shaped for the partition rules."""
    dt = np.dtype(dtype)
    return {"layers": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt), params["layers"])}


def engine_copy_tree(params) -> dict:
    """{'layers': the stacked decoder-layer leaves without adapters, in their own dtypes}: the
    continuous engine's per-layer weight copy (`Engine.run`: `lora.merge`, then
    `jax.jit(unstack_layers)`, whose slices keep each leaf's dtype), shaped for the partition
    rules (a slice keeps its leaf's sharding)."""
    from easyrl.model.trainable import strip
    return {"layers": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                   strip(params)["layers"])}


def engine_merge_tree(params) -> dict:
    """The kernels `lora.merge` rebuilds (W + s A B, in W's dtype: every kernel with adapters),
    a new array each while the engine runs (the trainer keeps the unmerged ones). Over a
    quantized base (model.lora.base_quant) the engine decodes with the adapters unmerged:
    nothing is rebuilt."""
    from easyrl.model.trainable import flatten, unflatten
    flat = flatten(params)
    return unflatten({k[: -len("lora_a")] + "kernel": flat[k[: -len("lora_a")] + "kernel"]
                      for k in flat if k.endswith("/lora_a")
                      and k[: -len("lora_a")] + "kernel" in flat})


def _pow2_capped(n: int, cap: int) -> int:
    """`easyrl.engine._pow2_at_least`: the prefill batch's padded rows."""
    return min(1 << max(int(n) - 1, 0).bit_length(), cap)


def engine_prefix_rows(prompts: int, group: int, slots: int, prefill_batch: int) -> list:
    """Rows of the prefill batches whose prefix KV can be alive at once in `Engine.run` (an
    upper bound), `prompts` requests of `group` samples each on `slots` slots.

    The host loop prefills only while fewer samples wait (`ready`) than slots are free, each
    call taking up to prefill_batch prompts until the waiting samples cover the free slots: so a
    round of prefills (before the admissions that follow it) takes at most W = ceil(slots / G)
    prompts (batches of prefill_batch, then one of the rest padded to a power of two), and after
    the admissions fewer than G samples (one prompt's) are left waiting. A batch lives while a
    sample of it waits or it was the last admitted from: at a round's last prefill that is the
    round's batches + one older batch (<= min(prefill_batch, pow2(W)) rows). With W >= prompts
    the first round prefills every prompt and no older batch exists."""
    g, pb = max(int(group), 1), int(prefill_batch)

    def split(n: int) -> list:
        q, r = divmod(n, pb)
        return [pb] * q + ([_pow2_capped(r, pb)] if r else [])
    w = -(-int(slots) // g)
    if w >= prompts:
        return split(prompts)
    return [_pow2_capped(min(pb, w), pb)] + split(min(w, prompts - 1))


def decode_mode(platform: Optional[str]) -> Optional[str]:
    """The sampler's decode loop as `generate.make_sampler(decode="auto")` (the PPO trainer's
    setting; no config key) resolves it on `platform`: `platform_tuning.tuning_for(platform)
    .decode` ("unrolled" on CPU, "scan" elsewhere); None when the target platform is unknown."""
    if not platform:
        return None
    return tuning_for(platform).decode
