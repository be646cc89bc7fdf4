"""ORPO presets. `python -m easyrl orpo --config configs/orpo.py:PRESET [--config.KEY=VALUE ...]`

Preference pairs (as for DPO); no reference model. ORPO trains SFT and preference at once, so
`model.path` may be a base model (the paper's setting) or an SFT model.

orpo.beta   lambda, the weight of the odds-ratio term (TRL ORPOConfig.beta, default 0.1; the
            paper's lambda)
orpo.nll_tokens  all (default): the NLL term over the chosen prompt + response tokens, as TRL's
            ORPOTrainer; response: over the chosen response tokens only

tiny              tiny LLaMA on the bundled synthetic sort task; set model.path to a tiny SFT
                  run (`easyrl sft --config configs/sft.py:tiny`) or leave it empty to train
                  from a random init (ORPO's own SFT term then does the instruction tuning).
llama2_7b_uf      ORPO on UltraFeedback from a base LLaMA-2-7B (Hong et al. 2024 trained
                  Llama-2-7B and Mistral-7B base models on UltraFeedback with ORPO alone):
                  lambda 0.1 (paper / TRL default), data argilla/ultrafeedback-binarized-
                  preferences-cleaned (the ORPO repository's dataset for its Mistral-ORPO-beta
                  model), lr 5e-6, linear warmup 100 steps then cosine (the paper's schedule was
                  inverse-sqrt; cosine is our substitution), global batch 64, max length 2048,
                  3 epochs: these lr / batch / epoch values are our reading of the repository's
                  recipe, not re-verified here. Hardware: 8x A100 80GB (our assumption), mesh
                  dp:1,fsdp:-1,tp:1 (fsdp 8), micro-batch 8 pairs, remat full:
                  `easyrl plan` peak 21.06 GiB per device vs 72.00 usable.

HARDWARE (below) is what each real-model preset is sized for: `python -m easyrl plan --config
configs/orpo.py:PRESET` plans on it, and tests/test_plan.py checks that it fits.
"""
import ml_collections as mlc

from easyrl.train.config import base_config

A100_8 = dict(devices=8, device_memory_gib=80, platform="gpu", name="8x A100 80GB")
HARDWARE = {"llama2_7b_uf": A100_8}


def get_config(preset: str = "tiny"):
    c = base_config("orpo")
    # nll_tokens: all (the chosen prompt + response, as TRL's ORPOTrainer) | response
    c.orpo = mlc.ConfigDict(dict(beta=0.1, nll_tokens="all"))
    if preset == "tiny":
        c.train.update(steps=200, batch_size=32, seq_len=24)
        c.optim.update(lr=1e-3, schedule="cosine", warmup=10, weight_decay=0.0)
        c.log.every = 25
        c.eval.update(every=50, max_batches=0)
        c.checkpoint.async_save = False
    elif preset == "llama2_7b_uf":
        c.mesh = "dp:1,fsdp:-1,tp:1"
        c.model.update(path="/path/to/Llama-2-7b-hf", dtype="bfloat16", remat="full")
        c.data.update(train="argilla/ultrafeedback-binarized-preferences-cleaned", split="train",
                      eval="", template="tulu", format="")
        c.orpo.update(beta=0.1)
        c.train.update(epochs=3, batch_size=64, micro_batch_size=8, seq_len=2048)
        c.optim.update(lr=5e-6, schedule="cosine", warmup=100, weight_decay=0.0)
        c.log.every = 10
        c.checkpoint.update(every=500, keep=3)
    else:
        raise ValueError(f"unknown orpo preset {preset!r}: tiny, llama2_7b_uf")
    return c
