"""RRHF presets. `python -m easyrl rrhf --config configs/rrhf.py:PRESET [--config.KEY=VALUE ...]`

Data: rows `prompt`, `responses` (list), `scores` (one number per response; higher is better).
The policy starts from `model.path` (an SFT run directory or an HF folder; random init when empty).

rrhf.length_penalty  alpha in p_i = sum_t log pi(y_i,t) / |y_i|^alpha (true lengths), default 1
rrhf.rank_weight     weight of the ranking term (RRHF's `rrhf_weight`), default 1
rrhf.num_responses   responses per prompt N (0 = the most any row has; extra ones are cut and
                     counted, rows with fewer are padded and masked)

tiny       tiny LLaMA on the bundled synthetic sort task (4 responses per prompt, one correct,
           scored by the task's graded reward), 300 steps of 16 prompts (~35 s on 2 CPU cores with
           mesh dp:1,fsdp:1,tp:1); set model.path to a tiny SFT run
           (`easyrl sft --config configs/sft.py:tiny`) to start from an SFT policy as Wombat did.
           From a 200-step tiny SFT run the held-out ranking loss falls ~0.98 -> ~0.65 per prompt
           and the best response's per-token log-likelihood rises ~-0.88 -> ~-0.81 (it first dips
           while the ranking term pushes down negatives that share its tokens, then recovers).
wombat_7b  Wombat-7B (GanjinZero/RRHF train_wombat7b.sh): from Alpaca-7B (model.path), the
           released Wombat data (Alpaca prompts; responses from ChatGPT, text-davinci-003, LLaMA
           and Alpaca scored by ChatGPT), 3 epochs, lr 2e-5, weight decay 0, cosine schedule with
           3% warmup, global batch 64 prompts (8 GPUs x 1 x 8 accumulation), max length 512,
           rrhf_weight 1, length_penalty 1, bf16. The prompts must already be rendered in the
           Alpaca format ("Below is an instruction ... ### Response:") since easyrl has no
           Alpaca template (the `plain` template adds nothing), and the rows written with
           `prompt`/`responses`/`scores` columns. Responses per prompt: 4 here is our guess from
           the four sources; set rrhf.num_responses to what your data holds. Hardware: 8x A100
           80GB (Wombat's 8 GPUs). mesh dp:1,fsdp:-1,tp:1 (fsdp 8), micro-batch 8 prompts (x 4
           responses), remat dots: `easyrl plan` peak 27.50 GiB per device vs 72.00 GiB usable.

HARDWARE (below) is what each real-model preset is sized for, one entry per preset:
`python -m easyrl plan --config configs/rrhf.py:PRESET` plans on it when --devices is not given,
and tests/test_plan.py checks that the preset's mesh / micro-batch / remat fit it.
"""
import ml_collections as mlc

from easyrl.train.config import base_config

HARDWARE = {
    "wombat_7b": dict(devices=8, device_memory_gib=80, platform="gpu", name="8x A100 80GB"),
}


def get_config(preset: str = "tiny"):
    c = base_config("rrhf")
    c.rrhf = mlc.ConfigDict(dict(length_penalty=1.0, rank_weight=1.0, num_responses=0))
    if preset == "tiny":
        c.train.update(steps=300, batch_size=16, seq_len=24)
        c.optim.update(lr=1e-3, schedule="cosine", warmup=10, weight_decay=0.0)
        c.log.every = 25
        c.eval.update(every=100, max_batches=0)
        c.checkpoint.async_save = False
    elif preset == "wombat_7b":
        c.mesh = "dp:1,fsdp:-1,tp:1"  # fsdp 8 on HARDWARE's 8x A100 80GB
        c.model.update(path="/path/to/alpaca-7b", dtype="bfloat16", remat="dots")
        c.data.update(train="/path/to/wombat_train.jsonl", eval="", format="rrhf",
                      template="plain")
        c.rrhf.update(length_penalty=1.0, rank_weight=1.0, num_responses=4)
        c.train.update(epochs=3, batch_size=64, micro_batch_size=8, seq_len=512)
        c.optim.update(lr=2e-5, schedule="cosine", weight_decay=0.0)
        c.optim.warmup = 0.03  # a ratio of the run (< 1); >= 1 would be steps
        c.checkpoint.update(every=100, keep=3)
    else:
        raise ValueError(f"unknown rrhf preset {preset!r}: tiny, wombat_7b")
    return c
