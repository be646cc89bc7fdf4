"""Config files: ml_collections `get_config(preset)`, the shared keys, and validation.

Every trainer's config file starts from `base_config()` and adds its own section. Values are
checked by `validate` before anything is compiled, and errors name the config key.
"""
from __future__ import annotations

import importlib.util
import math
import os
from typing import Optional

import ml_collections as mlc

SYNTHETIC = "synthetic"  # data.train / data.eval value: the bundled synthetic task


def base_config(command: str) -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.command = command
    c.output_dir = f"runs/{command}"
    c.seed = 0
    c.mesh = "dp:1,fsdp:-1,tp:1"
    c.model = mlc.ConfigDict(dict(
        path="",            # HF folder or easyrl checkpoint; empty = random init from preset
        preset="tiny",
        dtype="float32",    # compute dtype (bfloat16 for speed; params stay param_dtype)
        param_dtype="float32",
        remat="none",       # none | full | dots | dots_no_batch | minimal
        attention="xla",    # xla | cudnn
        # LoRA (easyrl.model.lora): rank 0 = train all weights. With rank > 0 the base is frozen
        # and only the adapters (and a reward / value model's score head) train.
        lora=mlc.ConfigDict(dict(
            rank=0,
            alpha=16.0,          # scale = alpha / rank
            dropout=0.0,         # on the adapter's input, while training
            targets="q|k|v|o|gate|up|down",  # regex over the dense kernels' short names
            base_dtype="",       # e.g. bfloat16: hold the frozen base in it ("" = param_dtype)
            init_from="",        # a PEFT adapter folder to continue (sets rank/alpha/targets)
            # the frozen dense kernels stored quantized (easyrl.model.qlora): none | int8
            # (per output channel, StackLLaMA's 8-bit base) | nf4 (QLoRA: blocks of quant_block
            # along each kernel's input axis; double_quant also quantizes the block scales)
            base_quant="none",
            quant_block=64,
            double_quant=False,
        )),
    ))
    c.tokenizer = mlc.ConfigDict(dict(path=""))  # HF folder or sentencepiece .model; empty = synthetic
    c.data = mlc.ConfigDict(dict(
        train=SYNTHETIC, eval=SYNTHETIC, split="", format="", template="plain",
        packing=False, shuffle=True, skip_bad_rows=False,
        columns="",  # rename source columns: "question:prompt,response_j:chosen,response_k:rejected"
        # > 0: evaluate on this fraction of data.train's rows, never trained on (a deterministic
        # split by seed, like datasets' test_size); data.eval must then be "" or "synthetic".
        # Without it, data.eval="synthetic" evaluates only when data.train is synthetic too.
        eval_fraction=0.0,
        # keyword arguments for the tokenizer's apply_chat_template (template=chat), a JSON
        # object, e.g. '{"enable_thinking": false}' (TRL's chat_template_kwargs)
        template_kwargs="",
        # online trainers' prompts longer than <section>.max_prompt_len: left (cut from the left,
        # keeping BOS; counted and warned) | error (refuse, naming the row)
        truncate_prompts="left",
    ))
    c.train = mlc.ConfigDict(dict(
        steps=0, epochs=0, batch_size=32, micro_batch_size=0, seq_len=64, max_nonfinite=10,
    ))
    c.optim = mlc.ConfigDict(dict(
        lr=1e-3, schedule="cosine", warmup=0.0, min_lr_ratio=0.0, weight_decay=0.0,
        b1=0.9, b2=0.999, eps=1e-8, clip=1.0,
    ))
    # allow_changes: resume a run dir whose stored run config differs (else an error naming keys)
    c.checkpoint = mlc.ConfigDict(dict(every=0, keep=2, async_save=True, allow_changes=False))
    c.log = mlc.ConfigDict(dict(every=10, tensorboard=True, wandb_project="", wandb_name=""))
    c.eval = mlc.ConfigDict(dict(every=0, max_batches=0))
    c.distributed = mlc.ConfigDict(dict(coordinator="", num_processes=0, process_id=-1))
    return c


def load_config_file(spec: str) -> mlc.ConfigDict:
    """'configs/sft.py:tiny' -> get_config('tiny'). Relative paths are tried against the working
    directory, then against the easyrl source checkout."""
    path, _, arg = spec.partition(":")
    candidates = [path, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), path)]
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise FileNotFoundError(f"--config: config file {path!r} not found")
    mod_spec = importlib.util.spec_from_file_location(f"easyrl_config_{abs(hash(found))}", found)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


def _is_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or path.endswith(
        (".json", ".jsonl", ".parquet", ".model")) or os.path.exists(path)


def validate(c: mlc.ConfigDict, *, dp_size: Optional[int] = None,
             max_positions: Optional[int] = None) -> None:
    """Raise ValueError / FileNotFoundError naming the config key."""
    def need(cond, key, msg):
        if not cond:
            raise ValueError(f"config {key}: {msg}")
    t = c.train
    need(t.batch_size > 0, "train.batch_size", f"must be positive, got {t.batch_size}")
    mb = t.micro_batch_size or t.batch_size
    need(mb > 0 and t.batch_size % mb == 0, "train.micro_batch_size",
         f"{mb} must divide train.batch_size={t.batch_size}")
    need(t.steps > 0 or t.epochs > 0, "train.steps", "set train.steps or train.epochs")
    need(t.seq_len > 0, "train.seq_len", f"must be positive, got {t.seq_len}")
    # the online-RL trainers count train.batch_size / micro_batch_size in prompts (each gets G
    # rows) and check their own row counts against the mesh (grpo.validate, online_dpo)
    if dp_size is not None and c.get("command") not in ("grpo", "online_dpo"):
        need(mb % dp_size == 0, "train.batch_size",
             f"micro-batch {mb} (global batch {t.batch_size}) is not divisible by the "
             f"data-parallel size {dp_size} of mesh {c.mesh!r}")
    if max_positions is not None:
        need(t.seq_len <= max_positions, "train.seq_len",
             f"{t.seq_len} exceeds the model's max_position_embeddings={max_positions}")
    for key in ("optim", "value_optim"):
        if c.get(key) is not None:
            lr = c[key].lr
            need(isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0, f"{key}.lr",
                 f"must be a finite number >= 0, got {lr!r}")
    need(t.get("max_nonfinite", 0) >= 0, "train.max_nonfinite",
         f"must be >= 0 (0 = never stop for non-finite steps), got {t.get('max_nonfinite')}")
    _validate_output_dir(c)
    validate_lora(c)
    if c.data.get("columns"):
        from easyrl.data.formats import parse_columns
        try:
            parse_columns(c.data.columns)
        except ValueError as e:
            raise ValueError(f"config data.columns: {e}") from None
    from easyrl.data.templates import parse_template_kwargs
    parse_template_kwargs(c.data.get("template_kwargs", ""))
    need(c.data.get("truncate_prompts", "left") in ("left", "error"), "data.truncate_prompts",
         f"{c.data.get('truncate_prompts')!r}; valid: left, error")
    frac = c.data.get("eval_fraction", 0.0)
    need(isinstance(frac, (int, float)) and 0.0 <= frac < 1.0, "data.eval_fraction",
         f"must be in [0, 1), got {frac!r}")
    if frac > 0:
        need(c.data.train, "data.eval_fraction", "holds out part of data.train, which is empty")
        need(c.data.eval in ("", SYNTHETIC), "data.eval_fraction",
             f"{frac} holds out part of data.train for evaluation, and data.eval={c.data.eval!r} "
             f"is set too: keep one (data.eval='' or data.eval_fraction=0)")
    for key in ("data.train", "data.eval"):
        v = c.data.get(key.split(".")[1], "")
        if v and v != SYNTHETIC and _is_local(v) and not v.startswith("gs://"):
            if not os.path.exists(os.path.expanduser(v)):
                raise FileNotFoundError(f"config {key}: file {v!r} not found")
    for key, v in (("model.path", c.model.path), ("tokenizer.path", c.tokenizer.path)):
        if v and not v.startswith("gs://") and not os.path.exists(os.path.expanduser(v)):
            raise FileNotFoundError(f"config {key}: {v!r} not found")


def _validate_output_dir(c: mlc.ConfigDict) -> None:
    """output_dir (local) must be a folder or not exist yet, under a folder."""
    out = c.get("output_dir") or ""
    if not out or out.startswith("gs://"):
        return
    p = os.path.abspath(os.path.expanduser(out))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    if os.path.exists(p) and not os.path.isdir(p):
        where = "" if p == os.path.abspath(os.path.expanduser(out)) else f": {p!r}"
        raise ValueError(f"config output_dir: {out!r}{where} is a file, not a folder")


def validate_lora(c: mlc.ConfigDict) -> None:
    """model.lora.*: errors name the key."""
    lo = c.model.get("lora")
    if lo is None:
        return

    def need(cond, key, msg):
        if not cond:
            raise ValueError(f"config model.lora.{key}: {msg}")
    need(isinstance(lo.rank, int) and lo.rank >= 0, "rank", f"must be an int >= 0, got {lo.rank!r}")
    need(lo.alpha > 0, "alpha", f"must be positive, got {lo.alpha!r}")
    need(0.0 <= lo.dropout < 1.0, "dropout", f"must be in [0, 1), got {lo.dropout!r}")
    if lo.rank or lo.init_from:
        from easyrl.model.lora import check_targets
        check_targets(lo.targets, "model.lora.targets")
    if lo.base_dtype:
        import jax.numpy as jnp
        try:
            ok = jnp.issubdtype(jnp.dtype(lo.base_dtype), jnp.floating)
        except TypeError:
            ok = False
        need(ok, "base_dtype", f"{lo.base_dtype!r} is not a float dtype (e.g. bfloat16)")
        need(lo.rank > 0 or lo.init_from, "base_dtype", "only applies with LoRA (model.lora.rank > 0)")
    quant = lo.get("base_quant", "none")
    need(quant in ("none", "int8", "nf4"), "base_quant",
         f"{quant!r}: expected none, int8 or nf4")
    if quant != "none":
        need(lo.rank > 0 or lo.init_from, "base_quant",
             "only applies with LoRA (model.lora.rank > 0): a quantized base is frozen")
        need(isinstance(lo.quant_block, int) and lo.quant_block >= 2 and lo.quant_block % 2 == 0,
             "quant_block", f"must be an even int >= 2, got {lo.quant_block!r}")
    if lo.init_from:
        need(os.path.isdir(os.path.expanduser(lo.init_from)), "init_from",
             f"{lo.init_from!r} is not a directory (expected a PEFT adapter folder)")
