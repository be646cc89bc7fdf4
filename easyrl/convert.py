"""`easyrl convert`: Hugging Face folders <-> easyrl checkpoints, streamed tensor by tensor;
LoRA checkpoints -> merged HF weights (`easyrl-to-hf --merge-lora`) or a PEFT adapter folder
(`easyrl-to-peft`)."""
from __future__ import annotations

import argparse
import logging
import os
from typing import Optional

import jax

from easyrl import checkpoint, hf
from easyrl.peft import save_peft

TOKENIZER_SUBDIR = "tokenizer"
log = logging.getLogger(__name__)


def hf_to_easyrl(hf_dir: str, out: str, kind: str = "causal_lm", dtype=None) -> None:
    config, params = hf.load(hf_dir, kind=kind, dtype=dtype)
    checkpoint.save_model(out, config, params, kind=kind, source=os.path.abspath(hf_dir))
    tok_dir = os.path.join(out, TOKENIZER_SUBDIR)
    if any(os.path.exists(os.path.join(hf_dir, n)) for n in hf.TOKENIZER_FILES):
        os.makedirs(tok_dir, exist_ok=True)
        hf.save_tokenizer_files(hf_dir, tok_dir)


def easyrl_to_hf(ckpt: str, out: str, kind=None, dtype=None, tokenizer=None,
                 max_shard_size: int = 5 * 2**30, merge_lora: bool = False) -> None:
    """HF folder from an easyrl checkpoint. A LoRA checkpoint needs `merge_lora`: the adapters
    are folded into the kernels (W + alpha/r A B) and full weights are written."""
    run_dir, _ = checkpoint.resolve(ckpt)
    stored, _, _ = checkpoint.read_model_config(run_dir)
    if stored.lora_rank and not merge_lora:
        raise ValueError(f"{run_dir}: a LoRA checkpoint (rank {stored.lora_rank}); pass "
                         f"--merge-lora to write merged full weights, or use `easyrl convert "
                         f"easyrl-to-peft` to write the adapter alone")
    config, kind, params = checkpoint.load_model(ckpt, kind=kind, merge_lora=merge_lora)
    if tokenizer is None and os.path.isdir(os.path.join(run_dir, TOKENIZER_SUBDIR)):
        tokenizer = os.path.join(run_dir, TOKENIZER_SUBDIR)
    hf.save(out, config, params, kind="reward" if kind == "value" else kind, tokenizer=tokenizer,
            dtype=dtype, max_shard_size=max_shard_size)
    if stored.base_quant != "none" and jax.process_index() == 0:
        note = (f"The LoRA adapters of `{run_dir}` merged into the DEQUANTIZED {stored.base_quant} "
                f"base it trained on (model.lora.base_quant={stored.base_quant}): these weights "
                f"carry the base's quantization error. For the adapters on the original "
                f"full-precision base, export them alone: `python -m easyrl convert "
                f"easyrl-to-peft --ckpt {ckpt} --out DIR`.")
        with open(os.path.join(out, "README.md"), "w") as f:
            f.write(f"---\nlibrary_name: transformers\ntags: [easyrl, lora-merged, "
                    f"{stored.base_quant}]\n---\n# Merged export\n\n{note}\n")
        log.warning(note)


def _origin(stored: dict) -> Optional[str]:
    """The model a checkpoint came from: its run's model.path, or a conversion's source."""
    return (stored.get("run_config") or {}).get("model", {}).get("path") or stored.get("source")


def _local(path: str) -> str:
    p = os.path.expanduser(path)
    return os.path.abspath(p) if os.path.exists(p) else path


def base_model_of(run_dir: str) -> tuple:
    """(base_model_name_or_path for a PEFT adapter of `run_dir`, or None; a warning or None).

    The run's model.path, followed back through easyrl folders that hold their origin's weights
    unchanged (`easyrl convert hf-to-easyrl` checkpoints: their `source`) to the Hugging Face
    folder or hub id it started from: what PEFT users load the adapters onto. When the chain
    reaches an easyrl TRAINING run (its weights were trained, LoRA adapters merged into a new
    base), the adapters belong on that run's weights, which PEFT can only load once exported:
    None, and the warning says how (`--base-model`). None too, with a warning, when no origin is
    recorded (a random init)."""
    _, _, stored = checkpoint.read_model_config(run_dir)
    path, seen = _origin(stored), set()
    while path and os.path.isfile(os.path.join(os.path.expanduser(path),
                                               checkpoint.CONFIG_FILE)):
        here = os.path.abspath(os.path.expanduser(path))
        if here in seen:
            break
        seen.add(here)
        _, _, st = checkpoint.read_model_config(here)
        if st.get("run_config"):  # a training run: its weights are not its origin's
            return None, (
                f"{run_dir} started from the easyrl run {here}, whose trained weights are the "
                f"base of these adapters; PEFT users load them on that model exported as a "
                f"Hugging Face folder: `easyrl convert easyrl-to-hf --ckpt {here} --out DIR` "
                f"(add --merge-lora for a LoRA run), then pass --base-model DIR "
                f"(base_model_name_or_path left empty)")
        path = _origin(st)
    if not path:
        return None, (f"{run_dir} records no Hugging Face base model (random init?); pass "
                      f"--base-model to set base_model_name_or_path")
    return _local(path), None


def easyrl_to_peft(ckpt: str, out: str, base_model: Optional[str] = None, dtype=None,
                   tokenizer=None) -> None:
    """PEFT adapter folder (adapter_config.json + adapter_model.safetensors) from a LoRA
    checkpoint: `PeftModel.from_pretrained(<base HF model>, out)`. A reward / value model is a
    SEQ_CLS adapter with the `score` head in modules_to_save. `base_model` (written as
    base_model_name_or_path) defaults to the Hugging Face model the run's chain started from
    (`base_model_of`)."""
    run_dir, _ = checkpoint.resolve(ckpt)
    stored, _, _ = checkpoint.read_model_config(run_dir)
    if not stored.lora_rank:
        raise ValueError(f"{run_dir}: not a LoRA checkpoint (model.lora.rank = 0); export full "
                         f"weights with `easyrl convert easyrl-to-hf`")
    config, kind, params = checkpoint.load_model(ckpt)
    if tokenizer is None and os.path.isdir(os.path.join(run_dir, TOKENIZER_SUBDIR)):
        tokenizer = os.path.join(run_dir, TOKENIZER_SUBDIR)
    # one atomic write: the adapter and its tokenizer files appear together
    if not base_model:
        base_model, warning = base_model_of(run_dir)
        if warning and jax.process_index() == 0:
            log.warning(warning)
    save_peft(out, config, params, kind=kind, base_model=base_model, dtype=dtype,
              tokenizer=tokenizer)


def parse_size(s: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = s.strip().upper()
    for u, m in sorted(units.items(), key=lambda x: -len(x[0])):
        if s.endswith(u):
            return int(float(s[: -len(u)]) * m)
    return int(s)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="convert weights between Hugging Face and easyrl",
        description="Convert weights between Hugging Face and easyrl. LoRA runs: "
                    "`easyrl-to-hf --merge-lora` writes merged full weights, `easyrl-to-peft` "
                    "the adapter as a PEFT folder; a PEFT adapter folder is imported to continue "
                    "training with --config.model.lora.init_from=DIR (model.path = its base).")
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
    b.add_argument("--merge-lora", action="store_true",
                   help="LoRA checkpoint: fold the adapters into the weights (W + alpha/r A B) "
                        "and write merged full weights")
    c = conv.add_parser(
        "easyrl-to-peft", help="LoRA checkpoint or run dir -> PEFT adapter folder",
        description="Write adapter_config.json + adapter_model.safetensors that "
                    "peft.PeftModel.from_pretrained loads on top of the base HF model (reward / "
                    "value models: task SEQ_CLS, score head in modules_to_save). To continue "
                    "training from such a folder, set --config.model.lora.init_from=DIR (with "
                    "model.path the base model).")
    c.add_argument("--ckpt", required=True, help="LoRA easyrl checkpoint, run output_dir, or <run>/checkpoints/<step>")
    c.add_argument("--out", required=True, help="adapter folder to write")
    c.add_argument("--base-model", default=None,
                   help="base_model_name_or_path to record (default: the Hugging Face model the "
                        "run started from, followed back through converted checkpoints)")
    c.add_argument("--dtype", default=None, help="adapter dtype (default: as stored)")
    c.add_argument("--tokenizer", default=None, help="tokenizer folder or .model to include")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.direction == "hf-to-easyrl":
        hf_to_easyrl(args.hf, args.out, kind=args.kind, dtype=args.dtype)
    elif args.direction == "easyrl-to-peft":
        easyrl_to_peft(args.ckpt, args.out, base_model=args.base_model, dtype=args.dtype,
                       tokenizer=args.tokenizer)
    else:
        easyrl_to_hf(args.ckpt, args.out, kind=args.kind, dtype=args.dtype,
                     tokenizer=args.tokenizer, max_shard_size=parse_size(args.max_shard_size),
                     merge_lora=args.merge_lora)
    print(f"wrote {args.out}")
