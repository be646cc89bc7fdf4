"""LoRA adapters on the dense kernels, trainable-subset helpers, merging, and PEFT io.

With `LlamaConfig.lora_rank > 0`, every dense projection whose short name (q, k, v, o, gate, up,
down) matches the regex `lora_targets` becomes a `LoRADense`: it keeps the `kernel` (and `bias`)
of `nn.Dense`, so the base tree and the Hugging Face name table are unchanged, and adds

    lora_a [in, r]   (PEFT's init: kaiming-uniform, i.e. U(-1/sqrt(in), 1/sqrt(in)))
    lora_b [r, out]  (zeros: a fresh adapter leaves the model exactly as it was)

    y = x W (+ b) + (alpha / r) * dropout(x) A B

Under `nn.scan` both get the leading layer axis L (`layers/self_attn/q_proj/lora_a [L, D, r]`),
which the partition table in `easyrl.parallel` covers. Applying the same parameters with
`disabled(config)` (rank 0) ignores the adapter leaves: the base model, with no copy of the
weights (the DPO / PPO reference under LoRA).

PEFT: `save_peft` writes `adapter_config.json` + `adapter_model.safetensors` in PEFT's layout
(`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in], `lora_B.weight`
[out, r]; reward / value models as SEQ_CLS with the `score` head in `modules_to_save`), which
`peft.PeftModel.from_pretrained` loads on top of the base Hugging Face model; `load_peft` reads
such a folder back onto easyrl parameters.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from easyrl.model.matmul import dense_dot_general

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
MODULE_OF = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn",
             "gate": "mlp", "up": "mlp", "down": "mlp"}
ADAPTER_LEAVES = ("lora_a", "lora_b")
TRAINABLE_HEADS = ("score",)  # reward / value heads stay trainable under LoRA
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# ---- which kernels ---------------------------------------------------------------------------
def _short(name: str) -> str:
    return name[:-5] if name.endswith("_proj") else name


def matches(targets: str, name: str) -> bool:
    """Does regex `targets` select projection `name` ('q_proj' or 'q')? The regex must match
    the whole short name (q, k, v, o, gate, up, down) or the whole module name (q_proj, ...)."""
    short = _short(name)
    if short not in TARGETS:
        return False
    return bool(re.fullmatch(targets, short) or re.fullmatch(targets, f"{short}_proj"))


def target_names(targets: str) -> Tuple[str, ...]:
    """The short names (in TARGETS order) that regex `targets` selects."""
    return tuple(t for t in TARGETS if matches(targets, t))


def check_targets(targets: str, key: str = "model.lora.targets") -> Tuple[str, ...]:
    try:
        re.compile(targets)
    except re.error as e:
        raise ValueError(f"config {key}: {targets!r} is not a valid regex ({e})") from None
    names = target_names(targets)
    if not names:
        raise ValueError(f"config {key}: {targets!r} matches none of the dense kernels "
                         f"{', '.join(TARGETS)} (e.g. 'q|v' or 'q|k|v|o|gate|up|down')")
    return names


def is_target(config, name: str) -> bool:
    return config.lora_rank > 0 and matches(config.lora_targets, name)


def disabled(config):
    """The same model with adapters off (their parameter leaves are ignored by `apply`)."""
    return config.replace(lora_rank=0, lora_dropout=0.0) if config.lora_rank else config


def scale(config) -> float:
    return float(config.lora_alpha) / float(config.lora_rank)


# ---- the module ------------------------------------------------------------------------------
def lora_a_init(key, shape, dtype=jnp.float32):
    """PEFT's default: kaiming_uniform(a=sqrt(5)) on [r, in] = U(-1/sqrt(in), 1/sqrt(in))."""
    bound = 1.0 / np.sqrt(shape[-2])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class LoRADense(nn.Module):
    """`nn.Dense` (same `kernel` / `bias` parameters and numerics) plus a rank-r adapter."""
    features: int
    rank: int
    alpha: float
    dropout: float = 0.0
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        d_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (d_in, self.features), self.param_dtype)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
                if self.use_bias else None)
        a = self.param("lora_a", lora_a_init, (d_in, self.rank), self.param_dtype)
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features), self.param_dtype)
        x, kernel, bias, a, b = nn.dtypes.promote_dtype(x, kernel, bias, a, b, dtype=self.dtype)
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        y = dense_dot_general(x, kernel, dims)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        if self.dropout > 0 and self.has_rng("dropout"):
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))
        low = jax.lax.dot_general(x, a, dims)
        return y + jax.lax.dot_general(low, b, dims) * jnp.asarray(self.alpha / self.rank, y.dtype)


# ---- trainable subsets -----------------------------------------------------------------------
def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/") if tree else {}


def _unflat(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/") if flat else {}


def is_adapter(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in ADAPTER_LEAVES


def has_adapters(params) -> bool:
    return any(is_adapter(p) for p in _flat(params))


def trainable_mask(params, heads=TRAINABLE_HEADS):
    """Bool pytree like `params`: adapters and the score head (reward / value) train, the rest
    of the model stays frozen."""
    return _unflat({p: is_adapter(p) or p.split("/", 1)[0] in heads for p in _flat(params)})


def partition(params, mask) -> Tuple[dict, dict]:
    """(trainable, fixed) nested dicts, by a bool pytree `mask` (None: everything trains)."""
    if mask is None:
        return params, {}
    flat, m = _flat(params), _flat(mask)
    return (_unflat({k: v for k, v in flat.items() if m[k]}),
            _unflat({k: v for k, v in flat.items() if not m[k]}))


def combine(trainable, fixed):
    """Inverse of `partition`."""
    if not fixed:
        return trainable
    return _unflat({**_flat(trainable), **_flat(fixed)})


def adapters(params) -> dict:
    return _unflat({k: v for k, v in _flat(params).items() if is_adapter(k)})


def strip(params) -> dict:
    """The parameters without adapter leaves."""
    return _unflat({k: v for k, v in _flat(params).items() if not is_adapter(k)})


def num_params(tree) -> int:
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


# ---- adding, casting, merging ------------------------------------------------------------------
def _out_shardings(fn, args, mesh):
    if mesh is None:
        return None
    from easyrl.parallel import named_shardings
    return named_shardings(jax.eval_shape(fn, *args), mesh)


def add_adapters(config, base_params, rng, kind: str = "causal_lm", mesh=None) -> dict:
    """`base_params` (no adapters) plus fresh adapters for `config` (B = 0: the model is
    unchanged), initialized already sharded by the partition table. Only the adapters are
    materialized (the base init is dead code under jit)."""
    from easyrl import model as M
    if config.lora_rank <= 0:
        return base_params
    fn = lambda r: adapters(M.init_params(config, r, kind))  # noqa: E731
    fresh = jax.jit(fn, out_shardings=_out_shardings(fn, (rng,), mesh))(rng)
    return combine(strip(base_params), fresh)


def cast_frozen(params, dtype, mask=None) -> dict:
    """Frozen leaves (mask False; default: all but adapters and the score head) cast to `dtype`,
    keeping their shardings."""
    mask = trainable_mask(params) if mask is None else mask
    dt = jnp.dtype(dtype)
    train, fixed = partition(params, mask)
    fixed = {k: v for k, v in _flat(fixed).items()}
    cast = {k: v for k, v in fixed.items() if v.dtype != dt}
    if cast:
        shard = {k: v.sharding for k, v in cast.items()}
        cast = jax.jit(lambda t: {k: v.astype(dt) for k, v in t.items()}, out_shardings=shard,
                       donate_argnums=0)(cast)
    return combine(train, _unflat({**fixed, **cast}))


def merge(config, params) -> dict:
    """Base parameters with every adapter folded in: W + (alpha / r) A B (computed in float32,
    stored in W's dtype). Shardings are kept; the result has no adapter leaves."""
    if not has_adapters(params):
        return params
    s = scale(config)
    flat = _flat(params)
    kernels = {}
    for k in flat:
        if k.endswith("/lora_a"):
            base = k[: -len("lora_a")]
            kernels[base + "kernel"] = (flat[base + "kernel"], flat[k], flat[base + "lora_b"])

    def fold(w, a, b):
        ab = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
        return (w.astype(jnp.float32) + s * ab).astype(w.dtype)

    shard = {k: getattr(w, "sharding", None) for k, (w, _, _) in kernels.items()}
    if any(v is None for v in shard.values()):
        shard = None
    merged = jax.jit(lambda t: {k: fold(*v) for k, v in t.items()}, out_shardings=shard)(kernels)
    out = {k: v for k, v in flat.items() if not is_adapter(k)}
    out.update(merged)
    return _unflat(out)


# ---- PEFT ------------------------------------------------------------------------------------
def _peft_module(short: str, layer: int) -> str:
    return f"model.layers.{layer}.{MODULE_OF[short]}.{short}_proj"


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
              dtype=None) -> None:
    """Write a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
    Streams one tensor at a time; every process must call it, process 0 writes."""
    from easyrl.hf import _host
    from easyrl.st_io import write_streaming
    if config.lora_rank <= 0 or not has_adapters(params):
        raise ValueError("the model has no LoRA adapters (model.lora.rank = 0); export full "
                         "weights with `easyrl convert easyrl-to-hf` instead")
    flat = _flat(params)
    entries = []  # (peft name, easyrl path, layer or None, transpose)
    for i in range(config.num_hidden_layers):
        for t in target_names(config.lora_targets):
            base = f"layers/{MODULE_OF[t]}/{t}_proj/"
            for leaf, hf_leaf in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
                if base + leaf not in flat:
                    raise ValueError(f"parameters lack adapter {base + leaf!r} that "
                                     f"lora_targets={config.lora_targets!r} selects")
                entries.append((f"{PEFT_PREFIX}{_peft_module(t, i)}.{hf_leaf}.weight",
                                base + leaf, i, True))
    if kind != "causal_lm":
        entries.append((f"{PEFT_PREFIX}score.weight", "score/kernel", None, True))

    def dt(p):
        return np.dtype(jnp.dtype(dtype or flat[p].dtype))

    def shape(p, i):
        s = flat[p].shape[1:] if i is not None else flat[p].shape
        return tuple(s[::-1])

    specs = [(n, shape(p, i), dt(p)) for n, p, i, _ in entries]
    by_name = {e[0]: e for e in entries}

    def produce(name):
        _, p, i, tr = by_name[name]
        a = _host(flat[p] if i is None else flat[p][i]).astype(dt(p))
        return a.T if tr else a

    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out, exist_ok=True)
    target = os.path.join(out, ADAPTER_WEIGHTS) if writer else os.devnull
    write_streaming(target, specs, produce, metadata={"format": "pt"})
    if writer:
        with open(os.path.join(out, ADAPTER_CONFIG), "w") as f:
            json.dump(peft_config(config, kind, base_model), f, indent=2)


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
        full = _peft_module(t, 0)
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
    from easyrl.st_io import SafetensorsFile
    from easyrl import model as M
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
    flat_shapes = _flat(shapes)
    used, new = set(), {}
    for p, sds in flat_shapes.items():
        m = re.fullmatch(r"layers/(self_attn|mlp)/(\w+)_proj/(lora_a|lora_b)", p)
        if m:
            _, short, leaf = m.groups()
            hf_leaf = "lora_A" if leaf == "lora_a" else "lora_B"
            layers = []
            for i in range(config.num_hidden_layers):
                key = f"{_peft_module(short, i)}.{hf_leaf}.weight"
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
        elif p == "score/kernel" and "score.weight" in names:
            a = np.asarray(st.get(names["score.weight"]))
            if a.T.shape != tuple(sds.shape):
                raise ValueError(f"{wpath}: tensor {names['score.weight']!r} has shape {a.shape}, "
                                 f"expected {tuple(sds.shape)[::-1]}")
            new[p] = a.T.astype(sds.dtype)
            used.add("score.weight")
    extra = sorted(set(names) - used)
    if extra:
        raise ValueError(f"{wpath}: tensors easyrl does not use: {extra[:3]}"
                         f"{' ...' if len(extra) > 3 else ''}")
    if mesh is not None:
        from easyrl.parallel import named_shardings
        sh = named_shardings({k: flat_shapes[k] for k in new}, mesh)
        new = {k: jax.device_put(v, sh[k]) for k, v in new.items()}
    else:
        new = {k: jnp.asarray(v) for k, v in new.items()}
    flat = _flat(params)
    missing = [k for k in flat_shapes if k not in flat and k not in new]
    if missing:
        raise ValueError(f"{folder}: cannot place the adapter: base parameters lack {missing[:3]}")
    return _unflat({**{k: v for k, v in flat.items() if k in flat_shapes}, **new})
