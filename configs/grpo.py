"""GRPO-family presets (GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++).
`python -m easyrl grpo --config configs/grpo.py:PRESET [--config.KEY=VALUE ...]`

model.path is the starting policy (an SFT run dir or HF folder); the reference, when one is held
(grpo.beta > 0), is that same initial policy (with LoRA: the base with the adapters off).
train.batch_size counts PROMPTS per iteration; each gets grpo.num_generations (G) samples, so an
iteration trains on train.batch_size x G completions, split into grpo.num_minibatches optimizer
steps (each accumulated over micro-batches of train.micro_batch_size x G completions), repeated
grpo.num_iterations times with the old log-probs of the rollout (never recomputed).

grpo.advantage        grpo (group-normalised) | rloo (leave-one-out) | reinforce_pp (REINFORCE++:
                      k1 KL in the token rewards, returns whitened over the batch) |
                      reinforce_pp_baseline (the group mean subtracted from the score first)
grpo.scale_rewards    grpo only: group | batch | none (Dr. GRPO)
grpo.loss_type        grpo | bnpo | dr_grpo | dapo | rloo (TRL RLOOTrainer: one summed ratio per
                      sequence, plain mean over sequences; with advantage=rloo)
                      (docs/algorithms.md, "Group methods")
grpo.beta             KL coefficient: k3 in the loss for advantage=grpo, a k1 reward penalty for
                      rloo / reinforce_pp*; 0 holds no reference model at all
grpo.epsilon_low/high clip range of the ratio (DAPO clip-higher: epsilon_high 0.28)
grpo.importance_sampling_level  token | sequence (GSPO)
grpo.mask_truncated_completions  completions without EOS are left out of the loss (DAPO)
grpo.dynamic_sampling groups whose rewards are all equal are dropped and the batch refilled
                      from up to grpo.max_resample more prompt batches (DAPO); if still short,
                      the remaining places keep zero-std groups (logged)
rollout.behaviour_logprobs  auto | sampler | trainer: whose log-probs are the old ones
rollout.is_correction       none | token_truncate | token_mask | sequence_truncate |
                      sequence_mask (trainer old log-probs only), rollout.is_cap its upper
                      bound (TRL vllm_importance_sampling_clip_max), rollout.is_cap_min its
                      lower bound (TRL ..._clip_min; 0 = none)
reward.functions / reward.weights  comma-separated `module:function` (or file.py:function or a
                      built-in name) and their weights (easyrl/rewards.py); reward.path a reward
                      model, one more source with weight reward.weight

tiny      the bundled synthetic sort task from the tiny SFT run (runs/sft) with its rule-based
          graded reward (`synthetic`), no reward model, beta 0 (no reference), G 8, dapo loss
tiny_rm   the same, scored by the tiny reward model (runs/rm) instead of the rule
gsm8k_rlvr  GSM8K with an answer-extraction exact-match reward (`gsm8k_exact`, verifiable
          reward 1/0), DeepSeekMath GRPO settings (Shao et al. 2024, sec. 4.1: policy lr 1e-6,
          KL coefficient 0.04, 64 samples per question, max length 1024, batch 1024 completions,
          a single update per exploration stage), loss grpo, group-scaled advantages. The model
          is your SFT'd base (DeepSeekMath-Instruct 7B there; any LLaMA-shaped 7B here).
          Data openai/gsm8k `main` with question -> prompt and the `answer` column passed to the
          reward. Hardware: 16x H100 80GB, 2 nodes (our assumption: on 8 GPUs the sampler's KV
          cache of 1024 rollouts x 1024 tokens alone is 64 GiB per device, `easyrl plan` peak
          78.03 GiB). mesh fsdp 16, micro-batch 1 prompt (64 completions), remat full, shared
          prompt prefixes: `easyrl plan` peak 39.02 GiB per device vs 72.00 GiB usable (the
          rollout).
rloo_tldr TRL's RLOO settings (RLOOTrainer docs, v0.11 `examples/scripts/rloo`): k = 2 samples per
          prompt, TRL's RLOO loss (loss_type rloo: exp(summed log-ratio) per sequence, clipped,
          mean over sequences), KL coefficient 0.05 as a reward penalty, lr 3e-6, batch 64 completions, 1
          epoch and 1 minibatch per batch (REINFORCE), temperature 0.7, response length 53,
          missing-EOS penalty 1.0 (grpo.missing_eos_penalty: subtracted from the reward of a
          completion without EOS), reward model from reward.path; data trl-lib/tldr. Hardware:
          8x A100 80GB (TRL's runs). mesh dp:1,fsdp:-1,tp:1 (fsdp 8), micro_batch_size 0 (the
          whole minibatch of 64 completions), remat dots: `easyrl plan` peak 16.77 GiB per
          device vs 72.00 GiB usable (policy, reference and reward model, no critic)
qwen25_7b_math  Dr. GRPO on Qwen2.5-7B, the "Understanding R1-Zero-Like Training" recipe (Liu et al.
          2025; sail-sg/understand-r1-zero `examples/qwen2.5-7b.sh`, oat `train_zero_math.py`):
          base model Qwen/Qwen2.5-7B (model.path /path/to/Qwen2.5-7B; `easyrl plan` takes the
          qwen25_7b preset from the name), data open-r1/Big-Math-RL-Verified-Processed (config
          `all`: data.train open-r1/Big-Math-RL-Verified-Processed@all, split train: prompt ->
          prompt, solution -> answer), critic_type drgrpo = loss
          dr_grpo (token sum over a constant max_new_tokens) with scale_rewards none (advantage
          r - group mean), beta 0 (no reference), lr 1e-6 constant, no warmup, Adam betas
          (0.9, 0.95) (oat's defaults), grad clip 1.0, G 8 samples, 128 prompts per rollout
          (1024 completions), 1 PPO epoch, train_batch_size 128 completions = 8 optimizer steps
          per rollout (grpo.num_minibatches 8), prompt max 1024, generate max 3000, temperature
          1.0, top_p 1.0, clip 0.2 (oat's cliprange default). Our substitutions: template chat
          (the tokenizer's ChatML template; oat uses its R1 text template "A conversation
          between User and Assistant ... <think>", which easyrl's templates do not have), the
          reward boxed_math (the completion's last \\boxed{} against the answer after a string
          normalisation of the LaTeX; oat grades with its symbolic math grader, which also
          matches equivalent forms such as 0.5 and \\frac{1}{2}: pass such a grader as
          reward.functions=FILE.py:FN), epochs 1 (oat's run has no fixed length). oat zeroes the
          reward of completions cut at max length (no knob here; they mostly score 0 anyway).
          Hardware: 8x A100 80GB (the paper: 8x A100, size not given; 80GB our assumption).
          mesh fsdp 8, micro-batch 1 prompt (8 completions, one per device, as oat's
          train_batch_size_per_device 1), remat full, shared prompt prefixes: `easyrl plan` peak
          56.93 GiB per device vs 72.00 GiB usable (the rollout).

HARDWARE (below) is what each real-model preset is sized for; `easyrl plan` plans on it.
"""
import ml_collections as mlc

from easyrl.train.config import base_config

HARDWARE = {
    "gsm8k_rlvr": dict(devices=16, device_memory_gib=80, platform="gpu", name="16x H100 80GB"),
    "rloo_tldr": dict(devices=8, device_memory_gib=80, platform="gpu", name="8x A100 80GB"),
    "qwen25_7b_math": dict(devices=8, device_memory_gib=80, platform="gpu", name="8x A100 80GB"),
}


def get_config(preset: str = "tiny"):
    c = base_config("grpo")
    # num_workers > 0: reward functions in worker processes, each call bounded by timeout
    # seconds; on_error: raise (stop the run) | none (rows not applicable, counted)
    c.reward = mlc.ConfigDict(dict(path="", weight=1.0, functions="", weights="", num_workers=0,
                                   timeout=600.0, on_error="raise"))
    c.grpo = mlc.ConfigDict(dict(
        max_prompt_len=16, max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0,
        num_generations=8, advantage="grpo", scale_rewards="group", adv_eps=1e-4,
        loss_type="dapo", beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
        importance_sampling_level="token", num_iterations=1, num_minibatches=1,
        mask_truncated_completions=False, missing_eos_penalty=0.0, dynamic_sampling=False,
        max_resample=3,
        samples_every=10, num_samples=4, true_reward="",
    ))
    # behaviour (old) log-probs: the sampler's own (auto: when computing in float32, where they
    # equal the trainer's to ~1e-6; no old-log-prob pass) or the trainer's (a scoring pass when
    # off-policy), with an optional importance-sampling correction for the sampler's mismatch
    # engine: static (one batch, shared prefixes) | continuous (easyrl.engine: slots freed by
    # finished samples are refilled; rollout.slots, 0 = one per rollout row)
    c.rollout = mlc.ConfigDict(dict(behaviour_logprobs="auto", is_correction="none", is_cap=2.0,
                                    is_cap_min=0.0, engine="static", slots=0))
    c.data.update(template="plain", eval="")
    if preset in ("tiny", "tiny_rm"):
        c.model.path = "runs/sft"
        c.data.train = "synthetic"
        c.grpo.update(true_reward="synthetic", max_prompt_len=16, max_new_tokens=14,
                      num_generations=8, samples_every=10)
        if preset == "tiny":
            c.reward.functions = "synthetic"
        else:
            c.reward.path = "runs/rm"
        c.train.update(steps=150, batch_size=32)
        c.optim.update(lr=3e-4, schedule="constant", warmup=0, clip=1.0)
        c.log.every = 1
    elif preset == "gsm8k_rlvr":
        c.mesh = "dp:1,fsdp:-1,tp:1"
        c.model.update(path="/path/to/sft-7b", dtype="bfloat16", remat="full")
        c.data.update(train="openai/gsm8k@main", split="train", format="prompt",
                      columns="question:prompt")
        c.reward.functions = "gsm8k_exact"
        c.grpo.update(max_prompt_len=512, max_new_tokens=512, temperature=1.0,
                      num_generations=64, advantage="grpo", scale_rewards="group",
                      loss_type="grpo", beta=0.04, num_iterations=1, num_minibatches=1)
        c.train.update(epochs=1, batch_size=16, micro_batch_size=1, seq_len=1024)
        c.optim.update(lr=1e-6, schedule="constant", warmup=0, weight_decay=0.0)
        c.checkpoint.update(every=50, keep=2)
    elif preset == "rloo_tldr":
        c.mesh = "dp:1,fsdp:-1,tp:1"
        c.model.update(path="/path/to/sft-1b", dtype="bfloat16", remat="dots")
        c.reward.path = "/path/to/rm-1b"
        c.data.update(train="trl-lib/tldr", split="train", format="prompt")
        c.grpo.update(max_prompt_len=512, max_new_tokens=53, temperature=0.7,
                      num_generations=2, advantage="rloo", beta=0.05, loss_type="rloo",
                      num_iterations=1, num_minibatches=1, missing_eos_penalty=1.0)
        c.train.update(epochs=1, batch_size=32, seq_len=565)
        c.optim.update(lr=3e-6, schedule="linear", warmup=0)
        c.checkpoint.update(every=100, keep=2)
    elif preset == "qwen25_7b_math":
        c.mesh = "dp:1,fsdp:-1,tp:1"  # fsdp 8 on HARDWARE's 8x A100 80GB
        c.model.update(path="/path/to/Qwen2.5-7B", dtype="bfloat16", remat="full")
        # NAME@CONFIG: Big-Math's load_dataset config `all`; solution -> answer for the reward
        # (the other columns reach it too)
        c.data.update(train="open-r1/Big-Math-RL-Verified-Processed@all", split="train",
                      format="prompt", template="chat", columns="solution:answer")
        c.reward.functions = "boxed_math"
        c.grpo.update(max_prompt_len=1024, max_new_tokens=3000, temperature=1.0, top_k=0,
                      top_p=1.0, num_generations=8, advantage="grpo", scale_rewards="none",
                      loss_type="dr_grpo", beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
                      num_iterations=1, num_minibatches=8)
        c.train.update(epochs=1, batch_size=128, micro_batch_size=1, seq_len=4024)
        c.optim.update(lr=1e-6, schedule="constant", warmup=0, weight_decay=0.0, b1=0.9,
                       b2=0.95, clip=1.0)
        c.checkpoint.update(every=50, keep=2)
    else:
        raise ValueError(f"unknown grpo preset {preset!r}: tiny, tiny_rm, gsm8k_rlvr, rloo_tldr, "
                         f"qwen25_7b_math")
    return c
