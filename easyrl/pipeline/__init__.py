"""The whole RLHF recipe in one command: `python -m easyrl pipeline` (see configs/pipeline.py).

run.py       stages (SFT -> RM -> PPO, DPO, RRHF), reuse / resume / redo / force, orchestration;
             `easyrl.pipeline.run.run(config)` runs it
evaluate.py  held-out evaluation: true reward, reward-model score, KL to SFT, response length
export.py    Hugging Face folders with model cards
report.py    report.md and its plots
"""
