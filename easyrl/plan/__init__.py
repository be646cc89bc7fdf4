"""`easyrl plan`: per-device memory of a training config on a mesh, without allocating the model.

    python -m easyrl plan --config configs/ppo.py:tulu25_13b --devices 256 --device-memory 16
    python -m easyrl plan --config configs/ppo.py:tulu25_13b   # on the preset's HARDWARE entry
    python -m easyrl plan --config configs/sft.py:tiny --config.mesh=dp:2,fsdp:4 --devices 8 --compile

Shapes come from `jax.eval_shape` (parameters: `easyrl.model.param_shapes`; optimizer state:
`eval_shape(tx.init, ...)` with the trainer's own `easyrl.train.optim.make_optimizer`), and the
per-device bytes of every parameter-like array from the real partition-rule table
(`easyrl.parallel.partition_specs` on a mesh-shaped stand-in): a dimension counts 1/size of the
mesh axes it is sharded over, a replicated dimension counts fully. Nothing is allocated, so a
13B / 70B config plans on a laptop CPU in seconds.

Model config: `model.path` when it exists locally (an easyrl run dir / checkpoint or a Hugging
Face folder's config.json); otherwise (placeholder paths such as /path/to/tulu2-13b, gs://) the
preset from `--model-preset`, else an explicit `model.preset` (anything but the default 'tiny'),
else one guessed from the path's name (`13b` -> llama2_13b, `llama-3...8b` -> llama3_8b, ...),
else `model.preset`. PPO's reward / value models and GRPO's reward model likewise
(`--reward-preset`). With no
model.path the trainer's random-init preset is used with the tokenizer's vocabulary, as training
would.

Hardware: --devices / --device-memory / --platform; without --devices, the preset's documented
hardware when its config file has one (a module-level `HARDWARE = {preset: dict(devices=...,
device_memory_gib=..., platform=..., name=...)}`, as configs/*.py give every real-model preset),
else this machine's devices.

SFT fuses the LM head with its cross-entropy in chunks (no [B, T, V] logits; the other trainers
build full logits), and PPO's / GRPO's rollout counts the unrolled decode loop's copy of the
decoder weights when the target backend is CPU (`--platform`; default: this machine's backend
without `--devices`, else unknown and not counted); the report says which.

PPO / GRPO: `rollout.engine=continuous` plans the continuous-batching engine instead of the
static sampler: its per-slot KV cache (`rollout.slots`, 0 = one per rollout row), the prefix store
(a bound on the prefilled prompts alive at once), one prefill call and its per-layer weight copy
(counted on every platform); when the rollout is the peak the report names rollout.slots as a
lever (and, when the plan does not fit, the most slots that fit).

LoRA (`model.lora.rank > 0`) is planned as the trainers hold it: the real init with adapters,
the frozen base in `model.lora.base_dtype`, gradients and optimizer state of the adapters (+ a
reward / value model's score head) only, and no reference copy (DPO / PPO / GRPO: adapters off).

GRPO: train.batch_size prompts x grpo.num_generations completions per rollout; no value model; a
reference only when grpo.beta > 0; a reward model only when reward.path is set. `--compile` is
not supported for it yet (it needs the GRPO trainer's update function).

Files: `models.py` (which models, their abstract parameters / optimizer states, LoRA subsets),
`memory.py` (bytes per device, the activation / KV-cache formulas and the memory model),
`planner.py` (one setting's plan: resident state + phases, peak, problems), `suggest.py` (the
search for a setting that fits), `compiled.py` (`--compile`: XLA's memory analysis),
`report.py` (the printed table, the verdict, the command line).
"""
from easyrl.plan.compiled import compiled_memory
from easyrl.plan.memory import (GiB, activation_bytes, count, decode_copy_bytes, decode_mode,
                                engine_copy_tree, engine_merge_tree, engine_prefix_rows, fake_mesh, fused_head_bytes, head_bytes_per_token, head_chunk,
                                kv_cache_bytes, layer_bytes_per_token, lora_bytes_per_token,
                                per_device_bytes, tree_bytes)
from easyrl.plan.models import ModelInfo, build_models, guess_preset, resolve_model_config
from easyrl.plan.planner import (DEFAULT_HEADROOM, FUSED_HEAD_COMMANDS, Line, Plan, Planner,
                                 Setting, make_plan)
from easyrl.plan.report import (COMPILE_MAX_PARAMS, DEFAULT_DEVICE_MEMORY_GIB, HARDWARE_KEYS,
                                add_parser, documented_hardware, format_plan, human, load_config,
                                run, verdict)
from easyrl.plan.suggest import candidate_meshes, min_devices, setting_flags, suggest

__all__ = [
    "GiB", "DEFAULT_HEADROOM", "DEFAULT_DEVICE_MEMORY_GIB", "COMPILE_MAX_PARAMS",
    "ModelInfo", "build_models", "guess_preset", "resolve_model_config",
    "activation_bytes", "count", "decode_copy_bytes", "decode_mode", "engine_copy_tree",
    "engine_merge_tree", "engine_prefix_rows", "fake_mesh",
    "fused_head_bytes", "head_bytes_per_token", "head_chunk", "kv_cache_bytes",
    "layer_bytes_per_token", "lora_bytes_per_token", "per_device_bytes", "tree_bytes",
    "FUSED_HEAD_COMMANDS", "Line", "Plan", "Planner", "Setting", "make_plan",
    "candidate_meshes", "min_devices", "setting_flags", "suggest", "compiled_memory",
    "add_parser", "format_plan", "human", "load_config", "run", "verdict", "HARDWARE_KEYS",
    "documented_hardware",
]
