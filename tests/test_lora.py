"""LoRA: exact identity at init, trainer runs with a frozen base and adapter-only optimizer
state, merged / PEFT / easyrl parity after training, PEFT import, the adapters-off DPO and PPO
reference, sharding, config errors."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
import torch

from easyrl import checkpoint, convert, hf, parallel, rollout
from easyrl import model as M
from easyrl.algorithms import common, dpo, ppo, rm, sft
from easyrl.data import synthetic
from easyrl.model import lora, trainable
from easyrl.train import loop, setup
from easyrl.train.config import validate_lora
from easyrl.train.optim import make_optimizer

import tiny_configs
from hf_models import batch, make_causal_lm, make_reward_model

ONE_DEVICE = tiny_configs.ONE_DEVICE
VOCAB = 160  # the bundled synthetic tokenizer
LORA = {"model.lora.rank": 4, "model.lora.alpha": 8.0}


def make_config(command, out, **over):
    return tiny_configs.make_config(command, out, **{"checkpoint.async_save": "false",
                                                     "data.eval": "", **over})


@pytest.fixture(scope="module")
def base_lm(tmp_path_factory):
    """A tiny HF causal LM (GQA) with the synthetic tokenizer's vocabulary."""
    d = tmp_path_factory.mktemp("lora_base_lm")
    make_causal_lm(str(d), vocab_size=VOCAB, num_key_value_heads=2, pad_token_id=3,
                   bos_token_id=1, eos_token_id=2)
    return str(d)


@pytest.fixture(scope="module")
def data(cache, tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_data")
    sft_path, pairs = str(d / "sft.jsonl"), str(d / "pairs.jsonl")
    synthetic.write_jsonl(sft_path, synthetic.sft_examples(64, seed=0))
    synthetic.write_jsonl(pairs, synthetic.preference_pairs(64, seed=3, split="train"))
    return {"sft": sft_path, "pairs": pairs}


def _random_adapters(params, seed=0, std=0.2):
    """Non-zero B (and A) so adapters visibly change the model."""
    flat = trainable.flatten(params)
    rs = np.random.RandomState(seed)  # numpy: no per-shape compiles
    for k in sorted(flat):
        if trainable.is_adapter(k):
            x = (rs.standard_normal(flat[k].shape) * std).astype(np.float32)
            flat[k] = jax.device_put(x, flat[k].sharding)
    return trainable.unflatten(flat)


_init = jax.jit(M.init_params, static_argnums=(0, 2))  # eager init is slow on 2 cores
_forward = jax.jit(M.forward, static_argnums=0)


def _hf_logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return out.logits.float().numpy()


def _masked_max_diff(a, b, mask):
    return float(np.max(np.abs(a - b) * mask[..., None]))


# ---- the module ----------------------------------------------------------------------------------
def test_initial_adapters_give_the_base_logits_exactly(tmp_path):
    make_causal_lm(str(tmp_path / "lm"), num_key_value_heads=2, attention_bias=True,
                   mlp_bias=True)
    base_cfg, base = hf.load(str(tmp_path / "lm"))
    ids, mask = batch(base_cfg.vocab_size, b=3, t=10)
    want = np.asarray(_forward(base_cfg, base, ids, mask))
    cfg = base_cfg.replace(lora_rank=4, lora_alpha=8.0)
    params = lora.add_adapters(cfg, base, jax.random.PRNGKey(1))
    got = np.asarray(_forward(cfg, params, ids, mask))
    np.testing.assert_array_equal(got, want)  # bit-exact: B = 0
    flat = trainable.flatten(trainable.adapters(params))
    assert {p.split("/")[2] for p in flat} == {f"{t}_proj" for t in lora.TARGETS}
    for p, x in flat.items():  # PEFT's init: A ~ U(+-1/sqrt(in)), B = 0
        bound = 1 / np.sqrt(x.shape[1]) if p.endswith("lora_a") else 0.0
        assert float(jnp.abs(x).max()) <= bound, p
    for targets, names in (("q|v", {"q_proj", "v_proj"}), ("down_proj", {"down_proj"}),
                           ("(gate|up)_proj|o", {"gate_proj", "up_proj", "o_proj"})):
        shapes = M.param_shapes(base_cfg.replace(lora_rank=2, lora_targets=targets))
        assert {p.split("/")[2] for p in trainable.flatten(trainable.adapters(shapes))} == names, targets
    # adapters off: the same parameters under a rank-0 config ignore the adapter leaves
    moved = _random_adapters(params)
    np.testing.assert_array_equal(np.asarray(_forward(base_cfg, moved, ids, mask)), want)
    assert np.abs(np.asarray(_forward(cfg, moved, ids, mask)) - want).max() > 1e-2
    # adapter dropout acts only when a dropout key is given (training)
    dcfg = cfg.replace(lora_dropout=0.5)
    drop = jax.jit(lambda p, r: M.forward(dcfg, p, ids, mask, rng=r))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda p: M.forward(dcfg, p, ids, mask))(moved)),
                               np.asarray(_forward(cfg, moved, ids, mask)), atol=1e-6)
    assert np.abs(np.asarray(drop(moved, jax.random.PRNGKey(0))) -
                  np.asarray(drop(moved, jax.random.PRNGKey(1)))).max() > 1e-3
    # a reward model: the score head stays trainable, the base does not
    mask_tree = trainable.trainable_mask(M.param_shapes(base_cfg.replace(lora_rank=2), "reward"))
    on = sorted(p for p, v in trainable.flatten(mask_tree).items() if v)
    assert "score/kernel" in on and all(p == "score/kernel" or trainable.is_adapter(p) for p in on)


def test_adapter_params_get_the_partition_rule_shardings():
    mesh = parallel.create_mesh("dp:1,fsdp:4,tp:2")
    cfg = M.get_preset("tiny").replace(lora_rank=4)
    base = parallel.sharded_init(lambda r: M.init_params(lora.disabled(cfg), r), mesh,
                                 jax.random.PRNGKey(0))
    params = lora.add_adapters(cfg, base, jax.random.PRNGKey(1), mesh=mesh)
    flat = trainable.flatten(trainable.adapters(params))
    assert len(flat) == 14  # 7 kernels x (A, B)
    for path, x in flat.items():
        want = parallel.spec_for(path, x.shape, mesh)
        assert x.sharding.spec == want, path
        assert any(ax is not None for ax in want), path  # every adapter is actually split
    q = flat["layers/self_attn/q_proj/lora_a"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert flat["layers/mlp/down_proj/lora_b"].sharding.spec == \
        jax.sharding.PartitionSpec(None, None, "fsdp")
    assert flat["layers/self_attn/o_proj/lora_a"].sharding.spec == \
        jax.sharding.PartitionSpec(None, "tp", None)
    # and the optimizer state over the trainable subset follows the same table
    tx, _ = make_optimizer(mlc.ConfigDict(dict(lr=1e-3, schedule="constant", warmup=0, b1=0.9,
                                               b2=0.999, eps=1e-8, weight_decay=0.0, clip=1.0)), 10)
    train = trainable.partition(params, trainable.trainable_mask(params))[0]
    specs = parallel.partition_specs(jax.eval_shape(tx.init, train), mesh)
    mu = specs[1][0].mu
    assert mu["layers"]["self_attn"]["q_proj"]["lora_a"] == q.sharding.spec


# ---- SFT with LoRA: frozen base, adapter-only optimizer state, three-way export parity -----------
@pytest.fixture(scope="module")
def sft_lora_run(base_lm, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_lora")
    c = make_config("sft", out, **LORA, **{
        "model.path": base_lm, "data.train": data["sft"], "train.steps": 4, "train.batch_size": 8,
        "train.seq_len": 32, "optim.lr": 2e-2, "optim.warmup": 0, "optim.schedule": "constant",
        "log.every": 1, "model.lora.targets": "q|k|v|o|gate|up|down"})
    res = sft.train(c)
    return str(out), res


def test_sft_lora_freezes_the_base_and_optimizes_only_adapters(sft_lora_run, base_lm):
    out, res = sft_lora_run
    state = res.state
    params = state.params
    _, base = hf.load(base_lm)
    # the base is bit-for-bit the HF model; the adapters moved
    np.testing.assert_array_equal(np.asarray(trainable.strip(params)["layers"]["mlp"]["up_proj"]["kernel"]),
                                  np.asarray(base["layers"]["mlp"]["up_proj"]["kernel"]))
    for k, v in trainable.flatten(trainable.strip(params)).items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(trainable.flatten(base)[k]), err_msg=k)
    assert float(jnp.abs(params["layers"]["self_attn"]["q_proj"]["lora_b"]).max()) > 1e-3
    # optimizer state = Adam's two moments of the adapters only (plus scalar counts)
    n_adapter = trainable.num_params(trainable.adapters(params))
    n_model = trainable.num_params(params)
    opt_arrays = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    n_opt = sum(int(np.prod(x.shape)) for x in opt_arrays)
    print(f"SFT LoRA: model {n_model} params, adapters {n_adapter}, optimizer state {n_opt} "
          f"floats (2 x adapters = {2 * n_adapter})")
    assert n_opt == 2 * n_adapter and n_adapter < n_model / 10


def test_merged_export_peft_and_easyrl_agree(sft_lora_run, base_lm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out, _ = sft_lora_run
    cfg, _, params = checkpoint.load_model(out)
    assert cfg.lora_rank == 4 and trainable.has_adapters(params)
    ids, mask = batch(VOCAB, b=3, t=12)
    ours = np.asarray(M.forward(cfg, params, ids, mask))
    base_logits = np.asarray(M.forward(*hf.load(base_lm), ids, mask))
    assert _masked_max_diff(ours, base_logits, mask) > 1e-2  # training changed the model
    # without --merge-lora a LoRA checkpoint refuses a plain export
    with pytest.raises(ValueError, match="merge-lora"):
        convert.easyrl_to_hf(out, str(tmp_path / "nope"))
    from easyrl import cli
    cli.main(["convert", "easyrl-to-hf", "--ckpt", out, "--out", str(tmp_path / "merged"),
              "--merge-lora"])
    cli.main(["convert", "easyrl-to-peft", "--ckpt", out, "--out", str(tmp_path / "adapter")])
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    d_merged = _masked_max_diff(_hf_logits(merged, ids, mask), ours, mask)
    acfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert acfg["peft_type"] == "LORA" and acfg["task_type"] == "CAUSAL_LM" and acfg["r"] == 4
    assert acfg["base_model_name_or_path"] == os.path.abspath(base_lm)
    assert sorted(acfg["target_modules"]) == sorted(f"{t}_proj" for t in lora.TARGETS)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_lm), str(tmp_path / "adapter")).eval()
    d_peft = _masked_max_diff(_hf_logits(peft_model, ids, mask), ours, mask)
    print(f"LoRA logits max |diff| vs easyrl: merged HF export {d_merged:.2e}, "
          f"PEFT adapter on the base {d_peft:.2e}")
    assert d_merged < 1e-4 and d_peft < 1e-4
    # import back (to continue training): model.lora.init_from = the PEFT folder
    c = make_config("sft", tmp_path / "cont", **{"model.path": base_lm,
                                                  "model.lora.init_from": str(tmp_path / "adapter")})
    validate_lora(c)
    icfg = setup.model_config(c)
    assert (icfg.lora_rank, icfg.lora_alpha) == (4, 8.0)
    iparams = setup.load_params(c, icfg, "causal_lm", parallel.create_mesh(ONE_DEVICE))
    for k, v in trainable.flatten(params).items():
        np.testing.assert_allclose(np.asarray(trainable.flatten(iparams)[k]), np.asarray(v), atol=1e-7,
                                   err_msg=k)
    np.testing.assert_allclose(np.asarray(M.forward(icfg, iparams, ids, mask)), ours, atol=1e-6)


# ---- reward model: SEQ_CLS adapter with the score head -----------------------------------------
def test_reward_lora_trains_head_and_adapters_and_exports_seq_cls(data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    base_dir = str(tmp_path / "rm_base")
    make_reward_model(base_dir, vocab_size=VOCAB, num_key_value_heads=2, pad_token_id=3,
                      bos_token_id=1, eos_token_id=2)
    c = make_config("rm", tmp_path / "rm", **LORA, **{
        "model.path": base_dir, "data.train": data["pairs"], "train.steps": 2,
        "train.batch_size": 8, "train.seq_len": 32, "optim.lr": 2e-2, "optim.warmup": 0,
        "log.every": 1, "model.lora.targets": "q|v"})
    res = rm.train(c)
    state = res.state
    n_train = trainable.num_params(trainable.adapters(state.params)) + trainable.num_params(state.params["score"])
    n_opt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
    print(f"RM LoRA: optimizer state {n_opt} floats = 2 x (adapters + score head) = {2 * n_train}")
    assert n_opt == 2 * n_train
    _, base = hf.load(base_dir, kind="reward")
    assert not np.allclose(np.asarray(state.params["score"]["kernel"]),
                           np.asarray(base["score"]["kernel"]))  # the head trained
    convert.easyrl_to_peft(str(tmp_path / "rm"), str(tmp_path / "rm_adapter"))
    acfg = json.loads((tmp_path / "rm_adapter" / "adapter_config.json").read_text())
    assert acfg["task_type"] == "SEQ_CLS" and acfg["modules_to_save"] == ["score"]
    cfg, _, params = checkpoint.load_model(str(tmp_path / "rm"))
    ids, mask = batch(VOCAB, b=3, t=12)
    ids = np.where(mask > 0, np.where(ids == 3, 4, ids), 3)  # HF finds the last token by pad id 3
    ours = np.asarray(M.score(cfg, params, ids, mask))
    pm = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base_dir),
                                   str(tmp_path / "rm_adapter")).eval()
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


# ---- DPO / PPO reference = the base with adapters off ------------------------------------------
def test_dpo_adapters_off_reference_equals_a_separate_reference_copy(base_lm, data, tmp_path):
    """The DPO trainer's wiring under LoRA holds no reference copy; its first-step loss equals
    the one computed against a separate frozen copy of the initial policy, at the initial
    adapters (log 2) and with moved adapters."""
    c = make_config("dpo", tmp_path / "dpo", **LORA, **{
        "model.path": base_lm, "data.train": data["pairs"], "train.steps": 1,
        "train.batch_size": 8, "train.seq_len": 32})
    mesh = parallel.create_mesh(ONE_DEVICE)
    tok = setup.load_tokenizer(c)
    cfg = setup.model_config(c, tok)
    params = setup.load_params(c, cfg, "causal_lm", mesh)  # the base + fresh adapters
    task = dpo.build_task(loop.Env(c, mesh, tok, cfg, params))
    assert task.frozen is None  # no second copy of the weights
    b = {k: jnp.asarray(v) for k, v in next(task.train_data).items() if isinstance(v, np.ndarray)}
    denom = common.pair_denom(b)
    adapters_off = jax.jit(lambda p: task.loss_fn(p, None, b, None, denom))
    with_copy = jax.jit(lambda p, f: dpo.make_loss(cfg, c.dpo)(p, f, b, None, denom))
    ref_copy = common.frozen_copy(params)  # the non-LoRA wiring: a copy of the initial policy
    l0, _ = adapters_off(params)
    assert float(l0) == pytest.approx(np.log(2), abs=1e-6)  # policy == reference at step 1
    moved = _random_adapters(params, std=0.3)
    (l1, m1), (l2, m2) = adapters_off(moved), with_copy(moved, ref_copy)
    print(f"DPO LoRA loss with moved adapters: adapters-off reference {float(l1):.7f}, separate "
          f"reference copy {float(l2):.7f}")
    assert abs(float(l1) - np.log(2)) > 1e-4  # the adapters moved the policy off the reference
    assert float(l1) == pytest.approx(float(l2), abs=1e-6)
    for k in m1:
        assert float(m1[k]) == pytest.approx(float(m2[k]), abs=1e-6), k
    with pytest.raises(ValueError, match="adapters_off_reference"):
        dpo.make_loss(lora.disabled(cfg), c.dpo, adapters_off_reference=True)


def test_ppo_lora_reference_and_update_touch_only_adapters_and_value_head():
    cfg = M.get_preset("tiny").replace(lora_rank=4, lora_alpha=8.0)
    base_cfg = lora.disabled(cfg)
    key = jax.random.PRNGKey(0)
    policy = _random_adapters(_init(cfg, key), std=0.05)
    value = _init(cfg, jax.random.PRNGKey(3), "value")  # fresh adapters (B = 0)
    reward = trainable.strip(value)
    b, plen, n = 4, 6, 5
    tokens = jax.random.randint(jax.random.PRNGKey(1), (b, plen + n), 3, cfg.vocab_size)
    attn = jnp.ones((b, plen + n), jnp.int32)
    resp = jnp.ones((b, n), jnp.int32)
    cfgs = dict(policy=cfg, ref=lora.disabled(cfg), value=cfg, reward=base_cfg)
    scored = jax.jit(lambda m: ppo.score_rollout(cfgs, m, tokens, attn, resp, prompt_len=plen,
                                                 temperature=1.0))(
        dict(policy=policy, ref=policy, value=value, reward=reward))
    want_ref = jax.jit(lambda p: rollout.response_logprobs(base_cfg, p, tokens, attn, plen, 1.0)[0])(
        trainable.strip(policy))
    np.testing.assert_allclose(np.asarray(scored["ref_logprobs"]), np.asarray(want_ref), atol=1e-6)
    assert float(jnp.abs(scored["logprobs"] - scored["ref_logprobs"]).max()) > 1e-3
    optim = mlc.ConfigDict(dict(lr=1e-2, schedule="constant", warmup=0, b1=0.9, b2=0.999,
                                eps=1e-8, weight_decay=0.1, clip=1.0))
    tx, _ = make_optimizer(optim, 4)
    pm, vm = trainable.trainable_mask(policy), trainable.trainable_mask(value)
    pt, vt = trainable.partition(policy, pm)[0], trainable.partition(value, vm)[0]
    state = ppo.PPOState(step=jnp.zeros((), jnp.int32), policy=policy, value=value,
                         policy_opt=tx.init(pt), value_opt=tx.init(vt))
    adv = jax.random.normal(jax.random.PRNGKey(4), (b, n))
    ret = scored["values"] + adv
    inputs = dict(tokens=tokens, attn=attn, resp_mask=resp, logprobs=scored["logprobs"],
                  values=scored["values"], advantages=adv, returns=ret)
    update = jax.jit(ppo.make_update(cfg, cfg, tx, tx, prompt_len=plen, temperature=1.0,
                                     ppo_epochs=1, num_minibatches=2, cliprange=0.2,
                                     cliprange_value=0.2, vf_coef=0.1, policy_mask=pm,
                                     value_mask=vm))
    new, metrics = update(state, inputs, jax.random.PRNGKey(2))
    assert float(metrics["policy/approxkl_first"]) == pytest.approx(0.0, abs=1e-6)
    for old_t, new_t in ((policy, new.policy), (value, new.value)):
        fo, fn = trainable.flatten(old_t), trainable.flatten(new_t)
        for k in fo:
            changed = not np.array_equal(np.asarray(fo[k]), np.asarray(fn[k]))
            trains = trainable.is_adapter(k) or k.startswith("score/")
            assert changed == trains, k
    n_opt = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(new.value_opt) if np.ndim(x) > 0)
    assert n_opt == 2 * (trainable.num_params(trainable.adapters(value)) + trainable.num_params(value["score"]))


# ---- config ------------------------------------------------------------------------------------
def test_lora_config_errors_name_the_key(tmp_path):
    c = make_config("sft", tmp_path)
    for key, val, match in (("model.lora.rank", "-1", "model.lora.rank"),
                            ("model.lora.targets", "qq|zz", "model.lora.targets"),
                            ("model.lora.dropout", "1.5", "model.lora.dropout"),
                            ("model.lora.base_dtype", "int8", "model.lora.base_dtype"),
                            ("model.lora.init_from", str(tmp_path / "missing"), "model.lora.init_from")):
        bad = make_config("sft", tmp_path, **{"model.lora.rank": 4, key: val})
        with pytest.raises(ValueError, match=match):
            validate_lora(bad)
    validate_lora(make_config("sft", tmp_path, **LORA))
    validate_lora(c)
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "lm_head"]}))
    with pytest.raises(ValueError, match="target_modules"):
        setup.model_config(make_config("sft", tmp_path, **{"model.lora.init_from": str(tmp_path / "ad")}))
    with pytest.raises(ValueError, match="model.lora.rank"):
        setup.model_config(make_config("sft", tmp_path, **{"model.lora.rank": 4,
                                                           "model.lora.init_from": str(tmp_path / "ad")}))
    assert lora.target_names("q_proj|v") == ("q", "v") and lora.target_names(".*") == lora.TARGETS


# ---- pipeline evaluation of a LoRA policy ---------------------------------------------------------
def test_pipeline_eval_of_a_lora_policy_uses_its_adapters(base_lm, data, tmp_path):
    """The held-out evaluation loads LoRA runs merged: the KL to the SFT model and the samples
    are those of the adapted policy (an earlier version applied the SFT config to the LoRA tree,
    so the adapters were ignored and the KL came out 0.000). The evaluated KL equals the one
    computed here with the adapters applied unmerged (the LoRA config and tree) on samples drawn
    from the merged policy with the evaluation's rng, and the SFT model itself scores KL 0."""
    from easyrl import losses
    from easyrl.data.tokenizer import load_tokenizer
    from easyrl.generate import make_sampler, normalize_eos
    from easyrl.pipeline.evaluate import evaluate, load_prompts
    sft_dir, lora_dir = tmp_path / "sft", tmp_path / "sft_lora"
    common = {"data.train": data["sft"], "train.batch_size": 8, "train.seq_len": 32,
              "log.every": 1}
    sft.train(make_config("sft", sft_dir, **common, **{"model.path": base_lm, "train.steps": 2}))
    sft.train(make_config("sft", lora_dir, **LORA, **common, **{
        "model.path": str(sft_dir), "train.steps": 4, "optim.lr": 2e-2, "optim.warmup": 0,
        "optim.schedule": "constant", "model.lora.targets": "q|k|v|o|gate|up|down"}))
    ec = mlc.ConfigDict(dict(prompts="synthetic", split="", format="", num_prompts=8,
                             batch_size=8, max_prompt_len=16, max_new_tokens=8, temperature=1.0,
                             num_samples=1, greedy=False, true_reward="synthetic"))
    res = evaluate({"sft": str(sft_dir), "lora": str(lora_dir)}, sft_dir=str(sft_dir),
                   rm_dir=None, ec=ec, template="plain", mesh_spec=ONE_DEVICE, seed=0,
                   log=lambda *_: None)
    print("kl_to_sft:", {k: round(v["kl_to_sft"], 4) for k, v in res.items()})
    assert abs(res["sft"]["kl_to_sft"]) < 1e-5
    # a Monte Carlo estimate over 8 short samples: its sign is noise, its size is the adapters'
    assert abs(res["lora"]["kl_to_sft"]) > 0.05

    # the same number by hand: sample from the merged policy with the evaluation's rng, then
    # sum log p_lora - log p_sft over the response tokens
    mesh = parallel.create_mesh(ONE_DEVICE)
    tok = load_tokenizer(str(sft_dir / "tokenizer"))
    (batch, _), = load_prompts(ec, tok, "plain", mesh)[0]
    cfg, _, lparams = checkpoint.load_model(str(lora_dir))
    assert cfg.lora_rank == 4
    scfg, _, sparams = checkpoint.load_model(str(sft_dir))
    mcfg, _, mparams = checkpoint.load_model(str(lora_dir), merge_lora=True)
    eos = normalize_eos(tuple({*normalize_eos(tok.eos_token_id), *normalize_eos(None, scfg)}))
    sampler = make_sampler(mcfg, max_new_tokens=8, temperature=1.0, eos_token_id=eos,
                           pad_token_id=tok.pad_token_id)
    roll = sampler(mparams, batch["input_ids"], batch["attention_mask"],
                   jax.random.fold_in(jax.random.PRNGKey(0), 0))
    attn = jnp.concatenate([batch["attention_mask"], roll["response_mask"]], axis=1)
    m = roll["response_mask"].astype(jnp.float32)

    def seq_logp(c, p):
        lp = losses.token_logprobs(M.forward(c, p, roll["tokens"], attn), roll["tokens"], 1.0)
        return jnp.sum(lp[:, 16:] * m, -1)

    kl = float(jnp.mean(seq_logp(cfg, lparams) - seq_logp(scfg, sparams)))
    np.testing.assert_allclose(res["lora"]["kl_to_sft"], kl, rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def sft_adapter(sft_lora_run, tmp_path_factory):
    """The trained SFT LoRA run exported as a PEFT adapter folder (what model.lora.init_from takes)."""
    from easyrl import cli
    out = tmp_path_factory.mktemp("sft_adapter") / "adapter"
    cli.main(["convert", "easyrl-to-peft", "--ckpt", sft_lora_run[0], "--out", str(out)])
    return str(out)


def test_dpo_reference_is_the_loaded_adapter_in_every_mode(base_lm, data, sft_adapter, tmp_path):
    """Continuing an SFT adapter (model.lora.init_from): the live reference is the base with that
    adapter frozen (policy == reference at step 1: loss log 2) and agrees with precompute_ref."""
    over = {**LORA, "model.path": base_lm, "model.lora.init_from": sft_adapter,
            "data.train": data["pairs"], "train.steps": 1, "train.batch_size": 8,
            "train.seq_len": 32, "model.lora.rank": 0}
    mesh = parallel.create_mesh(ONE_DEVICE)
    losses_by_mode = {}
    for mode in ("live", "precompute"):
        c = make_config("dpo", tmp_path / mode, **over, **{"dpo.precompute_ref": str(mode == "precompute")})
        tok = setup.load_tokenizer(c)
        cfg = setup.model_config(c, tok)
        params = setup.load_params(c, cfg, "causal_lm", mesh)
        task = dpo.build_task(loop.Env(c, mesh, tok, cfg, params))
        b = {k: jnp.asarray(v) for k, v in next(task.train_data).items() if isinstance(v, np.ndarray)}
        loss, _ = jax.jit(lambda p, f: task.loss_fn(p, f, b, None, common.pair_denom(b)))(params, task.frozen)
        losses_by_mode[mode] = float(loss)
        if mode == "live":  # only the adapter leaves are copied
            assert trainable.flatten(task.frozen) and all(trainable.is_adapter(k)
                                                          for k in trainable.flatten(task.frozen))
    print("DPO first-step loss from the loaded adapter:", losses_by_mode)
    assert losses_by_mode["live"] == pytest.approx(np.log(2), abs=1e-6)
    assert losses_by_mode["precompute"] == pytest.approx(np.log(2), abs=1e-6)


def test_ppo_reference_is_the_loaded_adapter(base_lm, sft_adapter, tmp_path):
    """PPO continuing an SFT adapter: the scoring pass's reference log-probs are the initial
    policy's, so the KL to the reference is 0 before any update."""
    from easyrl.algorithms import ppo
    from easyrl.train.rl_loop import RLEnv
    rm_dir = str(tmp_path / "rm")
    convert.hf_to_easyrl(base_lm, rm_dir)
    c = make_config("ppo", tmp_path / "ppo", **{
        "model.path": base_lm, "model.lora.init_from": sft_adapter,
        "reward.path": rm_dir, "train.steps": 1, "train.batch_size": 4, "ppo.num_minibatches": 1})
    mesh = parallel.create_mesh(ONE_DEVICE)
    tok = setup.load_tokenizer(c)
    pcfg = setup.model_config(c, tok)
    built = ppo.build(RLEnv(c, mesh, tok, pcfg, 1))
    ids, mask = batch(VOCAB, b=4, t=12)
    plen = c.ppo.max_prompt_len
    tokens = jnp.asarray(np.concatenate([np.full((4, plen), 5), ids], 1), jnp.int32)
    attn = jnp.ones_like(tokens)
    scored = built.iteration.score(built.iteration.models(built.state, built.frozen), tokens, attn,
                                   jnp.ones((4, tokens.shape[1] - plen), jnp.int32))
    diff = float(jnp.abs(scored["logprobs"] - scored["ref_logprobs"]).max())
    print(f"PPO from a loaded adapter: max |logp - logp_ref| = {diff:.2e}")
    assert diff < 1e-5
