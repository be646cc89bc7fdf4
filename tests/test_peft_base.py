"""easyrl-to-peft's base_model_name_or_path: the Hugging Face model the run started from,
followed back through converted easyrl checkpoints; a run started from another easyrl TRAINING
run gets no (wrong) HF base but a warning naming --base-model; a random init warns too."""

from easyrl import checkpoint, convert
from easyrl.model import get_preset


def _ckpt(d, **extra):
    checkpoint.write_model_config(str(d), get_preset("tiny"), "causal_lm", **extra)
    return str(d)


def _run(d, model_path):
    return _ckpt(d, run_config={"model": {"path": model_path}})


def test_chain_through_converted_checkpoints_reaches_the_hf_folder(tmp_path):
    hf_dir = tmp_path / "llama-hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    conv = _ckpt(tmp_path / "converted", source=str(hf_dir))  # easyrl convert hf-to-easyrl
    lora = _run(tmp_path / "lora", conv)
    assert convert.base_model_of(lora) == (str(hf_dir), None)
    direct = _run(tmp_path / "direct", str(hf_dir))
    assert convert.base_model_of(direct) == (str(hf_dir), None)
    hub = _run(tmp_path / "hub", "meta-llama/Llama-2-7b-hf")  # a hub id stays as written
    assert convert.base_model_of(hub) == ("meta-llama/Llama-2-7b-hf", None)


def test_a_trained_run_in_the_chain_is_not_skipped(tmp_path):
    hf_dir = tmp_path / "llama-hf"
    hf_dir.mkdir()
    sft = _run(tmp_path / "sft", str(hf_dir))
    ppo = _run(tmp_path / "ppo", sft)
    base, warning = convert.base_model_of(ppo)
    assert base is None  # the HF folder would load the adapters onto the wrong weights
    assert f"started from the easyrl run {sft}" in warning and "--base-model DIR" in warning
    assert "easyrl convert easyrl-to-hf --ckpt" in warning
    rnd = _run(tmp_path / "random", "")
    base, warning = convert.base_model_of(rnd)
    assert base is None and "--base-model" in warning
    loop = tmp_path / "loop"  # a corrupt chain pointing at itself ends, it does not hang
    _ckpt(loop, source=str(loop))
    assert convert.base_model_of(_run(tmp_path / "x", str(loop)))[0] == str(loop)
