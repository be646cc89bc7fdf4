"""PPO presets. `python -m easyrl ppo --config configs/ppo.py:PRESET [--config.KEY=VALUE ...]`

model.path is the SFT policy (also the frozen reference); reward.path the reward model;
value.path the critic's initialization (default: the reward model, as in Tulu 2.5).

tiny         the bundled synthetic task end to end (policy from `easyrl sft`, RM from `easyrl rm`)
tulu25_13b   Tulu 2.5 PPO 13B (model card): lr 1e-6, batch 64, Adam(0.9, 0.999, 1e-8), linear
             schedule with 10% warmup, 1 epoch, KL 0.05, temperature 0.7, prompt/response
             1024/1024, gamma 1, lambda 0.95, clip 0.2 (policy and value), vf_coef 0.1,
             `<|user|>\\n{prompt}\\n<|assistant|>\\n` prompts (tulu template). Hardware: TPU
             v3-256, 256 devices x 16 GiB (the Tulu 2.5 pods). mesh dp:1,fsdp:-1,tp:8 (fsdp 32;
             the Tulu pipeline's one mesh, set by SFT's 8192-token rows), ppo.num_minibatches 1 (one
             minibatch of 64 rollouts, as the card's batch), remat full: `easyrl plan` peak 7.58
             GiB per device vs 14.40 GiB usable (its first suggestion on that mesh; the old
             fsdp:256 mesh cannot split 64 rows; on the whole pod it also finds fsdp:64,tp:4 with
             remat dots_no_batch, 11.56 GiB)
stackllama_7b StackLLaMA: `Question: {q}\\n\\nAnswer: ` prompts, adaptive KL (init 0.2, target 6,
             horizon 10000), lr 1.4e-5, batch 64 (TRL example settings). Hardware: 8x A100 80GB
             (TRL's StackLLaMA runs). mesh dp:1,fsdp:-1,tp:1 (fsdp 8), 4 minibatches of 16,
             remat dots: `easyrl plan` peak 46.61 GiB per device vs 72.00 GiB usable

HARDWARE (below) is what each real-model preset is sized for, one entry per preset:
`python -m easyrl plan --config configs/ppo.py:PRESET` plans on it when --devices is not given,
and tests/test_plan.py checks that the preset's mesh / minibatch / remat fit it.
"""
import ml_collections as mlc

from easyrl.train.config import base_config

HARDWARE = {
    "tulu25_13b": dict(devices=256, device_memory_gib=16, platform="tpu", name="TPU v3-256"),
    "stackllama_7b": dict(devices=8, device_memory_gib=80, platform="gpu", name="8x A100 80GB"),
}


def get_config(preset: str = "tiny"):
    c = base_config("ppo")
    # reward sources: a reward model (path, its score x weight) and/or host reward functions
    # (`module:function` names and weights, comma-separated; easyrl/rewards.py), summed
    # num_workers > 0: reward functions in worker processes, each call bounded by timeout
    # seconds; on_error: raise (stop the run) | none (rows not applicable, counted)
    c.reward = mlc.ConfigDict(dict(path="", weight=1.0, functions="", weights="", num_workers=0,
                                   timeout=600.0, on_error="raise"))
    c.value = mlc.ConfigDict(dict(path=""))  # empty: initialize the critic from reward.path
    c.value_optim = mlc.ConfigDict(c.optim.to_dict())
    c.ppo = mlc.ConfigDict(dict(
        max_prompt_len=16, max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0,
        ppo_epochs=4, num_minibatches=4, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
        gamma=1.0, lam=0.95, whiten_advantages=True,
        kl_coef=0.05, kl_estimator="k1", adaptive_kl=False, kl_target=6.0, kl_horizon=10000,
        missing_eos_penalty=0.0, ratio_threshold=0.0, target_kl=0.0,
        samples_every=10, num_samples=4, true_reward="",
    ))
    # rollout engine: static (one batch) | continuous (easyrl.engine; slots 0 = one per row);
    # behaviour (old) log-probs: trainer (auto: the scoring pass runs anyway) | sampler
    c.rollout = mlc.ConfigDict(dict(engine="static", slots=0, behaviour_logprobs="auto"))
    c.data.update(template="plain", eval="")
    if preset == "tiny":
        c.model.path = "runs/sft"
        c.reward.path = "runs/rm"
        c.data.train = "synthetic"
        c.ppo.update(true_reward="synthetic", max_prompt_len=16, max_new_tokens=14,
                     temperature=1.0, kl_coef=0.1, ppo_epochs=4, num_minibatches=4,
                     samples_every=10)
        c.train.update(steps=100, batch_size=128)
        c.optim.update(lr=1e-4, schedule="constant", warmup=0, clip=1.0)
        c.value_optim.update(lr=1e-3, schedule="constant", warmup=0, clip=1.0)
        c.log.every = 1
    elif preset == "tulu25_13b":
        c.mesh = "dp:1,fsdp:-1,tp:8"  # fsdp 32 on HARDWARE's TPU v3-256
        c.model.update(path="/path/to/tulu2-13b", dtype="bfloat16", remat="full")
        c.reward.path = "/path/to/tulu2.5-rm-13b"
        c.data.update(train="allenai/tulu-2.5-preference-data", split="ultrafeedback_mean_aspects",
                      format="messages", template="tulu")
        c.ppo.update(max_prompt_len=1024, max_new_tokens=1024, temperature=0.7, kl_coef=0.05,
                     gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
                     ppo_epochs=1, num_minibatches=1, missing_eos_penalty=10.0)
        c.train.update(epochs=1, batch_size=64, seq_len=2048)
        c.optim.update(lr=1e-6, schedule="linear", warmup=0.1, b1=0.9, b2=0.999, eps=1e-8)
        c.value_optim.update(lr=1e-6, schedule="linear", warmup=0.1)
        c.checkpoint.update(every=50, keep=2)
    elif preset == "stackllama_7b":
        c.mesh = "dp:1,fsdp:-1,tp:1"  # fsdp 8 on HARDWARE's 8x A100 80GB
        c.model.update(path="/path/to/stackllama-sft-7b", dtype="bfloat16", remat="dots")
        c.reward.path = "/path/to/stackllama-rm-7b"
        c.data.update(train="lvwerra/stack-exchange-paired", split="train", format="prompt",
                      template="stackllama", columns="question:prompt")
        c.ppo.update(max_prompt_len=512, max_new_tokens=128, temperature=1.0, kl_coef=0.2,
                     adaptive_kl=True, kl_target=6.0, kl_horizon=10000, ppo_epochs=4,
                     num_minibatches=4)
        c.train.update(steps=20000, batch_size=64, seq_len=640)
        c.optim.update(lr=1.4e-5, schedule="constant")
        c.value_optim.update(lr=1.4e-5, schedule="constant")
        c.checkpoint.update(every=100, keep=2)
    else:
        raise ValueError(f"unknown ppo preset {preset!r}: tiny, tulu25_13b, stackllama_7b")
    return c
