"""Held-out evaluation of trained policies: rule-based true reward, reward-model score, KL to the
SFT policy and response length.

For each policy, `eval.num_samples` responses to each of the first `eval.num_prompts` held-out
prompts, sampled at `eval.temperature` (default 1: the policy's own distribution, the one PPO
optimizes; no top-k / top-p), give

* `true_reward`: mean rule-based reward of the task (when `eval.true_reward` names one) and
  `exact`: the fraction of responses with true reward 1;
* `rm_score`: mean reward-model score of prompt + response (the token sequence PPO scores);
* `kl_to_sft`: mean over responses of sum_t [log pi(y_t | x, y_<t) - log pi_sft(y_t | x, y_<t)]
  (log-probs at temperature 1, response tokens incl. EOS). At eval.temperature = 1 this is the
  Monte-Carlo estimate of the sequence-level KL(pi || pi_sft); 0 for the SFT policy itself;
* `response_len`: generated tokens incl. EOS; `eos_fraction`: responses that ended with EOS;
* with a rule-based reward (verifiable: correct = true reward 1), from the same n =
  `eval.num_samples` responses per prompt: `pass@k`, the unbiased estimator of Chen et al. 2021
  (1 - C(n - c, k) / C(n, k), c correct of n), and `maj@k`, whether the majority answer of the
  first k responses is correct (answer = the response's whitespace-split tokens joined by one
  space; ties to the answer seen first), both averaged over prompts, for k in 1, 4, 8 (those
  <= n). pass@1 equals `exact`. See `easyrl.pipeline.metrics_at_k`.

With `eval.greedy` the same metrics (suffix `_greedy`) are also computed on greedy responses:
the policy's mode. Every policy sees the same prompts and the same sampling keys.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import jax
import numpy as np

from easyrl import checkpoint, parallel, rollout
from easyrl import model as M
from easyrl.generate import make_sampler
from easyrl.parallel import to_host
from easyrl.pipeline.metrics_at_k import at_k_metrics, normalize_answer


def prompt_source(ec) -> Optional[str]:
    """The prompts file of `eval.prompts` ("synthetic" -> the bundled task's eval split)."""
    from easyrl.train import setup
    if not ec.prompts:
        return None
    if ec.prompts == "synthetic":
        import ml_collections as mlc
        c = mlc.ConfigDict(dict(data=dict(train="", eval="synthetic", split="")))
        return setup.data_source(c, "prompts", "eval")
    if ec.split and not os.path.exists(ec.prompts):
        return f"{ec.prompts}:{ec.split}"
    return ec.prompts


def load_prompts(ec, tokenizer, template: str, mesh):
    """([(global batch of jax arrays, prompt texts of the global batch)], n): the first
    `eval.num_prompts` held-out prompts, left-padded to eval.max_prompt_len, in global batches of
    eval.batch_size (rounded to the data-parallel size; the last batch is filled with repeats)."""
    from easyrl.data import encode, formats, templates
    from easyrl.data.tokenizer import pad_id
    src = prompt_source(ec)
    templates.check_template(template)
    rows = formats.load_data(src, "prompts", ec.format or None, False, None).rows
    examples, _ = encode.tokenize_prompts(rows[:ec.num_prompts], tokenizer, template,
                                          ec.max_prompt_len)
    n = len(examples)
    if n == 0:
        raise ValueError(f"config eval.prompts: no prompts in {src}")
    dp = parallel.data_parallel_size(mesh)
    bs = max(dp, ec.batch_size - ec.batch_size % dp)
    bs = min(bs, dp * math.ceil(n / dp))
    examples = examples + [examples[-1]] * (-n % bs)
    nproc, pid = jax.process_count(), jax.process_index()
    local = bs // nproc
    pad = pad_id(tokenizer)
    batches = []
    for start in range(0, len(examples), bs):
        chunk = examples[start:start + bs]
        host = encode.collate_prompts(chunk[pid * local:(pid + 1) * local], ec.max_prompt_len, pad)
        batch = parallel.to_global_batch({k: host[k] for k in ("input_ids", "attention_mask")}, mesh)
        batches.append((batch, [ex["text"] for ex in chunk]))
    return batches, n


def evaluate(policies: dict, *, sft_dir: str, rm_dir: Optional[str], ec, template: str, mesh_spec: str,
             seed: int = 0, log=print, template_kwargs=None) -> dict:
    """{policy name: metrics} for `policies` = {name: run dir} (causal-LM run dirs of the SFT
    architecture). `sft_dir`: the KL reference and the tokenizer; `rm_dir`: the reward model
    (None: no RM score). `template_kwargs`: apply_chat_template's keyword arguments (the
    stages' data.template_kwargs)."""
    from easyrl.data.templates import parse_template_kwargs, set_template_kwargs
    from easyrl.data.tokenizer import load_tokenizer
    from easyrl.data.synthetic import true_reward as synthetic_reward
    mesh = parallel.create_mesh(mesh_spec)
    tok = set_template_kwargs(load_tokenizer(os.path.join(sft_dir, "tokenizer")),
                              parse_template_kwargs(template_kwargs))
    batches, n = load_prompts(ec, tok, template, mesh)
    rule = synthetic_reward if ec.true_reward == "synthetic" else None
    if ec.true_reward not in ("", "synthetic"):
        raise ValueError(f"config eval.true_reward: {ec.true_reward!r}, expected 'synthetic' or ''")

    # LoRA runs are evaluated merged: every policy then has the SFT model's config (`scfg`)
    scfg, _, sft_params = checkpoint.load_model(sft_dir, mesh=mesh, merge_lora=True)
    rm = checkpoint.load_model(rm_dir, kind="reward", mesh=mesh) if rm_dir else None
    eos = rollout.eos_ids(tok, scfg)
    plen = ec.max_prompt_len

    @jax.jit
    def score(pol, ref, reward, tokens, attn, mask):
        out = {"kl": (rollout.sequence_logprob(scfg, pol, tokens, attn, mask, plen)
                      - rollout.sequence_logprob(scfg, ref, tokens, attn, mask, plen))}
        if rm is not None:
            out["rm"] = M.score(rm[0], reward, tokens, attn)
        return out

    modes = [("", ec.temperature, max(1, ec.num_samples))]
    if ec.greedy and ec.temperature > 0:
        modes.append(("_greedy", 0.0, 1))
    from tqdm.auto import tqdm
    bar = tqdm(total=len(policies) * len(batches) * sum(m[2] for m in modes), desc="eval",
               disable=jax.process_index() != 0, dynamic_ncols=True)
    results = {}
    for name, run_dir in policies.items():
        bar.set_postfix(policy=name)
        cfg, _, params = checkpoint.load_model(run_dir, mesh=mesh, merge_lora=True)
        out = {"step": checkpoint.latest_step(run_dir), "num_prompts": n}
        samples = []
        for suffix, temp, reps in modes:
            sampler = make_sampler(cfg, max_new_tokens=ec.max_new_tokens, temperature=temp,
                                   eos_token_id=eos, pad_token_id=tok.pad_token_id, mesh=mesh)
            acc = {"true": [], "answer": [], "rm": [], "len": [], "kl": [], "eos": []}
            for r in range(reps):
                rep = {k: [] for k in acc}
                for b, (batch, texts) in enumerate(batches):
                    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1000 * r + b)
                    roll = rollout.sample(sampler, params, batch, rng)
                    s = score(params, sft_params, None if rm is None else rm[2], roll["tokens"],
                              roll["attn"], roll["resp_mask"])
                    hm = to_host(roll["resp_mask"])
                    resp = rollout.decode(tok, roll["response"], hm)  # hm: already on the host
                    rep["len"] += hm.sum(-1).tolist()
                    rep["eos"] += to_host(roll["has_eos"]).tolist()
                    rep["kl"] += np.asarray(to_host(s["kl"])).tolist()
                    if rm is not None:
                        rep["rm"] += np.asarray(to_host(s["rm"])).tolist()
                    if rule is not None:
                        rep["true"] += [rule(q, a) for q, a in zip(texts, resp)]
                        rep["answer"] += [normalize_answer(a) for a in resp]
                    bar.update(1)
                    if r == 0 and b == 0:  # a few examples for the report
                        samples += [{"mode": suffix[1:] or "sampled", "prompt": q, "response": a}
                                    for q, a in zip(texts, resp)][:4]
                for k in acc:  # drop the repeats that filled the last batch
                    acc[k] += rep[k][:n]
            if rule is not None:
                t = acc["true"]
                out[f"true_reward{suffix}"] = float(np.mean(t))
                out[f"exact{suffix}"] = float(np.mean([x == 1.0 for x in t]))
                if not suffix:  # acc holds sample r of prompt p at r * n + p
                    correct = [[t[r * n + p] == 1.0 for r in range(reps)] for p in range(n)]
                    answers = [[acc["answer"][r * n + p] for r in range(reps)] for p in range(n)]
                    out.update(at_k_metrics(correct, answers))
            if rm is not None:
                out[f"rm_score{suffix}"] = float(np.mean(acc["rm"]))
            out[f"response_len{suffix}"] = float(np.mean(acc["len"]))
            out[f"eos_fraction{suffix}"] = float(np.mean(acc["eos"]))
            if not suffix:
                out["kl_to_sft"] = float(np.mean(acc["kl"]))
        out["samples"] = samples
        results[name] = out
    bar.close()
    for name, out in results.items():
        log(f"  {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in out.items()
                                      if isinstance(v, float)))
    return results
