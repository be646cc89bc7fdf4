"""`<output_dir>/report.md`: the held-out results table and training-curve plots (PNG, Agg)."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

POLICIES = ("sft", "ppo", "grpo", "online_dpo", "dpo", "kto", "orpo", "cpo", "simpo", "rrhf")
AT_K = ("pass@1", "pass@4", "pass@8", "maj@4", "maj@8")  # report columns (eval has maj@1 too)


def _series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts], float)) if pts else None


def _smooth(y, n):
    if len(y) < 2 * n or n <= 1:
        return y
    k = np.ones(n) / n
    pad = np.concatenate([np.full(n - 1, y[0]), y])
    return np.convolve(pad, k, mode="valid")


def load_pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _panel(ax, rows, key, label, color, *, eval_key=None, smooth=0, ylabel=None, title=None):
    s = _series(rows, key)
    if s is not None:
        x, y = s
        if smooth and len(y) >= 2 * smooth:
            ax.plot(x, y, color=color, alpha=0.25, lw=1)
            ax.plot(x, _smooth(y, smooth), color=color, lw=2, label=f"{label} ({smooth}-step avg)")
        else:
            ax.plot(x, y, color=color, lw=2, label=label, marker="." if len(x) < 30 else None)
    if eval_key:
        e = _series(rows, eval_key)
        if e is not None:
            ax.plot(e[0], e[1], color="tab:orange", lw=1.5, ls="--", marker="o", ms=6,
                    label="held-out eval")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel or label)
    if title:
        ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)


# (file, title, [(key, label, eval key, ylabel, smooth)])
PLOTS = {
    "sft": ("sft_loss.png", "SFT: token cross-entropy (lower is better)",
            [("loss", "train loss", "eval/loss", "cross-entropy (nats/token)", 0)]),
    "rm": ("rm_accuracy.png", "Reward model: pair accuracy and margin",
           [("accuracy", "train accuracy", "eval/accuracy", "accuracy  (r_chosen > r_rejected)", 0),
            ("margin", "train margin", "eval/margin", "r_chosen - r_rejected", 0)]),
    "ppo": ("ppo.png", "PPO: reward-model score, KL to SFT and true reward per iteration",
            [("objective/scores", "RM score", None, "mean RM score of rollouts", 5),
             ("objective/kl", "KL to SFT", None, "sum_t (log pi - log pi_sft)", 5),
             ("objective/true_reward", "true reward", None, "rule-based reward of rollouts", 5)]),
    "grpo": ("grpo.png", "GRPO: rule-based reward, its spread within groups and entropy",
             [("reward", "reward", None, "mean reward of rollouts (reward.functions)", 5),
              ("frac_reward_zero_std", "groups with one reward", None,
               "fraction of groups whose G rewards are equal", 5),
              ("entropy", "entropy", None, "token entropy of the policy", 5)]),
    "dpo": ("dpo.png", "DPO: implicit-reward margins and accuracies",
            [("rewards/margins", "train margin", "eval/rewards/margins", "beta * (h_chosen - h_rejected)", 0),
             ("rewards/accuracies", "train accuracy", "eval/rewards/accuracies", "accuracy", 0)]),
    "online_dpo": ("online_dpo.png", "Online DPO: reward of its samples, score margin of the "
                   "pairs and KL to SFT",
                   [("objective/scores", "reward", None, "mean reward of rollouts", 5),
                    ("objective/scores_margin", "chosen - rejected reward", None,
                     "reward margin of the ranked pairs", 5),
                    ("objective/kl", "KL to SFT", None, "sum_t (log pi - log pi_sft)", 5)]),
    "kto": ("kto.png", "KTO: implicit-reward margin and the KL reference point",
            [("rewards/margins", "train margin", "eval/rewards/margins",
              "mean reward of desirable - of undesirable", 0),
             ("kl", "train z", "eval/kl", "z = max(0, KL estimate)", 0)]),
    "orpo": ("orpo.png", "ORPO: pair accuracy and the chosen NLL",
             [("rewards/accuracies", "train accuracy", "eval/rewards/accuracies", "accuracy", 0),
              ("nll_loss", "train NLL", "eval/nll_loss", "chosen NLL (nats/token)", 0)]),
    "cpo": ("cpo.png", "CPO: implicit-reward margins and accuracies",
            [("rewards/margins", "train margin", "eval/rewards/margins", "beta (lp_w - lp_l)", 0),
             ("rewards/accuracies", "train accuracy", "eval/rewards/accuracies", "accuracy", 0)]),
    "simpo": ("simpo.png", "SimPO: length-normalized reward margins and accuracies",
              [("rewards/margins", "train margin", "eval/rewards/margins",
                "beta (lp_w - lp_l), per-token lp", 0),
               ("rewards/accuracies", "train accuracy", "eval/rewards/accuracies", "accuracy", 0)]),
    "rrhf": ("rrhf.png", "RRHF: ranking accuracy and loss",
             [("rank_acc", "train rank accuracy", "eval/rank_acc", "ordered pairs ranked right", 0),
              ("loss", "train loss", "eval/loss", "loss (rank + SFT)", 0)]),
}
COLORS = ("tab:blue", "tab:green", "tab:purple")


def plot_stage(stage: str, rows: list, out_dir: str) -> Optional[str]:
    """One PNG of a stage's metrics.jsonl rows; returns its file name (None without matplotlib)."""
    plt = load_pyplot()
    if plt is None or stage not in PLOTS or not rows:
        return None
    fname, title, panels = PLOTS[stage]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (key, label, ekey, ylabel, smooth), color in zip(axes[0], panels, COLORS):
        _panel(ax, rows, key, label, color, eval_key=ekey, smooth=smooth, ylabel=ylabel,
               title=label.replace("train ", ""))
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(os.path.join(out_dir, fname), dpi=110)
    plt.close(fig)
    return fname


def plot_eval(results: dict, out_dir: str) -> Optional[str]:
    """Bar charts of the held-out table: true reward (or RM score) and KL to SFT per policy."""
    plt = load_pyplot()
    names = [n for n in POLICIES if n in results] + [n for n in results if n not in POLICIES]
    if plt is None or not names:
        return None
    cols = [(k, t) for k, t in (("true_reward", "true reward (held-out)"),
                                ("rm_score", "RM score (held-out)"),
                                ("kl_to_sft", "KL to SFT"))
            if all(k in results[n] for n in names)]
    fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.6), squeeze=False)
    colors = {"sft": "tab:gray", "ppo": "tab:blue", "grpo": "tab:orange", "dpo": "tab:green",
              "rrhf": "tab:purple", "online_dpo": "tab:red", "kto": "tab:brown",
              "orpo": "tab:pink", "cpo": "tab:cyan", "simpo": "tab:olive"}
    for ax, (k, t) in zip(axes[0], cols):
        vals = [results[n][k] for n in names]
        bars = ax.bar(names, vals, color=[colors.get(n, "tab:olive") for n in names])
        ax.bar_label(bars, fmt="%.3f", fontsize=9)
        if "sft" in results:
            ax.axhline(results["sft"][k], color="black", lw=0.8, ls=":")
        ax.set_title(t, fontsize=11)
        ax.grid(alpha=0.3, axis="y")
        lo, hi = min(0.0, *vals), max(0.0, *vals)
        ax.set_ylim(lo - 0.12 * (hi - lo + 1e-9), hi + 0.15 * (hi - lo + 1e-9))
    fig.suptitle("Policies on held-out prompts", fontsize=12)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(os.path.join(out_dir, "eval.png"), dpi=110)
    plt.close(fig)
    return "eval.png"


def _first_last(rows, key, n=5):
    s = _series(rows, key)
    if s is None or len(s[1]) == 0:
        return None
    y = s[1]
    return float(np.mean(y[:n])), float(np.mean(y[-n:]))


def stage_summary(stage: str, rows: list) -> str:
    """One line saying what the stage learned, from its metrics."""
    def fl(key, n=1, fmt="{:.3f}"):
        s = _series(rows, key)
        if s is None:
            return None
        if len(s[1]) < 2 * n:
            return fmt.format(s[1][-1])
        v = _first_last(rows, key, n)
        return f"{fmt.format(v[0])} -> {fmt.format(v[1])}"

    def last(key, fmt="{:.3f}"):
        s = _series(rows, key)
        return None if s is None else fmt.format(s[1][-1])
    parts = []
    if stage == "sft":
        parts = [("train loss", fl("loss")), ("held-out loss", last("eval/loss")),
                 ("held-out token accuracy", last("eval/accuracy"))]
    elif stage == "rm":
        parts = [("train accuracy", fl("accuracy")), ("held-out accuracy", last("eval/accuracy")),
                 ("held-out margin", last("eval/margin"))]
    elif stage == "ppo":
        parts = [("RM score (first 5 -> last 5 iterations)", fl("objective/scores", 5)),
                 ("true reward", fl("objective/true_reward", 5)),
                 ("KL to SFT", fl("objective/kl", 5))]
    elif stage == "grpo":
        parts = [("reward (first 5 -> last 5 iterations)", fl("reward", 5)),
                 ("groups with one reward", fl("frac_reward_zero_std", 5)),
                 ("entropy", fl("entropy", 5))]
    elif stage == "dpo":
        parts = [("train margin", fl("rewards/margins")),
                 ("held-out accuracy", last("eval/rewards/accuracies")),
                 ("held-out margin", last("eval/rewards/margins"))]
    elif stage == "rrhf":
        parts = [("train rank accuracy", fl("rank_acc")), ("held-out rank accuracy",
                                                          last("eval/rank_acc"))]
    elif stage == "online_dpo":
        parts = [("reward (first 5 -> last 5 iterations)", fl("objective/scores", 5)),
                 ("true reward", fl("objective/true_reward", 5)),
                 ("KL to SFT", fl("objective/kl", 5))]
    elif stage == "kto":
        parts = [("train margin", fl("rewards/margins")),
                 ("held-out margin", last("eval/rewards/margins")), ("z", fl("kl"))]
    elif stage in ("orpo", "cpo", "simpo"):
        parts = [("train accuracy", fl("rewards/accuracies")),
                 ("held-out accuracy", last("eval/rewards/accuracies")),
                 ("held-out margin", last("eval/rewards/margins"))]
    return "; ".join(f"{k} {v}" for k, v in parts if v is not None)


def _cell(text: str) -> str:
    """Text as a markdown table cell (code span; pipes escaped)."""
    text = (text or "").replace("`", "'").replace("|", "\\|").replace("\n", " ")
    return f"`{text}`" if text.strip() else "(empty)"


def _fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}"


def _dur(s):
    if s is None:
        return "-"
    m, s = divmod(int(round(s)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def write_report(output_dir: str, *, stages: list, stage_info: dict, metrics: dict,
                 evaluation: Optional[dict], eval_settings: Optional[dict], exports: dict,
                 total_seconds: float, note: str = "") -> str:
    """Write report.md (and plots/) and return its text.

    stage_info: {stage: {"status": "trained" | "resumed" | "reused", "seconds": float, "step": int}}
    metrics: {stage: metrics.jsonl rows}; evaluation: {policy: metrics} or None;
    exports: {name: folder}."""
    plots_dir = os.path.join(output_dir, "plots")
    trained = sum(stage_info.get(s, {}).get("seconds") or 0.0 for s in stages)
    lines = ["# easyrl pipeline report", "",
             f"Output directory: `{os.path.abspath(output_dir)}`. Training time of the stages: "
             f"{_dur(trained)}; this run of the pipeline: {_dur(total_seconds)} (reused stages "
             f"cost nothing).", ""]
    if note:
        lines += [note, ""]
    lines += ["| stage | status | steps | time | what it learned |", "|---|---|---|---|---|"]
    for s in stages:
        info = stage_info.get(s, {})
        lines.append(f"| {s} | {info.get('status', '-')} | {info.get('step', '-')} | "
                     f"{_dur(info.get('seconds'))} | {stage_summary(s, metrics.get(s, []))} |")
    lines.append("")

    have_plt = load_pyplot() is not None
    if evaluation:
        es = eval_settings or {}
        temp = es.get("temperature", 1.0)
        how = "greedy decoding" if temp == 0 else f"sampling at temperature {temp:g}"
        lines += ["## Policies on held-out prompts", "",
                  f"{es.get('num_prompts', '?')} held-out prompts x {es.get('num_samples', 1)} "
                  f"response(s) each, {how}, up to {es.get('max_new_tokens', '?')} new tokens.", ""]
        names = [n for n in POLICIES if n in evaluation] + [n for n in evaluation if n not in POLICIES]
        has_true = any("true_reward" in evaluation[n] for n in names)
        has_rm = any("rm_score" in evaluation[n] for n in names)
        has_greedy = any("true_reward_greedy" in evaluation[n] for n in names)
        at_k = [k for k in AT_K if any(k in evaluation[n] for n in names)]
        # pass@1 is the fraction of responses exactly right: it replaces the `exact` column
        correct_cols = at_k if "pass@1" in at_k else ["exact"] + at_k
        n_samples = es.get("num_samples", 1)
        head = ["policy"] + (["true reward"] + correct_cols if has_true else []) + \
            (["RM score"] if has_rm else []) + ["KL to SFT", "mean response length"] + \
            (["true reward (greedy)"] if has_greedy else [])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for n in names:
            r = evaluation[n]
            row = [f"**{n}**"] + ([_fmt(r.get("true_reward"))] + [_fmt(r.get(k)) for k in correct_cols]
                                  if has_true else []) + \
                ([_fmt(r.get("rm_score"))] if has_rm else []) + \
                [_fmt(r.get("kl_to_sft")), _fmt(r.get("response_len"), 2)] + \
                ([_fmt(r.get("true_reward_greedy"))] if has_greedy else [])
            lines.append("| " + " | ".join(row) + " |")
        bullets = [
            "- **true reward**: the synthetic task's rule-based reward in [0, 1] (0.5 x letters "
            "right + 0.5 x positions right; 1 = correctly sorted)" + (
                "; **exact**: the fraction of responses that are exactly right."
                if "exact" in correct_cols else ".") if has_true else "",
            f"- **pass@k**: the chance that at least one of k of a prompt's {n_samples} responses "
            "is exactly right (true reward 1), the unbiased estimator 1 - C(n-c, k) / C(n, k) of "
            "Chen et al. 2021 (c right of n), averaged over prompts; pass@1 = the fraction of "
            "responses exactly right. **maj@k**: the fraction of prompts whose most frequent "
            "answer among their first k responses (whitespace-normalized text; ties to the "
            "first seen) is right. Both from the same sampled responses."
            if has_true and at_k else "",
            "- **RM score**: the trained reward model's score of prompt + response." if has_rm else "",
            "- **KL to SFT**: mean over responses of sum_t [log pi(y_t) - log pi_sft(y_t)] on each "
            "policy's own responses (in nats; at temperature 1 an estimate of KL(pi || pi_sft)).",
            "- **mean response length**: generated tokens, EOS included.",
            "- **true reward (greedy)**: the same reward for greedy (argmax) decoding." if has_greedy else "",
        ]
        lines += [""] + [b for b in bullets if b] + [""]
        if have_plt:
            f = plot_eval(evaluation, plots_dir)
            if f:
                lines += [f"![held-out results](plots/{f})", ""]
        samples = [(n, s) for n in names for s in evaluation[n].get("samples", [])[:2]]
        if samples:
            lines += ["<details><summary>sample responses</summary>", "",
                      "| policy | mode | prompt | response |", "|---|---|---|---|"]
            lines += [f"| {n} | {s.get('mode', '')} | {_cell(s['prompt'])} | {_cell(s['response'])} |"
                      for n, s in samples]
            lines += ["", "</details>", ""]
    else:
        lines += ["## Policies on held-out prompts", "", "Not evaluated (eval.prompts is empty).", ""]

    lines += ["## Training curves", ""]
    if not have_plt:
        lines += ["Plots need matplotlib: `pip install 'easyrl[plots]'` (or `pip install "
                  "matplotlib`) and re-run the pipeline (finished stages are reused).", ""]
    for s in stages:
        rows = metrics.get(s)
        if not rows or s not in PLOTS:
            continue
        f = plot_stage(s, rows, plots_dir) if have_plt else None
        lines += [f"### {s}: {PLOTS[s][1]}", "", stage_summary(s, rows) + ".", ""]
        if f:
            lines += [f"![{s}](plots/{f})", ""]
    if exports:
        lines += ["## Exports (Hugging Face folders)", ""]
        for n, d in exports.items():
            cls = "AutoModelForSequenceClassification" if n == "rm" else "AutoModelForCausalLM"
            lines.append(f"- `{n}`: `{os.path.abspath(d)}` (`{cls}.from_pretrained`; model card in "
                         f"its README.md)")
        lines.append("")
    text = "\n".join(lines)
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write(text)
    return text
