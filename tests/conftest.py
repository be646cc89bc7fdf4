"""Test setup: 8 simulated CPU devices, no network, tiny models built locally."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """EASYRL_CACHE (the synthetic data) under the session's base temp dir, shared by test files."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EASYRL_CACHE", str(tmp_path_factory.getbasetemp() / "easyrl_cache"))
        yield
