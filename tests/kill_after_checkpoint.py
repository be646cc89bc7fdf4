"""Test driver: run an easyrl trainer and SIGKILL the process right after the checkpoint of a given
step is on disk (a preemption with no chance to clean up).

usage: python tests/kill_after_checkpoint.py STEP <trainer> [--config ...]
"""
import os
import signal
import sys

import orbax.checkpoint as ocp

KILL_AT = int(sys.argv[1])
_save = ocp.CheckpointManager.save


def save(self, step, *args, **kwargs):
    out = _save(self, step, *args, **kwargs)
    if step == KILL_AT:
        self.wait_until_finished()
        os.kill(os.getpid(), signal.SIGKILL)
    return out


ocp.CheckpointManager.save = save

if __name__ == "__main__":
    from easyrl.train import launch
    launch.main(sys.argv[2], sys.argv[3:])
