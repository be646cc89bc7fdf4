"""Trainer configs for tests: a `configs/<command>.py:tiny` preset on one device with overrides."""
from easyrl.train.config import load_config_file
from easyrl.train.launch import apply_overrides

ONE_DEVICE = "dp:1,fsdp:1,tp:1"  # the tiny model runs fastest unsharded on a 2-core CI box


def make_config(command, out, **over):
    c = load_config_file(f"configs/{command}.py:tiny")
    base = {"output_dir": str(out), "mesh": ONE_DEVICE, "log.tensorboard": "false"}
    apply_overrides(c, [f"{k}={v}" for k, v in {**base, **over}.items()])
    return c
