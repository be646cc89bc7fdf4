"""The plan of one setting (mesh, micro-batch, remat): resident state + the peak phase."""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional

import jax
import numpy as np

from easyrl.algorithms.rrhf import PLAN_RESPONSES
from easyrl.plan.memory import (GiB, activation_bytes, count, decode_copy_tree,
                               engine_copy_tree, engine_merge_tree, engine_prefix_rows,
                               head_bytes_per_token, head_chunk, kv_cache_bytes,
                               layer_bytes_per_token, per_device_bytes, tree_bytes)
from easyrl.plan.models import ModelInfo, build_models, grpo_reference, live_reference
from easyrl.platform_tuning import Tuning, tuning_for

DEFAULT_HEADROOM = 0.10
# rrhf: rrhf.num_responses; ppo: 1; grpo: G; kto: the example and its KL row
ROWS_PER_EXAMPLE = {"sft": 1, "rm": 2, "dpo": 2, "kto": 2, "orpo": 2, "cpo": 2, "simpo": 2}
RRHF_DEFAULT_RESPONSES = PLAN_RESPONSES  # the algorithm's own assumption (its batch_spec)
# easyrl.train.step.accumulate peels micro-batch 0 off the scan; with 2 micro-steps the scan has
# length 1 and XLA schedules both micro-batches together (compiled temporaries ~ no accumulation).
TWO_MICRO_STEPS_OVERLAP = 2
GROUP_COMMANDS = ("grpo", "online_dpo")  # online RL with G samples per prompt, no critic
LORA_REFERENCE = "reference: the policy with its LoRA adapters off (no copy of the weights)"
GRPO_NO_REFERENCE = "reference: none (grpo.beta = 0: no KL term, no reference model held)"
ROLLOUT_ENGINES = ("static", "continuous")  # rollout.engine (easyrl.train.rl_loop.ENGINES)
# trainers whose loss fuses the LM head with the cross-entropy in chunks (no [B, T, V] logits):
# `algorithms.sft.make_loss` -> `losses.lm_head_loss_sums`; DPO / RRHF / PPO build full logits
FUSED_HEAD_COMMANDS = ("sft",)


def _trainable_what(info: ModelInfo) -> str:
    return "adapters" + (" + score head" if info.kind != "causal_lm" else "")




from easyrl.plan.records import Line, Plan, Setting  # noqa: F401  (re-exported)


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
        # GRPO / online DPO: G completions per prompt (train.batch_size counts prompts);
        # update_rows: rows per prompt in the update (GRPO: all G; online DPO: the pair)
        sec = c.get(self.command) if self.command in GROUP_COMMANDS else None
        self.group = int(sec.num_generations) if sec is not None else 1
        self.update_rows = 2 if self.command == "online_dpo" else self.group
        # PPO / GRPO / online DPO: the rollout engine (rollout.engine, rollout.slots: 0 = 1/row)
        ro = (c.get("rollout") or {}) if self.command in ("ppo",) + GROUP_COMMANDS else {}
        self.engine = str(ro.get("engine", "static"))
        self.slots = int(ro.get("slots", 0))
        self._engines = {}  # (slots, P, N) -> easyrl.engine.Engine (its sizes; nothing allocated)
        self._engine_copy = None  # continuous engine: the per-layer copy (leaves' own dtypes)
        self._engine_merge = None  # continuous engine + LoRA: the merged target kernels

    def with_rollout(self, engine: str, slots: int) -> "Planner":
        """The same planner (models, caches) with rollout.engine / rollout.slots replaced."""
        other = copy.copy(self)
        other.engine, other.slots = str(engine), int(slots)
        return other

    def rollout_rows(self) -> int:
        """PPO / GRPO: rows of one rollout, train.batch_size x G (PPO: G = 1)."""
        return int(self.c.train.batch_size) * self.group

    def engine_slots(self) -> int:
        """The continuous engine's decode slots as rl_loop.run sizes it: rollout.slots, or 0 =
        one per rollout row (train.batch_size x G)."""
        return self.slots or self.rollout_rows()

    def rollout_engine(self, P: int, N: int):
        """The `easyrl.engine.Engine` rl_loop.run builds (its defaults for block / chunk /
        prefill_batch, which the trainer does not set): only its sizes are read (nothing is
        allocated or compiled)."""
        key = (self.engine_slots(), P, N)
        if key not in self._engines:
            from easyrl.engine import Engine
            self._engines[key] = Engine(self.models["policy"].config, slots=key[0],
                                        max_prompt_len=P, max_new_tokens=N, eos_token_id=())
        return self._engines[key]

    # the knobs as configured
    def current(self) -> Setting:
        from easyrl import parallel
        mesh = parallel.parse_mesh_spec(self.c.mesh, self.devices)
        if self.command == "ppo":
            micro = self.c.train.batch_size // max(self.c.ppo.num_minibatches, 1)
        elif self.command in GROUP_COMMANDS:
            mbs = int(self.c.train.micro_batch_size)
            micro = mbs * self.update_rows if mbs else self.grpo_minibatch_rows()
        else:
            micro = self.c.train.micro_batch_size or self.c.train.batch_size
        return Setting(mesh, micro, self.c.model.remat)

    def grpo_minibatch_rows(self) -> int:
        """GRPO: completion rows per optimizer step, train.batch_size x G / grpo.num_minibatches
        (online DPO: x 2, its pairs' rows)."""
        nm = max(int(self.c[self.command].num_minibatches), 1)
        return int(self.c.train.batch_size) * self.update_rows // nm

    def micro_candidates(self) -> List[int]:
        """The values of Setting.micro the search tries: divisors of train.batch_size (PPO:
        minibatch rows; supervised: examples per micro-batch); GRPO: micro-batches of whole
        groups (train.micro_batch_size x G rows) dividing the minibatch, and the minibatch
        itself (train.micro_batch_size 0). grpo.num_minibatches is kept: it sets the number of
        optimizer steps per iteration (the algorithm), not only memory."""
        B = int(self.c.train.batch_size)
        if self.command not in GROUP_COMMANDS:
            return [d for d in range(1, B + 1) if B % d == 0]
        mb, G = self.grpo_minibatch_rows(), self.update_rows
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
                        f"{info_.frozen_label(dt)} + {count(n_train)} trainable "
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

        def rollout(rows: int, P: int, S: int, b_roll: float, shared: int = 1, group: int = 1):
            """The rollout of `rows` sequences (`group` samples per prompt) by rollout.engine:
            the static sampler or the continuous engine."""
            if self.engine not in ROLLOUT_ENGINES:
                problems.append(f"config rollout.engine: {self.engine!r}; valid: "
                                f"{', '.join(ROLLOUT_ENGINES)}")
            if self.engine == "continuous":
                if self.slots < 0:
                    problems.append(f"config rollout.slots: {self.slots} must be >= 0 (0 = one "
                                    f"per rollout row)")
                    return
                engine_rollout(rows, P, S - P, group)
            else:
                static_rollout(rows, P, S, b_roll, shared)

        def static_rollout(rows: int, P: int, S: int, b_roll: float, shared: int = 1):
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

        def engine_rollout(rows: int, P: int, N: int, G: int):
            """The continuous engine (`easyrl.engine`, as rl_loop.run builds it): per-slot KV
            block buffers, the prefix store, one prefill call, the per-layer weight copy."""
            from easyrl.model import lora
            try:
                eng = self.rollout_engine(P, N)
            except ValueError as e:
                problems.append(f"rollout.engine=continuous: {e}")
                return
            L, K, Dh = pcfg.num_hidden_layers, pcfg.num_key_value_heads, pcfg.head_dim
            a = np.dtype(pcfg.dtype).itemsize
            slots, nb, blk, pbatch = eng.slots, eng.nblocks, eng.block, eng.prefill_batch
            kv_total, kv_dev = kv_cache_bytes(pcfg, slots, nb * blk, m)
            how = "rollout.slots=0: one per rollout row" if not self.slots else "rollout.slots"
            lines.append(Line("KV cache (engine slots)", kv_dev, kv_total,
                              f"slots*NB*block*2*L*K*Dh*{a}B = {slots}*{nb}*{blk}*2*{L}*{K}*{Dh}*"
                              f"{a} ({how}; NB = ceil(({P}+{N})/{blk}))", "rollout"))
            prompts = rows // max(G, 1)
            batches = engine_prefix_rows(prompts, G, slots, pbatch)
            pb = eng._prompt_bucket(P)  # the padded prompt length of a full-length prompt
            kdiv = tp if K % tp == 0 else 1
            row_kv = 2.0 * L * K * Dh * pb * a
            row_logits = 4.0 * pcfg.vocab_size  # last-position logits [Bp, V] float32

            def on_device(r: int) -> float:  # a prefill batch: split over dp*fsdp if it divides
                return r / dpf if r % dpf == 0 else float(r)
            wait = -(-slots // max(G, 1))
            if wait >= prompts:
                bound = (f"ceil(slots/G)={wait} >= {prompts} prompts: all are prefilled before "
                         f"the first admission")
            else:
                bound = (f"prefills start only while fewer samples wait than slots are free, so "
                         f"a round prefills at most ceil(slots/G)={wait} prompts, alive with "
                         f"one older batch")
            lines.append(Line(
                "prefix store (engine)", sum(on_device(r) for r in batches) * (row_kv / kdiv
                                                                              + row_logits),
                sum(batches) * (row_kv + row_logits),
                f"prefilled prompts' KV ({pb} keys) + last logits, kept until their {G} "
                f"sample(s) are admitted; bound: {bound}: prefill batches (<= prefill_batch="
                f"{pbatch} rows, padded to powers of two) of {'+'.join(map(str, batches))} rows"
                + ("" if dpf == 1 else f", each whole on every device unless it divides "
                                       f"dp*fsdp={dpf}"), "rollout"))
            rows_call = max(batches)
            ecfg = lora.disabled(pcfg)  # the engine runs the merged model (rank 0)
            lb = layer_bytes_per_token(ecfg, tp, pb, train=False)
            lines.append(Line("prefill activations (engine)", on_device(rows_call) * pb * (
                lb["working"] + head_bytes_per_token(ecfg, "hidden", tp, False)), None,
                f"one prefill call: {rows_call} prompts x {pb} tokens (prefill_batch="
                f"{pbatch})", "rollout"))
            params = pol.params
            if self._engine_copy is None:
                self._engine_copy = engine_copy_tree(params)
            dts = sorted({np.dtype(x.dtype).name for x in jax.tree.leaves(self._engine_copy)})
            lines.append(Line("decoder weights, per-layer copy (engine)",
                              self._per_device(self._engine_copy, m),
                              tree_bytes(self._engine_copy),
                              f"the engine always unrolls: params['layers'] sliced per layer once "
                              f"per run (jit(unstack_layers), in the leaves' own dtype: "
                              f"{'/'.join(dts)})", "rollout"))
            if pol.lora:
                if self._engine_merge is None:
                    self._engine_merge = engine_merge_tree(params)
                lines.append(Line("LoRA merge (engine)", self._per_device(self._engine_merge, m),
                                  tree_bytes(self._engine_merge),
                                  "lora.merge: W + s*A*B of every targeted kernel, a new array "
                                  "(the engine decodes the merged model)", "rollout"))
            if slots > rows:
                info.append(f"note: rollout.slots={slots} > the {rows} rollout rows: "
                            f"{slots - rows} slots are never filled (their KV cache counted)")
            info.append(f"rollout engine: continuous ({slots} slots, {nb} blocks of {blk} keys "
                        f"each, prefill_batch {pbatch}): the decode layers are always unrolled, "
                        f"their per-layer weight copy counted on every platform")

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
            rollout(B, P, S, b_roll, group=1)
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
        elif self.command in GROUP_COMMANDS:
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
        engine = self.engine if self.command in ("ppo",) + GROUP_COMMANDS else "static"
        return Plan(self.command, self.devices, self.device_memory, self.headroom, s, lines,
                    resident, phases, peak, problems, info, self.group, engine,
                    self.engine_slots() if engine == "continuous" else 0)

    def _grpo(self, c, s: Setting, pcfg, lines, problems, info, add_state, grads, rows_per_device,
              rollout) -> None:
        """GRPO's lines: the policy (+ reference when grpo.beta > 0, + a reward model when
        reward.path is set; no value model); rollout of train.batch_size x G rows; the reward
        model's forward over the whole rollout batch; the scoring pass and the update on one
        micro-batch of s.micro rows. Online DPO alike (section online_dpo), with a reference
        always, the scoring pass of the reference only (over G x s.micro / 2 rows: the
        rollout rows of s.micro / 2 prompts) and the update on the pairs (2 rows per prompt)."""
        from easyrl.model import lora
        name, G, tp = self.command, self.group, s.mesh["tp"]
        g, dpo = c[name], name == "online_dpo"
        B = int(c.train.batch_size)
        P, N = int(g.max_prompt_len), int(g.max_new_tokens)
        S, rows, nm = P + N, B * G, int(g.num_minibatches)
        per = "2 (the pair)" if dpo else f"{name}.num_generations"
        if G < 1:
            problems.append(f"{name}.num_generations={G} must be >= 1")
        if nm <= 0 or (B if dpo else rows) % nm:
            problems.append(f"{name}.num_minibatches={nm} must divide the "
                            + (f"{B} prompts (pairs)" if dpo else f"rollout batch of train."
                               f"batch_size x grpo.num_generations = {B} x {G} = {rows} rows"))
        mb = self.grpo_minibatch_rows()
        if s.micro <= 0 or mb % s.micro:
            problems.append(f"{name} micro-batch of {s.micro} rows (train.micro_batch_size x "
                            f"{per}) must divide the minibatch of {mb} rows (train.batch_size x "
                            f"{per} / {name}.num_minibatches)")
        steps = max(mb // max(s.micro, 1), 1)
        info.append(f"rollout batch {B} prompts x {G} completions = {rows} rows x {P}+{N} tokens; "
                    f"{nm} optimizer step(s) per iteration ({name}.num_minibatches) of {mb} rows"
                    + (" (chosen + rejected of each prompt)" if dpo else "")
                    + f", each over {steps} micro-batch(es) of {s.micro} rows")
        pol = self.models["policy"]
        add_state(pol, "policy")
        has_ref = grpo_reference(c)  # online DPO: always
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
        info.append(("no value model: pairs ranked by " if dpo else
                     "no value model (critic): group-relative advantages; rewards from ")
                    + (" + ".join(sources) or "nothing configured"))
        b_roll = rows_per_device(rows, "rollout batch", "train.batch_size", report=False)
        # shared prefixes when the prompt batch splits over the data-parallel devices (rl_loop)
        dp = s.mesh["dp"] * s.mesh["fsdp"]
        rollout(rows, P, S, b_roll, shared=G if G > 1 and B % dp == 0 else 1, group=G)
        if rew is not None:
            lines.append(Line("reward model forward", activation_bytes(
                rew.config, "reward", b_roll, S, "none", tp, train=False), None,
                f"{b_roll:g} rows x {S} tokens: the whole rollout batch in one call "
                f"(rl_loop.HostRewards)", "rewards"))
        b = rows_per_device(s.micro, f"{name} micro-batch (train.micro_batch_size x {per}, or "
                            f"the minibatch)", "train.micro_batch_size")
        # the scoring pass: GRPO's old log-probs (+ reference); online DPO's reference only,
        # chunked by prompts (train.micro_batch_size of them: G rows each)
        passes = {} if dpo else {"policy": pcfg}
        b_score = b * G / 2 if dpo else b
        if has_ref:  # LoRA: the base with the adapters off
            passes["reference"] = (self.models["reference"].config if "reference" in self.models
                                   else lora.disabled(pcfg))
        scoring = max(activation_bytes(x, "causal_lm", b_score, S, "none", tp, train=False)
                      for x in passes.values())
        lines.append(Line("scoring activations", scoring, None,
                          f"largest forward of {' / '.join(passes)} over one micro-batch, "
                          f"{b_score:g} rows x {S} tokens", "scoring"))
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

