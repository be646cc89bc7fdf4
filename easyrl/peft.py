"""PEFT LoRA adapter folders <-> easyrl parameters.

`save_peft` writes `adapter_config.json` + `adapter_model.safetensors` in PEFT's layout, which
`peft.PeftModel.from_pretrained` loads on top of the base Hugging Face model: every adapted
module is named `base_model.model.` + its Hugging Face name (`easyrl.hf.NAME_MAP`), e.g.
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and `.lora_B.weight`
[out, r]; reward / value models are SEQ_CLS with the `score` head in `modules_to_save`.
`load_peft` reads such a folder back onto easyrl parameters; `read_peft_config` and
`peft_targets` give the rank, alpha and targets of the adapter (`model.lora.init_from`).
"""
from __future__ import annotations

import json
import os
import re
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from easyrl import hf
from easyrl import model as M
from easyrl.model.lora import MODULE_OF, TARGETS, target_names
from easyrl.model.trainable import flatten, has_adapters, unflatten
from easyrl.parallel import named_shardings
from easyrl.st_io import SafetensorsFile

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_LEAF = {"lora_a": "lora_A", "lora_b": "lora_B"}


def _modules(short: str, num_layers: int) -> List[str]:
    """Hugging Face module names of projection `short` (q, ..., down), one per layer."""
    names, _ = hf.hf_names(f"layers/{MODULE_OF[short]}/{short}_proj/kernel", num_layers)
    return [n[:-len(".weight")] for n, _ in names]


def _hf_name(path: str) -> str:
    """The Hugging Face name of an unstacked easyrl parameter (score/kernel -> score.weight)."""
    (name, _), = hf.hf_names(path, 0)[0]
    return name


def peft_config(config, kind: str = "causal_lm", base_model: Optional[str] = None) -> dict:
    alpha = float(config.lora_alpha)
    seq_cls = kind != "causal_lm"
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if seq_cls else "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": int(config.lora_rank),
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(config.lora_dropout),
        "target_modules": [f"{t}_proj" for t in target_names(config.lora_targets)],
        "modules_to_save": ["score"] if seq_cls else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_peft(out: str, config, params, kind: str = "causal_lm", base_model: Optional[str] = None,
              dtype=None, tokenizer=None) -> None:
    """Write a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors, and the
    files of `tokenizer`, see `hf.save_tokenizer_files`). Streams one tensor at a time; every
    process must call it, process 0 writes. Atomic (`hf.export_folder`): the folder appears,
    or replaces an older export, only once complete."""
    if config.lora_rank <= 0 or not has_adapters(params):
        raise ValueError("the model has no LoRA adapters (model.lora.rank = 0); export full "
                         "weights with `easyrl convert easyrl-to-hf` instead")
    flat = flatten(params)
    targets = target_names(config.lora_targets)
    modules = {t: _modules(t, config.num_hidden_layers) for t in targets}
    entries = []  # (peft name, easyrl path, layer, transpose): hf.write_safetensors entries
    for i in range(config.num_hidden_layers):
        for t in targets:
            base = f"layers/{MODULE_OF[t]}/{t}_proj/"
            for leaf, hf_leaf in PEFT_LEAF.items():
                if base + leaf not in flat:
                    raise ValueError(f"parameters lack adapter {base + leaf!r} that "
                                     f"lora_targets={config.lora_targets!r} selects")
                entries.append((f"{PEFT_PREFIX}{modules[t][i]}.{hf_leaf}.weight", base + leaf, i,
                                True))
    if kind != "causal_lm":
        entries.append((PEFT_PREFIX + _hf_name("score/kernel"), "score/kernel", None, True))
    with hf.export_folder(out) as tmp:  # None on processes other than 0
        hf.write_safetensors(os.path.join(tmp, ADAPTER_WEIGHTS) if tmp else os.devnull, entries, flat,
                             dtype)
        if tmp is not None:
            with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
                json.dump(peft_config(config, kind, base_model), f, indent=2)
            if tokenizer is not None:
                hf.save_tokenizer_files(tokenizer, tmp)


def read_peft_config(folder: str) -> dict:
    """adapter_config.json of a PEFT LoRA folder, checked for what easyrl can load."""
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing (not a PEFT adapter folder)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None

    def need(cond, msg):
        if not cond:
            raise ValueError(f"{path}: {msg}")
    need(cfg.get("peft_type") == "LORA", f"peft_type={cfg.get('peft_type')!r}, easyrl loads LORA")
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        need(not cfg.get(flag), f"{flag}=true is not supported")
    need(cfg.get("bias", "none") == "none", f"bias={cfg.get('bias')!r}: only 'none' is supported")
    need(not cfg.get("rank_pattern") and not cfg.get("alpha_pattern"),
         "per-module rank_pattern / alpha_pattern are not supported")
    need(cfg.get("layers_to_transform") is None, "layers_to_transform is not supported")
    need(isinstance(cfg.get("r"), int) and cfg["r"] > 0, f"r={cfg.get('r')!r}: expected a positive int")
    return cfg


def peft_targets(cfg: dict, folder: str = "") -> str:
    """The easyrl `lora_targets` regex equivalent to a PEFT config's target_modules."""
    tm = cfg.get("target_modules")
    names = []
    for t in TARGETS:
        full = _modules(t, 1)[0]
        if isinstance(tm, str):
            hit = re.fullmatch(tm, full) or tm == full.rsplit(".", 1)[-1]
        else:
            hit = any(full == m or full.endswith("." + m) for m in (tm or ()))
        if hit:
            names.append(t)
    known = {f"{t}_proj" for t in TARGETS}
    extra = [m for m in (tm if isinstance(tm, list) else []) if m not in known]
    if extra or not names:
        raise ValueError(f"{os.path.join(folder, ADAPTER_CONFIG)}: target_modules={tm!r}: easyrl "
                         f"adapts only {sorted(known)}")
    return "|".join(names)


def load_peft(folder: str, config, params, kind: str = "causal_lm", mesh=None) -> dict:
    """`params` (the base, with or without adapters) with the adapters (and, for SEQ_CLS, the
    score head) of PEFT folder `folder`. `config` must carry the adapter's rank and targets
    (see `read_peft_config` / `peft_targets`). Tensors land on the partition-table shardings."""
    cfg = read_peft_config(folder)
    wpath = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.exists(wpath):
        raise FileNotFoundError(f"{wpath}: missing (easyrl reads safetensors PEFT adapters)")
    st = SafetensorsFile(wpath)
    names = {}
    for n in st.names():  # accept PEFT's saved names and the in-memory '.default' form
        key = n[len(PEFT_PREFIX):] if n.startswith(PEFT_PREFIX) else n
        key = key.replace(".default.weight", ".weight").replace(".modules_to_save", "")
        names[key] = n
    if cfg["r"] != config.lora_rank:
        raise ValueError(f"{folder}: adapter rank r={cfg['r']} != model.lora.rank={config.lora_rank}")
    shapes = M.param_shapes(config, kind)
    flat_shapes = flatten(shapes)
    score_name = _hf_name("score/kernel")
    used, new = set(), {}
    for p, sds in flat_shapes.items():
        m = re.fullmatch(r"layers/(self_attn|mlp)/(\w+)_proj/(lora_a|lora_b)", p)
        if m:
            _, short, leaf = m.groups()
            layers = []
            for i, module in enumerate(_modules(short, config.num_hidden_layers)):
                key = f"{module}.{PEFT_LEAF[leaf]}.weight"
                if key not in names:
                    raise KeyError(f"{wpath}: missing tensor {PEFT_PREFIX + key!r} "
                                   f"(adapter_config.json targets {short}_proj)")
                a = np.asarray(st.get(names[key]))
                if a.T.shape != tuple(sds.shape[1:]):
                    raise ValueError(f"{wpath}: tensor {names[key]!r} has shape {a.shape}, "
                                     f"expected {tuple(sds.shape[1:])[::-1]}")
                layers.append(a.T)
                used.add(key)
            new[p] = np.stack(layers).astype(sds.dtype)
        elif p == "score/kernel" and score_name in names:
            a = np.asarray(st.get(names[score_name]))
            if a.T.shape != tuple(sds.shape):
                raise ValueError(f"{wpath}: tensor {names[score_name]!r} has shape {a.shape}, "
                                 f"expected {tuple(sds.shape)[::-1]}")
            new[p] = a.T.astype(sds.dtype)
            used.add(score_name)
    extra = sorted(set(names) - used)
    if extra:
        raise ValueError(f"{wpath}: tensors easyrl does not use: {extra[:3]}"
                         f"{' ...' if len(extra) > 3 else ''}")
    if mesh is not None:
        sh = named_shardings({k: flat_shapes[k] for k in new}, mesh)
        new = {k: jax.device_put(v, sh[k]) for k, v in new.items()}
    else:
        new = {k: jnp.asarray(v) for k, v in new.items()}
    flat = flatten(params)
    missing = [k for k in flat_shapes if k not in flat and k not in new]
    if missing:
        raise ValueError(f"{folder}: cannot place the adapter: base parameters lack {missing[:3]}")
    return unflatten({**{k: v for k, v in flat.items() if k in flat_shapes}, **new})
