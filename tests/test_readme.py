"""The README stays true to the tree: its command table lists every command of `easyrl --help`,
its Layout section names every module and package of `easyrl/`, and its test command is the one
`.ci/run` runs."""
import os
import re

from easyrl import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _section(text: str, title: str) -> str:
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_command_table_lists_every_help_command():
    help_cmds = set(cli.build_parser()._subparsers._group_actions[0].choices)
    table = _section(_readme(), "Commands")
    rows = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M))
    assert rows == help_cmds, (f"README command table lacks {sorted(help_cmds - rows)}, "
                               f"lists unknown {sorted(rows - help_cmds)}")
    for name in ("kto", "orpo", "cpo", "simpo", "online_dpo"):
        assert name in help_cmds


def test_layout_names_every_module_and_package():
    layout = _section(_readme(), "Layout")
    pkg = os.path.join(ROOT, "easyrl")
    missing = []
    for entry in sorted(os.listdir(pkg)):
        if entry.startswith("_") and entry != "__main__.py" or entry.endswith(".pyc"):
            continue
        path = os.path.join(pkg, entry)
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "__init__.py")):
            continue
        name = entry + "/" if os.path.isdir(path) else entry
        if name not in layout:
            missing.append(name)
    assert not missing, f"README Layout does not mention easyrl/{missing}"
    for sub in ("setup.py", "launch.py", "run.py", "loop.py", "rl_loop.py"):
        assert sub in layout  # easyrl/train's modules


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    m = re.search(r"The tests \(what CI runs.*?```bash\n(.+?)\n```", _readme(), re.S)
    assert m, "README has no test command block"
    assert m.group(1).strip() in ci
