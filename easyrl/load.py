"""One way to get a model: `load_model(source, ...) -> (config, sharded params)`.

`source` is any of

    an easyrl run dir or `<run>/checkpoints/<step>`   (easyrl_config.json beside the orbax steps)
    a Hugging Face folder                           (config.json + safetensors / .bin)
    a PEFT LoRA adapter folder                      (adapter_config.json: its base model, then
                                                     the adapter on top)
    "preset:NAME"                                   (random init of `easyrl.model.PRESETS[NAME]`)

Every tensor lands on its partition-table sharding of `mesh` (`easyrl.parallel`). Trainers reach
this through `easyrl.train.setup` (config keys -> arguments); `easyrl generate`, the pipeline's
evaluation and the exports call it directly.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from easyrl import checkpoint, hf, parallel, peft
from easyrl import model as M
from easyrl.model import lora, qlora, trainable
from easyrl.model.config import LlamaConfig, get_preset

PRESET = "preset:"


def source_type(source: str) -> str:
    """easyrl | peft | hf | preset."""
    if source.startswith(PRESET):
        return "preset"
    if os.path.exists(os.path.join(checkpoint.resolve(source)[0], checkpoint.CONFIG_FILE)):
        return "easyrl"
    if os.path.exists(os.path.join(source, peft.ADAPTER_CONFIG)):
        return "peft"
    return "hf"


def peft_base(source: str) -> str:
    """The base model folder a PEFT adapter names (`base_model_name_or_path`)."""
    base = peft.read_peft_config(source).get("base_model_name_or_path")
    if not base or not os.path.isdir(os.path.expanduser(base)):
        raise FileNotFoundError(f"{os.path.join(source, peft.ADAPTER_CONFIG)}: "
                                f"base_model_name_or_path={base!r} is not a local model folder")
    return os.path.expanduser(base)


def model_config(source: str, tokenizer=None, **runtime) -> LlamaConfig:
    """The LlamaConfig of `source` with `runtime` options (dtype, remat, lora_*...). A preset
    takes the tokenizer's vocabulary and special ids (any tokenizer works with a random init)."""
    kind = source_type(source)
    if kind == "easyrl":
        cfg, _, _ = checkpoint.read_model_config(checkpoint.resolve(source)[0])
        return cfg.replace(**runtime)
    if kind == "peft":
        pc = peft.read_peft_config(source)
        runtime = dict(dict(lora_rank=int(pc["r"]), lora_alpha=float(pc.get("lora_alpha", 8)),
                            lora_targets=peft.peft_targets(pc, source)), **runtime)
        return model_config(peft_base(source), tokenizer, **runtime)
    if kind == "hf":
        return M.LlamaConfig.from_hf(hf.read_config(source), **runtime)
    cfg = get_preset(source[len(PRESET):], **runtime)
    if tokenizer is not None:
        cfg = cfg.replace(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return cfg


def load_model(source: str, config: Optional[LlamaConfig] = None, *, kind: str = "causal_lm",
               mesh=None, rng=None, init_missing_head: bool = False, base_dtype: Optional[str] = None,
               adapter: Optional[str] = None, tokenizer=None) -> Tuple[LlamaConfig, dict]:
    """(config, params) of `kind` from `source`, placed on `mesh` (default: one device).

    `config` (default `model_config(source)`) carries the runtime options. With LoRA
    (`config.lora_rank > 0`) the base is loaded (an easyrl checkpoint's own adapters merged in),
    optionally held in `base_dtype`, and adapters are added: fresh (B = 0), or those of PEFT
    folder `adapter` (a PEFT `source` is its own adapter). An easyrl causal-LM checkpoint loaded as
    a reward / value model gets a fresh score head; an HF folder without `score.weight` too when
    `init_missing_head`. `rng` draws random inits and fresh heads/adapters (default key 0)."""
    mesh = parallel.create_mesh("dp:1,fsdp:1,tp:1", devices=jax.local_devices()[:1]) if mesh is None else mesh
    rng = jax.random.PRNGKey(0) if rng is None else rng
    config = model_config(source, tokenizer) if config is None else config
    if source_type(source) == "peft":
        adapter, source = adapter or source, peft_base(source)
    rt = dict(dtype=config.dtype, param_dtype=config.param_dtype, remat=config.remat,
              attention=config.attention, base_quant=config.base_quant,
              quant_block=config.quant_block, double_quant=config.double_quant)
    base_dtype = base_dtype if config.lora_rank else None
    if base_dtype:  # load the base straight into its storage dtype
        rt["param_dtype"] = jnp.dtype(base_dtype).name
    params = _load_base(source, lora.disabled(config), kind, mesh, rng, init_missing_head, rt)
    if not config.lora_rank:
        return config, params
    if base_dtype:
        params = trainable.cast_frozen(params, base_dtype)
        params = _heads_to(params, config.param_dtype)
    params = lora.add_adapters(config, params, jax.random.fold_in(rng, 1), kind, mesh)
    if adapter:
        params = peft.load_peft(os.path.expanduser(adapter), config, params, kind, mesh)
    return config, params


def _heads_to(params, dtype):
    """Trainable heads (score) back in the training dtype after the base was cast."""
    out = dict(params)
    for h in trainable.TRAINABLE_HEADS:
        if h in out:
            out[h] = jax.tree.map(lambda x: x.astype(dtype), out[h])
    return out


def _load_base(source, config, kind, mesh, rng, init_missing_head, rt):
    typ = source_type(source)
    if typ == "preset":
        return parallel.sharded_init(lambda r: M.init_params(config.replace(**rt), r, kind), mesh,
                                     rng)
    if typ == "easyrl":
        # restored (adapters merged) in full precision, then quantized when asked
        quant = {k: rt.pop(k) for k in ("base_quant", "quant_block", "double_quant")}
        run_dir, _ = checkpoint.resolve(source)
        _, stored, _ = checkpoint.read_model_config(run_dir)
        if stored == "causal_lm" and kind != "causal_lm":
            # reward / value model from an SFT checkpoint: drop lm_head, fresh score head
            _, _, lm = checkpoint.load_model(source, mesh=mesh, merge_lora=True, **rt)
            head = parallel.sharded_init(
                lambda r: M.init_params(config.replace(base_quant="none"), r, kind), mesh,
                rng)["score"]
            params = {**{k: v for k, v in lm.items() if k != "lm_head"}, "score": head}
        else:
            params = checkpoint.load_model(source, kind=kind, mesh=mesh, merge_lora=True, **rt)[2]
        if quant["base_quant"] != "none":
            params = qlora.quantize_params(config.replace(**quant), params)
        return params
    _, params = hf.load(source, kind=kind, mesh=mesh, init_missing_head=init_missing_head,
                        rng=rng, **rt)
    return params
