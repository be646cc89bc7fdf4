"""`easyrl plan`: per-device memory of a training config on a mesh, without allocating the model.

    python -m easyrl plan --config configs/ppo.py:tulu25_13b --devices 256 --device-memory 16
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
else `model.preset`. PPO's reward / value models likewise (`--reward-preset`). With no
model.path the trainer's random-init preset is used with the tokenizer's vocabulary, as training
would.

Memory model, per device (b = rows of one micro-batch on a device = rows / (dp*fsdp), T = tokens
per row, a = bytes of the compute dtype, 4 = float32; D hidden, F intermediate, L layers, H / K
query / kv heads, Dh head dim, V vocab; under tensor parallelism q = H*Dh/tp, k = K*Dh/tp,
f = F/tp, v = V/tp, h = H/tp whenever tp divides them, as the partition rules shard them):

  parameters, optimizer state  exact: eval_shape pytrees x partition specs (AdamW: mu and nu in
                               the parameter dtype + int32 counts; PPO: policy and value)
  gradients                    = parameter bytes (param dtype, sharded like the parameters);
                               x2 with gradient accumulation (accumulator + this micro-batch);
                               with exactly 2 micro-steps activations count twice (XLA overlaps
                               them: measured with --compile)
  activations (training)       b*T * [ L * S(remat) + W + logits ]  where, per token,
      S(none)          = W = a*(4D + 2q + 2k + 4f) + 16D + (4 + a)*h*T + T
                         (every residual of the layer: norm inputs / float32 copies, rotated q,k,
                         v, float32 softmax probs and their compute-dtype copy, the mask,
                         attention output, gate, up, silu(gate), silu*up)
      S(dots)          = a*(3D + 2q + 2k + 2f) + 4*h*T  (every matmul output incl. the float32
                         attention scores, + the layer input)
      S(dots_no_batch) = S(minimal) = a*(3D + q + 2k + 2f)  (projection outputs, + layer input)
      S(full)          = a*D  (the layer input only)
      W                = one layer's working set while its backward runs (recomputed forward or
                         gradient buffers)
      logits           = (a + 3*4)*v for a LM head: [B,T,V] in the compute dtype + float32
                         logits, float32 softmax for the backward, float32 gradient; ~0 for a
                         score head. Plus 10*D*a for the embedding / final norm.
  forward-only passes          b*T * [ W + (a + 2*4)*v ] (DPO's live reference, PPO scoring)
  PPO                          resident: policy, reference (a copy of the policy), reward and
                               value parameters, policy and value optimizer states; then the peak
                               phase of: rollout = KV cache 2*L*B*(P+N)*K*Dh*a (batch over
                               dp*fsdp, kv heads over tp, as the sampler pins it) + a prefill
                               forward; scoring = the largest forward-only pass over the rollout
                               batch; update = policy + value gradients and training activations
                               of one minibatch (batch / ppo.num_minibatches rows, both models).
  peak                         resident + the largest phase; "fits" = peak <= (1 - headroom) *
                               device memory (default headroom 10%: XLA temporaries, fragmentation).

Activations are assumed sharded over the batch (dp*fsdp) as the design intends. Checked with
`--compile` on 8 simulated CPU devices (bench_100m, seq 512): on dp-only meshes the estimate is
within ~10% of XLA's; on fsdp meshes XLA's temporaries were ~3-4x larger because the model puts no
sharding constraint on the hidden state (the fsdp-sharded embedding table pulls it off the batch
axis); with `with_sharding_constraint(x, P(('dp','fsdp'), None, None))` at the decoder-layer
boundary they matched the estimate again (1.15 vs 1.06 GiB).

The activation terms are estimates (XLA fuses and rematerializes on its own); `--compile` (models
under 2B parameters) lowers and compiles the real train step / PPO update with abstract inputs and
prints XLA's memory analysis next to the estimate.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import os
import re
import sys
import types
from typing import Dict, List, Optional, Tuple

import jax
import numpy as np

GiB = 2 ** 30
DEFAULT_DEVICE_MEMORY_GIB = 16.0
DEFAULT_HEADROOM = 0.10
COMPILE_MAX_PARAMS = 2e9
REMAT_COST = {"none": 0, "dots": 1, "dots_no_batch": 2, "minimal": 2, "full": 3}
SEARCH_REMAT = ("none", "dots", "dots_no_batch", "full")  # minimal == dots_no_batch
ROWS_PER_EXAMPLE = {"sft": 1, "rm": 2, "dpo": 2}  # rrhf: rrhf.num_responses; ppo: 1
RRHF_DEFAULT_RESPONSES = 4
# easyrl.train.step.accumulate peels micro-batch 0 off the scan; with 2 micro-steps the scan has
# length 1 and XLA schedules both micro-batches together (compiled temporaries ~ no accumulation).
TWO_MICRO_STEPS_OVERLAP = 2


# ---- model configs ---------------------------------------------------------------------------
@dataclasses.dataclass
class ModelInfo:
    role: str  # policy | reference | reward | value
    config: object  # LlamaConfig (runtime options from the trainer config)
    kind: str  # causal_lm | reward | value
    source: str  # where the architecture came from (printed)
    params: object = None  # ShapeDtypeStruct pytree
    opt_state: object = None  # ShapeDtypeStruct pytree (trained models only)

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.params)))


def guess_preset(path: str) -> Optional[str]:
    """A preset for a model path that is not available locally, from its name: the size
    ('7b', '13b', '70b', '8b', '1b', ...) and the family ('llama-3' / 'llama3' / 'llama-3.1')."""
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
    family3 = re.search(r"llama-?3", name) is not None
    v31 = re.search(r"llama-?3[.-]?1", name) is not None
    table = {"7": "llama2_7b", "13": "llama2_13b", "70": "llama2_70b", "1": "bench_1b",
             "1.1": "bench_1b", "8": "llama31_8b" if v31 else "llama3_8b"}
    if family3 and size == "70":
        return "llama3_70b"
    return table.get(size)


def _runtime(c) -> dict:
    return dict(dtype=c.model.dtype, param_dtype=c.model.param_dtype, remat=c.model.remat,
                attention=c.model.attention)


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


def _total_steps(c) -> int:
    return max(int(c.train.steps), 1)


def build_models(c, model_preset: Optional[str] = None,
                 reward_preset: Optional[str] = None) -> Dict[str, ModelInfo]:
    """Abstract (eval_shape) params and optimizer states of every model the trainer holds."""
    from easyrl import model as M
    from easyrl.train.optim import make_optimizer
    tok = _tokenizer(c)
    pcfg, psrc = resolve_model_config(c, c.model.path, "model.path", model_preset, tok)
    command = c.get("command", "sft")
    models: Dict[str, ModelInfo] = {}
    if command == "ppo":
        rpath = c.reward.path
        vpath = c.value.path or rpath
        vkey = "value.path" if c.value.path else "reward.path"

        def other(path, key):  # reward / value: its own name, else the policy's preset
            if reward_preset:
                return resolve_model_config(c, path, key, reward_preset)
            if path and (guess_preset(path) or os.path.exists(os.path.expanduser(path))):
                return resolve_model_config(c, path, key, guess_preset(path), hint_why="guessed from the name")
            return resolve_model_config(c, path, key, _preset_name(psrc), hint_why="the policy's preset")
        rcfg, rsrc = other(rpath, "reward.path")
        vcfg, vsrc = other(vpath, vkey)
        specs = [("policy", pcfg, "causal_lm", psrc, c.optim),
                 ("reference", pcfg, "causal_lm", "a frozen copy of the policy", None),
                 ("reward", rcfg, "reward", rsrc, None),
                 ("value", vcfg, "value", vsrc, c.value_optim)]
    else:
        kind = "reward" if command == "rm" else "causal_lm"
        specs = [("policy", pcfg, kind, psrc, c.optim)]
        d = c.get("dpo")
        if command == "dpo" and not d.reference_free and not d.precompute_ref:
            specs.append(("reference", pcfg, kind, "a frozen copy of the initial policy", None))
    shapes = {}
    for role, cfg, kind, src, optim in specs:
        key = (cfg.replace(remat="none"), kind)
        if key not in shapes:
            shapes[key] = M.param_shapes(cfg, kind)
        params = shapes[key]
        opt = None
        if optim is not None:
            tx, _ = make_optimizer(optim, _total_steps(c))
            opt = jax.eval_shape(tx.init, params)
        models[role] = ModelInfo(role, cfg, kind, src, params, opt)
    return models


def _preset_name(source: str) -> Optional[str]:
    m = re.match(r"preset (\S+)", source)
    return m.group(1) if m else None


# ---- bytes ------------------------------------------------------------------------------------
def count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def fake_mesh(sizes: dict):
    """What `easyrl.parallel.spec_for` reads of a mesh: `.shape[axis]`."""
    return types.SimpleNamespace(shape=dict(sizes), axis_names=tuple(sizes))


def per_device_bytes(tree, mesh_sizes: dict) -> int:
    """Bytes of `tree` on one device when placed by the partition rules on a mesh of that shape
    (sharded dims count 1/axis size; replicated dims fully)."""
    from easyrl import parallel
    mesh = fake_mesh(mesh_sizes)
    specs = parallel.partition_specs(tree, mesh)
    total = 0
    for x, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(
            specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))):
        n = 1
        for i, dim in enumerate(x.shape):
            ax = spec[i] if i < len(spec) else None
            axes = () if ax is None else (ax if isinstance(ax, tuple) else (ax,))
            div = int(np.prod([mesh_sizes[a] for a in axes])) if axes else 1
            n *= dim // div
        total += n * np.dtype(x.dtype).itemsize
    return int(total)


def _split(n: int, tp: int) -> float:
    """n per device when tp shards it (only if divisible, as the partition rules do)."""
    return n / tp if tp > 1 and n % tp == 0 else float(n)


def layer_bytes_per_token(cfg, tp: int, key_len: int) -> Dict[str, float]:
    """Per-token bytes of one decoder layer: saved residuals per remat policy and the working set
    W (see the module docstring)."""
    a = np.dtype(cfg.dtype).itemsize
    D, F, H, K, Dh = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                      cfg.num_key_value_heads, cfg.head_dim)
    q, k, f, h = _split(H * Dh, tp), _split(K * Dh, tp), _split(F, tp), _split(H, tp)
    t = key_len
    w = a * (4 * D + 2 * q + 2 * k + 4 * f) + 16 * D + (4 + a) * h * t + t
    saved = {
        "none": w,
        "dots": a * (3 * D + 2 * q + 2 * k + 2 * f) + 4 * h * t,
        "dots_no_batch": a * (3 * D + q + 2 * k + 2 * f),
        "minimal": a * (3 * D + q + 2 * k + 2 * f),
        "full": a * D,
    }
    return dict(saved=saved, working=w)


def head_bytes_per_token(cfg, kind: str, tp: int, train: bool) -> float:
    a = np.dtype(cfg.dtype).itemsize
    other = 10 * cfg.hidden_size * a  # embedding output, final norm (+ float32 copies)
    if kind != "causal_lm":
        return other + 8
    v = _split(cfg.vocab_size, tp)
    return other + (a + (3 if train else 2) * 4) * v


def activation_bytes(cfg, kind: str, rows: float, seq: int, remat: str, tp: int,
                     train: bool = True) -> float:
    """Per-device activation bytes of one forward(+backward) over `rows` rows of `seq` tokens."""
    lb = layer_bytes_per_token(cfg, tp, seq)
    per_token = lb["working"] + head_bytes_per_token(cfg, kind, tp, train)
    if train:
        per_token += cfg.num_hidden_layers * lb["saved"][remat]
    return rows * seq * per_token


def kv_cache_bytes(cfg, batch: int, seq: int, mesh: dict, dtype=None) -> Tuple[float, float]:
    """(total, per device) bytes of the sampler's KV cache 2 x [L, B, S, K, Dh] (batch over
    dp*fsdp when divisible, kv heads over tp when divisible, as `generate._cache_sharding`)."""
    item = np.dtype(dtype or cfg.dtype).itemsize
    total = 2.0 * cfg.num_hidden_layers * batch * seq * cfg.num_key_value_heads * cfg.head_dim * item
    dpf = mesh["dp"] * mesh["fsdp"]
    div = (dpf if batch % dpf == 0 else 1) * (mesh["tp"] if cfg.num_key_value_heads % mesh["tp"] == 0 else 1)
    return total, total / div


# ---- the plan -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Line:
    name: str
    per_device: float
    total: Optional[float] = None  # unsharded total (None: not meaningful)
    note: str = ""
    phase: str = "resident"  # resident | rollout | scoring | step | update


@dataclasses.dataclass
class Setting:
    mesh: dict  # {'dp': .., 'fsdp': .., 'tp': ..}
    micro: int  # examples per micro-batch (PPO: rows per update minibatch)
    remat: str

    def mesh_spec(self) -> str:
        return ",".join(f"{a}:{self.mesh[a]}" for a in ("dp", "fsdp", "tp"))


@dataclasses.dataclass
class Plan:
    command: str
    devices: int
    device_memory: float  # bytes
    headroom: float
    setting: Setting
    lines: List[Line]
    resident: float
    phases: Dict[str, float]
    peak: float
    problems: List[str]  # reasons the trainer would refuse this setting
    info: List[str]  # batch / shape notes

    @property
    def limit(self) -> float:
        return (1.0 - self.headroom) * self.device_memory

    @property
    def fits(self) -> bool:
        return not self.problems and self.peak <= self.limit

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get) if self.phases else ""

    def line(self, name: str) -> Line:
        return next(x for x in self.lines if x.name.startswith(name))


class Planner:
    """Estimates for one config and its models; `estimate(setting)` is cheap (the search calls it
    for many meshes / micro-batches / remat policies)."""

    def __init__(self, c, models: Dict[str, ModelInfo], devices: int, device_memory: float,
                 headroom: float = DEFAULT_HEADROOM):
        self.c, self.models, self.devices = c, models, devices
        self.device_memory, self.headroom = device_memory, headroom
        self.command = c.get("command", "sft")
        self._pd = {}

    # the knobs as configured
    def current(self) -> Setting:
        from easyrl import parallel
        mesh = parallel.parse_mesh_spec(self.c.mesh, self.devices)
        if self.command == "ppo":
            micro = self.c.train.batch_size // max(self.c.ppo.num_minibatches, 1)
        else:
            micro = self.c.train.micro_batch_size or self.c.train.batch_size
        return Setting(mesh, micro, self.c.model.remat)

    def _per_device(self, tree, mesh: dict) -> int:
        key = (id(tree), tuple(sorted(mesh.items())))
        if key not in self._pd:
            self._pd[key] = per_device_bytes(tree, mesh)
        return self._pd[key]

    def rows_per_example(self) -> int:
        if self.command == "rrhf":
            return int(self.c.rrhf.num_responses) or RRHF_DEFAULT_RESPONSES
        return ROWS_PER_EXAMPLE.get(self.command, 1)

    def estimate(self, s: Setting) -> Plan:
        c, m = self.c, s.mesh
        dpf, tp = m["dp"] * m["fsdp"], m["tp"]
        lines: List[Line] = []
        problems: List[str] = []
        info: List[str] = []
        B = int(c.train.batch_size)
        used = int(np.prod(list(m.values())))
        if used < self.devices:
            info.append(f"note: mesh {s.mesh_spec()} uses {used} of the {self.devices} devices")
        if used > self.devices:
            problems.append(f"mesh {s.mesh_spec()} needs {int(np.prod(list(m.values())))} devices, "
                            f"only {self.devices}")

        def rows_per_device(rows: int, what: str, key: str, report: bool = True) -> float:
            if rows % dpf:
                if not report:
                    return float(math.ceil(rows / dpf))
                problems.append(f"{what} of {rows} is not divisible by dp*fsdp={dpf} of mesh "
                                f"{s.mesh_spec()} (config {key}; the trainer refuses it)")
                return float(math.ceil(rows / dpf))
            return rows / dpf

        def add_state(info_: ModelInfo, label: str, opt: bool = True):
            p = info_.params
            dt = np.dtype(info_.config.param_dtype).name
            lines.append(Line(f"{label} parameters", self._per_device(p, m), tree_bytes(p),
                              f"{count(info_.num_params)} x {dt}"))
            if opt and info_.opt_state is not None:
                o = info_.opt_state
                lines.append(Line(f"{label} optimizer state", self._per_device(o, m), tree_bytes(o),
                                  "AdamW mu + nu (param dtype)"))

        def grads(info_: ModelInfo, label: str, accumulate: bool, phase: str):
            g = self._per_device(info_.params, m) * (2 if accumulate else 1)
            lines.append(Line(f"{label} gradients", g, tree_bytes(info_.params) * (2 if accumulate else 1),
                              "x2: accumulator + micro-batch" if accumulate else "param dtype",
                              phase))

        pol = self.models["policy"]
        pcfg = pol.config.replace(remat=s.remat)
        if self.command == "ppo":
            p = c.ppo
            P, N = int(p.max_prompt_len), int(p.max_new_tokens)
            S = P + N
            if s.micro <= 0 or B % s.micro:
                problems.append(f"PPO minibatch {s.micro} must divide train.batch_size={B}")
            info.append(f"rollout batch {B} prompts x {P}+{N} tokens; update minibatch {s.micro} rows "
                        f"(ppo.num_minibatches={B // max(s.micro, 1)})")
            add_state(pol, "policy")
            add_state(self.models["reference"], "reference", opt=False)
            add_state(self.models["reward"], "reward", opt=False)
            add_state(self.models["value"], "value")
            b_roll = rows_per_device(B, "rollout batch", "train.batch_size", report=False)
            kv_total, kv_dev = kv_cache_bytes(pcfg, B, S, m)
            a = np.dtype(pcfg.dtype).itemsize
            lines.append(Line("KV cache (sampler)", kv_dev, kv_total,
                              f"2*L*B*(P+N)*K*Dh*{a}B = 2*{pcfg.num_hidden_layers}*{B}*{S}*"
                              f"{pcfg.num_key_value_heads}*{pcfg.head_dim}*{a}", "rollout"))
            lb = layer_bytes_per_token(pcfg, tp, S)
            prefill = b_roll * P * (lb["working"] + head_bytes_per_token(pcfg, "hidden", tp, False))
            lines.append(Line("prefill activations", prefill, None, f"{P} prompt tokens x {S} keys",
                              "rollout"))
            scoring = max(activation_bytes(x.config, x.kind, b_roll, S, "none", tp, train=False)
                          for x in self.models.values())
            lines.append(Line("scoring activations", scoring, None,
                              "largest of the 4 forward passes over the rollout batch", "scoring"))
            b_up = rows_per_device(s.micro, "PPO minibatch (train.batch_size / ppo.num_minibatches)",
                                   "ppo.num_minibatches")
            val = self.models["value"]
            grads(pol, "policy", False, "update")
            grads(val, "value", False, "update")
            lines.append(Line("policy activations", activation_bytes(pcfg, "causal_lm", b_up, S,
                                                                     s.remat, tp),
                              None, f"remat {s.remat}, {b_up:g} rows x {S} tokens", "update"))
            vcfg = val.config.replace(remat=s.remat)
            lines.append(Line("value activations", activation_bytes(vcfg, "value", b_up, S, s.remat, tp),
                              None, f"remat {s.remat}, score head", "update"))
        else:
            T = int(c.train.seq_len)
            rpe = self.rows_per_example()
            if s.micro <= 0 or B % s.micro:
                problems.append(f"micro-batch {s.micro} must divide train.batch_size={B}")
            micro_steps = max(B // max(s.micro, 1), 1)
            extra = ""
            if self.command == "rrhf" and not self.c.rrhf.num_responses:
                extra = f" (rrhf.num_responses=0: assuming {RRHF_DEFAULT_RESPONSES} responses)"
            info.append(f"batch {B} examples, micro-batch {s.micro} ({micro_steps} accumulation "
                        f"steps) x {rpe} row(s) each x {T} tokens{extra}")
            add_state(pol, "model")
            if "reference" in self.models:
                add_state(self.models["reference"], "reference", opt=False)
            b = rows_per_device(s.micro, "micro-batch (train.micro_batch_size or train.batch_size)",
                                "train.micro_batch_size") * rpe
            grads(pol, "model", micro_steps > 1, "step")
            act = activation_bytes(pcfg, pol.kind, b, T, s.remat, tp)
            note = f"remat {s.remat}, {b:g} rows x {T} tokens"
            if micro_steps == 2:  # measured: XLA runs both micro-batches side by side
                act *= TWO_MICRO_STEPS_OVERLAP
                note += (" x2: with 2 micro-steps XLA overlaps the peeled first micro-batch and "
                         "the length-1 scan")
            lines.append(Line("activations", act, None, note, "step"))
            if "reference" in self.models:
                ref = activation_bytes(pcfg, "causal_lm", b, T, "none", tp, train=False)
                lines.append(Line("reference forward", ref, None, "forward only", "step"))
        resident = sum(x.per_device for x in lines if x.phase == "resident")
        phases: Dict[str, float] = {}
        for x in lines:
            if x.phase != "resident":
                phases[x.phase] = phases.get(x.phase, 0.0) + x.per_device
        peak = resident + (max(phases.values()) if phases else 0.0)
        return Plan(self.command, self.devices, self.device_memory, self.headroom, s, lines,
                    resident, phases, peak, problems, info)


# ---- search -------------------------------------------------------------------------------------
def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_meshes(devices: int, max_tp: int = 8) -> List[dict]:
    out = []
    for tp in _divisors(devices):
        if tp > max_tp:
            break
        for dp in _divisors(devices // tp):
            out.append({"dp": dp, "fsdp": devices // tp // dp, "tp": tp})
    return out


def _cost(s: Setting, cur: Setting) -> tuple:
    changed = (s.mesh != cur.mesh) + (s.micro != cur.micro) + (s.remat != cur.remat)
    # fewer changes first; then less recomputation, bigger micro-batches, less tensor parallelism,
    # fewer replicas (dp) than fsdp
    return (changed, REMAT_COST[s.remat], -s.micro, s.mesh["tp"], s.mesh["dp"])


def suggest(planner: Planner, limit: int = 3) -> List[Plan]:
    """Settings of (mesh, micro-batch, remat) on the same devices that fit, best first: fewest
    changed knobs, then the cheapest (least recomputation, biggest micro-batch, least tp)."""
    cur = planner.current()
    B = int(planner.c.train.batch_size)
    micros = [d for d in _divisors(B)]
    fits = []
    for mesh, micro, remat in itertools.product(candidate_meshes(planner.devices), micros,
                                                SEARCH_REMAT):
        s = Setting(mesh, micro, remat)
        if s == cur:
            continue
        p = planner.estimate(s)
        if p.fits:
            fits.append((_cost(s, cur), p))
    fits.sort(key=lambda x: x[0])
    out, seen = [], set()
    for _, p in fits:  # one suggestion per set of changed knobs
        key = (p.setting.mesh != cur.mesh, p.setting.micro != cur.micro, p.setting.remat != cur.remat)
        if key in seen:
            continue
        seen.add(key)
        out.append(p)
        if len(out) >= limit:
            break
    return out


def min_devices(c, models, device_memory: float, headroom: float, start: int,
                cap: int = 1 << 16) -> Optional[Tuple[int, Plan]]:
    """The smallest power-of-two multiple of `start` devices on which some setting fits."""
    n = start * 2
    while n <= cap:
        pl = Planner(c, models, n, device_memory, headroom)
        cur = pl.current()
        best = None
        for mesh in candidate_meshes(n):
            for remat in SEARCH_REMAT:
                for micro in _divisors(int(c.train.batch_size)):
                    p = pl.estimate(Setting(mesh, micro, remat))
                    if p.fits and (best is None or _cost(p.setting, cur) < _cost(best.setting, cur)):
                        best = p
        if best is not None:
            return n, best
        n *= 2
    return None


def setting_flags(plan: Plan, cur: Setting, command: str, batch_size: int) -> str:
    s = plan.setting
    out = []
    if s.mesh != cur.mesh:
        out.append(f"--config.mesh={s.mesh_spec()}")
    if s.micro != cur.micro:
        if command == "ppo":
            out.append(f"--config.ppo.num_minibatches={batch_size // s.micro}")
        else:
            out.append(f"--config.train.micro_batch_size={s.micro}")
    if s.remat != cur.remat:
        out.append(f"--config.model.remat={s.remat}")
    return " ".join(out) or "(as configured)"


# ---- compiled memory analysis ---------------------------------------------------------------
def _abstract_batch(c, command: str, rows: int):
    """ShapeDtypeStructs of one global batch as the trainers' iterators produce it."""
    S = jax.ShapeDtypeStruct
    i32, f32 = np.int32, np.float32
    T = int(c.train.seq_len)
    if command == "sft":
        keys = ["input_ids", "attention_mask", "loss_mask"] + (
            ["positions", "segment_ids"] if c.data.packing else [])
        return {k: S((rows, T), i32) for k in keys}
    if command in ("rm", "dpo"):
        b = {f"{side}_{k}": S((rows, T), i32) for side in ("chosen", "rejected")
             for k in ("input_ids", "attention_mask", "loss_mask")}
        if command == "rm" and c.rm.use_margin:
            b["margin"] = S((rows,), f32)
        if command == "dpo" and c.dpo.precompute_ref and not c.dpo.reference_free:
            b.update(ref_chosen_logps=S((rows,), f32), ref_rejected_logps=S((rows,), f32))
        return b
    if command == "rrhf":
        n = int(c.rrhf.num_responses) or RRHF_DEFAULT_RESPONSES
        b = {k: S((rows, n, T), i32) for k in ("input_ids", "attention_mask", "loss_mask")}
        b.update(valid=S((rows, n), i32), scores=S((rows, n), f32))
        return b
    raise ValueError(f"--compile: no abstract batch for command {command!r}")


def _loss_and_denom(c, command: str, cfg):
    import importlib
    mod = importlib.import_module(f"easyrl.algorithms.{command}")
    if command == "sft":
        return mod.make_loss(cfg), mod.denom
    if command == "rm":
        return mod.make_loss(cfg, c.rm.use_margin), mod.denom
    if command == "dpo":
        from easyrl.algorithms import rm
        return mod.make_loss(cfg, c.dpo), rm.denom
    if command == "rrhf":
        return mod.make_loss(cfg, c.rrhf), mod.denom
    raise ValueError(command)


def compiled_memory(planner: Planner, s: Setting) -> dict:
    """Lower and compile the real train step (or PPO update) with abstract inputs and return
    XLA's memory analysis (bytes per device). On this machine's devices when `--devices` of them
    exist (sharded as the trainer shards), else on one device with the per-device micro-batch
    (parameters then count whole)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from easyrl import parallel
    from easyrl.train.optim import make_optimizer
    c, command = planner.c, planner.command
    local = jax.device_count()
    dpf = s.mesh["dp"] * s.mesh["fsdp"]
    if planner.devices <= local:
        mesh = parallel.create_mesh(s.mesh_spec(), devices=jax.devices()[:planner.devices])
        scale, where = 1, f"{planner.devices} local device(s), mesh {s.mesh_spec()}"
    else:
        mesh = parallel.create_mesh("dp:1,fsdp:1,tp:1", devices=jax.devices()[:1])
        scale, where = dpf, ("1 device with the per-device micro-batch (parameters, optimizer "
                             "state and gradients unsharded)")
    repl = NamedSharding(mesh, P())
    shard = lambda t: parallel.named_shardings(t, mesh)  # noqa: E731
    pol = planner.models["policy"]
    pcfg = pol.config.replace(remat=s.remat)
    abstract = lambda t, sh: jax.tree.map(  # noqa: E731
        lambda x, y: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=y), t, sh)
    # no mesh context: as the trainers (loop.run / ppo_loop.run) compile
    if command == "ppo":
        from easyrl.algorithms.ppo import PPOState, make_update
        p = c.ppo
        val = planner.models["value"]
        vcfg = val.config.replace(remat=s.remat)
        ptx, _ = make_optimizer(c.optim, _total_steps(c))
        vtx, _ = make_optimizer(c.value_optim, _total_steps(c))
        state = PPOState(step=jax.ShapeDtypeStruct((), np.int32), policy=pol.params,
                         value=val.params, policy_opt=pol.opt_state, value_opt=val.opt_state)
        sh = PPOState(step=repl, policy=shard(pol.params), value=shard(val.params),
                      policy_opt=shard(pol.opt_state), value_opt=shard(val.opt_state))
        B = max(int(c.train.batch_size) // scale, 1)
        Sq, N = int(p.max_prompt_len) + int(p.max_new_tokens), int(p.max_new_tokens)
        nm = max(int(c.train.batch_size) // s.micro, 1)
        f32, i32 = np.float32, np.int32
        roll = {"tokens": (Sq, i32), "attn": (Sq, i32), "resp_mask": (N, i32),
                "logprobs": (N, f32), "values": (N, f32), "advantages": (N, f32),
                "returns": (N, f32)}
        roll = {k: jax.ShapeDtypeStruct((B, n), d) for k, (n, d) in roll.items()}
        roll_sh = {k: parallel.batch_sharding(mesh, 2) for k in roll}
        fn = make_update(pcfg, vcfg, ptx, vtx, prompt_len=int(p.max_prompt_len),
                         temperature=float(p.temperature), ppo_epochs=1,
                         num_minibatches=nm, cliprange=p.cliprange,
                         cliprange_value=p.cliprange_value, vf_coef=p.vf_coef)
        jitted = jax.jit(fn, in_shardings=(sh, roll_sh, repl), out_shardings=(sh, repl),
                         donate_argnums=(0,))
        args = (abstract(state, sh), roll, jax.ShapeDtypeStruct((2,), np.uint32))
        what = "PPO update (1 epoch)"
    else:
        from easyrl.train.step import TrainState, make_train_step
        tx, schedule = make_optimizer(c.optim, _total_steps(c))
        loss_fn, denom_fn = _loss_and_denom(c, command, pcfg)
        B = int(c.train.batch_size)
        micro_steps = max(B // s.micro, 1)
        rows = max(B // scale, 1)
        if scale > 1:  # per-device equivalent: the per-device share of the global batch
            micro_steps = max(min(micro_steps, rows), 1)
        batch = _abstract_batch(c, command, rows)
        frozen = planner.models["reference"].params if "reference" in planner.models else None
        z = jax.ShapeDtypeStruct((), np.int32)
        state = TrainState(step=z, params=pol.params, opt_state=pol.opt_state, nonfinite=z,
                           streak=z, frozen=frozen)
        sh = TrainState(step=repl, params=shard(pol.params), opt_state=shard(pol.opt_state),
                        nonfinite=repl, streak=repl,
                        frozen=None if frozen is None else shard(frozen))
        batch_sh = {k: parallel.batch_sharding(mesh, len(v.shape)) for k, v in batch.items()}
        fn = make_train_step(loss_fn, tx, schedule, denom_fn, micro_steps)
        jitted = jax.jit(fn, in_shardings=(sh, batch_sh, repl), out_shardings=(sh, repl),
                         donate_argnums=(0,))
        args = (abstract(state, sh), batch, jax.ShapeDtypeStruct((2,), np.uint32))
        what = f"train step ({micro_steps} micro-steps)"
    compiled = jitted.lower(*args).compile()
    ma = compiled.memory_analysis()
    if ma is None:
        return dict(what=what, where=where, available=False, unsharded=scale > 1)
    get = lambda k: int(getattr(ma, k, 0) or 0)  # noqa: E731
    out = dict(what=what, where=where, available=True, unsharded=scale > 1,
               argument=get("argument_size_in_bytes"), output=get("output_size_in_bytes"),
               alias=get("alias_size_in_bytes"), temp=get("temp_size_in_bytes"),
               code=get("generated_code_size_in_bytes"))
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


# ---- report ---------------------------------------------------------------------------------------
def _g(x: Optional[float], unit: float = GiB) -> str:
    return "" if x is None else f"{x / unit:10.3f}"


PHASE_TITLES = {"rollout": "rollout (sampler)", "scoring": "scoring pass",
                "update": "PPO update (one minibatch)", "step": "train step (one micro-batch)"}


def format_plan(plan: Plan, models: Dict[str, ModelInfo], config_spec: str) -> str:
    s = plan.setting
    out = [f"easyrl plan: {plan.command} {config_spec}",
           f"devices: {plan.devices} x {plan.device_memory / GiB:.1f} GiB, mesh {s.mesh_spec()} "
           f"(dp*fsdp={s.mesh['dp'] * s.mesh['fsdp']} batch shards, fsdp*tp="
           f"{s.mesh['fsdp'] * s.mesh['tp']} weight shards)"]
    out.append("models:")
    for role, mi in models.items():
        cfg = mi.config
        out.append(f"  {role:9s} {count(mi.num_params):>7s} params  L={cfg.num_hidden_layers} "
                   f"D={cfg.hidden_size} F={cfg.intermediate_size} H={cfg.num_attention_heads} "
                   f"K={cfg.num_key_value_heads} V={cfg.vocab_size}  {mi.kind}  <- {mi.source}")
    pol = models["policy"].config
    out.append(f"dtypes: params {pol.param_dtype}, compute {pol.dtype}; remat {s.remat}")
    out.extend(plan.info)
    out.append("")
    unit, u = (GiB, "GiB") if plan.peak >= GiB else (2 ** 20, "MiB")
    out.append(f"{'per-device memory':44s} {u + '/device':>10s} {u + ' total':>10s}  notes")
    phase = None
    for x in plan.lines:
        if x.phase != phase:
            phase = x.phase
            title = "resident" if phase == "resident" else PHASE_TITLES.get(phase, phase)
            out.append(f"[{title}]")
        out.append(f"  {x.name:42s} {_g(x.per_device, unit)} {_g(x.total, unit):>10s}  {x.note}")
    out.append("")
    out.append(f"  {'resident (params + optimizer states)':42s} {_g(plan.resident, unit)}")
    for ph, v in plan.phases.items():
        out.append(f"  {'+ ' + PHASE_TITLES.get(ph, ph):42s} {_g(v, unit)}")
    out.append(f"  {'peak = resident + largest phase':42s} {_g(plan.peak, unit)}  ({plan.peak_phase})")
    return "\n".join(out)


def human(x: float) -> str:
    return f"{x / GiB:.2f} GiB" if x >= GiB / 10 else f"{x / 2 ** 20:.2f} MiB"


def verdict(plan: Plan) -> str:
    mem = (f"peak {human(plan.peak)} per device vs {plan.limit / GiB:.2f} GiB usable "
           f"({plan.device_memory / GiB:.1f} GiB less {plan.headroom:.0%} headroom)")
    if plan.problems:
        return ("verdict: does NOT fit: this setting cannot run: " + "; ".join(plan.problems)
                + f" [memory estimate: {mem}]")
    if plan.fits:
        return f"verdict: FITS: {mem}"
    return f"verdict: does NOT fit: {mem}"


# ---- CLI ------------------------------------------------------------------------------------------
class _PassThroughParser(argparse.ArgumentParser):
    """Collects `--config.KEY=VALUE` / `--config.KEY VALUE` (ml_collections overrides) into
    `args.config_overrides` instead of rejecting them as unknown options."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        over, rest, i = [], [], 0
        while i < len(args):
            a = args[i]
            if a.startswith("--config."):
                if "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--"):
                    over.extend([a, args[i + 1]])
                    i += 2
                    continue
                over.append(a)
            else:
                rest.append(a)
            i += 1
        ns, extras = super().parse_known_args(rest, namespace)
        ns.config_overrides = over
        return ns, extras


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="per-device memory plan of a training config (no model allocated)",
        description="Per-device memory for parameters, optimizer state, gradients, activations "
                    "(and for PPO the reference / reward / value models and the KV cache) of a "
                    "trainer config on a mesh, and whether it fits. Extra --config.KEY=VALUE "
                    "arguments override the config as for the trainers.")
    p.__class__ = _PassThroughParser
    p.add_argument("--config", required=True, help="configs/X.py:PRESET (any trainer config)")
    p.add_argument("--devices", type=int, default=None,
                   help="number of devices (default: this machine's jax.device_count())")
    p.add_argument("--device-memory", type=float, default=None,
                   help="GiB per device (default: the local device's memory if known, else 16)")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                   help="fraction of device memory kept free (default 0.1)")
    p.add_argument("--model-preset", default=None,
                   help="architecture preset when model.path is not available locally")
    p.add_argument("--reward-preset", default=None,
                   help="PPO: preset of the reward / value models when their paths are not local")
    p.add_argument("--compile", action="store_true",
                   help=f"also compile the train step and print XLA's memory analysis (models "
                        f"under {COMPILE_MAX_PARAMS / 1e9:g}B parameters)")
    p.add_argument("--no-suggest", action="store_true", help="skip the search for a setting that fits")
    p.set_defaults(func=run)


def local_device_memory() -> Optional[float]:
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    return None


def load_config(spec: str, overrides: List[str]):
    """The trainer config from `--config FILE:PRESET` + overrides (errors name the key)."""
    from easyrl.train.config import load_config_file
    from easyrl.train.launch import REPO, parse_config
    path = spec.partition(":")[0]
    if not os.path.isfile(path) and not os.path.isfile(os.path.join(REPO, path)):
        raise FileNotFoundError(f"--config: config file {path!r} not found")
    try:
        command = load_config_file(spec).get("command", "sft")
    except (TypeError, AttributeError) as e:  # a broken preset: name it, no deep traceback
        raise ValueError(f"config file {spec}: get_config failed: {type(e).__name__}: {e}") from e
    return parse_config(command, ["--config", spec, *overrides])


def make_plan(c, devices: int, device_memory_gib: float, *, headroom: float = DEFAULT_HEADROOM,
              model_preset: Optional[str] = None, reward_preset: Optional[str] = None):
    """(Planner, Plan of the setting as configured). The library entry point."""
    from easyrl.model.config import REMAT_POLICIES
    if c.model.remat not in REMAT_POLICIES:
        raise ValueError(f"config model.remat: {c.model.remat!r}, expected one of {REMAT_POLICIES}")
    if devices < 1:
        raise ValueError(f"--devices must be >= 1, got {devices}")
    if device_memory_gib <= 0:
        raise ValueError(f"--device-memory must be positive (GiB), got {device_memory_gib}")
    models = build_models(c, model_preset, reward_preset)
    planner = Planner(c, models, devices, device_memory_gib * GiB, headroom)
    return planner, planner.estimate(planner.current())


def run(args: argparse.Namespace) -> None:
    c = load_config(args.config, args.config_overrides)
    devices = args.devices or jax.device_count()
    mem = args.device_memory
    mem_note = ""
    if mem is None:
        local = local_device_memory()
        mem = local / GiB if local else DEFAULT_DEVICE_MEMORY_GIB
        mem_note = " (local device)" if local else " (default; pass --device-memory)"
    planner, plan = make_plan(c, devices, mem, headroom=args.headroom,
                              model_preset=args.model_preset, reward_preset=args.reward_preset)
    print(format_plan(plan, planner.models, args.config) + ("" if not mem_note else
                                                             f"\n  device memory {mem:.1f} GiB{mem_note}"))
    print(verdict(plan))
    if not plan.fits and not args.no_suggest:
        cur = planner.current()
        sugg = suggest(planner)
        B = int(c.train.batch_size)
        if sugg:
            print(f"settings that fit on {devices} devices (peak per device; best first):")
            for p in sugg:
                print(f"  {setting_flags(p, cur, plan.command, B):70s} peak {human(p.peak)}")
        else:
            found = min_devices(c, planner.models, planner.device_memory, args.headroom, devices)
            if found:
                n, p = found
                flags = setting_flags(p, dataclasses.replace(cur, mesh={}), plan.command, B)
                print(f"no mesh / micro-batch / remat setting fits on {devices} devices; the "
                      f"smallest power-of-two multiple that fits: --devices {n} {flags} "
                      f"(peak {human(p.peak)})")
            else:
                print(f"nothing fits on up to 65536 devices of {mem:.1f} GiB")
            print("  other levers: model.param_dtype=bfloat16 halves parameters, gradients and "
                  "optimizer state (numerics change)")
    if args.compile:
        n = planner.models["policy"].num_params
        if n >= COMPILE_MAX_PARAMS:
            print(f"--compile: skipped ({n / 1e9:.1f}B parameters; compiling needs < "
                  f"{COMPILE_MAX_PARAMS / 1e9:g}B on this machine)")
        else:
            r = compiled_memory(planner, plan.setting)
            if not r["available"]:
                print(f"compiled {r['what']}: memory analysis not available on this backend")
            else:
                phase = "update" if plan.command == "ppo" else "step"
                whole = lambda x: x.total if r["unsharded"] and x.total is not None else x.per_device  # noqa: E731
                est = sum(whole(x) for x in plan.lines if x.phase == phase)
                args_est = sum(whole(x) for x in plan.lines if x.phase == "resident" and not (
                    plan.command == "ppo" and x.name.startswith(("reference", "reward"))))
                print(f"compiled {r['what']} on {r['where']}:")
                print(f"  XLA memory analysis: arguments {r['argument'] / GiB:.3f} GiB, outputs "
                      f"{r['output'] / GiB:.3f} GiB, aliased {r['alias'] / GiB:.3f} GiB, temporaries "
                      f"{r['temp'] / GiB:.3f} GiB, code {r['code'] / 2**20:.1f} MiB; peak "
                      f"{r['peak'] / GiB:.3f} GiB")
                print(f"  estimate (same inputs): arguments {args_est / GiB:.3f} GiB, temporaries "
                      f"(gradients + activations) {est / GiB:.3f} GiB, peak "
                      f"{(args_est + est) / GiB:.3f} GiB")
