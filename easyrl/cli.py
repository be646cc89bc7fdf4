"""`python -m easyrl <command>` / `easyrl <command>`."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from easyrl.algorithms import registry
from easyrl.train.run import NonFiniteError

# command -> (module with add_parser(subparsers), one-line help)
COMMANDS = {
    "convert": "easyrl.convert",
    "generate": "easyrl.generate_cli",
    "plan": "easyrl.plan",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="easyrl", description="RLHF for LLaMA-family models in JAX: SFT, reward models, "
                                   "PPO, GRPO, online DPO, DPO, KTO, ORPO, CPO, SimPO, RRHF, "
                                   "and Hugging Face conversion.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in COMMANDS.items():
        importlib.import_module(mod).add_parser(sub)
    for name, algo in registry.all_algorithms().items():
        sub.add_parser(name, help=f"{algo.help}: --config configs/{name}.py:PRESET [--config.KEY=VALUE]")
    return parser


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in registry.all_algorithms():  # ml_collections config flags, not argparse
        from easyrl.train import launch
        try:
            launch.main(argv[0], argv[1:])
        except (FileNotFoundError, ValueError) as e:  # bad config or input: one line
            print(f"easyrl {argv[0]}: error: {e}", file=sys.stderr)
            sys.exit(2)
        except NonFiniteError as e:  # the run stopped: its last checkpoint is finite
            print(f"easyrl {argv[0]}: stopped: {e}", file=sys.stderr)
            sys.exit(1)
        return
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.config_overrides = rest
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
