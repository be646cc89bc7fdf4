"""KTO presets. `python -m easyrl kto --config configs/kto.py:PRESET [--config.KEY=VALUE ...]`

Data: unpaired rows {prompt, completion, label: true/false} (TRL's unpaired preference format),
or paired preference rows, which are unpaired automatically (chosen -> true, rejected ->
false). The policy starts from `model.path` (an SFT run directory or an HF folder) and the
reference is that same initial policy.

kto.beta               inverse temperature of the implicit reward r = logp - logp_ref
kto.desirable_weight   w_d, weight of the desirable (label true) examples' loss
kto.undesirable_weight w_u, weight of the undesirable examples' loss; with unequal class counts
                       keep w_d n_d / (w_u n_u) in [1, 4/3] (TRL and the KTO paper, Eq. 8: the
                       trainer warns otherwise)
kto.loss_type          kto | apo_zero_unpaired (TRL KTOTrainer; formulas in docs/algorithms.md)
kto.precompute_ref     one pass of the initial policy over train and eval data before training
                       stores the reference log-probs (example and KL row) per example: no
                       reference model is held while training (otherwise a frozen copy, or with
                       LoRA the base with the adapters off)

tiny            tiny LLaMA on the bundled synthetic sort task, its preference pairs unpaired;
                set model.path to a tiny SFT run (`easyrl sft --config configs/sft.py:tiny`).
kto_mix_7b      TRL's KTO example (docs "KTO Trainer", trl/scripts/kto.py): dataset
                trl-lib/kto-mix-14k (unpaired, messages), beta 0.1, desirable / undesirable
                weight 1, lr 5e-7 with a cosine schedule and 10% warmup, 1 epoch, bf16. TRL's
                example model is Qwen2-0.5B-Instruct; this preset sizes the recipe for a LLaMA-7B
                SFT model (model.path; our substitution until the Qwen bases land), global batch
                64 (TRL's KTO paper runs: 32-64; our choice), max length 1024. Hardware: 8x A100
                80GB (our assumption), mesh dp:1,fsdp:-1,tp:1 (fsdp 8), micro-batch 16, remat
                dots, live reference: `easyrl plan` peak 53.94 GiB per device vs 72.00
                usable.

HARDWARE (below) is what each real-model preset is sized for: `python -m easyrl plan --config
configs/kto.py:PRESET` plans on it, and tests/test_plan.py checks that it fits.
"""
import ml_collections as mlc

from easyrl.train.config import base_config

A100_8 = dict(devices=8, device_memory_gib=80, platform="gpu", name="8x A100 80GB")
HARDWARE = {"kto_mix_7b": A100_8}


def get_config(preset: str = "tiny"):
    c = base_config("kto")
    c.kto = mlc.ConfigDict(dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0,
                                loss_type="kto", precompute_ref=False))
    if preset == "tiny":
        c.kto.beta = 0.5  # from the tiny SFT model: held-out true reward 0.42 (beta 0.1: 0.39)
        c.train.update(steps=200, batch_size=32, seq_len=24)
        c.optim.update(lr=1e-3, schedule="cosine", warmup=10, weight_decay=0.0)
        c.log.every = 25
        c.eval.update(every=50, max_batches=0)
        c.checkpoint.async_save = False
    elif preset == "kto_mix_7b":
        c.mesh = "dp:1,fsdp:-1,tp:1"
        c.model.update(path="/path/to/llama-7b-sft", dtype="bfloat16", remat="dots")
        c.data.update(train="trl-lib/kto-mix-14k", split="train", eval="", template="chat",
                      format="unpaired")
        c.kto.update(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
        c.train.update(epochs=1, batch_size=64, micro_batch_size=16, seq_len=1024)
        c.optim.update(lr=5e-7, schedule="cosine", warmup=0.1, weight_decay=0.0)
        c.log.every = 10
        c.checkpoint.update(every=200, keep=3)
    else:
        raise ValueError(f"unknown kto preset {preset!r}: tiny, kto_mix_7b")
    return c
