"""SFT presets. `python -m easyrl sft --config configs/sft.py:PRESET [--config.KEY=VALUE ...]`

tiny            random-init tiny LLaMA on the bundled synthetic task (minutes on 2 CPU cores)
stackllama_7b   LLaMA-7B on stack-exchange-paired answers, `Question: ...\\n\\nAnswer: ...`
                Hardware: 8x A100 80GB (TRL's StackLLaMA runs). mesh dp:1,fsdp:-1,tp:1 (fsdp 8),
                micro-batch 16, remat dots: `easyrl plan` peak 31.70 GiB per device vs 72.00 GiB
                usable.
tulu2_13b       Llama-2-13B on the Tulu v2 SFT mixture with the Tulu chat format. Hardware: TPU
                v3-256, 256 devices x 16 GiB (our assumption: the pod of the Tulu 2.5 recipe,
                configs/pipeline.py:tulu25_13b). mesh dp:1,fsdp:-1,tp:8 (fsdp 32), micro-batch 32
                (4 accumulation steps), remat full: `easyrl plan` peak 8.24 GiB per device vs 14.40
                GiB usable -- the only setting it finds that fits (8192-token rows need tp 8 and
                full remat; batch 128 cannot split over more than 128 batch shards).

HARDWARE (below) is what each real-model preset is sized for, one entry per preset:
`python -m easyrl plan --config configs/sft.py:PRESET` plans on it when --devices is not given,
and tests/test_plan.py checks that the preset's mesh / micro-batch / remat fit it.
"""
from easyrl.train.config import base_config

HARDWARE = {
    "stackllama_7b": dict(devices=8, device_memory_gib=80, platform="gpu", name="8x A100 80GB"),
    "tulu2_13b": dict(devices=256, device_memory_gib=16, platform="tpu", name="TPU v3-256"),
}


def get_config(preset: str = "tiny"):
    c = base_config("sft")
    if preset == "tiny":
        c.train.update(steps=500, batch_size=32, seq_len=48)
        c.optim.update(lr=3e-3, schedule="cosine", warmup=20, weight_decay=0.0)
        c.log.every = 20
        c.eval.max_batches = 4
    elif preset == "stackllama_7b":
        # StackLLaMA SFT (TRL example): 4000+ steps, lr 1e-5, seq 1024, packed
        c.mesh = "dp:1,fsdp:-1,tp:1"  # fsdp 8 on HARDWARE's 8x A100 80GB
        c.model.update(path="/path/to/llama-7b-hf", dtype="bfloat16", remat="dots")
        c.data.update(train="lvwerra/stack-exchange-paired", eval="", split="train",
                      format="prompt_completion", template="stackllama", packing=True,
                      columns="question:prompt,response_j:completion")
        c.train.update(steps=4000, batch_size=64, micro_batch_size=16, seq_len=1024)
        c.optim.update(lr=1e-5, schedule="cosine", warmup=100, weight_decay=0.05)
        c.checkpoint.update(every=500, keep=3)
    elif preset == "tulu2_13b":
        # Tulu 2 SFT (Ivison et al. 2023): lr 1e-5 linear, 3% warmup, 2 epochs, 8192 tokens
        c.mesh = "dp:1,fsdp:-1,tp:8"  # fsdp 32 on HARDWARE's TPU v3-256
        c.model.update(path="/path/to/Llama-2-13b-hf", dtype="bfloat16", remat="full")
        c.data.update(train="allenai/tulu-v2-sft-mixture", eval="", split="train",
                      format="messages", template="tulu", packing=True)
        c.train.update(epochs=2, batch_size=128, micro_batch_size=32, seq_len=8192)
        c.optim.update(lr=1e-5, schedule="linear", warmup=0.03, weight_decay=0.0)
        c.checkpoint.update(every=1000, keep=2)
    else:
        raise ValueError(f"unknown sft preset {preset!r}: tiny, stackllama_7b, tulu2_13b")
    return c
