"""The algorithm registry: every trainer is found, and each supervised record's batch_spec (what
the planner compiles with) is exactly the batch its own task's iterators produce."""
import numpy as np
import pytest

from easyrl import cli
from easyrl.algorithms import registry
from easyrl.train import loop, setup
from tiny_configs import make_config


def test_every_trainer_is_registered_once_and_reaches_the_cli():
    algos = registry.all_algorithms()
    assert list(algos) == ["sft", "rm", "dpo", "kto", "orpo", "cpo", "simpo", "rrhf", "ppo",
                           "online_dpo", "grpo", "pipeline"]
    assert {a.loop for a in algos.values()} == {"supervised", "online", "recipe"}
    sub = cli.build_parser()._subparsers._group_actions[0].choices
    assert set(algos) <= set(sub)
    with pytest.raises(ValueError, match="unknown trainer 'nope'"):
        registry.get("nope")


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "kto", "orpo", "cpo", "simpo", "rrhf"])
def test_batch_spec_matches_the_task_batches(cache, tmp_path, command):
    over = {"dpo.reference_free": "true"} if command == "dpo" else {}
    c = make_config(command, tmp_path, **over)
    algo = registry.get(command)
    tok = setup.load_tokenizer(c)
    task = algo.build_task(loop.Env(c, None, tok, setup.model_config(c, tok), None))
    batch = next(task.train_data)
    arrays = {k: v for k, v in batch.items() if isinstance(v, np.ndarray)}
    spec = algo.batch_spec(c, c.train.batch_size)
    assert set(spec) == set(arrays), (sorted(spec), sorted(arrays))
    for k, s in spec.items():
        assert tuple(s.shape) == arrays[k].shape and np.dtype(s.dtype) == arrays[k].dtype, k
