"""Shared setup for every trainer: tokenizer, data sources, model config and parameters."""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp

from easyrl import checkpoint, hf, parallel
from easyrl import model as M
from easyrl.model.config import get_preset
from easyrl.train.config import SYNTHETIC

log = logging.getLogger(__name__)


def cache_dir() -> str:
    return os.environ.get("EASYRL_CACHE", os.path.expanduser("~/.cache/easyrl"))


def load_tokenizer(c):
    from easyrl.data.synthetic import synthetic_tokenizer_path
    from easyrl.data.tokenizer import load_tokenizer as _load
    path = c.tokenizer.path
    if not path and c.model.path:
        for cand in (c.model.path, os.path.join(c.model.path, "tokenizer")):
            if os.path.isdir(cand) and any(os.path.exists(os.path.join(cand, n)) for n in hf.TOKENIZER_FILES):
                path = cand
                break
    return _load(path or synthetic_tokenizer_path())


def data_source(c, kind: str, split: str):
    """`data.train` / `data.eval`: a local file, a hub `name` (with data.split), or 'synthetic'.
    kind: sft | preference | rrhf | prompts."""
    v = c.data.train if split == "train" else c.data.eval
    if not v:
        return None
    if v == SYNTHETIC:
        from easyrl.data import synthetic
        d = os.path.join(cache_dir(), f"synthetic-v{synthetic.VERSION}")
        path = os.path.join(d, f"{kind}_{split}.jsonl")
        if not os.path.exists(path):
            tmp = f"{d}.tmp{os.getpid()}"
            synthetic.write_dataset(tmp)
            os.makedirs(d, exist_ok=True)
            for f in os.listdir(tmp):
                os.replace(os.path.join(tmp, f), os.path.join(d, f))
            os.rmdir(tmp)
        return path
    if c.data.get("columns"):  # a source spec: formats.load_data renames the columns
        from easyrl.data.formats import parse_columns
        return {"path": v, "split": c.data.get("split") or None,
                "columns": parse_columns(c.data.columns)}
    if c.data.get("split") and not os.path.exists(v):
        return f"{v}:{c.data.split}"
    return v


def lora_runtime(c) -> dict:
    """LlamaConfig LoRA fields from model.lora.* (init_from: rank, alpha and targets are the
    PEFT adapter's own)."""
    lo = c.model.get("lora")
    if lo is None:
        return {}
    out = dict(lora_rank=int(lo.rank), lora_alpha=float(lo.alpha), lora_dropout=float(lo.dropout),
               lora_targets=lo.targets)
    if lo.init_from:
        from easyrl.model import lora
        pc = lora.read_peft_config(os.path.expanduser(lo.init_from))
        if lo.rank and lo.rank != pc["r"]:
            raise ValueError(f"config model.lora.rank: {lo.rank} differs from r={pc['r']} of the "
                             f"adapter model.lora.init_from={lo.init_from!r} (set 0 to take it)")
        out.update(lora_rank=int(pc["r"]), lora_alpha=float(pc.get("lora_alpha", 8)),
                   lora_targets=lora.peft_targets(pc, lo.init_from))
    return out


def model_config(c, tokenizer=None):
    """LlamaConfig from model.path (HF or easyrl) or model.preset; runtime options from config."""
    runtime = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat,
                   attention=c.model.attention, **lora_runtime(c))
    path = c.model.path
    if path:
        if os.path.exists(os.path.join(checkpoint.resolve(path)[0], checkpoint.CONFIG_FILE)):
            cfg, _, _ = checkpoint.read_model_config(checkpoint.resolve(path)[0])
            return cfg.replace(**runtime)
        return M.LlamaConfig.from_hf(hf.read_config(path), **runtime)
    cfg = get_preset(c.model.preset, **runtime)
    if tokenizer is not None:  # any tokenizer works with a random-init preset
        eos = tokenizer.eos_token_id
        cfg = cfg.replace(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    return cfg


def load_params(c, config, kind: str, mesh, rng=None, init_missing_head: bool = False):
    """Params for `kind` placed on `mesh`: from model.path (HF or easyrl) or a sharded random init.

    With LoRA (`config.lora_rank > 0`) the base is loaded (an easyrl checkpoint's own adapters
    merged in), optionally held in model.lora.base_dtype, and adapters are added: fresh (B = 0)
    or those of model.lora.init_from."""
    from easyrl.model import lora
    base_cfg = lora.disabled(config)
    lo = c.model.get("lora")
    base_dtype = (lo.base_dtype or None) if lo is not None and config.lora_rank else None
    rt = _rt(config)
    if base_dtype:  # load the base straight into its storage dtype
        rt["param_dtype"] = jnp.dtype(base_dtype).name
    params = _load_base(c, base_cfg, kind, mesh, rng, init_missing_head, rt)
    if not config.lora_rank:
        return params
    if base_dtype:
        params = lora.cast_frozen(params, base_dtype)
        params = _heads_to(params, config.param_dtype)
    rng = jax.random.PRNGKey(c.seed) if rng is None else rng
    params = lora.add_adapters(config, params, jax.random.fold_in(rng, 1), kind, mesh)
    if lo is not None and lo.init_from:
        params = lora.load_peft(os.path.expanduser(lo.init_from), config, params, kind, mesh)
    return params


def _heads_to(params, dtype):
    """Trainable heads (score) back in the training dtype after the base was cast."""
    from easyrl.model.lora import TRAINABLE_HEADS
    out = dict(params)
    for h in TRAINABLE_HEADS:
        if h in out:
            out[h] = jax.tree.map(lambda x: x.astype(dtype), out[h])
    return out


def _load_base(c, config, kind, mesh, rng, init_missing_head, rt):
    path = c.model.path
    if not path:
        rng = jax.random.PRNGKey(c.seed) if rng is None else rng
        return parallel.sharded_init(lambda r: M.init_params(config.replace(**rt), r, kind), mesh,
                                     rng)
    if os.path.exists(os.path.join(checkpoint.resolve(path)[0], checkpoint.CONFIG_FILE)):
        run_dir, _ = checkpoint.resolve(path)
        _, stored, _ = checkpoint.read_model_config(run_dir)
        if stored == "causal_lm" and kind != "causal_lm":
            # reward / value model from an SFT checkpoint: drop lm_head, fresh score head
            _, _, lm = checkpoint.load_model(path, mesh=mesh, merge_lora=True, **rt)
            head = parallel.sharded_init(lambda r: M.init_params(config, r, kind), mesh,
                                         jax.random.PRNGKey(c.seed))["score"]
            return {**{k: v for k, v in lm.items() if k != "lm_head"}, "score": head}
        return checkpoint.load_model(path, kind=kind, mesh=mesh, merge_lora=True, **rt)[2]
    _, params = hf.load(path, kind=kind, mesh=mesh, init_missing_head=init_missing_head,
                        rng=jax.random.PRNGKey(c.seed), **rt)
    return params


def _rt(config):
    return dict(dtype=config.dtype, param_dtype=config.param_dtype, remat=config.remat,
                attention=config.attention)
