"""Continuous-batching rollout engine: shared prompt prefixes, per-slot KV caches, exact sampling.

    eng = Engine(config, slots=32, max_prompt_len=128, max_new_tokens=256, temperature=1.0,
                 eos_token_id=2)
    out = eng.run(params, [dict(prompt_ids=[1, 5, 9], num_samples=8, max_new_tokens=64), ...],
                  seed=0)
    out[r]["response_ids"][g]  list[int]: sample g of request r, up to and including its first EOS
    out[r]["logprobs"][g]      list[float]: log-prob of each token under the distribution it was
                               drawn from (softmax(logits / T) over the top-k / top-p kept tokens;
                               log softmax(logits), T = 1 unfiltered, when greedy): what
                               `rollout.response_logprobs` of a scoring pass over the same tokens
                               with the same temperature / top_k / top_p computes
    out[r]["has_eos"][g]       bool
    eng.stats                  requests, samples, generated_tokens, prefill_calls,
                               prefilled_prompts (== requests: each prompt once), admit_calls,
                               decode_chunks, decode_steps, slot_steps, slot_utilization,
                               seconds, tokens_per_s (of the last `run`)

How it works (B = `slots`, L layers, K kv heads, Dh head dim, S = max_prompt_len +
max_new_tokens rounded up to NB blocks of `block` keys):

* Slots. Each of the B decode slots owns one row of every layer's KV cache, held as NB separate
  block buffers per layer: keys [B, K, Dh, block] (transposed) and values [B, K, block, Dh], the
  canonical operand layouts of the two attention dots (`llama.attend_core`), so a dot reads a
  block where it lies. A slot's prompt sits at cache indices 0..n-1 and its generated token i at
  n + i, so cache index == rope position (the true token position: prompt length + i).
* Shared prefixes. A request's prompt is prefilled ONCE (`_prefill`: the scanned `Llama` stack,
  several waiting prompts per call, right-padded to a length bucket and a batch bucket so the
  number of compilations stays bounded), giving its prefix KV [L, K, Dh | ., n] and its
  last-position logits, kept on device until all its G samples are admitted. Admitting a sample
  (`_admit`) copies that prefix KV into the free slot's rows (a device copy, no second prefill)
  and draws the sample's first token from the stored logits.
* Continuous batching. The host loop alternates admit (waiting samples into free slots) and a
  jitted decode chunk of `chunk` steps over all B slots (`_chunk`: a `while_loop`, layers
  unrolled over per-layer weights sliced out once per `run`); a sample that emits EOS or reaches
  its own max_new_tokens stops inside the chunk and frees its slot when the chunk returns.
  Empty and finished slots are masked (their writes are dropped, their tokens ignored).
* What a decode step reads. Every weight once (the decoder weights sliced per layer once per
  `run`: while it runs they exist twice, stacked and sliced, as in the sampler's unrolled
  decode), and for each layer the key and value blocks j < nb_live of all B slot rows,
  nb_live = ceil((1 + max over live slots of the slot's cache length) / block): that is
  B * nb_live * block keys and as many values per layer, not B * S. Blocks at or beyond
  nb_live sit behind a `lax.cond` and are not read (their scores are the masked value, their
  weight in the softmax exactly 0, so skipping changes no bit of the result:
  `skip_blocks=False` reads all NB blocks every step and gives the same tokens and log-probs).
  The limit is one per step for all rows (dense dots over a ragged set of rows would not be
  cheaper); within the live blocks each row's keys beyond its own length are masked, so a
  short row reads, but ignores, the blocks a longer row needs. Writes: each live slot writes its
  new key / value at its own index (per layer, one scatter per block buffer whose rows are the
  slots writing into that block; empty / finished slots write nothing).
* RNG. The key of token t of sample g of request r is fold_in(fold_in(fold_in(PRNGKey(seed),
  r), g), t): derived only from (seed, r, g, t), never from the slot, so the same seed and
  request list give the same samples whatever the number of slots, the admission order or the
  chunk size (greedy needs no key). Tokens are drawn with `generate.sample_logits`, row by row.
* LoRA: adapters are merged into the base kernels first (`lora.merge`, once per `run`), and the
  engine runs the merged model (rank 0); its log-probs equal a scoring pass over the merged
  parameters (an unmerged scoring pass differs by the rounding of W + s A B).
* Precision: the cache is held in the config's compute dtype (bf16 on CPU as uint16 bit
  patterns: `llama.cache_storage_dtype`), attention accumulates in float32 as `llama.attend_core`.
* mesh: the cache blocks are pinned to slots over (dp, fsdp) (when B divides) and kv heads over
  tp; parameters keep whatever sharding they have (jit propagation).

Requests are checked before any compute: a prompt longer than `max_prompt_len`, an empty prompt,
a request limit above the engine's `max_new_tokens`, or prompt length + the request's
max_new_tokens beyond `config.max_position_embeddings` raises ValueError naming the request.
"""
from __future__ import annotations

import collections
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from easyrl.generate import check_settings, normalize_eos
from easyrl.model import lora
from easyrl.model.config import LlamaConfig
from easyrl.model.llama import cache_storage_dtype
from easyrl.model.trainable import has_adapters
from easyrl.platform_tuning import tuning_for_mesh

from easyrl.engine.kernels import Static, programs, unstack

__all__ = ["Engine"]


def _pow2_at_least(n: int, cap: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return min(p, cap)


# ---- the engine -------------------------------------------------------------------------------
class Engine:
    """A continuous-batching sampler with shared prompt prefixes (see the module doc).

    slots: decode slots (rows of the KV cache); max_prompt_len / max_new_tokens: the longest
    prompt and response a request may have (the cache holds their sum per slot); temperature
    (0 = greedy), top_k (0 = off), top_p (1 = off): as `generate.sample_logits`; eos_token_id:
    int or ints, None = the config's, () = never stop early; pad_token_id: pads prompts in the
    prefill batch (None: the config's, else 0); block: keys per cache block (the unit attention
    skips); chunk: decode steps per jitted call between admissions; mesh: optional device mesh.
    prefill_batch: at most this many prompts per prefill call (batches are padded to a power of
    two rows and prompts to a length bucket: powers of two below `block`, multiples of `block`
    above). skip_blocks=False reads all cache blocks every step (for comparison).
    """

    def __init__(self, config: LlamaConfig, *, slots: int, max_prompt_len: int,
                 max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id=None, pad_token_id: Optional[int] = None,
                 block: int = 64, chunk: int = 8, mesh=None, prefill_batch: int = 8,
                 skip_blocks: bool = True):
        check_settings(max_new_tokens, temperature, top_k, top_p)
        for name, val in (("slots", slots), ("max_prompt_len", max_prompt_len),
                          ("block", block), ("chunk", chunk), ("prefill_batch", prefill_batch)):
            if int(val) < 1:
                raise ValueError(f"Engine: {name} must be >= 1, got {val}")
        self.config = config
        # adapters are merged before decoding; over a quantized base (model.lora.base_quant)
        # they stay separate (a merge would hold a full-precision copy of every kernel)
        self.run_config = config if config.base_quant != "none" else lora.disabled(config)
        self.slots, self.max_prompt_len = int(slots), int(max_prompt_len)
        self.max_new_tokens, self.block, self.chunk = int(max_new_tokens), int(block), int(chunk)
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.eos = normalize_eos(eos_token_id, config)
        if pad_token_id is None:
            pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.pad_token_id = int(pad_token_id)
        self.prefill_batch = int(prefill_batch)
        self.mesh = mesh
        self.nblocks = -(-(self.max_prompt_len + self.max_new_tokens) // self.block)
        storage = cache_storage_dtype(config.dtype, tuning_for_mesh(mesh).kv_cache_as_bits)
        self._st = Static(self.run_config, self.slots, self.nblocks, self.block, self.chunk,
                           self.temperature, self.top_k, self.top_p, storage, mesh,
                           bool(skip_blocks))
        n_eos = max(8, -(-len(self.eos) // 8) * 8)  # padded with -1 (never matches)
        self._eos_arr = np.asarray(list(self.eos) + [-1] * (n_eos - len(self.eos)), np.int32)
        self.stats: dict = {}

    # ---- requests ----
    def check_requests(self, requests: Sequence[dict]) -> list:
        """[(prompt int32 array, num_samples, max_new_tokens)] of the requests, or ValueError
        naming the first bad one (nothing is computed before this passes)."""
        out = []
        max_pos = self.config.max_position_embeddings
        for i, r in enumerate(requests):
            if "prompt_ids" not in r:
                raise ValueError(f"request {i}: missing 'prompt_ids'")
            prompt = np.asarray(r["prompt_ids"], np.int64).reshape(-1)
            n = int(prompt.size)
            g = int(r.get("num_samples", 1))
            lim = r.get("max_new_tokens")
            lim = self.max_new_tokens if lim is None else int(lim)
            if n < 1:
                raise ValueError(f"request {i}: empty prompt_ids")
            if g < 1:
                raise ValueError(f"request {i}: num_samples must be >= 1, got {g}")
            if not 1 <= lim <= self.max_new_tokens:
                raise ValueError(f"request {i}: max_new_tokens {lim} must be in [1, "
                                 f"{self.max_new_tokens}] (the engine's max_new_tokens)")
            if n > self.max_prompt_len:
                raise ValueError(f"request {i}: prompt length {n} exceeds the engine's "
                                 f"max_prompt_len {self.max_prompt_len}")
            if n + lim > max_pos:
                raise ValueError(f"request {i}: prompt length {n} + max_new_tokens {lim} = "
                                 f"{n + lim} exceeds the model's max_position_embeddings "
                                 f"{max_pos}")
            if prompt.min() < 0 or prompt.max() >= self.config.vocab_size:
                raise ValueError(f"request {i}: prompt_ids outside [0, {self.config.vocab_size})")
            out.append((prompt.astype(np.int32), g, lim))
        return out

    def _prompt_bucket(self, n: int) -> int:
        """The padded prompt length of a prefill batch whose longest prompt has n tokens: a
        power of two (>= 8) up to `block`, a multiple of `block` beyond; never past the cache."""
        if n <= self.block:
            pb = max(min(8, self.block), _pow2_at_least(n, self.block))
        else:
            pb = -(-n // self.block) * self.block
        return min(pb, self.nblocks * self.block)

    # ---- the loop ----
    def run(self, params, requests: Sequence[dict], seed=0) -> list:
        """Sample every request's num_samples continuations; results in request order (see the
        module doc). `seed`: an int or a PRNG key."""
        reqs = self.check_requests(requests)
        t_start = time.perf_counter()
        st = self._st
        init, prefill, admit, chunk = programs(st)
        if has_adapters(params) and self.config.base_quant == "none":
            params = lora.merge(self.config, params)
        rest = {k: v for k, v in params.items() if k != "layers"}
        layer_params = unstack(params)
        if jnp.issubdtype(jnp.result_type(seed), jax.dtypes.prng_key):
            base = jax.random.key_data(seed)  # a typed key
        elif np.ndim(seed) == 0:
            base = jax.random.PRNGKey(int(seed))  # an int
        else:
            base = jnp.asarray(seed, jnp.uint32)  # a raw uint32[2] key
        eos, pad = jnp.asarray(self._eos_arr), jnp.int32(self.pad_token_id)
        caches, state = init()
        b = self.slots

        results = [dict(response_ids=[None] * g, logprobs=[None] * g, has_eos=[None] * g)
                   for _, g, _ in reqs]
        pending = collections.deque(range(len(reqs)))  # requests not prefilled yet
        ready = collections.deque()  # (prefix batch, row, r, g): prefilled samples to admit
        free = list(range(b - 1, -1, -1))  # free slots (pop() takes the lowest)
        occupant = [None] * b  # slot -> [r, g, tokens, logprobs]
        n_live = 0
        stats = collections.Counter()
        eos_set = set(self.eos)

        def do_prefill(n_samples_wanted):
            """Prefill the next waiting prompts (enough to cover n_samples_wanted samples)."""
            take = []
            covered = 0
            while (pending and len(take) < self.prefill_batch
                   and (not take or covered < n_samples_wanted)):
                r = pending.popleft()
                take.append(r)
                covered += reqs[r][1]
            bp = _pow2_at_least(len(take), self.prefill_batch)
            pb = self._prompt_bucket(max(reqs[r][0].size for r in take))
            ids = np.full((bp, pb), self.pad_token_id, np.int32)
            lens = np.ones((bp,), np.int32)
            for row, r in enumerate(take):
                p = reqs[r][0]
                ids[row, :p.size] = p
                lens[row] = p.size
            prefix, logits = prefill(params, ids, lens)
            batch = dict(prefix=prefix, logits=logits)
            for row, r in enumerate(take):
                for g in range(reqs[r][1]):
                    ready.append((batch, row, r, g))
            stats["prefill_calls"] += 1
            stats["prefilled_prompts"] += len(take)

        while pending or ready or n_live:
            # ---- admit waiting samples into free slots (prefilling prompts as needed)
            groups, firsts = [], []
            while free and (ready or pending):
                if len(ready) < len(free) and pending:
                    do_prefill(len(free) - len(ready))
                    continue
                group = []
                src = ready[0][0]
                while free and ready and ready[0][0] is src and len(group) < b:
                    _, row, r, g = ready.popleft()
                    group.append((free.pop(), row, r, g))
                a = np.full((6, b), 0, np.int32)
                a[1] = b  # padding entries target slot B: dropped
                for i, (slot, row, r, g) in enumerate(group):
                    a[:, i] = (row, slot, reqs[r][0].size, reqs[r][2], r, g)
                caches, state, tok, lp = admit(caches, state, src["prefix"], src["logits"],
                                               *a, np.int32(len(group)), base, eos)
                stats["admit_calls"] += 1
                groups.append(group)
                firsts.append((tok, lp))
                for slot, _, r, g in group:
                    occupant[slot] = [r, g, [], []]
                n_live += len(group)
            if not n_live:
                continue
            caches, state, otok, olp, omask, steps = chunk(rest, layer_params, caches, state,
                                                           eos, pad)
            firsts, otok, olp, omask, steps, active = jax.device_get(
                (firsts, otok, olp, omask, steps, state["active"]))
            stats["decode_chunks"] += 1
            stats["decode_steps"] += int(steps)
            stats["slot_steps"] += int(omask.sum())
            for group, (tok, lp) in zip(groups, firsts):
                for i, (slot, _, _, _) in enumerate(group):
                    occupant[slot][2].append(int(tok[i]))
                    occupant[slot][3].append(float(lp[i]))
            for slot in range(b):
                occ = occupant[slot]
                if occ is None:
                    continue
                m = omask[slot]
                occ[2].extend(int(t) for t in otok[slot][m])
                occ[3].extend(float(x) for x in olp[slot][m])
                if not active[slot]:
                    r, g, toks, lps = occ
                    res = results[r]
                    res["response_ids"][g], res["logprobs"][g] = toks, lps
                    res["has_eos"][g] = bool(toks) and toks[-1] in eos_set
                    occupant[slot] = None
                    free.append(slot)
                    n_live -= 1
                    stats["generated_tokens"] += len(toks)
            free.sort(reverse=True)
        secs = time.perf_counter() - t_start
        self.stats = dict(requests=len(reqs), samples=sum(g for _, g, _ in reqs),
                          generated_tokens=stats["generated_tokens"],
                          prefill_calls=stats["prefill_calls"],
                          prefilled_prompts=stats["prefilled_prompts"],
                          admit_calls=stats["admit_calls"],
                          decode_chunks=stats["decode_chunks"],
                          decode_steps=stats["decode_steps"], slot_steps=stats["slot_steps"],
                          slot_utilization=(stats["slot_steps"] / (b * stats["decode_steps"])
                                            if stats["decode_steps"] else 0.0),
                          seconds=secs, tokens_per_s=stats["generated_tokens"] / max(secs, 1e-9))
        return results
