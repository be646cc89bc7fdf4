"""Hugging Face exports of the pipeline's models, each with a model card (README.md)."""
from __future__ import annotations

import json
import os
from typing import Optional

from easyrl import checkpoint

DESCRIPTIONS = {
    "sft": "supervised fine-tuning (SFT) policy",
    "rm": "reward model (initialized from the SFT model; trained on preference pairs)",
    "ppo": "PPO policy (from the SFT policy, against the reward model, KL penalty to the SFT policy)",
    "grpo": "GRPO policy (from the SFT policy, group-relative advantages of rule-based rewards)",
    "dpo": "DPO policy (from the SFT policy, which is also the reference)",
    "online_dpo": "online DPO policy (from the SFT policy, pairs of its own samples ranked by "
                  "the reward; the SFT policy is the reference)",
    "kto": "KTO policy (from the SFT policy, which is also the reference; unpaired labels)",
    "orpo": "ORPO policy (from the SFT policy; no reference model)",
    "cpo": "CPO policy (from the SFT policy; no reference model)",
    "simpo": "SimPO policy (from the SFT policy; no reference model)",
    "rrhf": "RRHF policy (from the SFT policy)",
}
HEADLINE = {  # final metrics worth a line in the card, per stage
    "sft": ("loss", "accuracy", "eval/loss", "eval/accuracy"),
    "rm": ("loss", "accuracy", "eval/loss", "eval/accuracy", "eval/margin"),
    "ppo": ("objective/scores", "objective/kl", "objective/true_reward", "objective/kl_coef",
            "tokens/response_len"),
    "grpo": ("reward", "reward_std", "frac_reward_zero_std", "entropy", "objective/true_reward",
             "completions/mean_length"),
    "dpo": ("loss", "rewards/accuracies", "rewards/margins", "eval/loss", "eval/rewards/accuracies",
            "eval/rewards/margins"),
    "rrhf": ("loss", "rank_acc", "eval/loss", "eval/rank_acc"),
    "online_dpo": ("objective/scores", "objective/scores_margin", "objective/kl",
                   "rewards/accuracies", "objective/true_reward"),
    "kto": ("loss", "kl", "rewards/margins", "eval/loss", "eval/rewards/margins"),
    "orpo": ("loss", "nll_loss", "rewards/accuracies", "eval/rewards/accuracies",
             "eval/rewards/margins"),
    "cpo": ("loss", "rewards/accuracies", "eval/rewards/accuracies", "eval/rewards/margins"),
    "simpo": ("loss", "rewards/accuracies", "eval/rewards/accuracies", "eval/rewards/margins"),
}


def export(name: str, run_dir: str, out: str, *, mesh=None, generation: Optional[dict] = None) -> None:
    """Write `out` (HF folder with weights, tokenizer, generation_config) from run dir `run_dir`.
    With `mesh` the parameters are restored sharded (a 13B model need not fit one device); every
    process must call this, process 0 writes."""
    from easyrl import hf
    from easyrl.convert import TOKENIZER_SUBDIR
    kind = "reward" if name == "rm" else "causal_lm"
    # a LoRA stage is exported merged (full weights); `easyrl convert easyrl-to-peft` writes the
    # adapters alone
    config, _, params = checkpoint.load_model(run_dir, kind=kind, mesh=mesh, merge_lora=True)
    tok = os.path.join(run_dir, TOKENIZER_SUBDIR)
    hf.save(out, config, params, kind=kind, tokenizer=tok if os.path.isdir(tok) else None,
            generation=generation if kind == "causal_lm" else None)
    if checkpoint.read_model_config(checkpoint.resolve(run_dir)[0])[0].lora_rank:
        from easyrl.convert import easyrl_to_peft
        easyrl_to_peft(run_dir, out + "_peft")


def model_card(name: str, run_dir: str, out: str, *, metrics: dict, evaluation: Optional[dict],
               pipeline_dir: str, template: str, eval_settings: Optional[dict] = None) -> str:
    """README.md for export `out` of stage `name`: what it is, how to load it, the stage config,
    final training metrics and held-out evaluation numbers."""
    from easyrl import hf
    mconfig, kind, stored = checkpoint.read_model_config(run_dir)
    run_config = stored.get("run_config", {})
    step = checkpoint.latest_step(run_dir)
    is_rm = name == "rm"
    arch = hf.architecture(mconfig, "reward" if is_rm else "causal_lm")
    auto = "AutoModelForSequenceClassification" if is_rm else "AutoModelForCausalLM"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [easyrl, rlhf, " + ("reward-model" if is_rm else name) + "]",
        "---",
        f"# {name}: {DESCRIPTIONS.get(name, name)}",
        "",
        f"Trained with easyrl's `python -m easyrl pipeline` (stage `{name}`, "
        f"{step} steps), exported from the easyrl run directory `{os.path.abspath(run_dir)}` as a "
        f"`{arch}`.",
        "",
        "## Load it",
        "",
        "```python",
        "import torch",
        f"from transformers import AutoTokenizer, {auto}",
        "",
        f'tok = AutoTokenizer.from_pretrained("{os.path.abspath(out)}")',
        f'model = {auto}.from_pretrained("{os.path.abspath(out)}")',
    ]
    prompt = "sort: f b d a" if template == "plain" else "..."
    if is_rm:
        lines += [
            f'batch = tok(["{prompt}" + " a b d f"], return_tensors="pt")',
            "with torch.no_grad():",
            "    reward = model(**batch).logits[:, 0]  # higher = better",
        ]
    else:
        lines += [
            f'batch = tok(["{prompt}"], return_tensors="pt")',
            "out = model.generate(**batch, max_new_tokens=16, do_sample=False)",
            'print(tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True))',
        ]
    lines += ["```", ""]
    if template != "plain":
        lines += [f"Prompts use easyrl's `{template}` template (see easyrl/data/templates.py).", ""]
    else:
        lines += ["Prompts are plain text (BOS + prompt; the response follows directly and ends "
                  "with EOS).", ""]
    if evaluation:
        es = eval_settings or {}
        how = (f" ({es.get('num_prompts')} held-out prompts x {es.get('num_samples', 1)} "
               f"responses at temperature {es.get('temperature')}; `*_greedy`: greedy decoding; "
               f"kl_to_sft in nats against the SFT policy)") if es else ""
        lines += ["## Held-out evaluation", "",
                  f"From the pipeline report `{os.path.join(os.path.abspath(pipeline_dir), 'report.md')}`"
                  f"{how}:", "", "| metric | value |", "|---|---|"]
        for k, v in evaluation.items():
            if isinstance(v, float):
                lines.append(f"| {k} | {v:.4f} |")
        lines.append("")
    if metrics:
        lines += ["## Final training metrics", "", "| metric | value |", "|---|---|"]
        keys = [k for k in HEADLINE.get(name, ()) if k in metrics]
        keys += [k for k in sorted(metrics) if k not in keys and not k.startswith(("data/", "time/"))
                 and isinstance(metrics[k], (int, float))]
        for k in keys:
            v = metrics[k]
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines.append("")
    lines += ["## Training settings", "",
              f"The `{name}` stage config (`python -m easyrl {run_config.get('command', name)} "
              f"--config configs/{run_config.get('command', name)}.py:...` with these values):", "",
              "```json", json.dumps(run_config, indent=2, sort_keys=True), "```", ""]
    text = "\n".join(lines)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(text)
    return text
