"""Online DPO presets (TRL OnlineDPOTrainer; easyrl/algorithms/online_dpo.py).
`python -m easyrl online_dpo --config configs/online_dpo.py:PRESET [--config.KEY=VALUE ...]`

model.path is the starting policy (an SFT run dir or HF folder); the reference is that same
initial policy, frozen (with LoRA: the base with the adapters off). train.batch_size counts
PROMPTS = preference pairs per iteration: each prompt gets online_dpo.num_generations (G)
samples, the best and the worst by reward become its (chosen, rejected) pair, and the DPO loss
on the pairs makes online_dpo.num_minibatches optimizer steps (each accumulated over
micro-batches of train.micro_batch_size pairs).

online_dpo.beta            DPO beta (TRL OnlineDPOConfig default 0.1)
online_dpo.loss_type       any DPO loss type of losses.dpo_losses (sigmoid, ipo, hinge, robust,
                           ...; comma-separated for a weighted sum with online_dpo.loss_weights)
online_dpo.label_smoothing the sigmoid / robust / exo / aot label smoothing (0 = off)
online_dpo.num_generations samples per prompt, G >= 2 (TRL: 2); chosen = argmax, rejected =
                           argmin of the G scores (G = 2: the first sample wins ties, as TRL)
online_dpo.max_prompt_len, max_new_tokens, temperature, top_k, top_p   the sampler's settings;
                           the log-probs are those of logits / temperature
online_dpo.missing_eos_penalty  subtracted from the reward of a completion without EOS (TRL)
online_dpo.num_minibatches optimizer steps per iteration (TRL: 1)
online_dpo.samples_every, num_samples   samples.jsonl every N iterations, rows per write
online_dpo.true_reward     "synthetic": log objective/true_reward of the bundled task
reward.functions / reward.weights  comma-separated `module:function` (or file.py:function or a
                           built-in name) and their weights (easyrl/rewards.py); reward.path a
                           reward model, one more source with weight reward.weight
rollout.engine, rollout.slots   static (shared prompt prefixes) | continuous (easyrl.engine)

tiny      the bundled synthetic sort task from the tiny SFT run (runs/sft) with its rule-based
          graded reward (`synthetic`), no reward model; G 2, beta 0.1, sigmoid loss; the
          model / data / optimizer sizes of configs/grpo.py:tiny.
tulu25_13b_online  online DPO on the Tulu 2.5 PPO setting. Sources: the Tulu 2.5 PPO 13B
          recipe (configs/ppo.py:tulu25_13b, Ivison et al. 2024 "Unpacking DPO and PPO"):
          policy allenai/tulu-2-13b, the 13B Tulu 2.5 reward model, the UltraFeedback prompts
          of allenai/tulu-2.5-preference-data (`ultrafeedback_mean_aspects`), the tulu chat
          template, temperature 0.7, prompt / response 1024 / 1024, missing-EOS penalty 10,
          batch 64 prompts, linear schedule with 10% warmup, 1 epoch; TRL OnlineDPOConfig /
          OnlineDPOTrainer: beta 0.1, lr 5e-7, 2 samples per prompt, sigmoid loss, one
          optimizer step per batch. OUR ASSUMPTION: the paper trains DPO offline and PPO
          online; we found no published online-DPO run of it, so this combination (and
          beta / lr taken from TRL rather than from the open-instruct online DPO script's
          beta 0.05) is ours. Hardware: TPU v3-256, 256 devices x 16 GiB (the Tulu 2.5 pods,
          as the PPO preset). mesh dp:1,fsdp:-1,tp:8 (fsdp 32), micro-batch 32 pairs (64 rows
          of 2048 tokens per forward, the PPO preset's minibatch), remat full: `easyrl plan`
          (policy + frozen reference + reward model, the rollout of 64 x 2 rows, the reward
          model's forward, the reference pass, the update on the pairs) peak 4.28 GiB per
          device vs 14.40 GiB usable.

HARDWARE (below) is what each real-model preset is sized for.
"""
import ml_collections as mlc

from easyrl.train.config import base_config

HARDWARE = {
    "tulu25_13b_online": dict(devices=256, device_memory_gib=16, platform="tpu",
                              name="TPU v3-256"),
}


def get_config(preset: str = "tiny"):
    c = base_config("online_dpo")
    # num_workers > 0: reward functions in worker processes, each call bounded by timeout
    # seconds; on_error: raise (stop the run) | none (rows not applicable, counted)
    c.reward = mlc.ConfigDict(dict(path="", weight=1.0, functions="", weights="", num_workers=0,
                                   timeout=600.0, on_error="raise"))
    c.online_dpo = mlc.ConfigDict(dict(
        beta=0.1, loss_type="sigmoid", loss_weights="", label_smoothing=0.0,
        num_generations=2, max_prompt_len=16, max_new_tokens=16, temperature=1.0, top_k=0,
        top_p=1.0, missing_eos_penalty=0.0, num_minibatches=1,
        samples_every=10, num_samples=4, true_reward="",
    ))
    # engine: static (one batch, shared prefixes) | continuous (easyrl.engine: slots freed by
    # finished samples are refilled; rollout.slots, 0 = one per rollout row)
    c.rollout = mlc.ConfigDict(dict(engine="static", slots=0))
    c.data.update(template="plain", eval="")
    if preset == "tiny":
        c.model.path = "runs/sft"
        c.data.train = "synthetic"
        c.reward.functions = "synthetic"
        c.online_dpo.update(true_reward="synthetic", max_prompt_len=16, max_new_tokens=14,
                            samples_every=10)
        c.train.update(steps=150, batch_size=32)
        c.optim.update(lr=3e-4, schedule="constant", warmup=0, clip=1.0)
        c.log.every = 1
    elif preset == "tulu25_13b_online":
        c.mesh = "dp:1,fsdp:-1,tp:8"  # fsdp 32 on HARDWARE's TPU v3-256
        c.model.update(path="/path/to/tulu2-13b", dtype="bfloat16", remat="full")
        c.reward.path = "/path/to/tulu2.5-rm-13b"
        c.data.update(train="allenai/tulu-2.5-preference-data", split="ultrafeedback_mean_aspects",
                      format="messages", template="tulu")
        c.online_dpo.update(max_prompt_len=1024, max_new_tokens=1024, temperature=0.7,
                            beta=0.1, loss_type="sigmoid", num_generations=2,
                            missing_eos_penalty=10.0, num_minibatches=1)
        c.train.update(epochs=1, batch_size=64, micro_batch_size=32, seq_len=2048)
        c.optim.update(lr=5e-7, schedule="linear", warmup=0.1, b1=0.9, b2=0.999, eps=1e-8)
        c.checkpoint.update(every=50, keep=2)
    else:
        raise ValueError(f"unknown online_dpo preset {preset!r}: tiny, tulu25_13b_online")
    return c
