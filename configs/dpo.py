"""DPO presets. `python -m easyrl dpo --config configs/dpo.py:PRESET [--config.KEY=VALUE ...]`

The policy starts from `model.path` (an SFT run directory or an HF folder; random init from
model.preset when empty) and the reference is that same initial policy.

dpo.beta            inverse temperature of the implicit reward r = beta (logp - logp_ref)
dpo.loss_type       sigmoid | robust | hinge | ipo | exo_pair | nca_pair | bco_pair | sppo_hard |
                    aot | aot_pair (= aot_unpaired) | apo_zero | apo_down | discopop | sft (TRL
                    DPOTrainer's loss types; formulas and sources in docs/algorithms.md), or a
                    comma-separated list of them, e.g. sigmoid,sppo_hard: loss = sum_i w_i loss_i
dpo.loss_weights    comma-separated weights w_i >= 0, one per dpo.loss_type entry; "" = 1 each
dpo.rpo_alpha       RPO (TRL rpo_alpha): adds rpo_alpha x the mean token NLL of the chosen
                    responses of the batch; 0 = off
dpo.label_smoothing eps for sigmoid (conservative DPO), robust, exo_pair (0 -> 1e-3, as TRL), aot
                    and aot_pair; must be < 0.5
dpo.discopop_tau    temperature of the discopop loss (TRL discopop_tau, default 0.05)
dpo.reference_free  reference log-probs are 0 (no reference model at all)
dpo.precompute_ref  one pass of the initial policy over train and eval data before training
                    stores reference log-probs in the batches: no reference model is held
                    while training (otherwise a frozen copy of the initial params is, or,
                    with LoRA (model.lora.rank > 0), the base with the adapters off: no copy)

tiny            tiny LLaMA on the bundled synthetic sort task; set model.path to a tiny SFT run
                (`easyrl sft --config configs/sft.py:tiny`) for the SFT -> DPO recipe, or leave it
                empty to start from a random init (the reference is then that random policy).
stackllama2_7b  Stack-Llama-2 (TRL examples/research_projects/stack_llama_2/scripts/
                dpo_llama2.py): beta 0.1, reference = the SFT model (model.path), data
                lvwerra/stack-exchange-paired `data/rl` (eval `data/evaluation`) with the prompt
                `Question: {q}\\n\\nAnswer: ` (stackllama template), max length 1024 (prompt cut
                from the left), 1000 steps, global batch 128 (8 GPUs x 4 x 4 accumulation),
                cosine schedule with 100 warmup steps, weight decay 0.05. TRL trained a LoRA
                adapter (r=8, alpha 16) at lr 5e-4 on a 4-bit base; easyrl trains all weights, so
                the preset uses lr 5e-7 (the full-fine-tuning DPO rate of Zephyr / Tulu 2 DPO) --
                our substitution, not a published Stack-Llama-2 value. data.columns maps the
                dataset's question/response_j/response_k to prompt/chosen/rejected
                (response_j is preferred). Hardware: 8x A100 80GB (our assumption: TRL's 8 GPUs,
                as for StackLLaMA). mesh dp:1,fsdp:-1,tp:1 (fsdp 8), micro-batch 16 pairs, remat
                dots, live reference: `easyrl plan` peak 53.94 GiB per device vs 72.00 GiB usable.
stackllama2_7b_lora  the same with TRL's LoRA adapter: r 8, alpha 16, dropout 0.05 on q/k/v,
                lr 5e-4, bf16 frozen base, reference = base with adapters off. Ship the result
                with `easyrl convert easyrl-to-peft`. Same hardware and setting: peak 42.84 GiB
                per device vs 72.00 GiB usable.
zephyr_7b       Zephyr-7B-beta's DPO stage (alignment-handbook recipes/zephyr-7b-beta/dpo/
                config_full.yaml, README "8 GPUs (80GB of VRAM)"): DPO of the SFT model
                alignment-handbook/zephyr-7b-sft-full (Mistral-7B-v0.1 fine-tuned on UltraChat;
                model.path /path/to/zephyr-7b-sft-full, planned as the mistral_7b preset) on
                HuggingFaceH4/ultrafeedback_binarized train_prefs, eval test_prefs (the file's
                earlier dataset_splits; its current dataset_mixture pools both splits and holds
                out 2000 rows; chosen / rejected are message lists whose last assistant turn is
                the response), beta 0.01, loss sigmoid, lr 5e-7, cosine schedule, warmup ratio
                0.1, 1 epoch, global batch 128 pairs (8 GPUs x 8 x 2 accumulation), AdamW
                without weight decay, max length 1024, eval every 100 steps, checkpoints every
                100 (save_total_limit 1), template chat (the SFT model's own <|user|> /
                <|assistant|> chat template; the handbook also inserts an empty system turn).
                The HuggingFaceH4/zephyr-7b-beta model card (an earlier run, before the
                UltraFeedback label fixes) differs: 3 epochs, 16 devices x 2 = batch 32, linear
                schedule, and beta 0.1 per the Zephyr report (arXiv:2310.16944); we follow the
                handbook file, whose README says 1 epoch at beta 0.01 matches zephyr-7b-beta.
                TRL's max_prompt_length 512 has no equivalent: easyrl cuts the prompt from the
                left only as far as the longer response needs. Hardware: 8x A100 80GB. mesh
                dp:1,fsdp:-1,tp:1 (fsdp 8), micro-batch 16 pairs (8 accumulation steps), remat
                dots, live reference: `easyrl plan` peak 55.58 GiB per device vs 72.00 GiB usable
                (the handbook's own 8 per GPU x 2 accumulation with gradient checkpointing,
                micro-batch 64 with remat full, plans 70.28 GiB: it fits, with little to spare).

HARDWARE (below) is what each real-model preset is sized for, one entry per preset:
`python -m easyrl plan --config configs/dpo.py:PRESET` plans on it when --devices is not given,
and tests/test_plan.py checks that the preset's mesh / micro-batch / remat fit it.
"""
import ml_collections as mlc

from easyrl.train.config import base_config

A100_8 = dict(devices=8, device_memory_gib=80, platform="gpu", name="8x A100 80GB")
HARDWARE = {"stackllama2_7b": A100_8, "stackllama2_7b_lora": A100_8, "zephyr_7b": A100_8}


def get_config(preset: str = "tiny"):
    c = base_config("dpo")
    c.dpo = mlc.ConfigDict(dict(beta=0.1, loss_type="sigmoid", loss_weights="", rpo_alpha=0.0,
                                label_smoothing=0.0, discopop_tau=0.05, reference_free=False,
                                precompute_ref=False))
    if preset == "tiny":
        c.train.update(steps=200, batch_size=32, seq_len=24)
        c.optim.update(lr=1e-3, schedule="cosine", warmup=10, weight_decay=0.0)
        c.log.every = 25
        c.eval.update(every=50, max_batches=0)
        c.checkpoint.async_save = False
    elif preset == "stackllama2_7b":
        c.mesh = "dp:1,fsdp:-1,tp:1"  # fsdp 8 on HARDWARE's 8x A100 80GB
        c.model.update(path="/path/to/llama-2-7b-se-sft", dtype="bfloat16", remat="dots")
        c.data.update(train="/path/to/stack-exchange-paired/data/rl",
                      eval="/path/to/stack-exchange-paired/data/evaluation",
                      format="preference", template="stackllama", columns="question:prompt,response_j:chosen,response_k:rejected")
        c.dpo.update(beta=0.1, loss_type="sigmoid")
        c.train.update(steps=1000, batch_size=128, micro_batch_size=16, seq_len=1024)
        c.optim.update(lr=5e-7, schedule="cosine", warmup=100, weight_decay=0.05)
        c.eval.update(every=100, max_batches=50)
        c.log.every = 10
        c.checkpoint.update(every=100, keep=3)
    elif preset == "stackllama2_7b_lora":
        # what TRL ran: a LoRA adapter (r 8, alpha 16, dropout 0.05) at lr 5e-4 on a frozen base.
        # TRL's target_modules list names q/k/v plus GPT-J modules absent from LLaMA, so on LLaMA
        # it adapts q_proj, k_proj, v_proj. The base is held in bf16 (TRL: 4-bit); the reference
        # is the base with the adapters off (no second copy).
        c = get_config("stackllama2_7b")
        c.model.lora.update(rank=8, alpha=16.0, dropout=0.05, targets="q|k|v",
                            base_dtype="bfloat16")
        c.optim.update(lr=5e-4)
    elif preset == "zephyr_7b":
        c.mesh = "dp:1,fsdp:-1,tp:1"  # fsdp 8 on HARDWARE's 8x A100 80GB
        c.model.update(path="/path/to/zephyr-7b-sft-full", dtype="bfloat16", remat="dots")
        c.data.update(train="HuggingFaceH4/ultrafeedback_binarized:train_prefs",
                      eval="HuggingFaceH4/ultrafeedback_binarized:test_prefs",
                      format="preference", template="chat")
        c.dpo.update(beta=0.01, loss_type="sigmoid")
        c.train.update(epochs=1, batch_size=128, micro_batch_size=16, seq_len=1024)
        c.optim.update(lr=5e-7, schedule="cosine", warmup=0.1, weight_decay=0.0)
        c.eval.update(every=100, max_batches=0)
        c.log.every = 10
        c.checkpoint.update(every=100, keep=1)
    else:
        raise ValueError(f"unknown dpo preset {preset!r}: tiny, stackllama2_7b, "
                         f"stackllama2_7b_lora, zephyr_7b")
    return c
