"""The models a trainer holds, as abstract pytrees: architecture from model.path / presets,
parameters and optimizer state from `jax.eval_shape` (nothing allocated).

LoRA (`model.lora.rank > 0`), as the trainers hold it (`easyrl.train.setup.load_params`,
`easyrl.train.loop`, `easyrl.train.rl_loop`): the parameters are the real model init with the LoRA config (base
kernels plus `lora_a [L, in, r]` / `lora_b [L, r, out]` on every targeted kernel), the frozen
leaves in `model.lora.base_dtype` when set; only `trainable.trainable_mask` (the adapters, plus the
`score` head of a reward / value model) trains, so gradients and the optimizer state cover
`trainable.partition(params, mask)[0]` only. DPO's live reference and PPO's / GRPO's reference
are the policy with its adapters off: no copy. PPO's value model gets fresh adapters like the
policy; the reward model none (it is not trained).

GRPO (`grpo`): the policy, NO value model, a frozen reference only when `grpo.beta > 0` (a copy of
the initial policy; LoRA: the adapters off), a reward model only when `reward.path` is set (frozen,
no adapters; the reward functions run on the host).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from easyrl.train.run import total_steps


@dataclasses.dataclass
class ModelInfo:
    role: str  # policy | reference | reward | value
    config: object  # LlamaConfig (runtime options from the trainer config)
    kind: str  # causal_lm | reward | value
    source: str  # where the architecture came from (printed)
    params: object = None  # ShapeDtypeStruct pytree, as the trainer holds it
    opt_state: object = None  # ShapeDtypeStruct pytree (trained models only)
    trainable: object = None  # the leaves that get gradients / optimizer state (trained models)
    mask: object = None  # LoRA: bool pytree like params (True: trains); None: everything trains
    base_dtype: Optional[str] = None  # LoRA: dtype the frozen base is held in (None: param_dtype)

    @property
    def num_params(self) -> int:
        """Parameters of the model (a quantized kernel counts its weights, not its arrays)."""
        if getattr(self.config, "base_quant", "none") != "none":
            from easyrl import model as M
            return _numel(M.param_shapes(self.config.replace(base_quant="none"), self.kind))
        return _numel(self.params)

    def frozen_label(self, param_dtype: str) -> str:
        """How the frozen base is held: 'bfloat16', or 'nf4 + bfloat16' (quantized kernels,
        the rest in the base dtype)."""
        dt = np.dtype(self.base_dtype or param_dtype).name
        bq = getattr(self.config, "base_quant", "none")
        return dt if bq == "none" else f"{bq} + {dt}"

    @property
    def num_trainable(self) -> int:
        return _numel(self.trainable)

    @property
    def lora(self) -> bool:
        return self.mask is not None


def _numel(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def guess_preset(path: str) -> Optional[str]:
    """A preset for a model path that is not available locally, from its name: the size
    ('7b', '13b', '70b', '8b', '1b', ...) and the family ('llama-3' / 'llama3' / 'llama-3.1',
    'qwen2.5', 'qwen3', 'mistral' / 'zephyr')."""
    from easyrl.model.config import PRESETS
    name = os.path.basename(os.path.normpath(path)).lower() if path else ""
    if not name:
        return None
    if name in PRESETS:
        return name
    m = re.search(r"(?<![0-9.])(\d+(?:\.\d+)?)\s*b(?![a-z])", name.replace("_", "-"))
    if not m:
        return None
    size = m.group(1)
    family = {"qwen2.5": {"7": "qwen25_7b", "1.5": "qwen25_1_5b"}, "qwen3": {"8": "qwen3_8b"},
              "mistral": {"7": "mistral_7b"}, "zephyr": {"7": "mistral_7b"}}
    for fam, sizes in family.items():
        if re.search(re.escape(fam).replace(r"\.", r"[.-]?"), name):
            return sizes.get(size)
    family3 = re.search(r"llama-?3", name) is not None
    v31 = re.search(r"llama-?3[.-]?1", name) is not None
    table = {"7": "llama2_7b", "13": "llama2_13b", "70": "llama2_70b", "1": "bench_1b",
             "1.1": "bench_1b", "8": "llama31_8b" if v31 else "llama3_8b"}
    if family3 and size == "70":
        return "llama3_70b"
    return table.get(size)


def _runtime(c) -> dict:
    """LlamaConfig runtime fields as `easyrl.train.setup.model_config` sets them (LoRA included;
    model.lora.init_from: rank / alpha / targets of that PEFT adapter)."""
    from easyrl.train.setup import lora_runtime
    return dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat,
                attention=c.model.attention, **lora_runtime(c))


def resolve_model_config(c, path: str, key: str, hint: Optional[str] = None, tokenizer=None,
                         hint_why: Optional[str] = None):
    """(LlamaConfig, source) for the model at `path` (config key `key`), never loading weights."""
    from easyrl import checkpoint, hf
    from easyrl.model.config import LlamaConfig, get_preset
    rt = _runtime(c)
    if path and not path.startswith("gs://") and os.path.exists(os.path.expanduser(path)):
        path = os.path.expanduser(path)
        run_dir, _ = checkpoint.resolve(path)
        if os.path.exists(os.path.join(run_dir, checkpoint.CONFIG_FILE)):
            cfg, _, _ = checkpoint.read_model_config(run_dir)
            return cfg.replace(**rt), f"easyrl checkpoint {path}"
        return LlamaConfig.from_hf(hf.read_config(path), **rt), f"{path}/config.json"
    explicit = c.model.preset if c.model.preset != "tiny" else None
    if path:
        where = f"{key} {path!r} not found locally"
        hint_why = hint_why or ("--model-preset" if key == "model.path" else "--reward-preset")
        for name, why in ((hint, hint_why), (explicit, "model.preset"),
                          (guess_preset(path), "guessed from the name")):
            if name:
                return get_preset(name, **rt), f"preset {name} ({why}; {where})"
        return (get_preset(c.model.preset, **rt),
                f"preset {c.model.preset} (model.preset; {where}: pass --model-preset NAME)")
    name = hint or c.model.preset
    cfg = get_preset(name, **rt)
    if tokenizer is not None and not hint:  # the trainer's random init takes the tokenizer's vocab
        cfg = cfg.replace(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return cfg, f"preset {name} (random init; vocab {len(tokenizer)} from the tokenizer)"
    return cfg, f"preset {name} (random init)"


def _tokenizer(c):
    """The trainer's tokenizer when a random-init preset needs its vocabulary (else None)."""
    if c.model.path:
        return None
    try:
        from easyrl.train import setup
        return setup.load_tokenizer(c)
    except Exception:  # noqa: BLE001 - planning must not depend on tokenizer files being present
        return None


def build_models(c, model_preset: Optional[str] = None,
                 reward_preset: Optional[str] = None) -> Dict[str, ModelInfo]:
    """Abstract (eval_shape) params and optimizer states of every model the trainer holds."""
    from easyrl import model as M
    from easyrl.model import lora
    from easyrl.model.trainable import partition
    from easyrl.train.optim import make_optimizer
    tok = _tokenizer(c)
    pcfg, psrc = resolve_model_config(c, c.model.path, "model.path", model_preset, tok)
    use_lora = pcfg.lora_rank > 0
    command = c.get("command", "sft")
    models: Dict[str, ModelInfo] = {}

    def other(path, key):  # reward / value: its own name, else the policy's preset
        if reward_preset:
            return resolve_model_config(c, path, key, reward_preset)
        if path and (guess_preset(path) or os.path.exists(os.path.expanduser(path))):
            return resolve_model_config(c, path, key, guess_preset(path), hint_why="guessed from the name")
        return resolve_model_config(c, path, key, _preset_name(psrc), hint_why="the policy's preset")

    if command == "ppo":
        rpath = c.reward.path
        vpath = c.value.path or rpath
        vkey = "value.path" if c.value.path else "reward.path"
        rcfg, rsrc = other(rpath, "reward.path")
        rcfg = lora.disabled(rcfg)  # the reward model is not trained: no adapters (easyrl.algorithms.ppo: _at)
        vcfg, vsrc = other(vpath, vkey)
        specs = [("policy", pcfg, "causal_lm", psrc, c.optim)]
        if not use_lora:  # LoRA: the reference is the policy with its adapters off
            specs.append(("reference", pcfg, "causal_lm", "a frozen copy of the policy", None))
        specs += [("reward", rcfg, "reward", rsrc, None),
                  ("value", vcfg, "value", vsrc, c.value_optim)]
    elif command in ("grpo", "online_dpo"):  # no critic; reference (GRPO: only with beta > 0)
        specs = [("policy", pcfg, "causal_lm", psrc, c.optim)]
        if grpo_reference(c) and not use_lora:  # LoRA: the policy with its adapters off
            specs.append(("reference", pcfg, "causal_lm",
                          "a frozen copy of the initial policy" + (
                              " (grpo.beta > 0)" if command == "grpo" else ""), None))
        if c.reward.path:
            rcfg, rsrc = other(c.reward.path, "reward.path")
            specs.append(("reward", lora.disabled(rcfg), "reward", rsrc, None))  # not trained
    else:
        kind = "reward" if command == "rm" else "causal_lm"
        specs = [("policy", pcfg, kind, psrc, c.optim)]
        if live_reference(c) and not use_lora:
            specs.append(("reference", pcfg, kind, "a frozen copy of the initial policy", None))
    base_dtype = (c.model.lora.base_dtype or None) if c.model.get("lora") is not None else None
    shapes = {}
    for role, cfg, kind, src, optim in specs:
        key = (cfg.replace(remat="none"), kind)
        if key not in shapes:
            shapes[key] = M.param_shapes(cfg, kind)  # the real init (with adapters under LoRA)
        params, mask, bdt = shapes[key], None, None
        if optim is not None and cfg.lora_rank > 0:
            bdt = base_dtype
            params, mask = lora_trees(params, bdt)
        trainable = opt = None
        if optim is not None:
            trainable = partition(params, mask)[0]
            tx, _ = make_optimizer(optim, total_steps(c) or 1)
            opt = jax.eval_shape(tx.init, trainable)
        models[role] = ModelInfo(role, cfg, kind, src, params, opt, trainable, mask, bdt)
    return models


def live_reference(c) -> bool:
    """Does the trainer run a reference forward pass every step (DPO, KTO: not precomputed /
    reference-free)?"""
    if c.get("command") == "kto":
        return not c.kto.precompute_ref
    d = c.get("dpo")
    return c.get("command") == "dpo" and not d.reference_free and not d.precompute_ref


def grpo_reference(c) -> bool:
    """Does the GRPO trainer hold a frozen reference (grpo.beta > 0: a KL term against it)?
    Online DPO always does (its loss is against the reference)."""
    if c.get("command") == "online_dpo":
        return True
    return c.get("command") == "grpo" and float(c.grpo.beta) > 0


def lora_trees(params, base_dtype: Optional[str] = None):
    """(params, trainable mask) of a LoRA model as `setup.load_params` holds it: frozen leaves in
    `base_dtype` when given; adapters and the score head in the parameter dtype."""
    from easyrl.model.trainable import is_quant_part, trainable_mask
    mask = trainable_mask(params)
    if base_dtype:
        dt = jnp.dtype(base_dtype)
        # quantized kernels (integers and float32 scales) keep their own dtypes
        params = jax.tree_util.tree_map_with_path(
            lambda k, x, m: x if m or is_quant_part(jax.tree_util.keystr(
                k, simple=True, separator="/")) else jax.ShapeDtypeStruct(x.shape, dt),
            params, mask)
    return params, mask


def _preset_name(source: str) -> Optional[str]:
    m = re.match(r"preset (\S+)", source)
    return m.group(1) if m else None

