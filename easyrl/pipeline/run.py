"""`python -m easyrl pipeline`: SFT -> reward model -> PPO, GRPO, online DPO, DPO, KTO, ORPO, CPO,
SimPO and RRHF from the SFT model ->
HF exports with model cards -> held-out evaluation -> report.md. See configs/pipeline.py."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from typing import Optional

import jax
import ml_collections as mlc

from easyrl import checkpoint, parallel
from easyrl.algorithms import registry
from easyrl.algorithms.registry import Algorithm
from easyrl.train.run import config_diff, normalize, say, total_steps

STAGES = ("sft", "rm", "ppo", "grpo", "online_dpo", "dpo", "kto", "orpo", "cpo", "simpo", "rrhf")
POLICIES = tuple(s for s in STAGES if s != "rm")
TITLES = {
    "sft": "supervised fine-tuning",
    "rm": "reward model from the SFT model",
    "ppo": "PPO from the SFT policy against the reward model",
    "grpo": "GRPO from the SFT policy with the task's rule-based reward",
    "online_dpo": "online DPO from the SFT policy, pairs of its own samples ranked by the reward",
    "dpo": "DPO from the SFT policy",
    "kto": "KTO from the SFT policy on the preference data, unpaired",
    "orpo": "ORPO from the SFT policy (no reference model)",
    "cpo": "CPO from the SFT policy (no reference model)",
    "simpo": "SimPO from the SFT policy (no reference model)",
    "rrhf": "RRHF from the SFT policy",
}
# stage config keys that may change between runs without invalidating a finished stage
VOLATILE = ("output_dir", "mesh", "distributed", "log", "checkpoint", "eval")
STAGE_FILE = "pipeline_stage.json"  # written into a stage dir when the stage finished
OUTPUTS = ("export", "plots", "eval.json", "report.md", "pipeline_config.json")


# ---- configuration ------------------------------------------------------------------------------
def parse_stages(c) -> list:
    names = [s.strip() for s in str(c.stages).split(",") if s.strip()]
    bad = [s for s in names if s not in STAGES]
    if bad or not names:
        raise ValueError(f"config stages: {c.stages!r}; expected a comma-separated subset of "
                         f"{','.join(STAGES)}")
    missing = [s for s in names if s not in c]
    if missing:
        raise ValueError(f"config stages: {missing[0]!r} has no sub-config in this preset "
                         f"(available: {', '.join(s for s in STAGES if s in c)})")
    return [s for s in STAGES if s in names]


def stage_dir(c, name: str) -> str:
    return os.path.join(c.output_dir, name)


def wired_keys(name: str, stages: list) -> tuple:
    """Stage config keys the pipeline points at its own stage directories."""
    keys = ("model.path",) if name != "sft" and "sft" in stages else ()
    return keys + (("reward.path",) if name == "ppo" and "rm" in stages else ())


def stage_config(c, name: str, stages: list) -> mlc.ConfigDict:
    """The trainer config of stage `name`: its sub-config with the pipeline's wiring applied."""
    s = mlc.ConfigDict(c[name].to_dict())
    s.output_dir = stage_dir(c, name)
    s.seed = c.seed
    s.mesh = c.mesh
    wired = wired_keys(name, stages)
    if "model.path" in wired:
        s.model.path = stage_dir(c, "sft")
    if "reward.path" in wired:
        s.reward.path = stage_dir(c, "rm")
    if name != "sft" and not s.model.path and name in ("rm", "ppo", "grpo", "online_dpo"):
        raise ValueError(f"config {name}.model.path: stage {name} needs a starting model; add "
                         f"sft to stages or set {name}.model.path")
    return s


def stage_status(name: str, s, wired=()) -> tuple:
    """('new' | 'partial' | 'done', latest step). Raises if the run dir holds a different config."""
    d = s.output_dir
    step = checkpoint.latest_step(d) if os.path.isdir(d) else None
    if step is None:
        return "new", None
    cfg_path = os.path.join(d, checkpoint.CONFIG_FILE)
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            stored = json.load(f).get("run_config", {})
        from easyrl.train.config import base_config
        defaults = normalize(base_config(s.command).to_dict())
        diff = config_diff(normalize(stored), normalize(s.to_dict()),
                           ignore=VOLATILE + tuple(wired), defaults=defaults)
        if diff:
            raise ValueError(
                f"stage {name}: {d} was trained with a different config ({'; '.join(diff[:4])}"
                f"{'; ...' if len(diff) > 4 else ''}); re-run with --config.redo={name} to "
                f"retrain it (and the stages built on it), --config.force=True to redo "
                f"everything, or choose another --config.output_dir")
    steps = total_steps(s)
    marker = _read_json(os.path.join(d, STAGE_FILE))
    done = step == steps if steps is not None else bool(marker and marker.get("step") == step)
    return ("done" if done else "partial"), step


def fingerprint(run_dir: Optional[str]) -> Optional[str]:
    """'<latest step>@<its checkpoint's mtime>': changes whenever the stage is retrained."""
    if not run_dir:
        return None
    step = checkpoint.latest_step(run_dir)
    if step is None:
        return None
    t = os.path.getmtime(os.path.join(run_dir, checkpoint.CKPT_SUBDIR, str(step)))
    return f"{step}@{t:.3f}"


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    if jax.process_index() != 0:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _sync(tag: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(tag)


@contextlib.contextmanager
def _distributed_once():
    """Every trainer calls parallel.initialize_distributed, which may run only once per process:
    after the pipeline did it, make the trainers' calls no-ops."""
    if jax.process_count() == 1:
        yield
        return
    orig = parallel.initialize_distributed
    parallel.initialize_distributed = lambda *a, **k: None
    try:
        yield
    finally:
        parallel.initialize_distributed = orig


DEPENDS = dict({s: ("sft",) for s in STAGES if s != "sft"}, ppo=("sft", "rm"))


def redo_set(c, stages) -> list:
    """Stages named in `redo` plus every stage built on them."""
    names = [s.strip() for s in str(c.redo).split(",") if s.strip()]
    bad = [s for s in names if s not in STAGES]
    if bad:
        raise ValueError(f"config redo: {bad[0]!r} is not a stage ({','.join(STAGES)})")
    out = set(names)
    for s in STAGES:  # in order, so dependencies of dependencies are covered
        if any(d in out and d in stages for d in DEPENDS.get(s, ())):
            out.add(s)
    return [s for s in STAGES if s in out]


def clean(c, names) -> None:
    """Delete pipeline outputs `names` under output_dir (never output_dir itself)."""
    if jax.process_index() == 0:
        for name in names:
            p = os.path.join(c.output_dir, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    _sync("easyrl-pipeline-clean")


# ---- the pipeline -------------------------------------------------------------------------------
def train_stage(i: int, n: int, name: str, s, wired=()) -> dict:
    """Run (or reuse, or resume) one stage; returns its info dict. `wired`: config keys the
    pipeline set to its own stage dirs (not compared with the stored config: the output
    directory may have moved)."""
    status, step = stage_status(name, s, wired)
    steps = total_steps(s)
    of = f" of {steps}" if steps else ""
    if status == "done":
        say(f"[pipeline {i}/{n}] {name}: reusing {name} from {s.output_dir} (step {step}{of})")
        marker = _read_json(os.path.join(s.output_dir, STAGE_FILE)) or {}
        return {"status": "reused", "step": step, "seconds": marker.get("seconds")}
    verb = f"resuming at step {step}{of}" if status == "partial" else f"{steps or 'all'} steps"
    say(f"\n[pipeline {i}/{n}] {name}: {TITLES[name]} ({verb}) -> {s.output_dir}")
    t0 = time.time()
    with _distributed_once():
        result = registry.get(name).train(s)
    dt = time.time() - t0
    final = int(result.final_step)
    prev = (_read_json(os.path.join(s.output_dir, STAGE_FILE)) or {}).get("seconds") or 0.0
    seconds = dt + (prev if status == "partial" else 0.0)
    _write_json(os.path.join(s.output_dir, STAGE_FILE), {"step": final, "seconds": seconds})
    say(f"[pipeline {i}/{n}] {name}: done in {dt:.0f}s")
    return {"status": "resumed" if status == "partial" else "trained", "step": final,
            "seconds": seconds}


def read_rows(run_dir: str) -> list:
    from easyrl.train.metrics import read_metrics
    try:
        return read_metrics(run_dir)
    except FileNotFoundError:
        return []


def eval_template(c, stages, key: str = "template"):
    """The evaluation's data.template (or data.template_kwargs): PPO's, else SFT's."""
    for name in ("ppo", "sft"):
        if name in c:
            return c[name].data.get(key, "")
    return "plain" if key == "template" else ""


def evaluation(c, stages, info) -> Optional[dict]:
    """eval.json: reuse the numbers of policies whose checkpoints and eval settings are unchanged."""
    policies = {n: stage_dir(c, n) for n in POLICIES if n in stages}
    if not c.eval.prompts or not policies:
        return None
    sft = stage_dir(c, "sft") if "sft" in stages else c.ppo.model.path if "ppo" in c else ""
    if not sft or not checkpoint.is_checkpoint(sft):
        say("[pipeline] eval: skipped (no SFT run directory to measure KL against)")
        return None
    rm = stage_dir(c, "rm") if "rm" in stages else (c.ppo.reward.path if "ppo" in c else "")
    rm = rm if rm and checkpoint.is_checkpoint(rm) else None
    settings = dict(normalize(c.eval.to_dict()), seed=c.seed, sft=fingerprint(sft),
                    rm=fingerprint(rm))
    path = os.path.join(c.output_dir, "eval.json")
    old = _read_json(path) or {}
    keep = {}
    if old.get("settings") == settings:
        keep = {n: r for n, r in old.get("results", {}).items()
                if n in policies and r.get("checkpoint") == fingerprint(policies[n])}
    todo = [n for n in policies if n not in keep]
    if todo:
        say(f"\n[pipeline] eval: {', '.join(todo)} on {c.eval.num_prompts} held-out prompts"
            + (f" (reusing {', '.join(keep)})" if keep else ""))
        from easyrl.pipeline.evaluate import evaluate
        t0 = time.time()
        with _distributed_once():
            new = evaluate({n: policies[n] for n in todo}, sft_dir=sft, rm_dir=rm, ec=c.eval,
                           template=eval_template(c, stages), mesh_spec=c.mesh, seed=c.seed, log=say,
                           template_kwargs=eval_template(c, stages, "template_kwargs"))
        say(f"[pipeline] eval: done in {time.time() - t0:.0f}s")
    else:
        say(f"[pipeline] eval: reusing {path}")
        new = {}
    for n in new:
        new[n]["checkpoint"] = fingerprint(policies[n])
    results = {n: (keep.get(n) or new[n]) for n in policies}
    _write_json(path, {"settings": settings, "results": results})
    return {"settings": settings, "results": results}


def exports(c, stages, ev) -> dict:
    """export/<stage>/ HF folders (weights re-written only when the checkpoint changed) + cards."""
    from easyrl.pipeline import export as E
    out_root = os.path.join(c.output_dir, "export")
    state_path = os.path.join(out_root, "exports.json")
    state = _read_json(state_path) or {}
    done = {}
    for name in stages:
        run_dir = stage_dir(c, name)
        out = os.path.join(out_root, name)
        step = checkpoint.latest_step(run_dir)
        fp = fingerprint(run_dir)
        if state.get(name, {}).get("checkpoint") == fp and os.path.exists(os.path.join(out, "config.json")):
            say(f"[pipeline] export {name}: reusing {out}")
        else:
            say(f"[pipeline] export {name}: {out}")  # replaces an older export atomically
            gen = {"max_new_tokens": int(c.eval.max_new_tokens)}
            E.export(name, run_dir, out, mesh=parallel.create_mesh(c.mesh), generation=gen)
            state[name] = {"step": step, "checkpoint": fp, "source": os.path.abspath(run_dir)}
        if jax.process_index() == 0:
            rows = read_rows(run_dir)
            evaluation_ = None
            if ev and name in ev["results"]:
                evaluation_ = {k: v for k, v in ev["results"][name].items() if isinstance(v, float)}
            E.model_card(name, run_dir, out, metrics=rows[-1] if rows else {}, evaluation=evaluation_,
                         pipeline_dir=c.output_dir, template=c[name].data.template,
                         eval_settings=ev["settings"] if ev else None)
        done[name] = out
    os.makedirs(out_root, exist_ok=True)
    _write_json(state_path, state)
    return done


def run(c) -> dict:
    """Run the pipeline for config `c` (configs/pipeline.py). Returns a summary dict."""
    t_start = time.time()
    stages = parse_stages(c)
    if str(c.output_dir).startswith("gs://"):
        raise ValueError("config output_dir: the pipeline writes reports and exports with the "
                         "local filesystem; use a local or shared (NFS / gcsfuse) path")
    first = c[stages[0]].distributed
    parallel.initialize_distributed(first.coordinator or None, first.num_processes or None,
                                    None if first.process_id < 0 else first.process_id)
    configs = {n: stage_config(c, n, stages) for n in stages}  # validates the wiring up front
    if c.force:
        say(f"[pipeline] force=True: deleting previous outputs under {c.output_dir}")
        clean(c, list(STAGES) + list(OUTPUTS))
    elif c.redo:
        redo = redo_set(c, stages)
        say(f"[pipeline] redo: deleting {', '.join(redo)} under {c.output_dir}")
        clean(c, redo)
    if jax.process_index() == 0:
        os.makedirs(c.output_dir, exist_ok=True)
    _write_json(os.path.join(c.output_dir, "pipeline_config.json"), normalize(c.to_dict()))
    say(f"[pipeline] stages {' -> '.join(stages)} in {os.path.abspath(c.output_dir)}")

    info = {}
    for i, name in enumerate(stages, 1):
        info[name] = train_stage(i, len(stages), name, configs[name], wired_keys(name, stages))

    ev = evaluation(c, stages, info)
    exp = exports(c, stages, ev) if c.export else {}
    total = time.time() - t_start
    report = None
    if jax.process_index() == 0:
        from easyrl.pipeline.report import load_pyplot, write_report
        if load_pyplot() is None:
            say("[pipeline] matplotlib is not installed: report.md without plots "
                "(pip install 'easyrl[plots]')")
        write_report(c.output_dir, stages=stages, stage_info=info,
                     metrics={n: read_rows(stage_dir(c, n)) for n in stages},
                     evaluation=ev["results"] if ev else None,
                     eval_settings=ev["settings"] if ev else None, exports=exp,
                     total_seconds=total)
        report = os.path.join(c.output_dir, "report.md")
        say(f"\n[pipeline] finished in {total:.0f}s; report: {report}")
        if ev:
            say(_table(ev["results"]))
    return {"stages": info, "eval": ev["results"] if ev else None, "exports": exp,
            "report": report, "seconds": total}


def _table(results: dict) -> str:
    cols = (("true_reward", "true reward"), ("pass@1", "pass@1"), ("pass@8", "pass@8"),
            ("maj@8", "maj@8"), ("rm_score", "RM score"), ("kl_to_sft", "KL to SFT"),
            ("response_len", "length"))
    cols = [(k, t) for k, t in cols if any(k in r for r in results.values())]
    head = f"{'policy':<8}" + "".join(f"{t:>13}" for _, t in cols)
    rows = [f"{n:<8}" + "".join(f"{r[k]:>13.3f}" if k in r else f"{'-':>13}" for k, _ in cols)
            for n, r in results.items()]
    return "\n".join([head, *rows])


ALGORITHM = Algorithm(
    command="pipeline", loop="recipe", order=90, run=run,
    help="the whole recipe: SFT -> RM -> PPO, GRPO, DPO, RRHF -> HF exports, eval, report.md")
