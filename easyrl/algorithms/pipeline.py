"""`python -m easyrl pipeline`: the trainer-style entry point (`train(c)`) of easyrl.pipeline."""
from __future__ import annotations


def train(c) -> dict:
    from easyrl.pipeline.run import run
    return run(c)
