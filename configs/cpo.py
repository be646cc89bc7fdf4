"""CPO presets. `python -m easyrl cpo --config configs/cpo.py:PRESET [--config.KEY=VALUE ...]`

Preference pairs (as for DPO); no reference model (CPO: Xu et al. 2024; TRL CPOTrainer).

cpo.beta            inverse temperature of the pair loss
cpo.loss_type       sigmoid | hinge | ipo | simpo (TRL CPOConfig.loss_type; ipo and simpo on
                    length-normalized log-probs, sigmoid and hinge on summed ones)
cpo.label_smoothing eps of the sigmoid / simpo forms, < 0.5
cpo.simpo_gamma     target reward margin gamma of loss_type=simpo (TRL default 0.5)
cpo.cpo_alpha       weight of the token-mean NLL of the chosen responses (TRL default 1; 0 = off)

tiny            tiny LLaMA on the bundled synthetic sort task; set model.path to a tiny SFT run.
alma_7b_lora    CPO as in the paper (ALMA-R): an ALMA-7B translation model (LLaMA-2-7B based,
                merged; model.path) with a LoRA adapter trained on the ALMA-R triplet preference
                data (haoranxu/ALMA-R-Preference, mapped to prompt/chosen/rejected by the user
                with data.columns), beta 0.1, cpo_alpha 1 (TRL's defaults, the paper's loss).
                Our reading of the paper's setting, not re-verified here: LoRA rank 16, lr 1e-4,
                global batch 128, 1 epoch, max length 512. Hardware: 8x A100 80GB (our
                assumption), mesh dp:1,fsdp:-1,tp:1, bf16 frozen base: `easyrl plan`
                peak 17.62 GiB per device vs 72.00 usable.

HARDWARE (below) is what each real-model preset is sized for (tests/test_plan.py checks it).
"""
import ml_collections as mlc

from easyrl.train.config import base_config

A100_8 = dict(devices=8, device_memory_gib=80, platform="gpu", name="8x A100 80GB")
HARDWARE = {"alma_7b_lora": A100_8}


def section(**kw):
    d = dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, simpo_gamma=0.5, cpo_alpha=1.0)
    d.update(kw)
    return mlc.ConfigDict(d)


def get_config(preset: str = "tiny"):
    c = base_config("cpo")
    c.cpo = section()
    if preset == "tiny":
        c.train.update(steps=200, batch_size=32, seq_len=24)
        c.optim.update(lr=1e-3, schedule="cosine", warmup=10, weight_decay=0.0)
        c.log.every = 25
        c.eval.update(every=50, max_batches=0)
        c.checkpoint.async_save = False
    elif preset == "alma_7b_lora":
        c.mesh = "dp:1,fsdp:-1,tp:1"
        c.model.update(path="/path/to/ALMA-7B-merged", dtype="bfloat16", remat="dots")
        c.model.lora.update(rank=16, alpha=32.0, dropout=0.05, targets="q|k|v|o",
                            base_dtype="bfloat16")
        c.data.update(train="/path/to/alma-r-preference.jsonl", eval="", format="preference")
        c.cpo.update(beta=0.1, loss_type="sigmoid", cpo_alpha=1.0)
        c.train.update(epochs=1, batch_size=128, micro_batch_size=16, seq_len=512)
        c.optim.update(lr=1e-4, schedule="cosine", warmup=0.01, weight_decay=0.01)
        c.log.every = 10
        c.checkpoint.update(every=200, keep=3)
    else:
        raise ValueError(f"unknown cpo preset {preset!r}: tiny, alma_7b_lora")
    return c
