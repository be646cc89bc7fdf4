"""The plan of one setting (mesh, micro-batch, remat): resident state + the peak phase."""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional

import numpy as np

from easyrl.algorithms.rrhf import PLAN_RESPONSES
from easyrl.plan.memory import (GiB, activation_bytes, count, decode_copy_tree,
                               head_bytes_per_token, head_chunk, kv_cache_bytes,
                               layer_bytes_per_token, per_device_bytes, tree_bytes)
from easyrl.plan.models import ModelInfo, build_models, grpo_reference, live_reference
from easyrl.platform_tuning import Tuning, tuning_for

DEFAULT_HEADROOM = 0.10
ROWS_PER_EXAMPLE = {"sft": 1, "rm": 2, "dpo": 2}  # rrhf: rrhf.num_responses; ppo: 1; grpo: G
RRHF_DEFAULT_RESPONSES = PLAN_RESPONSES  # the algorithm's own assumption (its batch_spec)
# easyrl.train.step.accumulate peels micro-batch 0 off the scan; with 2 micro-steps the scan has
# length 1 and XLA schedules both micro-batches together (compiled temporaries ~ no accumulation).
TWO_MICRO_STEPS_OVERLAP = 2
LORA_REFERENCE = "reference: the policy with its LoRA adapters off (no copy of the weights)"
GRPO_NO_REFERENCE = "reference: none (grpo.beta = 0: no KL term, no reference model held)"
# trainers whose loss fuses the LM head with the cross-entropy in chunks (no [B, T, V] logits):
# `algorithms.sft.make_loss` -> `losses.lm_head_loss_sums`; DPO / RRHF / PPO build full logits
FUSED_HEAD_COMMANDS = ("sft",)


def _trainable_what(info: ModelInfo) -> str:
    return "adapters" + (" + score head" if info.kind != "causal_lm" else "")


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
    micro: int  # examples per micro-batch (PPO: rows per update minibatch; GRPO: completion rows
    # per micro-batch = train.micro_batch_size x grpo.num_generations, or the whole minibatch)
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
    group: int = 1  # completions per prompt (GRPO's grpo.num_generations; else 1)

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
                 headroom: float = DEFAULT_HEADROOM, platform: Optional[str] = None,
                 platform_source: str = ""):
        self.c, self.models, self.devices = c, models, devices
        self.device_memory, self.headroom = device_memory, headroom
        self.platform, self.platform_source = platform, platform_source  # None: unknown target
        # the platform settings the trainer's sampler resolves on that platform (None: unknown)
        self.tuning: Optional[Tuning] = tuning_for(platform) if platform else None
        self.command = c.get("command", "sft")
        self.fused_head = self.command in FUSED_HEAD_COMMANDS
        self.live_reference = live_reference(c)
        self._pd = {}
        self._decode_copy = None  # PPO / GRPO, unrolled decode: decoder layers in the compute dtype
        # GRPO: completions per prompt; train.batch_size counts prompts
        self.group = int(c.grpo.num_generations) if self.command == "grpo" else 1

    # the knobs as configured
    def current(self) -> Setting:
        from easyrl import parallel
        mesh = parallel.parse_mesh_spec(self.c.mesh, self.devices)
        if self.command == "ppo":
            micro = self.c.train.batch_size // max(self.c.ppo.num_minibatches, 1)
        elif self.command == "grpo":
            mbs = int(self.c.train.micro_batch_size)
            micro = mbs * self.group if mbs else self.grpo_minibatch_rows()
        else:
            micro = self.c.train.micro_batch_size or self.c.train.batch_size
        return Setting(mesh, micro, self.c.model.remat)

    def grpo_minibatch_rows(self) -> int:
        """GRPO: completion rows per optimizer step, train.batch_size x G / grpo.num_minibatches."""
        return int(self.c.train.batch_size) * self.group // max(int(self.c.grpo.num_minibatches), 1)

    def micro_candidates(self) -> List[int]:
        """The values of Setting.micro the search tries: divisors of train.batch_size (PPO:
        minibatch rows; supervised: examples per micro-batch); GRPO: micro-batches of whole
        groups (train.micro_batch_size x G rows) dividing the minibatch, and the minibatch
        itself (train.micro_batch_size 0). grpo.num_minibatches is kept: it sets the number of
        optimizer steps per iteration (the algorithm), not only memory."""
        B = int(self.c.train.batch_size)
        if self.command != "grpo":
            return [d for d in range(1, B + 1) if B % d == 0]
        mb, G = self.grpo_minibatch_rows(), self.group
        return sorted({r for r in range(G, mb + 1, G) if mb % r == 0} | ({mb} if mb > 0 else set()))

    def _per_device(self, tree, mesh: dict) -> int:
        key = (id(tree), tuple(sorted(mesh.items())))
        if key not in self._pd:
            self._pd[key] = per_device_bytes(tree, mesh)
        return self._pd[key]

    def decode_note(self) -> str:
        """The report's line on the sampler's weight copy: counted or not, and why."""
        if self.tuning is None:
            return ("sampler decode: target platform unknown (pass --platform): the trainer's "
                    "decode='auto' runs the scanned layer stack off CPU, so the unrolled loop's "
                    "copy of the decoder weights is NOT counted (--platform cpu counts it)")
        where = self.platform + (f" ({self.platform_source})" if self.platform_source else "")
        if self.tuning.decode == "unrolled":
            return (f"sampler decode: 'auto' -> 'unrolled' on {where}: the decoder-layer weights "
                    f"are sliced per layer, a second copy in the compute dtype, counted in the "
                    f"rollout phase")
        return (f"sampler decode: 'auto' -> 'scan' on {where}: no second copy of the weights "
                f"(not counted)")

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
            note = f"{count(info_.num_params)} x {dt}"
            if info_.lora:
                n_train = info_.num_trainable
                note = (f"{count(info_.num_params - n_train)} frozen x "
                        f"{np.dtype(info_.base_dtype or dt).name} + {count(n_train)} trainable "
                        f"x {dt} ({_trainable_what(info_)})")
            lines.append(Line(f"{label} parameters", self._per_device(p, m), tree_bytes(p), note))
            if opt and info_.opt_state is not None:
                o = info_.opt_state
                lines.append(Line(f"{label} optimizer state", self._per_device(o, m), tree_bytes(o),
                                  "AdamW mu + nu of the trainable leaves (param dtype)"
                                  if info_.lora else "AdamW mu + nu (param dtype)"))

        def grads(info_: ModelInfo, label: str, accumulate: bool, phase: str):
            t = info_.trainable
            g = self._per_device(t, m) * (2 if accumulate else 1)
            note = "x2: accumulator + micro-batch" if accumulate else "param dtype"
            if info_.lora:
                note = f"{_trainable_what(info_)} only; " + note
            lines.append(Line(f"{label} gradients", g, tree_bytes(t) * (2 if accumulate else 1),
                              note, phase))

        pol = self.models["policy"]
        pcfg = pol.config.replace(remat=s.remat)

        def rollout(rows: int, P: int, S: int, b_roll: float, shared: int = 1):
            """The sampler over `rows` sequences: KV cache, prefill, the unrolled decode's copy.
            shared = G > 1: prompts prefilled once (rows / G of them), their cache then copied
            to the G samples (`generate.make_sampler(num_samples=G)`)."""
            kv_total, kv_dev = kv_cache_bytes(pcfg, rows, S, m)
            a = np.dtype(pcfg.dtype).itemsize
            lines.append(Line("KV cache (sampler)", kv_dev, kv_total,
                              f"2*L*B*(P+N)*K*Dh*{a}B = 2*{pcfg.num_hidden_layers}*{rows}*{S}*"
                              f"{pcfg.num_key_value_heads}*{pcfg.head_dim}*{a}", "rollout"))
            if shared > 1:
                lines.append(Line("prefix KV cache (before its copy)", kv_dev / shared,
                                  kv_total / shared, f"{rows // shared} prompts prefilled once, "
                                  f"copied to {shared} samples each", "rollout"))
            lb = layer_bytes_per_token(pcfg, tp, S, train=False)
            prefill = (b_roll / shared) * P * (lb["working"]
                                               + head_bytes_per_token(pcfg, "hidden", tp, False))
            lines.append(Line("prefill activations", prefill, None, f"{P} prompt tokens x {S} keys"
                              + (f", {rows // shared} prompts (shared prefixes)" if shared > 1
                                 else ""), "rollout"))
            info.append(self.decode_note())
            if self.tuning is not None and self.tuning.decode == "unrolled":
                if self._decode_copy is None:
                    self._decode_copy = decode_copy_tree(pol.params, pcfg.dtype)
                lines.append(Line("decoder weights, per-layer copy",
                                  self._per_device(self._decode_copy, m),
                                  tree_bytes(self._decode_copy),
                                  f"unrolled decode: params['layers'] sliced per layer, x {a}B "
                                  f"({np.dtype(pcfg.dtype).name})", "rollout"))

        if self.command == "ppo":
            p = c.ppo
            P, N = int(p.max_prompt_len), int(p.max_new_tokens)
            S = P + N
            if s.micro <= 0 or B % s.micro:
                problems.append(f"PPO minibatch {s.micro} must divide train.batch_size={B}")
            info.append(f"rollout batch {B} prompts x {P}+{N} tokens; update minibatch {s.micro} rows "
                        f"(ppo.num_minibatches={B // max(s.micro, 1)})")
            add_state(pol, "policy")
            if "reference" in self.models:
                add_state(self.models["reference"], "reference", opt=False)
            else:
                info.append(LORA_REFERENCE)
            add_state(self.models["reward"], "reward", opt=False)
            add_state(self.models["value"], "value")
            b_roll = rows_per_device(B, "rollout batch", "train.batch_size", report=False)
            rollout(B, P, S, b_roll)
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
        elif self.command == "grpo":
            self._grpo(c, s, pcfg, lines, problems, info, add_state, grads, rows_per_device, rollout)
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
            elif self.live_reference:
                info.append(LORA_REFERENCE)
            b = rows_per_device(s.micro, "micro-batch (train.micro_batch_size or train.batch_size)",
                                "train.micro_batch_size") * rpe
            grads(pol, "model", micro_steps > 1, "step")
            act = activation_bytes(pcfg, pol.kind, b, T, s.remat, tp, fused_head=self.fused_head)
            note = f"remat {s.remat}, {b:g} rows x {T} tokens"
            if self.fused_head and pol.kind == "causal_lm":
                note += (f", LM head fused with the loss in chunks of {head_chunk(b, T)} "
                         f"positions")
            if micro_steps == 2:  # measured: XLA runs both micro-batches side by side
                act *= TWO_MICRO_STEPS_OVERLAP
                note += (" x2: with 2 micro-steps XLA overlaps the peeled first micro-batch and "
                         "the length-1 scan")
            lines.append(Line("activations", act, None, note, "step"))
            if self.live_reference:
                from easyrl.model import lora
                ref = activation_bytes(lora.disabled(pcfg), "causal_lm", b, T, "none", tp,
                                       train=False)
                lines.append(Line("reference forward", ref, None, "forward only" + (
                    "" if "reference" in self.models else " (adapters off)"), "step"))
        resident = sum(x.per_device for x in lines if x.phase == "resident")
        phases: Dict[str, float] = {}
        for x in lines:
            if x.phase != "resident":
                phases[x.phase] = phases.get(x.phase, 0.0) + x.per_device
        peak = resident + (max(phases.values()) if phases else 0.0)
        return Plan(self.command, self.devices, self.device_memory, self.headroom, s, lines,
                    resident, phases, peak, problems, info, self.group)

    def _grpo(self, c, s: Setting, pcfg, lines, problems, info, add_state, grads, rows_per_device,
              rollout) -> None:
        """GRPO's lines: the policy (+ reference when grpo.beta > 0, + a reward model when
        reward.path is set; no value model); rollout of train.batch_size x G rows; the reward
        model's forward over the whole rollout batch; the scoring pass and the update on one
        micro-batch of s.micro rows."""
        from easyrl.model import lora
        g, G, tp = c.grpo, self.group, s.mesh["tp"]
        B = int(c.train.batch_size)
        P, N = int(g.max_prompt_len), int(g.max_new_tokens)
        S, rows, nm = P + N, B * G, int(g.num_minibatches)
        if G < 1:
            problems.append(f"grpo.num_generations={G} must be >= 1")
        if nm <= 0 or rows % nm:
            problems.append(f"grpo.num_minibatches={nm} must divide the rollout batch of "
                            f"train.batch_size x grpo.num_generations = {B} x {G} = {rows} rows")
        mb = self.grpo_minibatch_rows()
        if s.micro <= 0 or mb % s.micro:
            problems.append(f"GRPO micro-batch of {s.micro} rows (train.micro_batch_size x "
                            f"grpo.num_generations) must divide the minibatch of {mb} rows "
                            f"(train.batch_size x grpo.num_generations / grpo.num_minibatches)")
        steps = max(mb // max(s.micro, 1), 1)
        info.append(f"rollout batch {B} prompts x {G} completions = {rows} rows x {P}+{N} tokens; "
                    f"{nm} optimizer step(s) per iteration (grpo.num_minibatches) of {mb} rows, "
                    f"each over {steps} micro-batch(es) of {s.micro} rows")
        pol = self.models["policy"]
        add_state(pol, "policy")
        has_ref = grpo_reference(c)
        if "reference" in self.models:
            add_state(self.models["reference"], "reference", opt=False)
        else:
            info.append(LORA_REFERENCE if has_ref else GRPO_NO_REFERENCE)
        rew = self.models.get("reward")
        if rew is not None:
            add_state(rew, "reward", opt=False)
        sources = ([f"reward.functions {c.reward.functions!r} (on the host)"]
                   if c.reward.functions else []) + (["the reward model (reward.path)"]
                                                     if rew is not None else [])
        info.append("no value model (critic): group-relative advantages; rewards from "
                    + (" + ".join(sources) or "nothing configured"))
        b_roll = rows_per_device(rows, "rollout batch", "train.batch_size", report=False)
        # shared prefixes when the prompt batch splits over the data-parallel devices (rl_loop)
        dp = s.mesh["dp"] * s.mesh["fsdp"]
        rollout(rows, P, S, b_roll, shared=G if G > 1 and B % dp == 0 else 1)
        if rew is not None:
            lines.append(Line("reward model forward", activation_bytes(
                rew.config, "reward", b_roll, S, "none", tp, train=False), None,
                f"{b_roll:g} rows x {S} tokens: the whole rollout batch in one call "
                f"(rl_loop.HostRewards)", "rewards"))
        b = rows_per_device(s.micro, "GRPO micro-batch (train.micro_batch_size x "
                            "grpo.num_generations, or the minibatch)", "train.micro_batch_size")
        passes = {"policy": pcfg}  # old log-probs
        if has_ref:  # LoRA: the base with the adapters off
            passes["reference"] = (self.models["reference"].config if "reference" in self.models
                                   else lora.disabled(pcfg))
        scoring = max(activation_bytes(x, "causal_lm", b, S, "none", tp, train=False)
                      for x in passes.values())
        lines.append(Line("scoring activations", scoring, None,
                          f"largest forward of {' / '.join(passes)} over one micro-batch, "
                          f"{b:g} rows x {S} tokens", "scoring"))
        grads(pol, "policy", steps > 1, "update")
        lines.append(Line("policy activations", activation_bytes(pcfg, "causal_lm", b, S, s.remat,
                                                                 tp),
                          None, f"remat {s.remat}, {b:g} rows x {S} tokens, full logits",
                          "update"))


def make_plan(c, devices: int, device_memory_gib: float, *, headroom: float = DEFAULT_HEADROOM,
              model_preset: Optional[str] = None, reward_preset: Optional[str] = None,
              platform: Optional[str] = None, platform_source: str = ""):
    """(Planner, Plan of the setting as configured). The library entry point. `platform`: the
    target backend ('cpu', 'gpu', 'tpu'; None: unknown), whose `platform_tuning.tuning_for`
    decides the sampler's decode loop (PPO: the unrolled loop's weight copy is counted on 'cpu'
    only)."""
    from easyrl.model.config import REMAT_POLICIES
    if c.model.remat not in REMAT_POLICIES:
        raise ValueError(f"config model.remat: {c.model.remat!r}, expected one of {REMAT_POLICIES}")
    if devices < 1:
        raise ValueError(f"--devices must be >= 1, got {devices}")
    if device_memory_gib <= 0:
        raise ValueError(f"--device-memory must be positive (GiB), got {device_memory_gib}")
    models = build_models(c, model_preset, reward_preset)
    planner = Planner(c, models, devices, device_memory_gib * GiB, headroom, platform,
                      platform_source)
    return planner, planner.estimate(planner.current())

