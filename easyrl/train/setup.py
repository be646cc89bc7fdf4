"""Shared setup for every trainer: tokenizer, data sources, model config and parameters."""
from __future__ import annotations

import logging
import os

import jax

from easyrl import hf, load, peft
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
    from easyrl.data.templates import parse_template_kwargs, set_template_kwargs
    return set_template_kwargs(_load(path or synthetic_tokenizer_path()),
                               parse_template_kwargs(c.data.get("template_kwargs", "")))


# config keys of the iterator arguments, named in data messages
DATA_NAMES = {"seq_len": "train.seq_len", "global_batch_size": "train.batch_size",
              "eval_fraction": "data.eval_fraction"}


def _synthetic_file(kind: str, split: str) -> str:
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


def data_source(c, kind: str, split: str):
    """`data.train` / `data.eval`: a local file or folder, a hub `name` (with data.split), or
    'synthetic'; kind: sft | preference | rrhf | prompts. A `data.Source` (a str, or a dict spec
    with data.columns) that names its config key in data messages.

    Evaluation follows the training data: with data.eval_fraction > 0 the eval split is that
    fraction of data.train's rows (a deterministic split by `seed`; the train split is the rest);
    else data.eval, except that the bundled synthetic eval set goes only with synthetic training
    data (data.eval='synthetic' with another data.train: no evaluation, said in one line)."""
    from easyrl.data.reading import tag
    frac = float(c.data.get("eval_fraction", 0.0) or 0.0)
    train = c.data.get("train", "")
    holdout = None
    if split == "train" or frac > 0:
        key, v = "data.train", train
        if frac > 0:
            holdout = (frac, int(c.get("seed", 0)), "train" if split == "train" else "eval")
            split = "train"
    else:
        key, v = "data.eval", c.data.eval
        if v == SYNTHETIC and train and train != SYNTHETIC:
            from easyrl.train.run import say
            say(f"data.eval: no evaluation: the bundled synthetic eval set only goes with the "
                f"synthetic training data, and data.train={train!r} (set data.eval to an eval "
                f"file, or data.eval_fraction to hold out part of data.train)")
            return None
    if not v:
        return None
    if v == SYNTHETIC:
        src = _synthetic_file(kind, split)
    elif c.data.get("columns"):  # a source spec: formats.load_data renames the columns
        from easyrl.data.formats import parse_columns
        src = {"path": v, "split": c.data.get("split") or None,
               "columns": parse_columns(c.data.columns)}
    elif c.data.get("split") and not os.path.exists(v):
        src = f"{v}:{c.data.split}"
    else:
        src = v
    return tag(src, key, holdout, DATA_NAMES)


def lora_runtime(c) -> dict:
    """LlamaConfig LoRA fields from model.lora.* (init_from: rank, alpha and targets are the
    PEFT adapter's own)."""
    lo = c.model.get("lora")
    if lo is None:
        return {}
    out = dict(lora_rank=int(lo.rank), lora_alpha=float(lo.alpha), lora_dropout=float(lo.dropout),
               lora_targets=lo.targets)
    if lo.get("base_quant", "none") != "none":
        out.update(base_quant=lo.base_quant, quant_block=int(lo.quant_block),
                   double_quant=bool(lo.double_quant))
    if lo.init_from:
        pc = peft.read_peft_config(os.path.expanduser(lo.init_from))
        if lo.rank and lo.rank != pc["r"]:
            raise ValueError(f"config model.lora.rank: {lo.rank} differs from r={pc['r']} of the "
                             f"adapter model.lora.init_from={lo.init_from!r} (set 0 to take it)")
        out.update(lora_rank=int(pc["r"]), lora_alpha=float(pc.get("lora_alpha", 8)),
                   lora_targets=peft.peft_targets(pc, lo.init_from))
    return out


def model_source(c) -> str:
    """What `easyrl.load` loads for this config: model.path, else the model.preset."""
    return c.model.path or f"{load.PRESET}{c.model.preset}"


def model_config(c, tokenizer=None):
    """LlamaConfig from model.path (HF or easyrl) or model.preset; runtime options from config."""
    runtime = dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat,
                   attention=c.model.attention, **lora_runtime(c))
    return load.model_config(model_source(c), tokenizer, **runtime)


def load_params(c, config, kind: str, mesh, init_missing_head: bool = False):
    """Params for `kind` placed on `mesh` (`easyrl.load.load_model`): from model.path (HF or
    easyrl) or a sharded random init (key train seed); LoRA adapters fresh or from
    model.lora.init_from, the frozen base in model.lora.base_dtype."""
    lo = c.model.get("lora")
    _, params = load.load_model(
        model_source(c), config, kind=kind, mesh=mesh, rng=jax.random.PRNGKey(c.seed),
        init_missing_head=init_missing_head,
        base_dtype=(lo.base_dtype or None) if lo is not None else None,
        adapter=(lo.init_from or None) if lo is not None else None)
    return params
