"""Shared setup for every trainer: tokenizer, data sources, model config and parameters."""
from __future__ import annotations

import logging
import os

import jax

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


def model_config(c, tokenizer=None):
    """LlamaConfig from model.path (HF or easyrl) or model.preset; runtime options from config."""
    runtime = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat,
                   attention=c.model.attention)
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
    """Params for `kind` placed on `mesh`: from model.path (HF or easyrl) or a sharded random init."""
    path = c.model.path
    if not path:
        rng = jax.random.PRNGKey(c.seed) if rng is None else rng
        return parallel.sharded_init(lambda r: M.init_params(config, r, kind), mesh, rng)
    if os.path.exists(os.path.join(checkpoint.resolve(path)[0], checkpoint.CONFIG_FILE)):
        run_dir, _ = checkpoint.resolve(path)
        _, stored, _ = checkpoint.read_model_config(run_dir)
        if stored == "causal_lm" and kind != "causal_lm":
            # reward / value model from an SFT checkpoint: drop lm_head, fresh score head
            _, _, lm = checkpoint.load_model(path, mesh=mesh, **_rt(config))
            head = parallel.sharded_init(lambda r: M.init_params(config, r, kind), mesh,
                                         jax.random.PRNGKey(c.seed))["score"]
            return {**{k: v for k, v in lm.items() if k != "lm_head"}, "score": head}
        return checkpoint.load_model(path, kind=kind, mesh=mesh, **_rt(config))[2]
    _, params = hf.load(path, kind=kind, mesh=mesh, init_missing_head=init_missing_head,
                        rng=jax.random.PRNGKey(c.seed), **_rt(config))
    return params


def _rt(config):
    return dict(dtype=config.dtype, param_dtype=config.param_dtype, remat=config.remat,
                attention=config.attention)
