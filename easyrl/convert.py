"""`easyrl convert`: Hugging Face folders <-> easyrl checkpoints, streamed tensor by tensor."""
from __future__ import annotations

import argparse
import os

from easyrl import checkpoint, hf

TOKENIZER_SUBDIR = "tokenizer"


def hf_to_easyrl(hf_dir: str, out: str, kind: str = "causal_lm", dtype=None) -> None:
    config, params = hf.load(hf_dir, kind=kind, dtype=dtype)
    checkpoint.save_model(out, config, params, kind=kind, source=os.path.abspath(hf_dir))
    tok_dir = os.path.join(out, TOKENIZER_SUBDIR)
    if any(os.path.exists(os.path.join(hf_dir, n)) for n in hf.TOKENIZER_FILES):
        os.makedirs(tok_dir, exist_ok=True)
        hf.save_tokenizer_files(hf_dir, tok_dir)


def easyrl_to_hf(ckpt: str, out: str, kind=None, dtype=None, tokenizer=None,
                 max_shard_size: int = 5 * 2**30) -> None:
    config, kind, params = checkpoint.load_model(ckpt, kind=kind)
    run_dir, _ = checkpoint.resolve(ckpt)
    if tokenizer is None and os.path.isdir(os.path.join(run_dir, TOKENIZER_SUBDIR)):
        tokenizer = os.path.join(run_dir, TOKENIZER_SUBDIR)
    hf.save(out, config, params, kind="reward" if kind == "value" else kind, tokenizer=tokenizer,
            dtype=dtype, max_shard_size=max_shard_size)


def parse_size(s: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = s.strip().upper()
    for u, m in sorted(units.items(), key=lambda x: -len(x[0])):
        if s.endswith(u):
            return int(float(s[: -len(u)]) * m)
    return int(s)


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert weights between Hugging Face and easyrl")
    conv = p.add_subparsers(dest="direction", required=True)
    a = conv.add_parser("hf-to-easyrl", help="HF folder -> easyrl checkpoint")
    a.add_argument("--hf", required=True, help="local Hugging Face model folder")
    a.add_argument("--out", required=True, help="easyrl checkpoint directory to write")
    a.add_argument("--kind", default="causal_lm", choices=["causal_lm", "reward", "value"])
    a.add_argument("--dtype", default=None, help="parameter dtype (default float32)")
    b = conv.add_parser("easyrl-to-hf", help="easyrl checkpoint or run dir -> HF folder")
    b.add_argument("--ckpt", required=True, help="easyrl checkpoint, run output_dir, or <run>/checkpoints/<step>")
    b.add_argument("--out", required=True, help="HF folder to write")
    b.add_argument("--kind", default=None, choices=["causal_lm", "reward"],
                   help="default: the checkpoint's own kind")
    b.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: as stored)")
    b.add_argument("--tokenizer", default=None, help="tokenizer folder or .model to include")
    b.add_argument("--max-shard-size", default="5GB")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.direction == "hf-to-easyrl":
        hf_to_easyrl(args.hf, args.out, kind=args.kind, dtype=args.dtype)
    else:
        easyrl_to_hf(args.ckpt, args.out, kind=args.kind, dtype=args.dtype,
                     tokenizer=args.tokenizer, max_shard_size=parse_size(args.max_shard_size))
    print(f"wrote {args.out}")
