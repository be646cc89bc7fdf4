"""`python -m easyrl <command>` / `easyrl <command>`."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command -> (module with add_parser(subparsers), one-line help)
COMMANDS = {
    "convert": "easyrl.convert",
    "generate": "easyrl.generate_cli",
    "plan": "easyrl.plan",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="easyrl", description="RLHF for LLaMA-family models in JAX: SFT, reward models, "
                                   "PPO, DPO, RRHF, and Hugging Face conversion.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in COMMANDS.items():
        importlib.import_module(mod).add_parser(sub)
    for name, help_ in TRAINERS.items():
        sub.add_parser(name, help=f"{help_}: --config configs/{name}.py:PRESET [--config.KEY=VALUE]")
    return parser


TRAINERS = {
    "sft": "supervised fine-tuning",
    "rm": "reward model on preference pairs",
    "dpo": "direct preference optimization (sigmoid / robust / hinge / IPO)",
    "rrhf": "rank responses to align with human feedback (RRHF)",
    "ppo": "PPO with a KL penalty, rollouts from the jitted sampler",
    "pipeline": "the whole recipe: SFT -> RM -> PPO, DPO, RRHF -> HF exports, eval, report.md",
}


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TRAINERS:  # ml_collections config flags, not argparse
        from easyrl.train import launch
        try:
            launch.main(argv[0], argv[1:])
        except (FileNotFoundError, ValueError) as e:
            print(f"easyrl {argv[0]}: error: {e}", file=sys.stderr)
            sys.exit(2)
        return
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as e:  # user errors: one clear line
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"easyrl {args.command}: error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
