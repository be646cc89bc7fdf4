"""`easyrl generate`: sample responses for a JSONL file of prompts with the KV-cache sampler.

    python -m easyrl generate --model DIR --prompts prompts.jsonl --out out.jsonl \
        [--num_samples G] [--max_new_tokens 128] [--temperature 0.7] [--top_p 1.0] [--top_k 0] \
        [--template plain] [--template_kwargs JSON] [--batch_size 8 | --batch_slots B] \
        [--seed 0] [--tokenizer PATH] \
        [--mesh dp:1,fsdp:-1,tp:1] [--dtype bfloat16]

--batch_slots B runs the continuous-batching engine (`easyrl.engine`): B decode slots, a
finished sample's slot taken by the next waiting one, each prompt prefilled once; samples depend
only on (--seed, request, sample), not on B. Without it, static batches of --batch_size prompts.

DIR is a Hugging Face model folder or an easyrl checkpoint / run directory (its tokenizer is read
from `<dir>/tokenizer/` when present, else from `--tokenizer`). Each input line is a JSON object
with `prompt` (a string) or `messages` (a list of {"role", "content"}); each output line holds
`prompt` and, with the same shape whatever --num_samples is:
  `response`, `response_ids`, `logprobs`     the first sample: its text (without special
      tokens), its generated ids up to and including the first EOS, and the log-prob of each
      (of the distribution it was drawn from: temperature, top-k, top-p; the behaviour
      log-probs of RL) -- the output of a single-sample run, unchanged;
  `responses`, `responses_ids`, `responses_logprobs`   the same for all G samples, one list
      entry per sample (length 1 when G = 1).
The G samples of a prompt share one
prefill (its KV cache copied on device). A summary line on stderr gives requests, generated
tokens, seconds and tokens/s. `--temperature 0` is greedy decoding (argmax; --top_p and
--top_k do not apply). Every prompt's tokens plus --max_new_tokens must fit in the model's
max_position_embeddings, else an error names the prompt's line.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import List, Tuple

import numpy as np

log = logging.getLogger(__name__)

TOKENIZER_SUBDIR = "tokenizer"
LENGTH_BUCKET = 16  # prompt lengths are padded up to a multiple of this (fewer recompiles)


# ---- input ----------------------------------------------------------------------------------
def read_prompts(path: str) -> List[Tuple[int, dict]]:
    """[(line number, row)] from a JSONL prompt file; a clear error names the file and line."""
    from easyrl.data.reading import iter_jsonl

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: prompt file not found")
    rows = []
    for lineno, row, err in iter_jsonl(path):  # invalid UTF-8 / JSON: the line and column
        if err:
            raise ValueError(f"{path}:{lineno}: {err}")
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object with 'prompt' or "
                             f"'messages', got {type(row).__name__}")
        if isinstance(row.get("prompt"), str):
            pass
        elif isinstance(row.get("messages"), list) and row["messages"]:
            for m in row["messages"]:
                if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                        and isinstance(m.get("content"), str)):
                    raise ValueError(f"{path}:{lineno}: bad message {m!r} (expected "
                                     f"{{'role': ..., 'content': '...'}})")
        else:
            raise ValueError(f"{path}:{lineno}: row has no 'prompt' (string) or 'messages' "
                             f"(non-empty list); keys: {sorted(row)}")
        rows.append((lineno, row))
    if not rows:
        raise ValueError(f"{path}: no prompts found")
    return rows


def load_model_and_tokenizer(model_dir: str, tokenizer_path=None, mesh=None, dtype=None):
    """(config, params, tokenizer) from an HF folder or an easyrl checkpoint / run dir."""
    from easyrl import checkpoint, hf
    from easyrl.data.tokenizer import load_tokenizer

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: model directory not found (expected a Hugging Face "
                                f"folder or an easyrl checkpoint)")
    if checkpoint.is_checkpoint(model_dir):
        config, kind, params = checkpoint.load_model(model_dir, mesh=mesh, dtype=dtype)
        if kind != "causal_lm":
            raise ValueError(f"{model_dir}: holds a {kind!r} model; generation needs a causal_lm")
        run_dir, _ = checkpoint.resolve(model_dir)
        own = os.path.join(run_dir, TOKENIZER_SUBDIR)
        if tokenizer_path is None and os.path.isdir(own):
            tokenizer_path = own
        if tokenizer_path is None:
            raise ValueError(f"{model_dir}: easyrl checkpoint without a tokenizer/ folder; "
                             f"pass --tokenizer")
    else:
        config, params = hf.load(model_dir, mesh=mesh, dtype=dtype)
        tokenizer_path = tokenizer_path or model_dir
    if dtype is not None:  # compute in the parameter dtype too
        config = config.replace(dtype=config.param_dtype)
    tok = load_tokenizer(tokenizer_path)
    if len(tok) > config.vocab_size:
        log.warning("tokenizer %s has %d tokens but the model vocab is %d", tokenizer_path,
                    len(tok), config.vocab_size)
    return config, params, tok


def encode_prompts(rows, tokenizer, template: str, path: str):
    from easyrl.data.templates import tokenize_prompt

    out = []
    for lineno, row in rows:
        src = row["prompt"] if isinstance(row.get("prompt"), str) else row["messages"]
        try:
            ids = tokenize_prompt(template, src, tokenizer)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        if not ids:
            raise ValueError(f"{path}:{lineno}: prompt tokenizes to nothing")
        out.append(ids)
    return out


def left_pad(batch_ids, batch_size: int, pad_id: int, bucket: int = LENGTH_BUCKET):
    """Left-pad a list of id lists to [batch_size, P] (P rounded up to `bucket`); rows past the
    list are dummies (one pad token, mask 0)."""
    p = max(len(x) for x in batch_ids)
    p = -(-p // bucket) * bucket
    ids = np.full((batch_size, p), pad_id, np.int32)
    mask = np.zeros((batch_size, p), np.int32)
    for i, x in enumerate(batch_ids):
        ids[i, p - len(x):] = x
        mask[i, p - len(x):] = 1
    return ids, mask


def check_out(out: str) -> None:
    """--out must be a file path whose folder is (or can be made) a folder."""
    if os.path.isdir(out):
        raise ValueError(f"--out {out}: is a folder; give the JSONL file to write, e.g. "
                         f"{os.path.join(out, 'generations.jsonl')}")
    p = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise ValueError(f"--out {out}: {p} is a file, not a folder")


def check_lengths(rows, prompt_ids, max_new_tokens: int, max_positions: int, path: str) -> None:
    """Every prompt + max_new_tokens within the model's max_position_embeddings."""
    over = [(lineno, len(ids)) for (lineno, _), ids in zip(rows, prompt_ids)
            if len(ids) + max_new_tokens > max_positions]
    if over:
        lineno, n = over[0]
        more = f" ({len(over) - 1} more prompts too long)" if len(over) > 1 else ""
        raise ValueError(f"{path}:{lineno}: prompt of {n} tokens + --max_new_tokens "
                         f"{max_new_tokens} = {n + max_new_tokens} exceeds the model's "
                         f"max_position_embeddings={max_positions}{more}; shorten the prompt "
                         f"or lower --max_new_tokens")


def _record(row, prompt_ids, tok, ids_g, lp_g) -> dict:
    """One output line: the prompt (its messages too), G responses, their ids and log-probs."""
    rec = {"prompt": row["prompt"] if isinstance(row.get("prompt"), str) else
           tok.decode(prompt_ids, skip_special_tokens=True)}
    if "messages" in row and not isinstance(row.get("prompt"), str):
        rec["messages"] = row["messages"]
    texts = [tok.decode(x, skip_special_tokens=True) for x in ids_g]
    lps = [[round(float(x), 6) for x in lp] for lp in lp_g]
    # the first sample's flat keys (the output before --num_samples: scripts keep working) ...
    rec.update(response=texts[0], response_ids=ids_g[0], logprobs=lps[0])
    # ... and every sample's, one list entry per sample, also for G = 1
    rec.update(responses=texts, responses_ids=ids_g, responses_logprobs=lps)
    return rec


def _summary(args, n_req: int, g: int, n_tokens: int, dt: float) -> None:
    print(f"wrote {n_req} x {g} responses to {args.out}")
    print(f"easyrl generate: {n_req} requests, {n_req * g} samples, {n_tokens} generated "
          f"tokens in {dt:.1f}s ({n_tokens / max(dt, 1e-9):.1f} tokens/s)", file=sys.stderr)


def _run_engine(args, rows, prompt_ids, config, params, tok, eos, pad_id, mesh) -> None:
    """--batch_slots: every request through the continuous-batching engine in one run."""
    from easyrl.engine import Engine
    eng = Engine(config, slots=args.batch_slots, max_prompt_len=max(map(len, prompt_ids)),
                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, eos_token_id=tuple(sorted(eos)),
                 pad_token_id=pad_id, mesh=mesh)
    t0 = time.time()
    out = eng.run(params, [dict(prompt_ids=ids, num_samples=args.num_samples)
                           for ids in prompt_ids], seed=args.seed)
    dt = time.time() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    n_tokens = 0
    with open(args.out, "w", encoding="utf-8") as f:
        for (_, row), ids, res in zip(rows, prompt_ids, out):
            n_tokens += sum(len(x) for x in res["response_ids"])
            rec = _record(row, ids, tok, res["response_ids"], res["logprobs"])
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    _summary(args, len(rows), args.num_samples, n_tokens, dt)


# ---- command --------------------------------------------------------------------------------
def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample responses for a JSONL file of prompts",
                       description="Sample responses for a JSONL file of prompts with the KV-cache "
                                   "sampler. --temperature 0 is greedy decoding (argmax; --top_p "
                                   "and --top_k do not apply).")
    p.add_argument("--model", required=True, help="Hugging Face folder or easyrl checkpoint/run dir")
    p.add_argument("--prompts", required=True, help="JSONL: one {'prompt': ...} or {'messages': [...]} per line")
    p.add_argument("--out", required=True,
                   help="JSONL to write: prompt, response, response_ids, logprobs (the first "
                        "sample), responses, responses_ids, responses_logprobs (all samples)")
    p.add_argument("--num_samples", type=int, default=1,
                   help="samples per prompt (G), sharing one prefill of the prompt")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature (default 1.0); --temperature 0 is greedy decoding")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--template", default="plain", help="tulu | stackllama | plain | chat")
    p.add_argument("--template_kwargs", default="",
                   help="JSON object of apply_chat_template keyword arguments (template chat), "
                        "e.g. '{\"enable_thinking\": false}' (config data.template_kwargs)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per static batch")
    p.add_argument("--batch_slots", type=int, default=0,
                   help="decode slots of the continuous-batching engine (0: static batches)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or sentencepiece .model")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. dp:1,fsdp:-1,tp:1 (default: one device)")
    p.add_argument("--dtype", default=None, help="parameter and compute dtype, e.g. bfloat16")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import jax
    from tqdm.auto import tqdm

    from easyrl import parallel
    from easyrl.data.templates import check_template
    from easyrl.generate import make_sampler

    check_template(args.template)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.batch_slots < 0:  # before anything is loaded
        raise ValueError(f"--batch_slots must be >= 0 (0 = static batches), got {args.batch_slots}")
    from easyrl.data.templates import parse_template_kwargs, set_template_kwargs
    template_kwargs = parse_template_kwargs(args.template_kwargs, "--template_kwargs")
    check_out(args.out)
    rows = read_prompts(args.prompts)
    mesh = parallel.create_mesh(args.mesh) if args.mesh else None
    config, params, tok = load_model_and_tokenizer(args.model, args.tokenizer, mesh, args.dtype)
    set_template_kwargs(tok, template_kwargs)
    prompt_ids = encode_prompts(rows, tok, args.template, args.prompts)
    check_lengths(rows, prompt_ids, args.max_new_tokens, config.max_position_embeddings, args.prompts)

    eos = set()
    for e in (tok.eos_token_id, config.eos_token_id):
        if e is not None:
            eos.update([e] if isinstance(e, int) else e)
    pad_id = next(x for x in (tok.pad_token_id, config.pad_token_id, 0) if x is not None)
    bs = args.batch_size
    if mesh is not None:
        dp = parallel.data_parallel_size(mesh)
        bs = -(-bs // dp) * dp
    g = args.num_samples
    if args.batch_slots:
        return _run_engine(args, rows, prompt_ids, config, params, tok, eos, pad_id, mesh)
    sampler = make_sampler(config, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           eos_token_id=tuple(sorted(eos)), pad_token_id=pad_id, mesh=mesh,
                           num_samples=g)
    rng = jax.random.PRNGKey(args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    n_batches = -(-len(rows) // bs)
    t0, n_tokens = time.time(), 0
    with open(args.out, "w", encoding="utf-8") as f:
        for bi in tqdm(range(n_batches), desc="generate", unit="batch"):
            chunk = prompt_ids[bi * bs:(bi + 1) * bs]
            ids, mask = left_pad(chunk, bs, pad_id)
            if mesh is not None:
                gb = parallel.to_global_batch({"ids": ids, "mask": mask}, mesh)
                ids, mask = gb["ids"], gb["mask"]
            out = sampler(params, ids, mask, jax.random.fold_in(rng, bi))
            resp = parallel.to_host(out["response"])
            rmask = parallel.to_host(out["response_mask"])
            lps = parallel.to_host(out["logprobs"])
            for i in range(len(chunk)):
                _, row = rows[bi * bs + i]
                ids_g, lp_g = [], []
                for j in range(i * g, (i + 1) * g):  # rows i*G .. i*G+G-1: prompt i's samples
                    keep = rmask[j] > 0
                    ids_g.append([int(t) for t in resp[j][keep]])
                    lp_g.append(lps[j][keep])
                n_tokens += sum(len(x) for x in ids_g)
                f.write(json.dumps(_record(row, chunk[i], tok, ids_g, lp_g),
                                   ensure_ascii=False) + "\n")
            f.flush()
    _summary(args, len(rows), g, n_tokens, time.time() - t0)
