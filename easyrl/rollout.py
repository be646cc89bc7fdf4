"""Rollouts and what every consumer of them shares: the online-RL loop, the pipeline's held-out
evaluation and the PPO benchmark all sample, score and decode through these functions.

    roll = sample(sampler, params, prompts, rng)     # tokens, attn, resp_mask, response, has_eos,
                                                     # logprobs (the sampler's)
    lp, ent = response_logprobs(cfg, params, roll["tokens"], roll["attn"], P, T, top_k, top_p)
    texts = decode(tokenizer, roll["response"], roll["resp_mask"])

Shapes: prompts [B, P] (left-padded), responses [B, N], tokens / attn [B, P + N].
"""
from __future__ import annotations

import jax.numpy as jnp

from easyrl import losses, parallel
from easyrl import model as M
from easyrl.generate import normalize_eos
from easyrl.losses.common import filtered_logprobs


def eos_ids(tokenizer, config) -> tuple:
    """Every id that ends a response: the tokenizer's EOS and the model config's EOS ids."""
    return normalize_eos(tuple({*normalize_eos(tokenizer.eos_token_id),
                                *normalize_eos(None, config)}))


def sample(sampler, params, prompts: dict, rng, num_samples: int = 1) -> dict:
    """One rollout of `sampler` (`easyrl.generate.make_sampler`) from prompts
    {input_ids, attention_mask} [B, P]: tokens [B, P+N], attn [B, P+N] (prompt mask then the
    response mask), resp_mask [B, N], response [B, N], has_eos [B], logprobs [B, N] (the
    sampler's: of the filtered distribution it drew from, 0 off the mask). A sampler made with
    `num_samples=G` (shared prefixes) returns B*G rows: pass the same G here."""
    roll = sampler(params, prompts["input_ids"], prompts["attention_mask"], rng)
    mask = roll["response_mask"]
    pmask = prompts["attention_mask"]
    if num_samples > 1:
        pmask = jnp.repeat(pmask, num_samples, axis=0)
    return dict(tokens=roll["tokens"], attn=jnp.concatenate([pmask, mask], axis=1),
                resp_mask=mask, response=roll["response"], has_eos=roll["has_eos"],
                logprobs=roll["logprobs"])


def decode(tokenizer, response, mask) -> list:
    """Response texts [B] (masked tokens only, special tokens skipped, stripped), on every host."""
    response, mask = parallel.to_host(response), parallel.to_host(mask)
    return [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m],
                             skip_special_tokens=True).strip()
            for row, mrow in zip(response, mask)]


def response_logprobs(config, params, tokens, attn, prompt_len: int, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0):
    """(logprobs [B,N], entropy [B,N]) of the response tokens (positions P.. of `tokens`), from
    logits / temperature as the sampler draws them.

    top_k / top_p (the sampler's): the log-probs are those of the FILTERED distribution the
    sampler drew from (log softmax over the kept tokens, `losses.common.filtered_logprobs`);
    the entropy is always that of the unfiltered logits / temperature. top_k = 0, top_p = 1
    (the default): the plain log softmax, bit-identical to the unfiltered path."""
    logits = M.forward(config, params, tokens, attn)
    if top_k == 0 and top_p >= 1.0:
        lp = losses.token_logprobs(logits, tokens, temperature)[:, prompt_len:]
    else:  # only the response positions: the filter sorts over the vocabulary
        lp = filtered_logprobs(logits[:, prompt_len - 1:-1], tokens[:, prompt_len:], temperature,
                               top_k, top_p)
    ent = losses.token_entropy(logits, temperature)[:, prompt_len:]
    return lp, ent


def sequence_logprob(config, params, tokens, attn, resp_mask, prompt_len: int,
                     temperature: float = 1.0):
    """Summed response log-prob [B] over the response mask."""
    lp, _ = response_logprobs(config, params, tokens, attn, prompt_len, temperature)
    return jnp.sum(lp * resp_mask.astype(jnp.float32), -1)



def engine_sampler(engine, num_samples: int = 1):
    """A sampler with `make_sampler`'s signature and outputs over the continuous-batching
    engine (`easyrl.engine.Engine`), for the online-RL loop (one process): left-padded prompts
    [B, P] in, B * num_samples rows out (rows b*G .. b*G+G-1 prompt b's samples), responses
    right-padded to the engine's max_new_tokens with its pad id, the engine's log-probs."""
    import numpy as np
    g, n, pad = int(num_samples), engine.max_new_tokens, engine.pad_token_id

    def sample(params, input_ids, attention_mask, rng) -> dict:
        ids, mask = parallel.to_host(input_ids), parallel.to_host(attention_mask)
        reqs = [dict(prompt_ids=[int(t) for t, m in zip(r, mr) if m], num_samples=g)
                for r, mr in zip(ids, mask)]
        out = engine.run(params, reqs, seed=rng)
        rows = len(reqs) * g
        resp = np.full((rows, n), pad, np.int32)
        rmask = np.zeros((rows, n), np.int32)
        lps = np.zeros((rows, n), np.float32)
        eos = np.zeros((rows,), bool)
        for b, res in enumerate(out):
            for j, (x, lp, e) in enumerate(zip(res["response_ids"], res["logprobs"],
                                               res["has_eos"])):
                i = b * g + j
                resp[i, :len(x)], rmask[i, :len(x)], lps[i, :len(x)], eos[i] = x, 1, lp, e
        tokens = np.concatenate([np.repeat(ids, g, axis=0), resp], axis=1)
        return dict(tokens=jnp.asarray(tokens), response=jnp.asarray(resp),
                    response_mask=jnp.asarray(rmask), logprobs=jnp.asarray(lps),
                    has_eos=jnp.asarray(eos))

    return sample
