"""Test setup: 8 simulated CPU devices, no network, tiny models built locally."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA compilation cache for the whole run, shared by the xdist workers and the
# subprocesses the tests start (they inherit the environment): the suite runs the same tiny-model
# programs many times (resumed runs, CLI vs in-process, the presets), and compiling dominates
# their cost on CPU. Cached executables are the programs a fresh compile would produce.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(__import__("tempfile").gettempdir(),
                                   f"easyrl-tests-xla-cache-{_RUN}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def cache(tmp_path_factory):
    """EASYRL_CACHE (the synthetic data) under the session's base temp dir: set once for the whole
    session (per xdist worker), for every test, so none writes to ~/.cache/easyrl; subprocesses
    inherit it. Tests still name it where they rely on it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EASYRL_CACHE", str(tmp_path_factory.getbasetemp() / "easyrl_cache"))
        yield


@pytest.fixture(scope="session")
def sft_run(cache, tmp_path_factory):
    """A short tiny SFT run (the starting policy of the RM / DPO / RRHF recipes and the DPO
    reference), made once per session (per xdist worker) and shared by test_rm, test_dpo and
    test_rrhf."""
    from easyrl.algorithms import sft
    from tiny_configs import make_config
    out = tmp_path_factory.mktemp("sft_tiny_for_preference")
    sft.train(make_config("sft", out, **{"train.steps": 200, "train.seq_len": 24,
                                         "data.eval": "", "log.every": 50,
                                         "checkpoint.async_save": "false"}))
    return str(out)


@pytest.fixture(scope="session")
def heldout_pairs(cache, tmp_path_factory):
    """1024 held-out synthetic pairs (eval-split prompts, never in training): a 4x larger eval
    set than the bundled one, so the accuracy measured has ~0.6% standard error."""
    from easyrl.data import synthetic
    path = tmp_path_factory.mktemp("preference_heldout") / "pairs_1024.jsonl"
    synthetic.write_jsonl(str(path), synthetic.preference_pairs(1024, seed=1, split="eval"))
    return str(path)


@pytest.fixture(scope="session")
def random_models(tmp_path_factory):
    """Random-init tiny policy and reward model as easyrl checkpoints (synthetic tokenizer),
    shared by the online-RL tests (test_ppo, test_grpo)."""
    import jax

    from easyrl import checkpoint, model as M
    from easyrl.data.synthetic import synthetic_tokenizer_path
    from easyrl.data.tokenizer import load_tokenizer
    d = tmp_path_factory.mktemp("rl_models")
    tok = load_tokenizer(synthetic_tokenizer_path())
    cfg = M.get_preset("tiny").replace(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    checkpoint.save_model(str(d / "policy"), cfg, M.init_params(cfg, jax.random.PRNGKey(1)))
    checkpoint.save_model(str(d / "rm"), cfg, M.init_params(cfg, jax.random.PRNGKey(2), "reward"),
                          kind="reward")
    return d
