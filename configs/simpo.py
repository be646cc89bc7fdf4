"""SimPO presets. `python -m easyrl simpo --config configs/simpo.py:PRESET [--config.KEY=VALUE]`

Preference pairs (as for DPO); no reference model. Loss -log sig(beta lp_w - beta lp_l - gamma),
lp the length-normalized (mean token) log-prob (Meng et al. 2024; TRL CPOTrainer with
loss_type="simpo", cpo_alpha=0).

simpo.beta            reward scale beta (the paper: 2.0-2.5 for 7-8B models, up to 10)
simpo.simpo_gamma     target reward margin gamma (the paper quotes gamma / beta, e.g. 0.55)
simpo.label_smoothing eps of the sigmoid form, < 0.5
simpo.cpo_alpha       weight of a chosen-response NLL term (0 = pure SimPO; CPO-SimPO uses 1)

tiny               tiny LLaMA on the bundled synthetic sort task; set model.path to a tiny SFT run.
llama3_8b_instruct SimPO's Llama-3-8B-Instruct recipe (princeton-nlp/SimPO,
                   training_configs/llama-3-8b-instruct-simpo.yaml): beta 2.5, gamma / beta 0.55
                   (gamma 1.375), lr 1e-6, cosine with 10% warmup, 1 epoch, global batch 128,
                   max length 2048 (prompt 1800), data princeton-nlp/llama3-ultrafeedback
                   (on-policy pairs ranked by PairRM), the model's own chat template. Hardware:
                   8x H100 80GB (the SimPO repository's setup), mesh dp:1,fsdp:-1,tp:1 (fsdp
                   8), micro-batch 16 pairs, remat full: `easyrl
                   plan` peak 39.82 GiB per device vs 72.00 usable.

HARDWARE (below) is what each real-model preset is sized for (tests/test_plan.py checks it).
"""
import ml_collections as mlc

from easyrl.train.config import base_config

H100_8 = dict(devices=8, device_memory_gib=80, platform="gpu", name="8x H100 80GB")
HARDWARE = {"llama3_8b_instruct": H100_8}


def get_config(preset: str = "tiny"):
    c = base_config("simpo")
    c.simpo = mlc.ConfigDict(dict(beta=2.0, simpo_gamma=1.0, label_smoothing=0.0, cpo_alpha=0.0))
    if preset == "tiny":
        # from the tiny SFT model, beta 2 / lr 1e-3 separates the pairs (held-out accuracy ~0.96)
        # but lengthens and degrades the samples (true reward 0.24 vs SFT 0.26, KL 23); a larger
        # beta and margin (gamma / beta 0.5, the paper's ratio) at lr 3e-4 improve them (0.31)
        c.simpo.update(beta=10.0, simpo_gamma=5.0)
        c.train.update(steps=200, batch_size=32, seq_len=24)
        c.optim.update(lr=3e-4, schedule="cosine", warmup=10, weight_decay=0.0)
        c.log.every = 25
        c.eval.update(every=50, max_batches=0)
        c.checkpoint.async_save = False
    elif preset == "llama3_8b_instruct":
        c.mesh = "dp:1,fsdp:-1,tp:1"
        c.model.update(path="/path/to/Meta-Llama-3-8B-Instruct", dtype="bfloat16", remat="full")
        c.data.update(train="princeton-nlp/llama3-ultrafeedback", split="train", eval="",
                      template="chat", format="")
        c.simpo.update(beta=2.5, simpo_gamma=2.5 * 0.55)
        c.train.update(epochs=1, batch_size=128, micro_batch_size=16, seq_len=2048)
        c.optim.update(lr=1e-6, schedule="cosine", warmup=0.1, weight_decay=0.0)
        c.log.every = 10
        c.checkpoint.update(every=200, keep=3)
    else:
        raise ValueError(f"unknown simpo preset {preset!r}: tiny, llama3_8b_instruct")
    return c
