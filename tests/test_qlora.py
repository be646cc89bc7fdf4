"""LoRA on a quantized frozen base (model.lora.base_quant int8 | nf4): the quantized model equals
one whose weights are the dequantized values, stays close to full precision, loads by streaming
quantization, shards its quantized arrays, trains only the adapters (SFT, DPO), decodes from
the quantized base, exports PEFT adapters for the full-precision base and a merged model of the
dequantized weights, and the planner counts the bytes the real arrays hold."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from easyrl import checkpoint, convert, hf, parallel
from easyrl import model as M
from easyrl.algorithms import dpo, sft
from easyrl.data import synthetic
from easyrl.model import lora, qlora, quant, trainable
from easyrl.model.config import get_preset

import tiny_configs
from hf_models import batch, make_causal_lm

VOCAB = 160  # the bundled synthetic tokenizer
BLOCK = 32  # the tiny model's kernels have in = 64 / 96: NF4 blocks of 32
QUANTS = {"int8": {}, "nf4": dict(quant_block=BLOCK),
          "nf4_dq": dict(quant_block=BLOCK, double_quant=True)}
# max |logit diff| vs full precision on the tiny random model (measured: int8 ~6e-3,
# nf4 ~7e-2): the bounds leave 3x room
CLOSE = {"int8": 0.02, "nf4": 0.2, "nf4_dq": 0.2}


def _q(name):
    kw = QUANTS[name]
    return dict(base_quant=name.split("_")[0], **kw)


@pytest.fixture(scope="module")
def base_lm(tmp_path_factory):
    d = tmp_path_factory.mktemp("qlora_base_lm")
    make_causal_lm(str(d), vocab_size=VOCAB, num_key_value_heads=2, pad_token_id=3,
                   bos_token_id=1, eos_token_id=2, attention_bias=True)
    return str(d)


@pytest.mark.parametrize("name", sorted(QUANTS))
def test_quantized_model_equals_its_dequantized_weights(base_lm, name):
    """Streaming load (each HF tensor quantized as it is read) == quantizing the loaded tree;
    the logits equal a plain model's whose kernels are the dequantized values exactly, and are
    within the stated bound of full precision."""
    config, full = hf.load(base_lm)
    qconfig, qparams = hf.load(base_lm, **_q(name))
    again = qlora.quantize_params(qconfig, full)
    fq, fa = trainable.flatten(qparams), trainable.flatten(again)
    assert sorted(fq) == sorted(fa)
    for k in fq:
        np.testing.assert_array_equal(np.asarray(fq[k]), np.asarray(fa[k]), err_msg=k)
    parts = {k.rsplit("/", 1)[1] for k in fq if qlora.is_quant_part(k)}
    assert parts == {"int8": {"q", "scale"}, "nf4": {"codes", "absmax"},
                     "nf4_dq": {"codes", "absmax_q", "absmax_scale", "absmax_mean"}}[name]
    assert fq["layers/self_attn/q_proj/bias"].dtype == jnp.float32  # biases stay full precision
    ids, mask = batch(VOCAB, b=3, t=12)
    got = np.asarray(M.forward(qconfig, qparams, jnp.asarray(ids), jnp.asarray(mask)))
    deq = qlora.dequantize_params(qparams, jnp.float32)
    want = np.asarray(M.forward(config, deq, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_array_equal(got, want)
    ref = np.asarray(M.forward(config, full, jnp.asarray(ids), jnp.asarray(mask)))
    diff = float(np.abs(got - ref)[mask > 0].max())
    print(f"{name}: max |logit diff| vs full precision {diff:.2e}")
    assert 0 < diff < CLOSE[name]


def test_quantized_arrays_shard_and_bytes_match_the_planner(base_lm):
    """On a 2 x 2 x 2 mesh every quantized array gets the partition table's sharding; the
    bytes per device the real arrays hold equal the planner's count of the same tree."""
    from easyrl.plan.memory import per_device_bytes
    mesh = parallel.create_mesh("dp:2,fsdp:2,tp:2")
    config, params = hf.load(base_lm, mesh=mesh, base_quant="nf4", quant_block=BLOCK)
    flat = trainable.flatten(params)
    codes = flat["layers/mlp/up_proj/kernel/codes"]
    assert codes.dtype == jnp.uint8 and codes.shape == (2, 32, 96)
    assert codes.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tp")
    assert flat["layers/mlp/up_proj/kernel/absmax"].sharding.spec == \
        jax.sharding.PartitionSpec(None, "fsdp", "tp")
    assert flat["layers/mlp/down_proj/kernel/codes"].sharding.spec == \
        jax.sharding.PartitionSpec(None, "tp", "fsdp")
    real = max(sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards
                   if s.device == d) for d in mesh.devices.flat)
    planned = per_device_bytes(M.param_shapes(config), {"dp": 2, "fsdp": 2, "tp": 2})
    assert real == planned
    # the kernels: NF4 bytes per parameter as the formula (4 bits + a float32 per block)
    n = int(np.prod(flat["layers/mlp/up_proj/kernel/codes"].shape)) * 2
    got = codes.nbytes + flat["layers/mlp/up_proj/kernel/absmax"].nbytes
    assert got == quant.quantized_nbytes((2, 64, 96), "nf4", block=BLOCK)
    assert got / n == pytest.approx(quant.nbytes_per_param("nf4", block=BLOCK))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("qlora_data")
    sft_path, pairs = str(d / "sft.jsonl"), str(d / "pairs.jsonl")
    synthetic.write_jsonl(sft_path, synthetic.sft_examples(64, seed=0))
    # 16 pairs, seen 10 times each by the DPO run: a LoRA on a random tiny model learns them
    synthetic.write_jsonl(pairs, synthetic.preference_pairs(16, seed=3, split="train"))
    return {"sft": sft_path, "pairs": pairs}


def _config(command, out, **over):
    return tiny_configs.make_config(command, out, **{
        "checkpoint.async_save": "false", "data.eval": "", "model.lora.rank": 4,
        "model.lora.alpha": 8.0, "model.lora.base_quant": "nf4",
        "model.lora.quant_block": BLOCK, "log.every": 1, **over})


SFT = {"train.steps": 20, "train.batch_size": 8, "train.seq_len": 32, "optim.lr": 1e-2,
       "optim.warmup": 0, "optim.schedule": "constant"}


@pytest.fixture(scope="module")
def sft_nf4(base_lm, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_nf4")
    c = _config("sft", out, **{"model.path": base_lm, "data.train": data["sft"], **SFT})
    return str(out), sft.train(c)


def _losses(run_dir):
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r["loss"] for r in rows if "loss" in r]


def test_sft_on_nf4_base_trains_only_adapters_and_learns(sft_nf4, base_lm, data, tmp_path):
    out, res = sft_nf4
    params = res.state.params
    _, start = hf.load(base_lm, base_quant="nf4", quant_block=BLOCK)
    flat, ref = trainable.flatten(params), trainable.flatten(start)
    for k, v in ref.items():  # the quantized base, norms, embeddings: bit for bit as loaded
        np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(v), err_msg=k)
    assert flat["layers/self_attn/q_proj/kernel/codes"].dtype == jnp.uint8
    assert float(jnp.abs(flat["layers/self_attn/q_proj/lora_b"]).max()) > 1e-3
    n_opt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(res.state.opt_state)
                if np.ndim(x) > 0)
    assert n_opt == 2 * trainable.num_params(trainable.adapters(params))
    # it learns as the same LoRA run on the full-precision base does (a LoRA on a random tiny
    # model levels off near 4.7 from ln(160) = 5.08 in either case)
    fp_out = tmp_path / "sft_fp"
    sft.train(_config("sft", fp_out, **{"model.path": base_lm, "data.train": data["sft"],
                                        "model.lora.base_quant": "none", **SFT}))
    losses, fp = _losses(out), _losses(str(fp_out))
    print("LoRA SFT loss nf4", [round(x, 3) for x in losses], "full precision",
          [round(x, 3) for x in fp])
    assert np.mean(losses[-3:]) < losses[0] - 0.25
    assert abs(np.mean(losses[-3:]) - np.mean(fp[-3:])) < 0.05
    cfg, _, _ = checkpoint.read_model_config(out)
    assert cfg.base_quant == "nf4" and cfg.quant_block == BLOCK


def test_nf4_exports_peft_for_the_full_base_and_a_dequantized_merge(sft_nf4, base_lm, tmp_path):
    """PEFT: the adapter on the ORIGINAL full-precision base (what PEFT users load) equals
    easyrl's model with those adapters on the full-precision base; the merged export is the
    dequantized base + adapters (easyrl's quantized model's logits) and says so."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out, res = sft_nf4
    cfg, _, params = checkpoint.load_model(out)
    ids, mask = batch(VOCAB, b=3, t=12)
    ours_q = np.asarray(M.forward(cfg, params, jnp.asarray(ids), jnp.asarray(mask)))
    convert.easyrl_to_peft(out, str(tmp_path / "adapter"))
    acfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert acfg["base_model_name_or_path"] == os.path.abspath(base_lm)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_lm),
                                   str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        peft_logits = pm(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    fcfg, full = hf.load(base_lm)
    on_full = trainable.combine(full, trainable.adapters(params))
    want = np.asarray(M.forward(fcfg.replace(lora_rank=4, lora_alpha=8.0), on_full,
                                jnp.asarray(ids), jnp.asarray(mask)))
    assert float(np.abs(peft_logits - want)[mask > 0].max()) < 1e-4
    convert.easyrl_to_hf(out, str(tmp_path / "merged"), merge_lora=True)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        m_logits = merged(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert float(np.abs(m_logits - ours_q)[mask > 0].max()) < 1e-4
    card = open(tmp_path / "merged" / "README.md").read()
    assert "DEQUANTIZED nf4" in card and "easyrl-to-peft" in card


def test_sampler_and_engine_decode_from_the_quantized_base(sft_nf4):
    """Greedy tokens of the static sampler and the engine over the nf4 base + adapters (kept
    separate: no full-precision merge) equal greedy decoding of the equivalent plain model."""
    from easyrl.engine import Engine
    from easyrl.generate import generate
    out, _ = sft_nf4
    cfg, _, params = checkpoint.load_model(out)
    pcfg, _, plain = checkpoint.load_model(out, merge_lora=True)  # dequantized + merged
    rs = np.random.RandomState(0)
    plist = [rs.randint(3, VOCAB, n).tolist() for n in (5, 2, 7)]
    p = max(map(len, plist))
    ids = np.zeros((3, p), np.int32)
    mask = np.zeros_like(ids)
    for i, x in enumerate(plist):
        ids[i, p - len(x):], mask[i, p - len(x):] = x, 1
    kw = dict(max_new_tokens=8, temperature=0.0, eos_token_id=())
    want = np.asarray(generate(pcfg, plain, jnp.asarray(ids), jnp.asarray(mask),
                               jax.random.PRNGKey(0), **kw)["response"])
    got = np.asarray(generate(cfg, params, jnp.asarray(ids), jnp.asarray(mask),
                              jax.random.PRNGKey(0), **kw)["response"])
    np.testing.assert_array_equal(got, want)
    eng = Engine(cfg, slots=2, max_prompt_len=8, block=4, chunk=3, **kw)
    res = eng.run(params, [dict(prompt_ids=x) for x in plist], seed=0)
    assert [r["response_ids"][0] for r in res] == want.tolist()


def test_dpo_on_nf4_base_learns_with_adapters_off_reference(sft_nf4, data, tmp_path):
    out, _ = sft_nf4
    c = _config("dpo", tmp_path / "dpo", **{"model.path": out, "data.train": data["pairs"],
                                            "train.steps": 20, "train.batch_size": 8,
                                            "dpo.beta": 0.5,
                                            "train.seq_len": 32, "optim.lr": 1e-2,
                                            "optim.warmup": 0, "optim.schedule": "constant"})
    res = dpo.train(c)
    rows = [json.loads(x) for x in open(tmp_path / "dpo" / "metrics.jsonl")]
    rows = [r for r in rows if "loss" in r]
    assert abs(rows[0]["loss"] - np.log(2)) < 1e-3  # the policy starts as its reference
    assert np.mean([r["loss"] for r in rows[-3:]]) < 0.6  # measured: 0.69 -> ~0.41
    assert np.mean([r["rewards/margins"] for r in rows[-3:]]) > 0
    flat = trainable.flatten(res.state.params)
    assert flat["layers/mlp/up_proj/kernel/codes"].dtype == jnp.uint8


def _plan(spec, *over):
    from easyrl import plan
    c = plan.load_config(spec, ["--config.model.lora.base_quant=nf4",
                                "--config.mesh=dp:1,fsdp:1,tp:1", "--config.model.remat=full",
                                *over])
    return plan.make_plan(c, 1, 24, platform="gpu")[1]


GiB = 2 ** 30


def test_planner_on_one_24gib_gpu_with_nf4():
    """`easyrl plan` with model.lora.base_quant=nf4 on a single 24 GiB GPU: Stack-Llama-2's DPO
    LoRA preset fits (micro-batch 1); StackLLaMA's PPO with its LoRA (r 16 on q, v) fits at a
    rollout batch of 8 on the continuous engine, not at the preset's 64 (the scoring pass over
    64 x 640 tokens alone is ~28 GiB). The frozen bases count their quantized bytes."""
    d = _plan("configs/dpo.py:stackllama2_7b_lora", "--config.train.micro_batch_size=1")
    print(f"stackllama2_7b_lora nf4: peak {d.peak / GiB:.2f} GiB of {d.limit / GiB:.2f}")
    assert d.peak <= d.limit and d.peak < 10 * GiB
    params = [x for x in d.lines if x.name == "model parameters"][0]
    assert params.per_device < 4.5 * GiB  # ~3.9 GiB: 4-bit kernels + bf16 embeddings / head
    ppo_lora = ["--config.model.lora.rank=16", "--config.model.lora.alpha=32",
                "--config.model.lora.targets=q|v", "--config.rollout.engine=continuous",
                "--config.rollout.slots=8", "--config.model.lora.base_dtype=bfloat16"]
    small = _plan("configs/ppo.py:stackllama_7b", *ppo_lora, "--config.train.batch_size=8")
    big = _plan("configs/ppo.py:stackllama_7b", *ppo_lora)
    print(f"stackllama_7b PPO nf4: batch 8 peak {small.peak / GiB:.2f} GiB, batch 64 "
          f"{big.peak / GiB:.2f} GiB (limit {small.limit / GiB:.2f})")
    assert small.peak <= small.limit < big.peak
    assert big.phases["scoring"] > 20 * GiB


def test_quantization_config_errors_name_the_key(tmp_path):
    from easyrl.train.config import validate_lora
    c = _config("sft", tmp_path, **{"model.lora.base_quant": "nf3"})
    with pytest.raises(ValueError, match="model.lora.base_quant"):
        validate_lora(c)
    c = _config("sft", tmp_path, **{"model.lora.rank": 0})
    with pytest.raises(ValueError, match="model.lora.base_quant.*only applies with LoRA"):
        validate_lora(c)
    with pytest.raises(ValueError, match="config model.lora.quant_block: 3 must be an even"):
        get_preset("tiny").replace(base_quant="nf4", quant_block=3)
    get_preset("tiny").replace(base_quant="nf4", quant_block=48)  # any kernel size: padded
    assert lora.disabled(get_preset("tiny").replace(lora_rank=2, base_quant="int8")).base_quant \
        == "int8"  # the adapters-off reference still reads the quantized kernels


def test_nf4_block_that_divides_no_kernel_trains(base_lm):
    """quant_block 40 divides neither in size (64, 96) of the tiny model: every kernel's last
    block is padded, the model equals its dequantized weights (cut to their true shapes) and
    the adapters get finite, non-zero gradients."""
    config, full = hf.load(base_lm)
    qconfig, qparams = hf.load(base_lm, base_quant="nf4", quant_block=40)
    ids, mask = batch(VOCAB, b=2, t=10)
    deq = qlora.dequantize_params(qparams, jnp.float32, qconfig)
    flat = trainable.flatten(deq)
    for k, v in trainable.flatten(full).items():
        if k in flat:
            assert flat[k].shape == v.shape, k
    got = np.asarray(M.forward(qconfig, qparams, jnp.asarray(ids), jnp.asarray(mask)))
    ref = np.asarray(M.forward(config, full, jnp.asarray(ids), jnp.asarray(mask)))
    assert float(np.abs(got - ref)[mask > 0].max()) < CLOSE["nf4"]

    lcfg = qconfig.replace(lora_rank=2)  # adapters over the padded kernels, random init
    lparams = M.init_params(lcfg, jax.random.PRNGKey(0))
    from easyrl.model import quant
    assert lparams["layers"]["mlp"]["down_proj"]["kernel"]["codes"].shape[-2] == \
        quant.padded_in(lcfg.intermediate_size, 40) // 2 > lcfg.intermediate_size // 2

    train, frozen = trainable.partition(lparams, trainable.trainable_mask(lparams))

    def loss(t):
        p = trainable.combine(t, frozen)
        return jnp.mean(M.forward(lcfg, p, jnp.asarray(ids), jnp.asarray(mask)) ** 2)
    grads = trainable.flatten(jax.grad(loss)(train))
    lora_b = [v for k, v in grads.items() if k.endswith("lora_b")]
    assert lora_b and all(np.all(np.isfinite(np.asarray(g))) for g in lora_b)
    assert any(float(jnp.abs(g).max()) > 0 for g in lora_b)
