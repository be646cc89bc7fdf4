"""KTO, ORPO, CPO and SimPO trainers: first-step closed forms, micro-batch split invariance (KTO:
through its batch-level z only), the precomputed KTO reference, LoRA, TRL's class-weight
advice, and learning on the synthetic task from the tiny SFT model."""
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easyrl import model as M
from easyrl import parallel
from easyrl.algorithms import kto, registry
from easyrl.data import synthetic
from easyrl.train import loop, setup
from easyrl.train.metrics import read_metrics
from easyrl.train.step import accumulate, normalizers
from tiny_configs import ONE_DEVICE, make_config

REFLESS = ("orpo", "cpo", "simpo")


def small_pairs(tmp_path, n=64, seed=3):
    path = tmp_path / "pairs_small.jsonl"
    synthetic.write_jsonl(str(path), synthetic.preference_pairs(n, seed=seed, split="train"))
    return str(path)


def unpaired_rows(tmp_path, n=64, seed=5):
    """Truly unpaired data from the synthetic pairs: each prompt keeps ONE response, the chosen
    (label true) or the rejected (label false), by a coin flip."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in synthetic.preference_pairs(n, seed=seed, split="train"):
        good = bool(rng.random() < 0.5)
        rows.append({"prompt": p["prompt"], "completion": p["chosen" if good else "rejected"],
                     "label": good})
    path = tmp_path / "unpaired.jsonl"
    synthetic.write_jsonl(str(path), rows)
    return str(path)


def build(command, tmp_path, params_key=0, **over):
    """(task, params, model config) of `command`'s tiny preset on one device, random init."""
    c = make_config(command, tmp_path / command, **{"data.eval": "", "train.batch_size": 16,
                                                    **over})
    mesh = parallel.create_mesh(ONE_DEVICE)
    tok = setup.load_tokenizer(c)
    cfg = setup.model_config(c, tok)
    params = setup.load_params(c, cfg, "causal_lm", mesh)
    if params_key:
        params = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(
            jax.random.PRNGKey(params_key), x.shape, x.dtype), params)
    task = registry.get(command).build_task(loop.Env(c, mesh, tok, cfg, params))
    return task, params, cfg


def batch_of(task):
    return {k: jnp.asarray(v) for k, v in next(task.train_data).items()
            if isinstance(v, np.ndarray)}


def loss_and_grads(task, params, batch, micro, with_grad=True):
    denom = normalizers(task.denom_fn(batch))
    return jax.jit(lambda p, f, b: accumulate(task.loss_fn, p, f, b, jax.random.PRNGKey(0), denom,
                                              micro, with_grad=with_grad))(params, task.frozen, batch)


# ---- KTO --------------------------------------------------------------------------------------
def test_kto_first_step_closed_form_and_z_per_micro_batch(cache, tmp_path):
    """Policy == reference: r = 0 and z = max(0, 0) = 0 for every micro-batch, so each example's
    loss is w (1 - sig(0)) = w / 2 and loss + gradient do not depend on the split. With the
    policy moved off the reference, the accumulated loss is the mean of the examples' losses,
    each with the z of ITS micro-batch (rows m, m+n, ...): a float64 numpy reference from the
    per-example log-probs."""
    task, params, cfg = build("kto", tmp_path, **{"data.train": unpaired_rows(tmp_path),
                                                  "kto.desirable_weight": 1.5, "kto.beta": 0.5})
    b = batch_of(task)
    lab = np.asarray(b["label"])
    assert 0 < lab.sum() < len(lab)
    l1, m1, g1 = loss_and_grads(task, params, b, 1)
    l4, m4, g4 = loss_and_grads(task, params, b, 4)
    want = float(np.mean(np.where(lab == 1, 1.5, 1.0) * 0.5))
    assert float(l1) == pytest.approx(want, abs=1e-6) and float(l4) == pytest.approx(want, abs=1e-6)
    for k in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(float(m1[k])) < 1e-6 and abs(float(m4[k])) < 1e-6, k
    assert float(m1["count/chosen"]) == float(m4["count/chosen"]) == lab.sum()
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-6)

    moved = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.PRNGKey(7), x.shape,
                                                                x.dtype), params)
    lp, kl = jax.jit(lambda p: kto.example_logps(cfg, p, b))(moved)
    rlp, rkl = jax.jit(lambda p: kto.example_logps(cfg, p, b))(task.frozen)
    lp, kl, rlp, rkl = (np.asarray(x, np.float64) for x in (lp, kl, rlp, rkl))
    beta, n = 0.5, len(lab)

    def expected(micro):
        total = 0.0
        for m in range(micro):
            rows = list(range(m, n, micro))
            z = max(0.0, float(np.mean(kl[rows] - rkl[rows])))
            for i in rows:
                r = lp[i] - rlp[i]
                x = beta * (r - z) if lab[i] else beta * (z - r)
                total += (1.5 if lab[i] else 1.0) * (1.0 - 1.0 / (1.0 + math.exp(-x)))
        return total / n

    got = {m: float(loss_and_grads(task, moved, b, m, with_grad=False)[0]) for m in (1, 4)}
    for m in (1, 4):
        assert got[m] == pytest.approx(expected(m), rel=1e-5), m
    print(f"KTO loss, policy moved: 1 micro-batch {got[1]:.6f}, 4 micro-batches {got[4]:.6f}")


def test_kto_precomputed_reference_equals_the_live_one(cache, tmp_path):
    """kto.precompute_ref: no reference held, the stored per-example log-probs (example and KL
    row) give the live reference's loss and metrics on the same batch (policy moved)."""
    over = {"data.train": small_pairs(tmp_path, n=32)}
    live, params, _ = build("kto", tmp_path / "live", **over)
    pre, _, _ = build("kto", tmp_path / "pre", **over, **{"kto.precompute_ref": "true"})
    assert live.frozen is not None and pre.frozen is None
    b_live, b_pre = batch_of(live), batch_of(pre)
    assert {"ref_logps", "ref_kl_logps"} <= set(b_pre) and "ref_logps" not in b_live
    moved = jax.tree.map(lambda x: x * 1.05, params)
    def f(t, b):
        return jax.jit(lambda p, fr: t.loss_fn(p, fr, b, None, normalizers(t.denom_fn(b))))(
            moved, t.frozen)
    (la, ma), (lb, mb) = f(live, b_live), f(pre, b_pre)
    assert float(la) == pytest.approx(float(lb), abs=1e-6)
    for k in ma:
        assert float(ma[k]) == pytest.approx(float(mb[k]), abs=1e-5), k


def test_kto_lora_reference_is_the_base_with_adapters_off(cache, tmp_path):
    task, params, _ = build("kto", tmp_path, **{"data.train": small_pairs(tmp_path),
                                                "model.lora.rank": 4})
    assert task.frozen is None  # no copy of the weights: the base with the adapters off
    loss, _, _ = loss_and_grads(task, params, batch_of(task), 1, with_grad=False)
    assert float(loss) == pytest.approx(0.5, abs=1e-6)  # fresh adapters: policy == reference


def test_kto_weight_advice_follows_trl():
    from ml_collections import ConfigDict
    k = ConfigDict(dict(desirable_weight=1.0, undesirable_weight=1.0))
    assert kto.weight_advice(k, 50, 50) is None
    for nd, nu, none in ((50, 0, "undesirable"), (0, 50, "desirable")):  # no weight can help
        msg = kto.weight_advice(k, nd, nu)
        assert f"with no {none} example no kto.desirable_weight" in msg and "[" not in msg
    assert "in [1.25, 1.66]" in kto.weight_advice(k, 40, 50)  # neither 1 is in range
    k.desirable_weight = 1.3
    assert kto.weight_advice(k, 40, 50) is None  # w_d in [1.25, 1.66]
    k.desirable_weight = 1.0
    msg = kto.weight_advice(k, 10, 90)  # 9x more undesirable: raise w_d to [9, 11.97]
    assert "kto.desirable_weight in [9.0, 11.97]" in msg and "undesirable_weight in [0.08, 0.11]" in msg
    k.desirable_weight = 10.0
    assert kto.weight_advice(k, 10, 90) is None


def test_kto_warns_on_unbalanced_weights(cache, tmp_path, caplog):
    rows = [{"prompt": p["prompt"], "completion": p["chosen"], "label": i < 4}
            for i, p in enumerate(synthetic.preference_pairs(40, seed=2, split="train"))]
    path = tmp_path / "skewed.jsonl"
    synthetic.write_jsonl(str(path), rows)
    with caplog.at_level(logging.WARNING):
        build("kto", tmp_path, **{"data.train": str(path)})
    assert any("outside the recommended range" in r.getMessage() for r in caplog.records)


# ---- ORPO / CPO / SimPO -------------------------------------------------------------------------
@pytest.mark.parametrize("command", REFLESS)
def test_reference_free_trainers_are_split_invariant(cache, tmp_path, command):
    """Pair terms / global pairs and the chosen NLL / global chosen tokens: micro-batches of 4
    accumulate to the whole batch's loss, metrics and gradient; no reference is held."""
    task, params, _ = build(command, tmp_path, **{"data.train": small_pairs(tmp_path)})
    assert task.frozen is None
    b = batch_of(task)
    l1, m1, g1 = loss_and_grads(task, params, b, 1)
    l4, m4, g4 = loss_and_grads(task, params, b, 4)
    assert float(l1) == pytest.approx(float(l4), rel=1e-5)
    for k in m1:
        assert float(m1[k]) == pytest.approx(float(m4[k]), rel=1e-4, abs=1e-6), k
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-6)
    want = {"orpo": ("nll_loss", "log_odds_ratio", "log_odds_chosen"), "cpo": ("nll_loss",),
            "simpo": ()}[command]
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected") + want:
        assert k in m1, k


def _nll_reference(cfg, params, b, tokens: str) -> float:
    """Token-mean cross-entropy of the chosen rows, float64 numpy from the logits (log-softmax,
    label = the next token): over every attended token but the first (TRL's ORPOTrainer,
    `concatenated_forward`: labels = input_ids where attention_mask == 1, shifted by one) or
    over the response tokens only."""
    ids = np.asarray(b["chosen_input_ids"])
    logits = np.asarray(M.forward(cfg, params, b["chosen_input_ids"],
                                  b["chosen_attention_mask"]), np.float64)
    keep = np.asarray(b["chosen_attention_mask"] if tokens == "all" else b["chosen_loss_mask"])
    total, count = 0.0, 0
    for i in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if keep[i, t]:
                row = logits[i, t - 1]
                logz = row.max() + np.log(np.sum(np.exp(row - row.max())))
                total -= row[ids[i, t]] - logz
                count += 1
    return total / count


@pytest.mark.parametrize("tokens", ["all", "response"])
def test_orpo_nll_is_the_token_mean_cross_entropy(cache, tmp_path, tokens):
    """ORPO with orpo.beta = 0 is its NLL term alone: the token-mean cross-entropy of the chosen
    rows over prompt + response (TRL's ORPOTrainer; nll_tokens=all, the default) or over the
    response (nll_tokens=response), from a float64 reference built on the logits."""
    task, params, cfg = build("orpo", tmp_path, **{"data.train": small_pairs(tmp_path),
                                                   "orpo.beta": 0.0, "orpo.nll_tokens": tokens})
    b = batch_of(task)
    loss, m, _ = loss_and_grads(task, params, b, 2)  # split-invariant: 2 micro-batches
    assert float(loss) == pytest.approx(_nll_reference(cfg, params, b, tokens), rel=1e-5)
    assert float(m["nll_loss"]) == pytest.approx(float(loss), rel=1e-6)


def test_simpo_is_cpo_with_the_simpo_loss_and_no_nll(cache, tmp_path):
    over = {"data.train": small_pairs(tmp_path)}
    s_task, params, _ = build("simpo", tmp_path, **over, **{"simpo.beta": 2.0,
                                                             "simpo.simpo_gamma": 1.0})
    c_task, _, _ = build("cpo", tmp_path, **over, **{"cpo.loss_type": "simpo", "cpo.beta": 2.0,
                                                      "cpo.simpo_gamma": 1.0, "cpo.cpo_alpha": 0.0})
    b = batch_of(s_task)
    (ls, ms, _), (lc, mc, _) = (loss_and_grads(t, params, b, 1, with_grad=False)
                                for t in (s_task, c_task))
    assert float(ls) == pytest.approx(float(lc), rel=1e-6) and "nll_loss" not in ms
    # at random init lp_w ~ lp_l, so the loss is near -log sig(-gamma) = softplus(gamma)
    assert float(ls) == pytest.approx(math.log1p(math.exp(1.0)), abs=0.1)


@pytest.mark.parametrize("command,key,bad,match", [
    ("kto", "kto.loss_type", "sigmoid", "config kto.loss_type"),
    ("kto", "kto.undesirable_weight", "0", "config kto.undesirable_weight"),
    ("cpo", "cpo.loss_type", "robust", "config cpo.loss_type"),
    ("simpo", "simpo.beta", "0", "config simpo.beta"),
    ("orpo", "orpo.beta", "-1", "config orpo.beta"),
])
def test_config_errors_name_the_key(cache, tmp_path, command, key, bad, match):
    c = make_config(command, tmp_path, **{key: bad})
    with pytest.raises(ValueError, match=match):
        registry.get(command).check_config(c)


# ---- learning on the synthetic task -------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(sft_run, heldout_pairs, tmp_path_factory):
    """Each trainer's tiny preset from the tiny SFT model (KTO on truly unpaired rows: one
    response per prompt), then one held-out evaluation of all of them and of the SFT model."""
    import ml_collections as mlc

    from easyrl.pipeline.evaluate import evaluate
    d = tmp_path_factory.mktemp("pref_family")
    runs = {}
    for command in ("kto",) + REFLESS:
        over = {"model.path": sft_run, "data.eval": heldout_pairs, "eval.every": 200}
        if command == "kto":
            over["data.train"] = unpaired_rows(d, n=4000)
        registry.get(command).train(make_config(command, d / command, **over))
        runs[command] = str(d / command)
    ec = mlc.ConfigDict(dict(prompts="synthetic", split="", format="", num_prompts=256,
                             batch_size=128, max_prompt_len=16, max_new_tokens=16,
                             temperature=1.0, num_samples=2, greedy=False,
                             true_reward="synthetic"))
    res = evaluate({"sft": sft_run, **runs}, sft_dir=sft_run, rm_dir=None, ec=ec,
                   template="plain", mesh_spec=ONE_DEVICE, log=lambda *a: None)
    return runs, res


@pytest.mark.slow
@pytest.mark.parametrize("command", ("kto",) + REFLESS)
def test_trainer_improves_the_heldout_true_reward_over_sft(trained, command):
    runs, res = trained
    last = read_metrics(runs[command])[-1]
    sft, got = res["sft"]["true_reward"], res[command]["true_reward"]
    print(f"{command}: held-out true reward {got:.3f} vs SFT {sft:.3f} (KL to SFT "
          f"{res[command]['kl_to_sft']:.2f}); held-out "
          + ", ".join(f"{k} {last[k]:.3f}" for k in ("eval/rewards/accuracies",
                                                     "eval/rewards/margins") if k in last))
    assert got > sft
    assert last["eval/rewards/margins"] > 0
    if command != "kto":
        assert last["eval/rewards/accuracies"] > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("command", ["kto"])  # the supervised loop is shared: one trainer
def test_lora_on_a_mesh_with_micro_batches_resumes_exactly(cache, tmp_path, command, capsys):
    """LoRA adapters, an fsdp:2 mesh, 2 micro-batches, checkpoints every 2 steps: a run resumed
    from its step-2 checkpoint (the step-4 one deleted) ends with the uninterrupted run's
    adapters and logs the same rows."""
    import os
    import shutil

    from easyrl import checkpoint
    over = {"data.train": small_pairs(tmp_path, n=64), "data.eval": "", "train.steps": 4,
            "train.batch_size": 16, "train.micro_batch_size": 8, "model.lora.rank": 4,
            "mesh": "dp:1,fsdp:2,tp:1", "checkpoint.every": 2, "log.every": 1}
    algo = registry.get(command)
    a = algo.train(make_config(command, tmp_path / "a", **over))
    b_dir = tmp_path / "b"
    algo.train(make_config(command, b_dir, **over))
    shutil.rmtree(os.path.join(b_dir, checkpoint.CKPT_SUBDIR, "4"))
    assert checkpoint.latest_step(str(b_dir)) == 2
    capsys.readouterr()
    b = algo.train(make_config(command, b_dir, **over))
    assert "resuming from checkpoint at step 2" in capsys.readouterr().out
    for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    ra, rb = read_metrics(str(tmp_path / "a")), read_metrics(str(b_dir))
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6), x["step"]
