"""Reward functions exactly as TRL calls them: keyword arguments, TRL's documentation examples
unchanged (standard and conversational data, async, log_metric, trainer_state), unscorable rows,
and isolation in worker processes (a function that hangs forever, one that kills its process)."""
import asyncio
import json
import os
import textwrap

import numpy as np
import pytest

from easyrl import reward_set
from easyrl import rewards as R
from easyrl.data import encode
from easyrl.rewards import RewardError, RewardSet, load_reward_functions

# Verbatim from TRL's docs (docs/source/grpo_trainer.md, "Using a custom reward function",
# examples 1, 1.1, 2, 3, 5, 6) and its quickstart (`reward_len`).
TRL_DOCS = textwrap.dedent(r'''
    import asyncio
    import re

    def reward_len(completions, **kwargs):
        return [-abs(20 - len(completion)) for completion in completions]

    def reward_func_ids(completion_ids, **kwargs):
        """Reward function that assigns higher scores to longer completions (in terms of token count)."""
        return [float(len(ids)) for ids in completion_ids]

    def reward_func_chars(completions, **kwargs):
        """Reward function that assigns higher scores to longer completions (in terms of character count)."""
        return [float(len(completion)) for completion in completions]

    def format_reward_func(completions, **kwargs):
        """Reward function that checks if the completion has a specific format."""
        pattern = r"^<think>.*?</think><answer>.*?</answer>$"
        completion_contents = [completion[0]["content"] for completion in completions]
        matches = [re.match(pattern, content) for content in completion_contents]
        return [1.0 if match else 0.0 for match in matches]

    def reward_func_gt(completions, ground_truth, **kwargs):
        # Regular expression to capture content inside \boxed{}
        matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
        contents = [match.group(1) if match else "" for match in matches]
        # Reward 1 if the content is the same as the ground truth, 0 otherwise
        return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]

    async def async_reward_func(prompts, completions, **kwargs):
        # Simulate an I/O-bound call (e.g., HTTP request, database lookup)
        await asyncio.sleep(0.01)
        # Simple toy reward: 1.0 if the completion is non-empty, else 0.0
        return [1.0 if completion else 0.0 for completion in completions]

    def reward_func_log(completions, ground_truth, log_extra=None, log_metric=None, **kwargs):
        extracted = [re.search(r"\\boxed\{(.*?)\}", c) for c in completions]
        extracted = [m.group(1) if m else None for m in extracted]
        rewards = [1.0 if e == gt else 0.0 for e, gt in zip(extracted, ground_truth)]

        if log_extra:
            log_extra("golden_answer", list(ground_truth))
            log_extra("extracted_answer", [e or "[none]" for e in extracted])

        if log_metric:
            log_metric("accuracy", sum(rewards) / len(rewards))

        return rewards
''')

PROMPTS = ["Problem: Solve the equation $2x + 3 = 7$. Solution:",
           "Problem: Solve the equation $3x - 5 = 10$."]
COMPLETIONS = [r" The solution is \boxed{2}.", r" The solution is \boxed{6}."]
IDS = [[6303, 13], [304, 279, 12884, 13]]


@pytest.fixture
def docs_file(tmp_path):
    p = tmp_path / "trl_docs_rewards.py"
    p.write_text(TRL_DOCS)
    return p


def test_trl_docs_examples_unchanged(docs_file):
    names = ["reward_len", "reward_func_ids", "reward_func_chars", "reward_func_gt",
             "async_reward_func", "reward_func_log"]
    rs = load_reward_functions([f"{docs_file}:{n}" for n in names])
    vals = rs.values(PROMPTS, COMPLETIONS, IDS, {"ground_truth": ["2", "5"]})
    np.testing.assert_allclose(vals, [
        [-abs(20 - len(COMPLETIONS[0])), 2.0, len(COMPLETIONS[0]), 1.0, 1.0, 1.0],
        [-abs(20 - len(COMPLETIONS[1])), 4.0, len(COMPLETIONS[1]), 0.0, 1.0, 0.0]])
    assert rs.extra_metrics["accuracy"] == 0.5  # log_metric, as TRL's _log_metric


def test_conversational_prompts_reach_functions_as_messages(docs_file):
    """Example 2 (conversational): completions arrive as [{"role": "assistant", ...}] lists and
    the prompts as the rows' message lists; built-ins read the text of such completions too."""
    seen = {}

    def spy(prompts, completions, **kw):
        seen.update(prompts=prompts, completions=completions)
        return [0.0] * len(prompts)

    rs = load_reward_functions([f"{docs_file}:format_reward_func", "regex_format"])
    rs.add("spy", 1.0, spy)
    msgs = [[{"role": "user", "content": "What is the result of (1 + 2) * 4?"}],
            [{"role": "user", "content": "What is the result of (3 + 1) * 2?"}]]
    texts = ["<think>The sum of 1 and 2 is 3, which we multiply by 4 to get 12.</think>"
             "<answer>(1 + 2) * 4 = 12</answer>", "The sum of 3 and 1 is 4. So (3 + 1) * 2 = 8."]
    vals = rs.values(["rendered 1", "rendered 2"], texts, [[1], [2]], messages=msgs)
    np.testing.assert_allclose(vals[:, :2], [[1.0, 1.0], [0.0, 0.0]])
    assert seen["prompts"] == msgs
    assert seen["completions"] == [[{"role": "assistant", "content": t}] for t in texts]


def test_message_prompts_keep_their_messages_through_the_prompt_batch():
    from easyrl.data import load_tokenizer, synthetic
    tiny_tokenizer = load_tokenizer(synthetic.synthetic_tokenizer_path())
    rows = [{"prompt": [{"role": "user", "content": "sort: b a"}], "columns": {"answer": "a b"}},
            {"prompt": [{"role": "user", "content": "sort: c a"}], "columns": {"answer": "a c"}}]
    ex, _ = encode.tokenize_prompts(rows, tiny_tokenizer, "tulu", 32)
    batch = encode.collate_prompts(ex, 32, 0)
    assert batch["messages"] == [r["prompt"] for r in rows]
    plain, _ = encode.tokenize_prompts([{"prompt": "sort: b a"}], tiny_tokenizer, "plain", 32)
    assert encode.collate_prompts(plain, 32, 0)["messages"] is None


def test_keyword_call_trainer_state_numpy_and_async_concurrency():
    got = {}

    def progress(completions, trainer_state, **kw):  # keyword-only use of TRL's arguments
        got["state"] = trainer_state
        return np.full(len(completions), trainer_state.global_step / trainer_state.max_steps)

    both = {}

    async def first(prompts, **kw):  # finishes only if `second` runs at the same time
        both["a"] = asyncio.Event()
        await asyncio.sleep(0)
        await asyncio.wait_for(both["b_ready"].wait(), 5)
        both["a"].set()
        return [1.0] * len(prompts)

    async def second(prompts, **kw):
        both["b_ready"] = asyncio.Event()
        both["b_ready"].set()
        await asyncio.sleep(0)
        await asyncio.wait_for(both["a"].wait(), 5)
        return [2.0] * len(prompts)

    rs = RewardSet()
    rs.add("progress", 1.0, progress)
    rs.add("first", 1.0, first)
    rs.add("second", 1.0, second)
    vals = rs.values(PROMPTS, COMPLETIONS, IDS,
                     trainer_state=R.TrainerState(global_step=3, max_steps=12, epoch=0.5))
    np.testing.assert_allclose(vals, [[0.25, 1.0, 2.0]] * 2)
    assert got["state"].epoch == 0.5


def test_unscorable_rows_warn_and_all_none_is_counted():
    def only_first(completions, **kw):
        return [1.0] + [None] * (len(completions) - 1)

    rs = RewardSet()
    rs.add("only_first", 1.0, only_first)
    vals = rs.values(PROMPTS, COMPLETIONS, IDS)
    total, m = rs.combine(vals)
    assert np.isnan(total[1]) and total[0] == 1.0 and m["rewards/none_rows"] == 1.0
    assert "row 1" in R.unscorable_warning(PROMPTS, COMPLETIONS, vals)


def test_slow_function_in_process_prints_one_line(monkeypatch, capsys):
    import time
    monkeypatch.setattr(reward_set, "SLOW_WARNING_S", 0.2)
    rs = RewardSet()
    rs.add("sleepy", 1.0, lambda completions, **kw: time.sleep(0.6) or [0.0] * len(completions))
    rs.values(PROMPTS, COMPLETIONS, IDS)
    err = capsys.readouterr().err
    assert err.count("reward function 'sleepy' is still running after 0.2 s") == 1, err


WORKER_FNS = textwrap.dedent("""
    import os, time
    def hang(completions, **kwargs):
        time.sleep(10 ** 6)
    def die(completions, **kwargs):
        os._exit(3)
    def ok(completions, **kwargs):
        return [float(len(c)) for c in completions]
    def pid(completions, **kwargs):
        return [float(os.getpid())] * len(completions)
""")


@pytest.fixture
def worker_file(tmp_path):
    p = tmp_path / "worker_rewards.py"
    p.write_text(WORKER_FNS)
    return p


def test_workers_kill_and_replace_hung_and_dying_functions(worker_file):
    f = worker_file
    rs = load_reward_functions([f"{f}:hang", f"{f}:ok"], num_workers=2, timeout=2.0)
    try:
        with pytest.raises(RewardError) as ei:
            rs.values(PROMPTS, COMPLETIONS, IDS)
        assert "'hang'" in str(ei.value) and "did not return within 2 s (config reward.timeout)" \
            in str(ei.value) and "\n" not in str(ei.value)
    finally:
        rs.close()
    rs = load_reward_functions([f"{f}:die", f"{f}:pid"], num_workers=1, timeout=30.0)
    try:
        with pytest.raises(RewardError, match=r"'die' .*killed its worker process \(exit code 3\)"):
            rs.values(PROMPTS, COMPLETIONS, IDS)
        # the pool replaced the dead worker: the next batch runs, in a process that is not ours
        rs.sources = rs.sources[1:]
        vals = rs.values(PROMPTS, COMPLETIONS, IDS)
        assert vals[0, 0] != os.getpid() and rs._pool.replaced >= 1
    finally:
        rs.close()


def test_workers_on_error_none_counts_rows_and_goes_on(worker_file, capsys):
    f = worker_file
    rs = load_reward_functions([f"{f}:hang", f"{f}:die", f"{f}:ok"], num_workers=2, timeout=2.0,
                               on_error="none")
    try:
        for _ in range(2):  # the killed workers are replaced and the second batch runs too
            total, m = rs(PROMPTS, COMPLETIONS, IDS)
            np.testing.assert_allclose(total, [len(c) for c in COMPLETIONS])
            assert m["rewards/hang/errors"] == 2.0 and m["rewards/die/errors"] == 2.0
            assert m["rewards/ok/errors"] == 0.0
        assert "reward.on_error=none" in capsys.readouterr().err
    finally:
        rs.close()


@pytest.mark.parametrize("kw, key", [({"num_workers": -1}, "reward.num_workers"),
                                     ({"timeout": 0}, "reward.timeout"),
                                     ({"on_error": "skip"}, "reward.on_error")])
def test_isolation_keys_checked(kw, key):
    with pytest.raises(ValueError, match=f"config {key}"):
        load_reward_functions("exact_match", **kw)


def test_unpicklable_function_named_for_workers():
    rs = RewardSet(num_workers=1)
    with pytest.raises(ValueError, match="reward function 'inner' cannot be sent to a worker"):
        rs.add("inner", 1.0, lambda completions, **kw: [0.0] * len(completions))


# ----------------------------------------------------------------------------- through a run
def _prompt_file(tmp_path, extra):
    from easyrl.data import synthetic
    rows = [dict(prompt=r["prompt"], **extra(r)) for r in synthetic.prompts(16, seed=0)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_trl_docs_examples_in_a_grpo_run(random_models, tmp_path, docs_file):
    from easyrl.algorithms import grpo
    from easyrl.data import synthetic
    from easyrl.train import launch
    from easyrl.train.metrics import read_metrics
    prog = tmp_path / "progress.py"
    prog.write_text("def progress(completions, trainer_state, **kwargs):\n"
                    "    return [trainer_state.global_step / trainer_state.max_steps] * "
                    "len(completions)\n")
    data = _prompt_file(tmp_path, lambda r: {"ground_truth": synthetic.target(r["prompt"])})
    args = ["--config", "configs/grpo.py:tiny", f"--config.output_dir={tmp_path / 'run'}",
            f"--config.model.path={random_models / 'policy'}", "--config.mesh=dp:1",
            f"--config.data.train={data}", "--config.data.eval=", "--config.train.steps=2",
            "--config.train.batch_size=2", "--config.grpo.num_generations=2",
            "--config.grpo.max_new_tokens=6", "--config.log.tensorboard=false",
            "--config.log.every=1",
            f"--config.reward.functions={docs_file}:reward_len,{docs_file}:reward_func_log,"
            f"{prog}:progress", "--config.reward.weights=0.1,1,0"]
    grpo.train(launch.parse_config("grpo", args))
    rows = read_metrics(str(tmp_path / "run"))
    assert len(rows) == 2
    assert [r["rewards/progress/mean"] for r in rows] == [0.0, 0.5]  # trainer_state
    for r in rows:
        assert r["rewards/reward_len/mean"] <= 0 and "accuracy" in r  # log_metric
        assert r["rewards/reward_func_log/mean"] == r["accuracy"]


def test_every_function_none_for_every_row_stops_naming_columns(random_models, tmp_path):
    from easyrl.algorithms import grpo
    from easyrl.train import launch
    data = _prompt_file(tmp_path, lambda r: {"target": "x"})
    args = ["--config", "configs/grpo.py:tiny", f"--config.output_dir={tmp_path / 'run'}",
            f"--config.model.path={random_models / 'policy'}", "--config.mesh=dp:1",
            f"--config.data.train={data}", "--config.data.eval=", "--config.train.steps=1",
            "--config.train.batch_size=2", "--config.grpo.num_generations=2",
            "--config.grpo.max_new_tokens=4", "--config.log.tensorboard=false",
            "--config.reward.functions=exact_match"]
    with pytest.raises(RewardError, match=r"every reward function \(exact_match\) returned None "
                                          r"for every row.*columns: target"):
        grpo.train(launch.parse_config("grpo", args))
