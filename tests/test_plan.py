"""`easyrl plan`: exact parameter / optimizer bytes (checked against real arrays), big presets
planned on the CPU without allocating, suggestions that really fit, clear errors."""
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import pytest

from easyrl import model as M, parallel, plan
from easyrl.cli import main
from easyrl.model import lora, trainable
from easyrl.model.config import get_preset
from easyrl.train import setup
from easyrl.train.optim import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nbytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def shard0_bytes(tree) -> int:
    """Bytes of every array's shard on the first device."""
    return int(sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree)))


def run_cli(capsys, *args):
    main(["plan", *args])
    return capsys.readouterr().out


# ---- exact bytes ------------------------------------------------------------------------------
def test_param_and_optimizer_bytes_equal_the_real_tiny_arrays():
    c = plan.load_config("configs/sft.py:tiny", [])
    planner, p = plan.make_plan(c, 1, 16)
    cfg = planner.models["policy"].config
    # the same architecture the trainer builds (tokenizer vocabulary on a random-init preset)
    assert cfg == setup.model_config(c, setup.load_tokenizer(c))
    params = jax.jit(lambda r: M.init_params(cfg, r))(jax.random.PRNGKey(0))
    tx, _ = make_optimizer(c.optim, c.train.steps)
    opt = jax.jit(tx.init)(params)
    assert p.line("model parameters").total == nbytes(params)
    assert p.line("model parameters").per_device == nbytes(params)  # one device: everything
    assert p.line("model optimizer state").total == nbytes(opt)
    assert p.line("model optimizer state").per_device == nbytes(opt)
    assert p.line("model gradients").per_device == nbytes(params)  # no accumulation in tiny


def test_per_device_bytes_equal_the_real_sharded_arrays():
    """On 8 simulated devices, per-device bytes equal the first device's shards of arrays placed
    exactly as the trainer places them (partition rules, opt state born sharded)."""
    assert jax.device_count() >= 8
    for spec in ("dp:2,fsdp:2,tp:2", "dp:1,fsdp:2,tp:4"):
        c = plan.load_config("configs/sft.py:tiny", [f"--config.mesh={spec}"])
        planner, p = plan.make_plan(c, 8, 16)
        cfg = planner.models["policy"].config
        mesh = parallel.create_mesh(spec)
        params = parallel.sharded_init(lambda r: M.init_params(cfg, r), mesh, jax.random.PRNGKey(0))
        tx, _ = make_optimizer(c.optim, c.train.steps)
        opt_sh = parallel.named_shardings(jax.eval_shape(tx.init, params), mesh)
        opt = jax.jit(tx.init, out_shardings=opt_sh)(params)
        assert p.line("model parameters").per_device == shard0_bytes(params), spec
        assert p.line("model optimizer state").per_device == shard0_bytes(opt), spec
        assert p.line("model parameters").total == nbytes(params)


def test_ppo_and_dpo_hold_the_extra_models():
    c = plan.load_config("configs/ppo.py:tiny", [])
    planner, p = plan.make_plan(c, 1, 16)
    assert set(planner.models) == {"policy", "reference", "reward", "value"}
    names = [x.name for x in p.lines]
    for n in ("policy optimizer state", "reference parameters", "reward parameters",
              "value parameters", "value optimizer state", "KV cache (sampler)",
              "policy gradients", "value gradients"):
        assert n in names
    pol = planner.models["policy"]
    assert p.line("reference parameters").total == p.line("policy parameters").total
    params = M.param_shapes(pol.config)  # byte-exactness vs real arrays: the tests above
    assert p.line("policy parameters").total == plan.tree_bytes(params)
    vcfg = planner.models["value"].config
    val = jax.jit(lambda r: M.init_params(vcfg, r, kind="value"))(jax.random.PRNGKey(0))
    assert p.line("value parameters").total == nbytes(val)
    assert "score" in val and "lm_head" not in val
    d = plan.load_config("configs/dpo.py:tiny", [])
    assert "reference" in plan.make_plan(d, 1, 16)[0].models
    d = plan.load_config("configs/dpo.py:tiny", ["--config.dpo.precompute_ref=true"])
    assert "reference" not in plan.make_plan(d, 1, 16)[0].models


def test_kv_cache_formula():
    cfg = get_preset("llama2_13b", dtype="bfloat16")
    total, per = plan.kv_cache_bytes(cfg, 64, 2048, {"dp": 1, "fsdp": 64, "tp": 4})
    assert total == 2 * 40 * 64 * 2048 * 40 * 128 * 2
    assert per == total / 64 / 4
    # batch not divisible by dp*fsdp: the sampler leaves the batch unsharded
    assert plan.kv_cache_bytes(cfg, 64, 2048, {"dp": 1, "fsdp": 256, "tp": 1})[1] == total


# ---- SFT's fused LM head ---------------------------------------------------------------------
def _hf_folder(path, **kw) -> str:
    """A local Hugging Face folder (config.json) of the small preset with `kw` changed."""
    import json
    (path / "config.json").write_text(json.dumps(get_preset("small").replace(**kw).to_hf()))
    return str(path)


def _act_args(path, *extra):
    return [f"--config.model.path={path}", "--config.train.seq_len=256",
            "--config.train.batch_size=8", "--config.train.micro_batch_size=8", "--config.model.dtype=bfloat16",
            "--config.model.remat=none", "--config.mesh=dp:2,fsdp:1,tp:2", *extra]


def _layer_part(cfg, b, T, tp):
    lb = plan.layer_bytes_per_token(cfg, tp, T)
    return b * T * (lb["working"] + cfg.num_hidden_layers * lb["saved"]["none"])


def test_head_chunk_matches_the_sft_loss():
    """c = min(max(1, LM_HEAD_CHUNK_TOKENS // rows), T), as sft.make_loss sizes it and
    losses.head_scan clips it."""
    from easyrl import losses
    assert losses.LM_HEAD_CHUNK_TOKENS == 512
    for rows, T, want in ((4, 256, 128), (1, 256, 256), (1, 1024, 512), (3, 1024, 170),
                          (1000, 64, 1), (2.0, 48, 48)):
        assert plan.head_chunk(rows, T) == want, (rows, T)
        assert want == min(max(1, losses.LM_HEAD_CHUNK_TOKENS // int(rows)), T)


def test_sft_activations_count_one_chunk_of_the_fused_lm_head(tmp_path):
    """SFT (small preset, V 32000, bf16, 8 rows over dp 2, tp 2, seq 256): the activations are the
    layers + per token 10*D*a + (4 + a)*D (embedding / norm, the hidden-state gradient) + ONE chunk
    of c = 512 // 4 = 128 positions b*c*(4 + a)*v + the kernel gradient (4 + a)*D*v, not the
    old b*T*(a + 3*4)*v of [B, T, V] logits."""
    c = plan.load_config("configs/sft.py:tiny", _act_args(_hf_folder(tmp_path, vocab_size=32000)))
    planner, p = plan.make_plan(c, 4, 16)
    cfg = planner.models["policy"].config
    assert planner.fused_head and cfg.dtype == "bfloat16" and cfg.vocab_size == 32000
    D, a, v, b, T, tp = cfg.hidden_size, 2, 32000 / 2, 4, 256, 2
    layers = _layer_part(cfg, b, T, tp)
    chunk = b * 128 * (4 + a) * v  # one chunk: float32 logits + their gradient in bf16
    kernel = (4 + a) * D * v  # float32 kernel-gradient accumulator + its bf16 residual
    new = layers + b * T * (10 * D * a + (4 + a) * D) + chunk + kernel
    old = layers + b * T * (10 * D * a + (a + 3 * 4) * v)  # the [B, T, V] logits term
    act = p.line("activations")
    assert act.per_device == pytest.approx(new, rel=1e-12)
    assert "chunks of 128 positions" in act.note
    assert old - new == pytest.approx(b * T * ((a + 12) * v - (4 + a) * D) - chunk - kernel)
    assert act.per_device < 0.4 * old
    # float32 compute: the kernel gradient's residual is the accumulator itself (a' = 0)
    c32 = plan.load_config("configs/sft.py:tiny",
                           _act_args(tmp_path, "--config.model.dtype=float32"))
    cfg32 = plan.make_plan(c32, 4, 16)[0].models["policy"].config
    assert plan.fused_head_bytes(cfg32, b, T, tp) == b * 128 * 8 * v + 4 * D * v
    # LoRA freezes the LM head: no kernel gradient, only the chunk
    lc = plan.load_config("configs/sft.py:tiny", _act_args(tmp_path, "--config.model.lora.rank=4"))
    lcfg = plan.make_plan(lc, 4, 16)[0].models["policy"].config
    assert lcfg.lora_rank == 4 and plan.fused_head_bytes(lcfg, b, T, tp) == chunk


def test_dpo_rrhf_keep_full_logits_and_rm_has_a_score_head(tmp_path):
    """Only SFT fuses the head; DPO / RRHF (and PPO's update) still build [B, T, V] logits:
    (a + 3*4)*v per token; the reward model's score head is ~0 (8 B per token)."""
    assert plan.FUSED_HEAD_COMMANDS == ("sft",)
    path = _hf_folder(tmp_path, vocab_size=32000)
    D, a, v, T, tp = 128, 2, 16000, 256, 2
    for spec, extra, b, head in (
            ("configs/dpo.py:tiny", ["--config.dpo.precompute_ref=true"], 8, (a + 12) * v),
            ("configs/rrhf.py:tiny", ["--config.rrhf.num_responses=2"], 8, (a + 12) * v),
            ("configs/rm.py:tiny", [], 8, 8)):
        c = plan.load_config(spec, _act_args(path, *extra))
        planner, p = plan.make_plan(c, 4, 16)
        cfg = planner.models["policy"].config
        assert not planner.fused_head and cfg.vocab_size == 32000, spec
        want = _layer_part(cfg, b, T, tp) + b * T * (10 * D * a + head)  # 4 examples x 2 rows
        assert p.line("activations").per_device == pytest.approx(want, rel=1e-12), spec
        assert "fused" not in p.line("activations").note
    pc = plan.load_config("configs/ppo.py:tiny", [f"--config.model.path={path}",
                                                  f"--config.reward.path={path}"])
    ppl, pp = plan.make_plan(pc, 1, 16)
    pcfg = ppl.models["policy"].config
    rows, S = pc.train.batch_size // pc.ppo.num_minibatches, 16 + 14
    assert pp.line("policy activations").per_device == plan.activation_bytes(
        pcfg, "causal_lm", rows, S, pcfg.remat, 1)  # not fused
    assert plan.activation_bytes(pcfg, "causal_lm", rows, S, pcfg.remat, 1) > \
        plan.activation_bytes(pcfg, "causal_lm", rows, S, pcfg.remat, 1, fused_head=True)


# ---- PPO: the unrolled sampler's weight copy ---------------------------------------------------
def _ppo(platform, *extra):
    spec = "dp:1,fsdp:2,tp:2"
    c = plan.load_config("configs/ppo.py:tiny", [
        f"--config.mesh={spec}", "--config.model.dtype=bfloat16", "--config.train.batch_size=8",
        "--config.ppo.num_minibatches=2", *extra])
    return plan.make_plan(c, 4, 16, platform=platform)


def test_ppo_unrolled_decode_counts_a_copy_of_the_decoder_layers():
    """Planning for CPU (decode='auto' -> 'unrolled'): the rollout phase holds the decoder-layer
    weights a second time, per device = their elements on fsdp 2 x tp 2 x the compute dtype
    (bf16, parameters float32); embeddings / LM head not copied. Off CPU ('scan') or with an
    unknown target nothing is counted, and the report says which."""
    planner, p = _ppo("cpu")
    cfg = planner.models["policy"].config
    assert (cfg.param_dtype, cfg.dtype) == ("float32", "bfloat16")
    L, D, F, H, K, Dh = (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
                         cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    kernels = D * H * Dh + 2 * D * K * Dh + H * Dh * D + 3 * D * F  # q, k, v, o, gate, up, down
    norms = 2 * D  # input / post-attention RMSNorm scales (replicated)
    line = p.line("decoder weights, per-layer copy")
    assert line.phase == "rollout"
    assert line.per_device == L * (kernels / 4 + norms) * 2  # every kernel over fsdp*tp = 4
    assert line.total == L * (kernels + norms) * 2
    # = the first device's shards of the real sharded decoder layers, float32 -> bf16 (x 1/2)
    mesh = parallel.create_mesh("dp:1,fsdp:2,tp:2", devices=jax.devices()[:4])
    params = parallel.sharded_init(lambda r: M.init_params(cfg, r), mesh, jax.random.PRNGKey(0))
    assert line.per_device == shard0_bytes(params["layers"]) // 2
    assert line.per_device == plan.decode_copy_bytes(planner.models["policy"].params,
                                                     {"dp": 1, "fsdp": 2, "tp": 2}, "bfloat16")
    assert any("'auto' -> 'unrolled' on cpu" in x and "counted" in x for x in p.info)
    for platform, says in (("tpu", "'auto' -> 'scan' on tpu"), (None, "NOT counted")):
        q = _ppo(platform)[1]
        assert "decoder weights, per-layer copy" not in [x.name for x in q.lines], platform
        assert any(says in x for x in q.info), platform
        assert p.phases["rollout"] - q.phases["rollout"] == line.per_device
        assert p.resident == q.resident
    # LoRA: the adapters are sliced too (still in the compute dtype)
    lp, lplan = _ppo("cpu", "--config.model.lora.rank=4")
    adapters = plan.tree_bytes(trainable.adapters(lp.models["policy"].params)["layers"])  # float32
    assert lplan.line("decoder weights").total == line.total + adapters // 2


def test_the_counted_copy_is_what_the_unrolled_sampler_allocates():
    """XLA's temporaries of the compiled sampler, decode 'unrolled' minus 'scan', are the copy the
    plan counts (float32 parameters, bfloat16 compute: the slices are held in bf16)."""
    import numpy as np
    from easyrl.generate import make_sampler
    cfg = get_preset("small", dtype="bfloat16", param_dtype="float32").replace(
        num_hidden_layers=8, hidden_size=256, intermediate_size=1024, head_dim=64)
    params = M.param_shapes(cfg)
    copy = plan.decode_copy_bytes(params, {"dp": 1, "fsdp": 1, "tp": 1}, cfg.dtype)
    ids = jax.ShapeDtypeStruct((2, 8), np.int32)
    temp = {}
    for decode in ("unrolled", "scan"):
        fn = make_sampler(cfg, max_new_tokens=4, eos_token_id=(), decode=decode).jitted
        compiled = fn.lower(params, ids, ids, jax.ShapeDtypeStruct((2,), np.uint32),
                            np.full(8, -1, np.int32), np.int32(0)).compile()
        temp[decode] = compiled.memory_analysis().temp_size_in_bytes
    print(f"unrolled - scan temporaries {temp['unrolled'] - temp['scan']} B, "
          f"counted copy {copy:.0f} B")
    assert 0.9 * copy <= temp["unrolled"] - temp["scan"] <= 1.1 * copy


def test_cli_says_whether_the_decode_copy_is_counted(capsys):
    args = ["--config", "configs/ppo.py:tiny", "--no-suggest"]
    out = run_cli(capsys, *args, "--devices", "1", "--platform", "cpu")
    assert "decoder weights, per-layer copy" in out
    assert "'auto' -> 'unrolled' on cpu (--platform)" in out
    out = run_cli(capsys, *args, "--devices", "1")
    assert "decoder weights, per-layer copy" not in out and "NOT counted" in out
    out = run_cli(capsys, *args, "--devices", "1", "--platform", "gpu")
    assert "decoder weights, per-layer copy" not in out and "'auto' -> 'scan' on gpu" in out
    out = run_cli(capsys, *args)  # no --devices: this machine (the tests' CPU backend)
    assert "decoder weights, per-layer copy" in out and "this machine's backend" in out


def test_guess_preset_from_placeholder_paths():
    assert plan.guess_preset("/path/to/tulu2-13b") == "llama2_13b"
    assert plan.guess_preset("/path/to/tulu2.5-rm-13b") == "llama2_13b"
    assert plan.guess_preset("/path/to/llama-7b-hf") == "llama2_7b"
    assert plan.guess_preset("gs://b/Meta-Llama-3-70B") == "llama3_70b"
    assert plan.guess_preset("/m/Llama-2-70b-hf") == "llama2_70b"
    assert plan.guess_preset("runs/sft") is None


def test_local_hf_folder_config_is_read(tmp_path):
    import json
    cfg = get_preset("small")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    c = plan.load_config("configs/sft.py:tiny", [f"--config.model.path={tmp_path}"])
    planner, p = plan.make_plan(c, 1, 16)
    got = planner.models["policy"].config
    assert (got.hidden_size, got.num_hidden_layers, got.vocab_size) == (128, 4, 256)
    assert "config.json" in planner.models["policy"].source


# ---- LoRA -------------------------------------------------------------------------------------
def _opt_counts_bytes(tx, params) -> int:
    """Bytes of the optimizer state beyond mu + nu (the int32 step counts)."""
    return plan.tree_bytes(jax.eval_shape(tx.init, params)) - 2 * plan.tree_bytes(params)


def test_lora_optimizer_state_is_two_adam_moments_of_the_adapters():
    """DPO stackllama2_7b_lora (r 8 on q/k/v, base in bf16): optimizer state and gradients cover
    only the adapters, counted exactly from `jax.eval_shape` of the model with LoRA; no reference
    copy; far below the full-weights preset."""
    c = plan.load_config("configs/dpo.py:stackllama2_7b_lora", [])
    planner, p = plan.make_plan(c, 8, 80)
    pol = planner.models["policy"]
    cfg = pol.config
    assert (cfg.lora_rank, lora.target_names(cfg.lora_targets)) == (8, ("q", "k", "v"))
    shapes = M.param_shapes(cfg)  # the real init with the LoRA config
    adapters = trainable.adapters(shapes)
    L, D, r = cfg.num_hidden_layers, cfg.hidden_size, 8
    kv = cfg.num_key_value_heads * cfg.head_dim
    attn = adapters["layers"]["self_attn"]
    assert set(attn) == {"q_proj", "k_proj", "v_proj"} and "mlp" not in adapters["layers"]
    for name, out in (("q_proj", cfg.num_attention_heads * cfg.head_dim), ("k_proj", kv),
                      ("v_proj", kv)):
        assert attn[name]["lora_a"].shape == (L, D, r)
        assert attn[name]["lora_b"].shape == (L, r, out)
    adapter_bytes = plan.tree_bytes(adapters)
    assert adapter_bytes == 4 * L * 3 * (D * r + r * D)  # float32; llama2_7b: out = D
    tx, _ = make_optimizer(c.optim, c.train.steps)
    opt = p.line("model optimizer state").total
    assert opt == plan.tree_bytes(jax.eval_shape(tx.init, adapters))
    assert opt == 2 * adapter_bytes + _opt_counts_bytes(tx, adapters)  # Adam mu + nu
    assert 0 <= _opt_counts_bytes(tx, adapters) <= 64
    assert p.line("model gradients").total == 2 * adapter_bytes  # 8 micro-steps: x2
    # the frozen base in model.lora.base_dtype (bfloat16), adapters in float32
    base = M.param_shapes(lora.disabled(cfg))
    assert p.line("model parameters").total == 2 * trainable.num_params(base) + adapter_bytes
    # the reference is the base with the adapters off: a forward pass, no parameters
    names = [x.name for x in p.lines]
    assert "reference" not in planner.models and "reference parameters" not in names
    assert "reference forward" in names
    assert any("adapters off" in x for x in p.info)
    full_planner, full = plan.make_plan(plan.load_config("configs/dpo.py:stackllama2_7b", []), 8, 80)
    assert "reference parameters" in [x.name for x in full.lines]
    full_opt = full.line("model optimizer state").total
    assert full_opt == 2 * plan.tree_bytes(full_planner.models["policy"].params) + \
        _opt_counts_bytes(tx, full_planner.models["policy"].params)
    assert opt < full_opt / 500
    assert p.line("model optimizer state").per_device < full.line("model optimizer state").per_device / 100
    assert p.resident < full.resident / 4 and p.peak < full.peak
    print(f"dpo stackllama2_7b @8x80GiB: LoRA resident {p.resident / plan.GiB:.2f} GiB, peak "
          f"{p.peak / plan.GiB:.2f} GiB; full resident {full.resident / plan.GiB:.2f} GiB, "
          f"peak {full.peak / plan.GiB:.2f} GiB")


def test_lora_bytes_equal_the_real_sharded_arrays():
    """rm tiny with LoRA and a bfloat16 base on 8 devices: parameters / optimizer state as the
    trainer builds them (setup.load_params, opt state on the trainable subset) match the plan,
    total and per device; the score head trains with the adapters."""
    spec = "dp:2,fsdp:2,tp:2"
    c = plan.load_config("configs/rm.py:tiny", [f"--config.mesh={spec}", "--config.model.lora.rank=4",
                                                "--config.model.lora.base_dtype=bfloat16"])
    planner, p = plan.make_plan(c, 8, 16)
    cfg = setup.model_config(c, setup.load_tokenizer(c))
    assert planner.models["policy"].config == cfg
    mesh = parallel.create_mesh(spec)
    params = setup.load_params(c, cfg, "reward", mesh)
    mask = trainable.trainable_mask(params)
    train = trainable.partition(params, mask)[0]
    assert set(train) == {"layers", "score"}
    tx, _ = make_optimizer(c.optim, c.train.steps)
    opt_sh = parallel.named_shardings(jax.eval_shape(tx.init, train), mesh)
    opt = jax.jit(tx.init, out_shardings=opt_sh)(train)
    assert p.line("model parameters").total == nbytes(params)
    assert p.line("model parameters").per_device == shard0_bytes(params)
    assert p.line("model optimizer state").total == nbytes(opt)
    assert p.line("model optimizer state").per_device == shard0_bytes(opt)
    assert nbytes(opt) == 2 * nbytes(train) + _opt_counts_bytes(tx, train)
    assert p.line("model gradients").total == nbytes(train)
    assert {x.dtype.name for x in jax.tree.leaves(trainable.partition(params, mask)[1])} == {"bfloat16"}


def test_ppo_with_lora_holds_no_reference_and_an_untrained_reward_model():
    c = plan.load_config("configs/ppo.py:tiny", ["--config.model.lora.rank=4"])
    planner, p = plan.make_plan(c, 1, 16)
    assert set(planner.models) == {"policy", "reward", "value"}
    names = [x.name for x in p.lines]
    assert "reference parameters" not in names
    rew, val = planner.models["reward"], planner.models["value"]
    assert rew.config.lora_rank == 0 and not trainable.has_adapters(rew.params)
    assert val.config.lora_rank == 4 and set(val.trainable) == {"layers", "score"}
    vtx, _ = make_optimizer(c.value_optim, c.train.steps)
    assert p.line("value optimizer state").total == \
        2 * plan.tree_bytes(val.trainable) + _opt_counts_bytes(vtx, val.trainable)
    assert p.line("policy gradients").total == plan.tree_bytes(trainable.adapters(planner.models["policy"].params))
    full = plan.make_plan(plan.load_config("configs/ppo.py:tiny", []), 1, 16)[1]
    assert p.resident < full.resident


# ---- GRPO: no critic, a reference only with beta > 0, rollouts of batch_size x G -------------
# the tiny presets' shape keys pinned here (the tests' numbers do not follow preset edits)
GRPO_TINY = ["--config.train.batch_size=16", "--config.grpo.num_generations=8",
             "--config.grpo.max_prompt_len=16", "--config.grpo.max_new_tokens=14",
             "--config.grpo.num_minibatches=1", "--config.train.micro_batch_size=0",
             "--config.model.remat=none", "--config.model.dtype=float32",
             "--config.mesh=dp:1,fsdp:-1,tp:1"]


def _grpo(*extra, preset="tiny", devices=1):
    c = plan.load_config(f"configs/grpo.py:{preset}", [*GRPO_TINY, *extra])
    return plan.make_plan(c, devices, 16)


def test_grpo_holds_no_critic_and_a_reference_only_when_beta_is_positive():
    """beta 0 vs 0.04 on the same config: the only difference is the reference's parameters
    (resident and peak differ by exactly its bytes); with LoRA the reference is the policy with
    its adapters off, so beta changes nothing."""
    p0l, p0 = _grpo("--config.grpo.beta=0")
    p1l, p1 = _grpo("--config.grpo.beta=0.04")
    assert set(p0l.models) == {"policy"} and set(p1l.models) == {"policy", "reference"}
    for p in (p0, p1):
        names = [x.name for x in p.lines]
        assert not [n for n in names if n.startswith("value")], names  # no critic
        assert "reward parameters" not in names  # tiny: rule-based reward on the host
        assert "policy optimizer state" in names and "KV cache (sampler)" in names
    assert "reference parameters" not in [x.name for x in p0.lines]
    assert any("beta = 0" in x for x in p0.info)
    ref = p1.line("reference parameters")
    assert ref.total == p1.line("policy parameters").total == plan.tree_bytes(
        M.param_shapes(p1l.models["policy"].config))
    assert p1.resident - p0.resident == ref.per_device
    assert p1.phases == p0.phases  # the reference's scoring forward is the policy's size
    assert p1.peak - p0.peak == ref.per_device
    # on a mesh: per-device bytes
    q0 = _grpo("--config.grpo.beta=0", "--config.mesh=dp:1,fsdp:2,tp:2", devices=4)[1]
    q1 = _grpo("--config.grpo.beta=0.04", "--config.mesh=dp:1,fsdp:2,tp:2", devices=4)[1]
    assert q1.peak - q0.peak == q1.line("reference parameters").per_device < ref.per_device
    # LoRA: no reference copy, no difference at all
    l0l, l0 = _grpo("--config.grpo.beta=0", "--config.model.lora.rank=4")
    l1l, l1 = _grpo("--config.grpo.beta=0.04", "--config.model.lora.rank=4")
    assert set(l0l.models) == set(l1l.models) == {"policy"}
    assert (l1.resident, l1.phases, l1.peak) == (l0.resident, l0.phases, l0.peak)
    assert any("adapters off" in x for x in l1.info)
    assert l1.line("policy gradients").total == plan.tree_bytes(
        trainable.adapters(l1l.models["policy"].params))


def test_grpo_rollout_batch_is_prompts_times_generations():
    """train.batch_size counts prompts: the sampler runs B x G rows of P + N tokens; the update
    and the scoring pass run on micro-batches of train.micro_batch_size x G rows (0: the whole
    minibatch of B x G / grpo.num_minibatches rows)."""
    planner, p = _grpo("--config.train.batch_size=4", "--config.grpo.num_generations=8")
    cfg = planner.models["policy"].config
    B, G, P, N = 4, 8, 16, 14
    S = P + N
    assert planner.group == G and p.group == G
    kv = p.line("KV cache (sampler)")
    assert kv.total == 2 * cfg.num_hidden_layers * B * G * S * cfg.num_key_value_heads * \
        cfg.head_dim * 4  # float32 compute
    assert kv.total == plan.kv_cache_bytes(cfg, B * G, S, {"dp": 1, "fsdp": 1, "tp": 1})[0]
    assert any(f"{B} prompts x {G} completions = {B * G} rows" in x for x in p.info)
    # shared prefixes: B prompts prefilled once, their cache copied to the G samples
    assert p.line("prefix KV cache (before its copy)").total == kv.total / G
    lb = plan.layer_bytes_per_token(cfg, 1, S, train=False)
    assert p.line("prefill activations").per_device == pytest.approx(
        B * P * (lb["working"] + plan.head_bytes_per_token(cfg, "hidden", 1, False)))
    # micro_batch_size 0, 1 minibatch: one micro-batch of all B x G rows, no accumulation
    assert p.setting.micro == B * G
    assert p.line("policy activations").per_device == plan.activation_bytes(
        cfg, "causal_lm", B * G, S, cfg.remat, 1)
    assert p.line("policy gradients").per_device == plan.tree_bytes(planner.models["policy"].params)
    assert p.line("scoring activations").per_device == plan.activation_bytes(
        cfg, "causal_lm", B * G, S, "none", 1, train=False)
    # 2 minibatches, micro-batches of 1 prompt's group: 8 rows, gradients accumulated (x2)
    pl2, p2 = _grpo("--config.train.batch_size=4", "--config.grpo.num_generations=8",
                    "--config.grpo.num_minibatches=2", "--config.train.micro_batch_size=1",
                    "--config.mesh=dp:2,fsdp:1,tp:1", devices=2)
    assert p2.setting.micro == G and not p2.problems
    assert p2.line("KV cache (sampler)").total == kv.total  # the rollout is unchanged
    assert p2.line("policy activations").per_device == plan.activation_bytes(
        cfg, "causal_lm", G / 2, S, cfg.remat, 1)  # 8 rows over dp 2
    assert p2.line("scoring activations").per_device == plan.activation_bytes(
        cfg, "causal_lm", G / 2, S, "none", 1, train=False)
    assert p2.line("policy gradients").per_device == 2 * plan.tree_bytes(
        planner.models["policy"].params)
    assert any("2 optimizer step(s) per iteration" in x and "of 16 rows" in x and
               "2 micro-batch(es) of 8 rows" in x for x in p2.info)
    assert pl2.micro_candidates() == [8, 16]  # whole groups dividing the minibatch of 16 rows
    # refused settings: micro rows not dividing the minibatch / not splitting over dp*fsdp
    bad = _grpo("--config.train.batch_size=4", "--config.grpo.num_minibatches=2",
                "--config.train.micro_batch_size=3")[1]
    assert not bad.fits and any("must divide the minibatch of 16 rows" in x for x in bad.problems)
    bad = _grpo("--config.train.batch_size=4", "--config.grpo.num_generations=3",
                "--config.train.micro_batch_size=1", "--config.mesh=dp:2,fsdp:1,tp:1",
                devices=2)[1]
    assert any("not divisible by dp*fsdp=2" in x for x in bad.problems)


def test_grpo_reward_model_only_with_reward_path():
    """tiny_rm scores with a reward model (frozen, no adapters under LoRA, its forward over the
    whole rollout batch); tiny's rule-based reward holds none."""
    planner, p = _grpo("--config.model.lora.rank=4", preset="tiny_rm")
    rew = planner.models["reward"]
    assert set(planner.models) == {"policy", "reward"} and rew.kind == "reward"
    assert rew.config.lora_rank == 0 and not trainable.has_adapters(rew.params)
    assert rew.opt_state is None and "reward optimizer state" not in [x.name for x in p.lines]
    line = p.line("reward model forward")
    assert line.phase == "rewards"
    assert line.per_device == plan.activation_bytes(rew.config, "reward", 16 * 8, 30, "none", 1,
                                                    train=False)
    assert "reward" not in _grpo()[0].models


def test_grpo_cli_plan_suggestions_and_compile(capsys):
    shape = ["--config.train.batch_size=16", "--config.grpo.num_generations=64",
             "--config.grpo.max_prompt_len=512", "--config.grpo.max_new_tokens=512",
             "--config.grpo.beta=0.04", "--config.model.dtype=bfloat16"]
    out = run_cli(capsys, "--config", "configs/grpo.py:gsm8k_rlvr", *shape, "--no-suggest")
    assert "easyrl plan: grpo configs/grpo.py:gsm8k_rlvr" in out
    assert "16 prompts x 64 completions = 1024 rows x 512+512 tokens" in out
    assert "reference parameters" in out and "value parameters" not in out
    assert "no value model (critic)" in out
    assert re.search(r"KV cache \(sampler\)\s+[\d.]+\s+512\.000", out)  # 2*32*1024*1024*32*128*2 B
    assert "[GRPO update (one micro-batch)]" in out
    # a micro-batch too big for the device: the suggested train.micro_batch_size fits
    args = ["--config", "configs/grpo.py:tiny", *GRPO_TINY, "--devices", "1",
            "--device-memory", "0.06"]
    out = run_cli(capsys, *args)
    assert "verdict: does NOT fit" in out and "(update)" in out
    flags = re.findall(r"--config\.train\.micro_batch_size=\d+", out)
    assert flags, out
    assert "verdict: FITS" in run_cli(capsys, *args, flags[0])
    out = run_cli(capsys, "--config", "configs/grpo.py:tiny", *GRPO_TINY, "--devices", "1",
                  "--compile")
    assert "grpo: --compile not supported yet" in out
    with pytest.raises(NotImplementedError, match="grpo: --compile not supported yet"):
        planner, p = _grpo()
        plan.compiled_memory(planner, p.setting)


# ---- rollout.engine=continuous: the engine's slots, prefix store, prefill and weight copy -----
ENGINE_LINES = ("KV cache (engine slots)", "prefix store (engine)", "prefill activations (engine)",
                "decoder weights, per-layer copy (engine)")
STATIC_LINES = ("KV cache (sampler)", "prefix KV cache (before its copy)", "prefill activations",
                "decoder weights, per-layer copy")


def _gsm8k(*extra, devices=16, platform="gpu"):
    c = plan.load_config("configs/grpo.py:gsm8k_rlvr", list(extra))
    return plan.make_plan(c, devices, 80, platform=platform)


def _names(p) -> list:
    return [x.name for x in p.lines]


def test_continuous_engine_kv_cache_is_slots_times_blocks():
    """gsm8k_rlvr (llama2_7b, bf16 compute, P = N = 512, 16 prompts x 64) on 16 devices with
    rollout.engine=continuous: the engine's KV cache is slots x NB x block keys per layer for
    keys and values, NB = ceil((P + N) / 64); slots over fsdp 16 when they divide it."""
    L, K, Dh, a = 32, 32, 128, 2  # llama2_7b, bfloat16
    nb, block = -(-(512 + 512) // 64), 64
    for slots, div in ((256, 16), (250, 1)):
        planner, p = _gsm8k("--config.rollout.engine=continuous",
                            f"--config.rollout.slots={slots}")
        assert (p.engine, p.slots) == ("continuous", slots) and not p.problems
        kv = p.line("KV cache (engine slots)")
        assert kv.phase == "rollout"
        assert kv.total == slots * nb * block * (2 * L * K * Dh * a)
        assert kv.per_device == kv.total / div
        names = _names(p)
        assert all(n in names for n in ENGINE_LINES), names
        assert not [n for n in STATIC_LINES if n in names], names  # no static sampler lines
        assert any("rollout engine: continuous" in x for x in p.info)
    # the engine's own sizes (rl_loop.run builds it with its defaults)
    from easyrl.engine import Engine
    eng = planner.rollout_engine(512, 512)
    assert isinstance(eng, Engine) and (eng.slots, eng.nblocks, eng.block) == (250, nb, block)
    # a prompt / response length that is not a whole number of blocks: NB rounds up
    p = _gsm8k("--config.rollout.engine=continuous", "--config.rollout.slots=256",
               "--config.grpo.max_prompt_len=100", "--config.grpo.max_new_tokens=50")[1]
    assert p.line("KV cache (engine slots)").total == 256 * 3 * 64 * (2 * L * K * Dh * a)


def test_continuous_engine_slots_zero_is_one_per_rollout_row():
    """rollout.slots=0 (the default): one slot per rollout row, B x G = 1024 here, whose cache
    (P + N = 16 whole blocks) is the static sampler's KV cache; PPO: B rows."""
    _, p = _gsm8k("--config.rollout.engine=continuous")
    _, st = _gsm8k()
    assert p.slots == 1024 and st.engine == "static" and st.slots == 0
    kv = p.line("KV cache (engine slots)")
    assert "rollout.slots=0: one per rollout row" in kv.note
    assert (kv.total, kv.per_device) == (st.line("KV cache (sampler)").total,
                                         st.line("KV cache (sampler)").per_device)
    # more slots than prompts x G would need: every prompt prefilled at once, no older batch
    assert "all are prefilled before the first admission" in p.line("prefix store (engine)").note
    c = plan.load_config("configs/ppo.py:tulu25_13b", ["--config.rollout.engine=continuous"])
    q = plan.make_plan(c, 256, 16, platform="tpu")[1]
    assert q.slots == 64  # train.batch_size, one sample per prompt
    assert q.line("KV cache (engine slots)").total == 64 * 32 * 64 * 2 * 40 * 40 * 128 * 2


def test_fewer_slots_lower_the_rollout_peak():
    """Fewer slots: less KV cache, a smaller prefix store bound, a lower rollout phase and peak
    (the rest of the plan unchanged); the static plan is what it was."""
    plans = {s: _gsm8k("--config.rollout.engine=continuous", f"--config.rollout.slots={s}")[1]
             for s in (0, 512, 256, 64)}
    order = [plans[s] for s in (0, 512, 256, 64)]
    for big, small in zip(order, order[1:]):
        assert small.phases["rollout"] < big.phases["rollout"]
        assert small.peak < big.peak or small.peak_phase != "rollout"
        assert small.line("KV cache (engine slots)").per_device < big.line(
            "KV cache (engine slots)").per_device
        assert small.resident == big.resident
        assert {k: v for k, v in small.phases.items() if k != "rollout"} == {
            k: v for k, v in big.phases.items() if k != "rollout"}
    st = _gsm8k()[1]
    assert st.peak == pytest.approx(39.017 * plan.GiB, abs=1e-3 * plan.GiB)  # configs/grpo.py
    assert plans[256].peak < st.peak < plans[0].peak  # 256 slots: a quarter of the rows


def test_prefix_store_prefill_and_weight_copy_of_the_engine():
    """The prefix store: 2 L K Dh Pb a + 4 V bytes per row of the prefill batches its bound
    allows (gsm8k, 256 slots, G 64: ceil(256/64) = 4 prompts in one batch of 4 rows + one older
    batch of 4; 4 rows do not divide fsdp 16: whole on every device); one prefill call of 4
    prompts x 512 tokens; the per-layer weight copy in the parameters' dtype (float32), counted
    on every platform (the static sampler's only where 'auto' unrolls)."""
    planner, p = _gsm8k("--config.rollout.engine=continuous", "--config.rollout.slots=256")
    L, K, Dh, a, V = 32, 32, 128, 2, 32000
    assert plan.engine_prefix_rows(16, 64, 256, 8) == [4, 4]
    pre = p.line("prefix store (engine)")
    assert pre.per_device == pre.total == 8 * (2 * L * K * Dh * 512 * a + 4 * V)
    assert "4+4 rows" in pre.note and "ceil(slots/G)=4" in pre.note
    cfg = planner.models["policy"].config
    lb = plan.layer_bytes_per_token(cfg, 1, 512, train=False)
    assert p.line("prefill activations (engine)").per_device == pytest.approx(
        4 * 512 * (lb["working"] + plan.head_bytes_per_token(cfg, "hidden", 1, False)))
    copy = p.line("decoder weights, per-layer copy (engine)")
    layers = planner.models["policy"].params["layers"]
    assert copy.total == plan.tree_bytes(layers)  # float32, as the parameters
    assert copy.per_device == plan.per_device_bytes({"layers": layers},
                                                    {"dp": 1, "fsdp": 16, "tp": 1})
    for platform in ("cpu", "tpu", None):
        q = _gsm8k("--config.rollout.engine=continuous", "--config.rollout.slots=256",
                   platform=platform)[1]
        assert q.line("decoder weights, per-layer copy (engine)").per_device == copy.per_device
        assert q.phases["rollout"] == p.phases["rollout"], platform


def test_engine_weight_copy_is_the_real_sharded_layers():
    """PPO tiny on fsdp 2 x tp 2: the engine's copy per device = the first device's shards of the
    real sharded decoder layers, in their own dtype (float32: the engine slices, not casts);
    LoRA: no adapters in the copy (merged first), the merged kernels counted besides."""
    planner, p = _ppo("tpu", "--config.rollout.engine=continuous")
    cfg = planner.models["policy"].config
    mesh = parallel.create_mesh("dp:1,fsdp:2,tp:2", devices=jax.devices()[:4])
    params = parallel.sharded_init(lambda r: M.init_params(cfg, r), mesh, jax.random.PRNGKey(0))
    line = p.line("decoder weights, per-layer copy (engine)")
    assert line.per_device == shard0_bytes(params["layers"])
    assert "LoRA merge (engine)" not in _names(p)
    lp, lplan = _ppo("tpu", "--config.rollout.engine=continuous", "--config.model.lora.rank=4")
    assert lplan.line("decoder weights, per-layer copy (engine)").total == line.total
    merge = lplan.line("LoRA merge (engine)")
    flat = trainable.flatten(lp.models["policy"].params)
    kernels = [k[:-len("lora_a")] + "kernel" for k in flat if k.endswith("/lora_a")]
    assert kernels and merge.total == sum(plan.tree_bytes(flat[k]) for k in kernels)


def test_prefix_store_bound_holds_in_a_real_engine_run(monkeypatch):
    """`engine_prefix_rows` bounds the rows of the prefill batches alive at once in a real
    `Engine.run` (variable lengths: random EOS; fewer slots than samples)."""
    import weakref

    import numpy as np

    import easyrl.engine as E
    cfg = get_preset("tiny")
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    real = E.programs
    for prompts, g, slots, pbatch in ((12, 3, 5, 4), (10, 1, 4, 8), (9, 5, 16, 2)):
        live, peak = [], [0]

        def note():
            peak[0] = max(peak[0], sum(r for ref, r in live if ref() is not None))

        def programs(st):
            init, prefill, admit, chunk = real(st)

            def prefill_(p, ids, lens):
                out = prefill(p, ids, lens)
                live.append((weakref.ref(out[0][0]), ids.shape[0]))
                note()
                return out

            def chunk_(*args):
                note()
                return chunk(*args)
            return init, prefill_, admit, chunk_
        monkeypatch.setattr(E, "programs", programs)
        eng = E.Engine(cfg, slots=slots, max_prompt_len=8, max_new_tokens=12, temperature=1.0,
                       eos_token_id=tuple(range(3, cfg.vocab_size // 6)), block=8, chunk=2,
                       prefill_batch=pbatch)
        rs = np.random.RandomState(0)
        eng.run(params, [dict(prompt_ids=rs.randint(3, cfg.vocab_size, rs.randint(1, 9)).tolist(),
                              num_samples=g) for _ in range(prompts)], seed=0)
        bound = plan.engine_prefix_rows(prompts, g, slots, pbatch)
        print(f"{prompts} prompts x {g} on {slots} slots, prefill_batch {pbatch}: alive "
              f"prefix rows {peak[0]}, bound {bound}")
        assert 0 < peak[0] <= sum(bound)


def test_cli_prints_the_engine_lines_and_names_rollout_slots(capsys):
    out = run_cli(capsys, "--config", "configs/grpo.py:gsm8k_rlvr",
                  "--config.rollout.engine=continuous", "--config.rollout.slots=256")
    assert "[rollout (continuous engine)]" in out
    assert re.search(r"KV cache \(engine slots\)\s+8\.000\s+128\.000", out)  # over fsdp 16
    for name in ENGINE_LINES:
        assert name in out
    assert "verdict: FITS" in out and "(rollout)" in out
    assert "lever: the peak is the rollout (continuous engine, rollout.slots=256)" in out
    out = run_cli(capsys, "--config", "configs/ppo.py:tulu25_13b",
                  "--config.rollout.engine=continuous", "--config.rollout.slots=256")
    assert re.search(r"KV cache \(engine slots\)\s+1\.562\s+400\.000", out)  # fsdp 32 x tp 8
    assert "192 slots are never filled" in out
    for name in ENGINE_LINES:
        assert name in out
    # static gsm8k on 8 GPUs does not fit (the rollout): the report finds slots that do
    args = ["--config", "configs/grpo.py:gsm8k_rlvr", "--devices", "8", "--device-memory", "80",
            "--platform", "gpu"]
    out = run_cli(capsys, *args)
    assert "verdict: does NOT fit" in out and "lever: the peak is the rollout (static" in out
    flags = re.search(r"(--config\.rollout\.engine=continuous --config\.rollout\.slots=\d+) "
                      r"fits", out).group(1).split()
    assert "verdict: FITS" in run_cli(capsys, *args, *flags)


def test_bad_rollout_engine_is_refused():
    for flags, msg in ((["--config.rollout.engine=paged"], "rollout.engine: 'paged'"),
                       (["--config.rollout.engine=continuous", "--config.rollout.slots=-1"],
                        "rollout.slots: -1")):
        p = _grpo(*flags)[1]
        assert not p.fits and any(msg in x for x in p.problems), p.problems


# ---- big presets: no allocation ---------------------------------------------------------------
def test_tulu25_13b_on_256_devices_plans_on_cpu_without_allocating(tmp_path):
    spec = "configs/ppo.py:tulu25_13b"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, "-m", "easyrl", "plan", "--config", spec,
                                 "--devices", "256", "--device-memory", "16"],
                                stdout=out, stderr=err, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        elapsed = time.time() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    print(stdout)
    print(f"plan tulu25_13b @256: {elapsed:.1f}s, max RSS {usage.ru_maxrss / 2**10:.0f} MiB")
    assert proc.returncode == 0, stderr
    assert elapsed < 60
    # 13B float32 params alone are 48 GiB (and there are 4 models): a real allocation is impossible
    assert usage.ru_maxrss < 3 * 2**20, f"max RSS {usage.ru_maxrss} KiB"
    assert re.search(r"KV cache \(sampler\)\s+[\d.]+\s+100\.000", stdout)  # 2*40*64*2048*40*128*2 B
    for name in ("policy parameters", "policy optimizer state", "reference parameters",
                 "reward parameters", "value parameters", "value optimizer state",
                 "policy gradients", "policy activations"):
        assert name in stdout
    assert "llama2_13b" in stdout
    assert "mesh dp:1,fsdp:32,tp:8" in stdout and "verdict: FITS" in stdout  # the preset's setting


def test_an_indivisible_mesh_is_refused_and_a_fitting_one_suggested(capsys):
    """The base config's mesh fsdp=256 cannot split tulu25_13b's PPO minibatch of 64: the planner
    says so and finds a mesh."""
    out = run_cli(capsys, "--config", "configs/ppo.py:tulu25_13b", "--devices", "256",
                  "--device-memory", "16", "--config.mesh=dp:1,fsdp:-1,tp:1")
    assert "not divisible by dp*fsdp=256" in out and "verdict: does NOT fit" in out
    assert re.search(r"--config\.mesh=dp:\d+,fsdp:\d+,tp:\d+", out)


def _suggested(out: str):
    m = re.search(r"--devices (\d+) ((?:--config\.\S+ ?)+)", out)
    return int(m.group(1)), m.group(2).split()


def test_70b_on_too_few_devices_does_not_fit_and_the_suggestion_does(capsys):
    args = ["--config", "configs/sft.py:stackllama_7b", "--model-preset", "llama2_70b",
            "--device-memory", "80"]
    out = run_cli(capsys, *args, "--devices", "8")
    assert "68.98B" in out
    assert "verdict: does NOT fit" in out
    n, flags = _suggested(out)
    assert n > 8
    out2 = run_cli(capsys, *args, "--devices", str(n), *flags)
    assert "verdict: FITS" in out2, out2


def test_suggested_setting_on_the_same_devices_fits(capsys):
    args = ["--config", "configs/sft.py:stackllama_7b", "--model-preset", "llama2_7b",
            "--devices", "8", "--device-memory", "24", "--config.train.micro_batch_size=64",
            "--config.model.remat=none"]
    out = run_cli(capsys, *args)
    assert "verdict: does NOT fit" in out
    lines = out.split("settings that fit on 8 devices")[1].strip().splitlines()
    flags = lines[1].split("peak")[0].split()
    assert flags and all(f.startswith("--config.") for f in flags)
    assert "verdict: FITS" in run_cli(capsys, *args, *flags)


def test_remat_orders_activation_memory():
    c = plan.load_config("configs/sft.py:stackllama_7b", ["--config.model.path="])
    planner, _ = plan.make_plan(c, 8, 80, model_preset="llama2_7b")
    cur = planner.current()
    act = {r: planner.estimate(plan.Setting(cur.mesh, cur.micro, r)).line("activations").per_device
           for r in ("none", "dots", "dots_no_batch", "full")}
    assert act["none"] > act["dots"] > act["dots_no_batch"] > act["full"]


# ---- every real-model preset fits the hardware it documents ------------------------------------
TRAINER_CONFIGS = ("sft", "rm", "dpo", "kto", "orpo", "cpo", "simpo", "rrhf", "ppo", "grpo",
                   "online_dpo")


def _config_module(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"easyrl_test_configs_{name}",
                                                  os.path.join(REPO, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _presets(name: str) -> list:
    """Every preset of configs/<name>.py, as its unknown-preset error lists them."""
    try:
        _config_module(name).get_config("no-such-preset")
    except ValueError as e:
        return [x.strip() for x in str(e).split(":", 1)[1].split(",")]
    raise AssertionError(f"configs/{name}.py accepts any preset name")


REAL_PRESETS = [f"{name}.py:{p}" for name in TRAINER_CONFIGS for p in _presets(name)
                if p != "tiny" and not p.startswith("tiny_")]  # tiny, tiny_rm: the bundled task


def test_real_presets_include_ppo_and_grpo():
    for spec in ("ppo.py:tulu25_13b", "ppo.py:stackllama_7b", "grpo.py:gsm8k_rlvr",
                 "grpo.py:rloo_tldr", "grpo.py:qwen25_7b_math", "dpo.py:zephyr_7b"):
        assert spec in REAL_PRESETS, spec
    assert not [x for x in REAL_PRESETS if ":tiny" in x]


def _fits_documented_hardware(c, hw, what: str):
    """Plan `c` on `hw` (HARDWARE entry) and fail with the planner's verdict and suggestions."""
    planner, p = plan.make_plan(c, hw["devices"], hw["device_memory_gib"], platform=hw["platform"])
    # the architecture came from the placeholder path's name (1B / 7B / 13B), not the tiny /
    # small fallback presets
    small = {r: m.num_params for r, m in planner.models.items() if m.num_params < 5e8}
    assert not small, f"{what}: models planned from a small preset {small}; name a 1b/7b/13b path"
    if not p.fits:
        cur = planner.current()
        sugg = [f"{plan.setting_flags(q, cur, p.command, int(c.train.batch_size))} (peak "
                f"{plan.human(q.peak)})" for q in plan.suggest(planner)]
        pytest.fail(f"{what} does not fit {hw['name']} ({hw['devices']} x "
                    f"{hw['device_memory_gib']} GiB): {plan.verdict(p)} (peak phase: "
                    f"{p.peak_phase}); the planner suggests: "
                    f"{'; '.join(sugg) or 'nothing on these devices'}")
    return p


@pytest.mark.parametrize("spec", REAL_PRESETS)
def test_every_preset_fits_its_documented_hardware(spec):
    """Every real-model preset names its hardware (HARDWARE[preset] in its config file, quoted in
    the docstring) and its mesh / micro-batch (PPO: minibatch) / remat fit it by the analytic
    planner, as `easyrl plan --config configs/<spec>` with no --devices prints."""
    name, _, preset = spec.partition(":")
    mod = _config_module(name[:-3])
    hw = getattr(mod, "HARDWARE", {}).get(preset)
    assert hw is not None, f"configs/{spec}: no HARDWARE[{preset!r}] (the hardware it is sized for)"
    assert plan.documented_hardware(f"configs/{spec}") == hw
    assert set(hw) == set(plan.HARDWARE_KEYS) and hw["platform"] in ("cpu", "gpu", "tpu"), hw
    assert hw["name"] in " ".join(mod.__doc__.split()), f"configs/{name}: quote {hw['name']!r}"
    p = _fits_documented_hardware(plan.load_config(f"configs/{spec}", []), hw, f"configs/{spec}")
    print(f"{spec} on {hw['name']}: mesh {p.setting.mesh_spec()}, micro {p.setting.micro}, remat "
          f"{p.setting.remat}: {plan.verdict(p)}")


@pytest.mark.parametrize("preset", sorted(_config_module("pipeline").RECIPES))
def test_pipeline_presets_run_every_stage_on_one_machine(preset):
    """A real pipeline preset's stages are presets sized for the same hardware, carrying the same
    mesh, and each fits that hardware as the pipeline runs it (its top-level mesh copied in)."""
    from easyrl.pipeline import run as P
    from easyrl.train.config import load_config_file
    recipe = _config_module("pipeline").RECIPES[preset]
    c = load_config_file(f"configs/pipeline.py:{preset}")
    hws = {n: plan.documented_hardware(f"configs/{n}.py:{p}") for n, p in recipe.items()}
    assert None not in hws.values() and len({tuple(sorted(h.items())) for h in hws.values()}) == 1, hws
    for name, p in recipe.items():
        assert c[name].to_dict() == load_config_file(f"configs/{name}.py:{p}").to_dict(), name
        assert c[name].mesh == c.mesh, name
        s = P.stage_config(c, name, [name])  # as the pipeline runs it, less the path wiring
        _fits_documented_hardware(s, hws[name], f"pipeline {preset} stage {name} ({p})")


def test_plan_without_devices_uses_the_documented_hardware(capsys):
    out = run_cli(capsys, "--config", "configs/ppo.py:tulu25_13b", "--no-suggest")
    assert "hardware: TPU v3-256 (256 x 16 GiB, tpu), the preset's documented hardware" in out
    assert "devices: 256 x 16.0 GiB, mesh dp:1,fsdp:32,tp:8" in out
    assert "'auto' -> 'scan' on tpu (TPU v3-256, the preset's documented hardware)" in out
    assert "verdict: FITS" in out
    # --devices plans other hardware (and nothing of the preset's), --platform wins over it
    out = run_cli(capsys, "--config", "configs/ppo.py:tulu25_13b", "--devices", "512",
                  "--device-memory", "32", "--no-suggest")
    assert "hardware:" not in out and "devices: 512 x 32.0 GiB, mesh dp:1,fsdp:64,tp:8" in out
    out = run_cli(capsys, "--config", "configs/ppo.py:tulu25_13b", "--platform", "cpu",
                  "--no-suggest")
    assert "devices: 256 x 16.0 GiB" in out and "'auto' -> 'unrolled' on cpu (--platform)" in out
    assert plan.documented_hardware("configs/ppo.py:tiny") is None


# ---- compiled memory analysis ----------------------------------------------------------------
def test_compiled_memory_analysis_is_close_to_the_estimate(capsys):
    remat = "none"
    out = run_cli(capsys, "--config", "configs/sft.py:tiny", "--model-preset", "small",
                  "--config.train.seq_len=256", "--config.train.batch_size=4",
                  f"--config.model.remat={remat}", "--devices", "1", "--compile")
    xla = float(re.search(r"XLA memory analysis:.*peak ([\d.]+) GiB", out).group(1))
    est = float(re.search(r"estimate \(same inputs\):.*peak ([\d.]+) GiB", out).group(1))
    print(f"remat {remat}: compiled peak {xla:.4f} GiB, estimate {est:.4f} GiB")
    assert 0.5 * xla <= est <= 1.5 * xla


# ---- errors ---------------------------------------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "easyrl", "plan", *args], capture_output=True,
                          text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_bad_config_key_is_one_clear_line():
    r = _cli("--config", "configs/sft.py:tiny", "--config.train.bogus=3", "--devices", "4")
    assert r.returncode == 2
    assert "easyrl plan: error: unknown config key 'train.bogus'" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_inputs_are_clear(capsys):
    for args, msg in (
            (["--config", "configs/nope.py:tiny"], "not found"),
            (["--config", "configs/sft.py:tiny", "--config.mesh=dp:3,fsdp:-1"], "not divisible"),
            (["--config", "configs/sft.py:tiny", "--config.model.remat=sometimes"], "model.remat"),
            (["--config", "configs/sft.py:tiny", "--config.train.seq_len=abc"], "train.seq_len"),
            (["--config", "configs/sft.py:stackllama_7b", "--model-preset", "llama9"], "llama9")):
        with pytest.raises(SystemExit) as e:
            main(["plan", *args, "--devices", "8"])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err, args


@pytest.mark.parametrize("spec,preset", [("grpo.py:qwen25_7b_math", "qwen25_7b"),
                                         ("dpo.py:zephyr_7b", "mistral_7b")])
def test_qwen_and_mistral_recipes_plan_their_own_architecture(spec, preset):
    """The Qwen2.5 / Zephyr (Mistral) recipes' placeholder paths resolve to the qwen2 / mistral
    presets (q/k/v biases, the sliding window), not a LLaMA-shaped 7B of the same size."""
    hw = plan.documented_hardware(f"configs/{spec}")
    planner, _ = plan.make_plan(plan.load_config(f"configs/{spec}", []), hw["devices"],
                                hw["device_memory_gib"], platform=hw["platform"])
    pol, want = planner.models["policy"], get_preset(preset)
    assert f"preset {preset}" in pol.source, pol.source
    assert pol.config.model_type == want.model_type
    assert pol.config.sliding_window == want.sliding_window and pol.config.qkv_bias == want.qkv_bias


def test_qwen_and_mistral_recipes_pass_their_trainers_config_checks():
    """What the trainers check before compiling (the placeholder model.path aside): the GRPO
    recipe's minibatch / micro-batch split on its fsdp-8 mesh, the prompt + completion length
    within Qwen2.5's positions, a reward source; the DPO recipe's loss and batch split."""
    from types import SimpleNamespace

    from easyrl.algorithms import dpo as dpo_algo, grpo as grpo_algo
    from easyrl.train.config import validate
    mesh = SimpleNamespace(shape={"dp": 1, "fsdp": 8, "tp": 1})  # fsdp 8: HARDWARE's 8 GPUs
    for spec, preset in (("grpo.py:qwen25_7b_math", "qwen25_7b"), ("dpo.py:zephyr_7b", "mistral_7b")):
        assert plan.documented_hardware(f"configs/{spec}")["devices"] == 8, spec
        c = plan.load_config(f"configs/{spec}", ["--config.model.path="])
        positions = get_preset(preset).max_position_embeddings
        validate(c, dp_size=8, max_positions=positions)  # what Run.start checks
        if c.command == "grpo":  # micro_batch_size counts prompts: rows = prompts x G vs dp
            grpo_algo.validate(c, mesh, positions)
            assert c.train.seq_len == c.grpo.max_prompt_len + c.grpo.max_new_tokens
        else:
            dpo_algo.check_config(c.dpo)
