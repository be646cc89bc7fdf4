"""Reward-model presets. `python -m easyrl rm --config configs/rm.py:PRESET [--config.KEY=VALUE ...]`

The reward model starts from `model.path` (an SFT run directory or an HF causal-LM folder: the
lm_head is dropped and a fresh score head drawn from N(0, 1/(D+1))) or a random-init preset.
Data: preference rows (`prompt`, `chosen`, `rejected`, optional `margin`) or HH-style implicit
pairs; the run directory exports with
`python -m easyrl convert easyrl-to-hf --ckpt RUN --out DIR --kind reward` as a
LlamaForSequenceClassification.

rm.use_margin   subtract the row's `margin` inside the loss: -log sigmoid(r_c - r_r - m)

tiny            tiny LLaMA (2 layers, D=64) on the bundled synthetic sort task, 500 steps (~45 s
                on 2 CPU cores with mesh dp:1,fsdp:1,tp:1). From a 200-step tiny SFT run
                (model.path) it reaches ~97% held-out pair accuracy (random init: lower).
stackllama_7b   StackLLaMA reward model (TRL examples/research_projects/stack_llama/scripts/
                reward_modeling.py): LLaMA-7B, lvwerra/stack-exchange-paired `data/reward`
                (100k pairs), 1 epoch, lr 2e-5 linear, weight decay 0.001, max length 512,
                text `Question: {q}\\n\\nAnswer: {a}`. TRL trained LoRA r=8 (alpha 32) with 4 pairs
                per device; easyrl trains all weights, global batch 32. Reported ~67% held-out
                accuracy. data.train / data.eval are the dataset's `data/reward` and
                `data/evaluation` parquet folders (`huggingface-cli download
                lvwerra/stack-exchange-paired --repo-type dataset --local-dir DIR`);
                data.columns maps question/response_j/response_k to prompt/chosen/rejected
                (response_j is the preferred answer). Hardware: 8x A100 80GB (TRL's StackLLaMA
                runs). mesh dp:1,fsdp:-1,tp:1 (fsdp 8), micro-batch 8 pairs, remat dots: `easyrl
                plan` peak 20.86 GiB per device vs 72.00 GiB usable.
stackllama_7b_lora  the same as TRL ran it: LoRA r 8, alpha 32, dropout 0.1 on q/v (peft's
                LLaMA default), bf16 frozen base, score head trained in full. Same hardware and
                setting: peak 8.07 GiB per device vs 72.00 GiB usable.
tulu25_13b      Tulu 2.5 13B RM (allenai/tulu-v2.5-13b-preference-mix-rm model card): from
                allenai/tulu-2-13b, allenai/tulu-2.5-preference-data split
                `preference_big_mixture` (use `ultrafeedback_mean_aspects` for the UF RM), lr 1e-6,
                Adam (0.9, 0.999, eps 1e-8), linear schedule with 3% warmup, 1 epoch, total batch
                512, Tulu format `<|user|>\\n{prompt}\\n<|assistant|>\\n`. Max length 2048 is our
                choice (not stated on the card). Hardware: TPU v3-256, 256 devices x 16 GiB (the
                Tulu 2.5 pods). mesh dp:1,fsdp:-1,tp:8 (fsdp 32; the Tulu pipeline's one mesh, set
                by SFT's 8192-token rows), micro-batch 32 pairs (16 accumulation steps), remat
                dots_no_batch: `easyrl plan` peak 8.44 GiB per device vs 14.40 GiB usable (its
                first suggestion on that mesh; on the whole pod it also finds fsdp:256 with
                micro-batch 512 and remat full, 10.52 GiB).

HARDWARE (below) is what each real-model preset is sized for, one entry per preset:
`python -m easyrl plan --config configs/rm.py:PRESET` plans on it when --devices is not given,
and tests/test_plan.py checks that the preset's mesh / micro-batch / remat fit it.
"""
import ml_collections as mlc

from easyrl.train.config import base_config

A100_8 = dict(devices=8, device_memory_gib=80, platform="gpu", name="8x A100 80GB")
HARDWARE = {
    "stackllama_7b": A100_8,
    "stackllama_7b_lora": A100_8,
    "tulu25_13b": dict(devices=256, device_memory_gib=16, platform="tpu", name="TPU v3-256"),
}


def get_config(preset: str = "tiny"):
    c = base_config("rm")
    c.rm = mlc.ConfigDict(dict(use_margin=True))
    if preset == "tiny":
        c.train.update(steps=500, batch_size=32, seq_len=24)
        c.optim.update(lr=3e-3, schedule="cosine", warmup=10, weight_decay=0.1)
        c.log.every = 25
        c.eval.update(every=100, max_batches=0)
        c.checkpoint.async_save = False
    elif preset == "stackllama_7b":
        c.mesh = "dp:1,fsdp:-1,tp:1"  # fsdp 8 on HARDWARE's 8x A100 80GB
        c.model.update(path="/path/to/llama-7b-sft", dtype="bfloat16", remat="dots")
        c.data.update(train="/path/to/stack-exchange-paired/data/reward",
                      eval="/path/to/stack-exchange-paired/data/evaluation",
                      format="preference", template="stackllama", columns="question:prompt,response_j:chosen,response_k:rejected")
        c.train.update(epochs=1, batch_size=32, micro_batch_size=8, seq_len=512)
        c.optim.update(lr=2e-5, schedule="linear", warmup=0, weight_decay=0.001)
        c.eval.update(every=500, max_batches=200)
        c.checkpoint.update(every=500, keep=3)
    elif preset == "stackllama_7b_lora":
        # TRL's reward_modeling.py: LoRA r 8, alpha 32, dropout 0.1 (peft's default LLaMA
        # targets q_proj, v_proj), the score head trained in full, lr 2e-5
        c = get_config("stackllama_7b")
        c.model.lora.update(rank=8, alpha=32.0, dropout=0.1, targets="q|v", base_dtype="bfloat16")
    elif preset == "tulu25_13b":
        c.mesh = "dp:1,fsdp:-1,tp:8"  # fsdp 32 on HARDWARE's TPU v3-256
        c.model.update(path="/path/to/tulu-2-13b", dtype="bfloat16", remat="dots_no_batch")
        c.data.update(train="allenai/tulu-2.5-preference-data", split="preference_big_mixture",
                      eval="", format="", template="tulu")
        c.train.update(epochs=1, batch_size=512, micro_batch_size=32, seq_len=2048)
        c.optim.update(lr=1e-6, schedule="linear", weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8)
        c.optim.warmup = 0.03  # a ratio of the run (< 1); >= 1 would be steps
        c.checkpoint.update(every=200, keep=2)
    else:
        raise ValueError(f"unknown rm preset {preset!r}: tiny, stackllama_7b, "
                         f"stackllama_7b_lora, tulu25_13b")
    return c
