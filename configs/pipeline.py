"""The whole RLHF recipe in one command.

    python -m easyrl pipeline [--config configs/pipeline.py:PRESET] [--config.output_dir=DIR]
                              [--config.force=True] [--config.<stage>.KEY=VALUE ...]

Stages run in order, each in `<output_dir>/<stage>/` (an ordinary easyrl run directory):

    sft    supervised fine-tuning                               (configs/sft.py preset)
    rm     reward model initialized from the SFT model          (configs/rm.py preset)
    ppo    PPO from the SFT policy against the reward model     (configs/ppo.py preset)
    grpo   GRPO from the SFT policy, reward.functions (no RM)   (configs/grpo.py preset)
    online_dpo  online DPO from the SFT policy: pairs of its own samples ranked by reward.functions
                                                            (configs/online_dpo.py preset)
    dpo    DPO from the SFT policy (reference = SFT)            (configs/dpo.py preset)
    kto    KTO from the SFT policy, the pairs unpaired          (configs/kto.py preset)
    orpo   ORPO from the SFT policy (no reference)              (configs/orpo.py preset)
    cpo    CPO from the SFT policy (no reference)               (configs/cpo.py preset)
    simpo  SimPO from the SFT policy (no reference)             (configs/simpo.py preset)
    rrhf   RRHF from the SFT policy                             (configs/rrhf.py preset)

The pipeline wires the paths: every stage after sft gets `model.path = <output_dir>/sft` and ppo gets
`reward.path = <output_dir>/rm` when those stages are in `stages` (otherwise the stage's own
model.path / reward.path are used). Top-level `seed` and `mesh` are copied into every stage.
Every stage key can be overridden: `--config.ppo.train.steps=50`, `--config.sft.optim.lr=1e-3`.

Then every trained policy is exported to `<output_dir>/export/<stage>/` (HF LlamaForCausalLM) and
the reward model to `<output_dir>/export/rm/` (HF LlamaForSequenceClassification), each with the
tokenizer, generation_config.json and a model card README.md; the policies are evaluated on
held-out prompts (`<output_dir>/eval.json`) and `<output_dir>/report.md` gets a results table and
training-curve plots (`<output_dir>/plots/*.png`; plots need matplotlib: pip install 'easyrl[plots]').

Re-running reuses what is there: a stage whose run directory holds its final checkpoint is skipped
("reusing sft from ..."), a stage with a partial checkpoint resumes, and exports / evaluations of
unchanged models are kept. A stage whose saved run config differs from the requested one is an
error naming the keys (retrain it with `--config.redo=STAGE`, or use a new output_dir). `--config.force=True` deletes the pipeline's outputs
(stage dirs, export/, plots/, eval.json, report.md) and redoes everything.

Top-level keys
  output_dir        where everything goes (default runs/pipeline)
  force             delete previous outputs and start over
  redo              comma-separated stages to delete and retrain, with the stages built on them
                    (e.g. `--config.redo=ppo` after changing a ppo key; `redo=sft` redoes all)
  seed, mesh        copied into every stage config
  stages            comma-separated subset of sft,rm,ppo,grpo,online_dpo,dpo,kto,orpo,cpo,simpo,rrhf
                    (run in that order; the tiny preset's default: sft,rm,ppo,grpo,dpo,rrhf)
  export            write the HF folders (True)
  eval.prompts      held-out prompts: "synthetic" (the bundled task's eval split), a .jsonl / .parquet
                    of {"prompt": ...} rows, or "" to skip evaluation
  eval.num_prompts  prompts evaluated per policy
  eval.max_new_tokens, eval.max_prompt_len, eval.batch_size
  eval.temperature  sampling temperature of the evaluated responses. Default 1: each policy's own
                    distribution (what PPO optimizes), which makes "KL to SFT" = mean over
                    responses of sum_t [log pi(y_t) - log pi_sft(y_t)], y ~ pi, an unbiased
                    estimate of the sequence-level KL(pi || pi_sft). 0 = greedy.
  eval.num_samples  n, responses sampled per prompt (more = less sampling noise). With a rule-based
                    eval.true_reward the same n responses also give pass@k (the unbiased
                    estimator of Chen et al. 2021) and maj@k (majority vote of the first k) for
                    k = 1, 4, 8 (those <= n; default n = 8 gives all three)
  eval.greedy       also report greedy-decoding true reward / RM score / length (`*_greedy`)
  eval.true_reward  "synthetic": the bundled task's rule-based reward; "" for real data

Presets
  tiny            the bundled synthetic sort task with a random-init 2-layer LLaMA (D=64):
                  stages sft,rm,ppo,grpo,dpo,rrhf with their `tiny` presets (RM 300 steps), ~3.5
                  minutes on 2 CPU cores in all. Every other stage is configured too
                  (`--config.stages=sft,kto` runs just those).
  tiny_all        the same with every stage (+ online_dpo, kto, orpo, cpo, simpo).
  stackllama_7b   StackLLaMA (TRL stack_llama): LLaMA-7B -> SFT on stack-exchange-paired answers
                  (`Question: ...\\n\\nAnswer: ...`) -> reward model on its preference pairs
                  -> PPO with adaptive KL (init 0.2, target 6, horizon 10000). Stages
                  sft,rm,ppo (`--config.stages=sft,rm,ppo,dpo` adds Stack-Llama-2 DPO).
  tulu25_13b      Tulu 2.5 recipe: Llama-2-13B -> SFT on the Tulu v2 mixture -> 13B reward model
                  on the Tulu 2.5 preference mixture -> PPO (KL 0.05, temperature 0.7, 1024/1024,
                  Tulu chat format). Stages sft,rm,ppo.

A real preset composes stage presets (RECIPES below) sized for one machine: their HARDWARE
entries (configs/<stage>.py) agree and so do their meshes, which the preset's top-level `mesh` is
(the pipeline copies it into every stage, so each stage runs as its own preset would):
stackllama_7b on 8x A100 80GB with dp:1,fsdp:-1,tp:1 (fsdp 8), tulu25_13b on TPU v3-256 with
dp:1,fsdp:-1,tp:8 (fsdp 32). tests/test_plan.py plans every stage of them on that hardware.

Running a real-model preset on a pod (README):

    # 1. the base model as a local HF folder (download it once, on every host or shared storage)
    huggingface-cli download huggyllama/llama-7b --local-dir /data/llama-7b
    # 2. the data: stack-exchange-paired's parquet folders (the presets map its
    #    question/response_j/response_k columns with data.columns), plus held-out prompts
    huggingface-cli download lvwerra/stack-exchange-paired --repo-type dataset --local-dir /data/se
    # 3. the recipe, on every host of the pod (tpu_scripts/launch.sh runs a command on all hosts)
    python -m easyrl pipeline --config configs/pipeline.py:stackllama_7b \\
        --config.output_dir=/mnt/shared/runs/stackllama --config.sft.model.path=/data/llama-7b \\
        --config.sft.data.train=/data/se/data/finetune --config.ppo.data.train=/data/se/data/rl \\
        --config.rm.data.train=/data/se/data/reward --config.rm.data.eval=/data/se/data/evaluation \\
        --config.eval.prompts=/data/se/heldout_prompts.jsonl
    # Tulu 2.5-style (13B), same shape:
    python -m easyrl pipeline --config configs/pipeline.py:tulu25_13b \\
        --config.output_dir=/data/runs/tulu25 --config.sft.model.path=/data/Llama-2-13b-hf \\
        --config.eval.prompts=/data/tulu/heldout_prompts.jsonl

(output_dir must be a filesystem path every host sees, e.g. NFS or a gcsfuse mount; the exports'
tensors are gathered to and written by process 0, as are the report and the model cards.)
"""
import os

import ml_collections as mlc

from easyrl.train.config import load_config_file

HERE = os.path.dirname(os.path.abspath(__file__))

STAGES = ("sft", "rm", "ppo", "grpo", "online_dpo", "dpo", "kto", "orpo", "cpo", "simpo", "rrhf")
TINY_STAGES = ("sft", "rm", "ppo", "grpo", "dpo", "rrhf")  # the main job: keeps under 5 minutes
# real presets: stage -> the configs/<stage>.py preset it runs
RECIPES = {
    "stackllama_7b": dict(sft="stackllama_7b", rm="stackllama_7b", ppo="stackllama_7b",
                          dpo="stackllama2_7b"),
    "tulu25_13b": dict(sft="tulu2_13b", rm="tulu25_13b", ppo="tulu25_13b"),
}


def stage(spec: str) -> mlc.ConfigDict:
    """configs/<name>.py:<preset> as a stage sub-config."""
    return load_config_file(os.path.join(HERE, spec))


def get_config(preset: str = "tiny"):
    if preset not in ("tiny", "tiny_all") and preset not in RECIPES:
        raise ValueError(f"unknown pipeline preset {preset!r}: tiny, tiny_all, "
                         f"{', '.join(RECIPES)}")
    c = mlc.ConfigDict()
    c.command = "pipeline"
    c.output_dir = "runs/pipeline"
    c.force = False
    c.redo = ""
    c.seed = 0
    c.mesh = "dp:1,fsdp:-1,tp:1"
    c.stages = ",".join(STAGES)
    c.export = True
    c.eval = mlc.ConfigDict(dict(
        prompts="synthetic", split="", format="", num_prompts=256, batch_size=64,
        max_prompt_len=16, max_new_tokens=16, temperature=1.0, num_samples=8, greedy=True,
        true_reward="synthetic",
    ))
    if preset in ("tiny", "tiny_all"):
        c.stages = ",".join(STAGES if preset == "tiny_all" else TINY_STAGES)
        c.sft = stage("sft.py:tiny")
        c.sft.eval.every = 100  # eval points along the way, for the SFT loss plot
        c.rm = stage("rm.py:tiny")
        c.rm.train.steps = 300  # held-out accuracy 0.98 (0.97 at 500 steps), and PPO gains more
        c.ppo = stage("ppo.py:tiny")
        c.ppo.ppo.samples_every = 0
        c.grpo = stage("grpo.py:tiny")  # the task's rule-based reward, no reward model
        c.grpo.grpo.samples_every = 0
        c.dpo = stage("dpo.py:tiny")
        # From the tiny SFT policy, dpo.py:tiny (beta 0.1, lr 1e-3) separates chosen from rejected
        # (~93% held-out accuracy) but drives both log-likelihoods down until sampling degenerates
        # (true reward 0.10 vs SFT 0.47, KL ~74). A stiffer KL (beta 1) and a lower lr keep the
        # policy near SFT and improve it (true reward ~0.54, KL ~6).
        c.dpo.dpo.beta = 1.0
        c.dpo.optim.lr = 3e-4
        c.rrhf = stage("rrhf.py:tiny")
        c.online_dpo = stage("online_dpo.py:tiny")  # the task's rule-based reward ranks the pairs
        c.online_dpo.online_dpo.samples_every = 0
        c.kto = stage("kto.py:tiny")
        c.orpo = stage("orpo.py:tiny")
        c.cpo = stage("cpo.py:tiny")
        c.simpo = stage("simpo.py:tiny")
        c.eval.update(max_prompt_len=c.ppo.ppo.max_prompt_len, max_new_tokens=c.ppo.ppo.max_new_tokens)
    else:
        c.output_dir = f"runs/{preset}"
        c.stages = "sft,rm,ppo"
        for name, p in RECIPES[preset].items():
            c[name] = stage(f"{name}.py:{p}")
        c.mesh = c.sft.mesh  # the stages' own mesh (they all carry the same)
    if preset == "stackllama_7b":
        c.eval.update(prompts="/path/to/stack-exchange-paired/heldout_prompts.jsonl", format="prompt",
                      num_prompts=512, batch_size=64, max_prompt_len=512, max_new_tokens=128,
                      temperature=1.0, num_samples=1, true_reward="")
    elif preset == "tulu25_13b":
        c.eval.update(prompts="/path/to/tulu/heldout_prompts.jsonl", format="", num_prompts=512,
                      batch_size=64, max_prompt_len=1024, max_new_tokens=1024, temperature=1.0,
                      num_samples=1, true_reward="")
    return c
