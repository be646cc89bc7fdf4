"""The continuous-batching rollout engine (`easyrl.engine`): exact greedy parity with
transformers, slot-independent sampling, the sampled distribution, log-probs against a scoring
pass, per-request limits, LoRA, a sharded mesh, and request validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easyrl import hf, parallel
from easyrl import model as M
from easyrl.engine import Engine
from easyrl.rollout import response_logprobs

from hf_models import left_pad, make_causal_lm

LENGTHS = [7, 3, 5, 1, 16, 9, 8]  # 7 requests of mixed prompt lengths (8, 16: whole blocks)
N_NEW = 12
# block=8: prompts + responses span up to 4 cache blocks, so the blocks skipped per step change
# as slots fill and empty; chunk=4 so slots are freed and refilled mid-run
GREEDY = dict(max_prompt_len=16, max_new_tokens=N_NEW, temperature=0.0, eos_token_id=(),
              block=8, chunk=4)
SAMPLED = dict(max_prompt_len=16, max_new_tokens=10, temperature=1.0, top_p=0.9,
               eos_token_id=tuple(range(7, 23)), block=8, chunk=3)
LOGP_TOL_F32 = 1e-6
# bf16 compute and cache vs a bf16 scoring pass over the same tokens: measured max |diff| 0.02-0.03
# on this model (both sides round activations to bf16, in different orders); a token near a
# top-p cut-off can also fall on different sides of it, so the bound is loose
LOGP_TOL_BF16 = 0.1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("engine_model"))
    torch_model = make_causal_lm(folder, num_key_value_heads=2)
    config, params = hf.load(folder)
    return torch_model, config, params


def prompts(lengths, vocab, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, vocab, n).tolist() for n in lengths]


def hf_greedy(tm, prompt_list, n_new):
    """transformers `generate(do_sample=False)` of left-padded prompts, no early stop."""
    import torch
    ids, mask = left_pad(prompt_list)
    p = ids.shape[1]
    tm.generation_config.eos_token_id = None
    with torch.no_grad():
        out = tm.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=n_new, pad_token_id=0)
    return out[:, p:].numpy().tolist()


def score(config, params, prompt_list, out, temperature, top_k=0, top_p=1.0):
    """(engine log-probs, scoring-pass log-probs, mask) [S, N] over every sample: one
    `rollout.response_logprobs` pass over left-padded prompts + right-padded responses."""
    rows = [(p, r, lp) for p, o in zip(prompt_list, out)
            for r, lp in zip(o["response_ids"], o["logprobs"])]
    pl = max(len(p) for p, _, _ in rows)
    n = max(len(r) for _, r, _ in rows)
    tokens = np.zeros((len(rows), pl + n), np.int32)
    attn = np.zeros_like(tokens)
    got = np.zeros((len(rows), n), np.float32)
    m = np.zeros((len(rows), n), bool)
    for i, (p, r, lp) in enumerate(rows):
        tokens[i, pl - len(p):pl] = p
        attn[i, pl - len(p):pl] = 1
        tokens[i, pl:pl + len(r)] = r
        attn[i, pl:pl + len(r)] = 1
        got[i, :len(r)] = lp
        m[i, :len(r)] = True
    fn = jax.jit(response_logprobs, static_argnums=(0, 4, 5, 6, 7))
    want, _ = fn(config, params, jnp.asarray(tokens), jnp.asarray(attn), pl, temperature, top_k,
                 top_p)
    return got, np.asarray(want), m


# ---- exact greedy parity ------------------------------------------------------------------------
def test_greedy_matches_transformers_shared_prefixes_more_requests_than_slots(tiny):
    """7 requests of mixed prompt lengths x G=3 samples (21) through 3 slots: every sample is
    token-identical to transformers' greedy `generate`; each prompt is prefilled once; reading
    all cache blocks every step instead of the live ones changes no bit."""
    tm, config, params = tiny
    ps = prompts(LENGTHS, config.vocab_size)
    want = hf_greedy(tm, ps, N_NEW)
    eng = Engine(config, slots=3, **GREEDY)
    out = eng.run(params, [dict(prompt_ids=p, num_samples=3) for p in ps], seed=0)
    for r, o in enumerate(out):
        assert o["response_ids"] == [want[r]] * 3, r
        assert o["has_eos"] == [False] * 3
        assert all(len(lp) == N_NEW for lp in o["logprobs"])
    s = eng.stats
    assert s["requests"] == 7 and s["samples"] == 21 and s["generated_tokens"] == 21 * N_NEW
    assert s["prefilled_prompts"] == 7  # one prefill per prompt, shared by its 3 samples
    assert s["decode_steps"] >= 7 * (N_NEW - 1)  # 21 samples, 3 at a time (first token: prefill)
    # greedy log-probs are log softmax(logits) (T = 1) of a scoring pass
    got, ref, m = score(config, params, ps, out, 1.0)
    assert np.max(np.abs(np.where(m, got - ref, 0))) < LOGP_TOL_F32
    full = Engine(config, slots=3, skip_blocks=False, **GREEDY).run(
        params, [dict(prompt_ids=p, num_samples=3) for p in ps], seed=0)
    assert full == out  # tokens and log-probs bit for bit


def test_per_request_limits_and_eos(tiny):
    """Greedy with EOS on and per-request max_new_tokens: each sample is transformers' greedy
    continuation cut at min(its limit, the first EOS, which is included)."""
    tm, config, params = tiny
    ps = prompts(LENGTHS, config.vocab_size)
    want = hf_greedy(tm, ps, N_NEW)
    eos = want[0][4]  # a token request 0 emits mid-response (others may emit it too)
    limits = [N_NEW, 1, 2, 5, None, 3, 8]
    eng = Engine(config, slots=3, **{**GREEDY, "eos_token_id": eos})
    out = eng.run(params, [dict(prompt_ids=p, num_samples=2, max_new_tokens=lim)
                           for p, lim in zip(ps, limits)], seed=0)
    for r, (o, lim) in enumerate(zip(out, limits)):
        w = want[r][:lim or N_NEW]
        if eos in w:
            w = w[:w.index(eos) + 1]
        assert o["response_ids"] == [w, w], r
        assert o["has_eos"] == [w[-1] == eos] * 2
    assert out[0]["response_ids"][0][-1] == eos and len(out[0]["response_ids"][0]) <= 5
    assert out[1]["response_ids"][0] == want[1][:1]


# ---- sampling ---------------------------------------------------------------------------------
def test_samples_identical_for_any_slot_count(tiny):
    """temperature 1, top_p 0.9, EOS on: the key of token t of sample g of request r derives
    from (seed, r, g, t) only, so 1, 3 and 8 slots (different admission orders, slot rows and
    batch shapes) give the same samples; another seed gives other samples."""
    _, config, params = tiny
    ps = prompts([6, 2, 9, 4], config.vocab_size, seed=1)
    reqs = [dict(prompt_ids=p, num_samples=2) for p in ps]
    runs = {n: Engine(config, slots=n, **SAMPLED).run(params, reqs, seed=5) for n in (1, 3, 8)}
    ref = runs[8]
    eos = [h for o in ref for h in o["has_eos"]]
    assert any(eos) and not all(eos)  # samples of different lengths
    for n in (1, 3):
        for a, b in zip(runs[n], ref):
            assert a["response_ids"] == b["response_ids"], n
            assert a["has_eos"] == b["has_eos"]
            for x, y in zip(a["logprobs"], b["logprobs"]):
                np.testing.assert_allclose(x, y, atol=1e-5)
    # the two samples of a request differ, and so does another seed
    assert any(o["response_ids"][0] != o["response_ids"][1] for o in ref)
    other = Engine(config, slots=8, **SAMPLED).run(params, reqs, seed=6)
    assert [o["response_ids"] for o in other] != [o["response_ids"] for o in ref]


def _peaked(config, params, prompt, ppl=16.0):
    """Scale the LM head so the next-token distribution after `prompt` has perplexity ~ppl."""
    fwd = jax.jit(M.forward, static_argnums=0)
    lg = np.asarray(fwd(config, params, jnp.asarray([prompt], jnp.int32)))[0, -1].astype(np.float64)

    def perplexity(s):
        z = s * lg - (s * lg).max()
        p = np.exp(z) / np.exp(z).sum()
        return np.exp(-(p * np.log(p + 1e-300)).sum())

    lo, hi = 1.0, 1000.0
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if perplexity(mid) > ppl else (lo, mid)
    scaled = dict(params)
    scaled["lm_head"] = {"kernel": params["lm_head"]["kernel"] * lo}
    return scaled


def test_first_and_second_token_frequencies_match_the_model(tiny):
    """One prompt, G = 6000 samples of 2 tokens at T = 0.8: the first token (drawn at admission
    from the shared prefill's logits) follows softmax(logits / T), the second (drawn in the
    decode loop) the exact marginal sum_x p(x | prompt) p(. | prompt, x). The total variation
    of each empirical frequency vector must stay within the sampling noise: below 1.5x the
    largest TV of 200 simulated exact draws of the same size (numpy multinomial)."""
    _, config, params = tiny
    prompt = [5, 17, 99, 42]
    params = _peaked(config, params, prompt)
    t, n, v = 0.8, 6000, config.vocab_size
    eng = Engine(config, slots=64, max_prompt_len=8, max_new_tokens=2, temperature=t,
                 eos_token_id=(), block=8, chunk=4)
    out = eng.run(params, [dict(prompt_ids=prompt, num_samples=n)], seed=3)[0]
    assert eng.stats["prefilled_prompts"] == 1
    r = np.asarray(out["response_ids"])  # [n, 2]
    fwd = jax.jit(M.forward, static_argnums=0)
    p1 = np.asarray(jax.nn.softmax(fwd(config, params, jnp.asarray([prompt]))[0, -1] / t))
    ext = jnp.asarray([prompt + [x] for x in range(v)], jnp.int32)
    p2 = np.asarray(jax.nn.softmax(fwd(config, params, ext)[:, -1] / t, axis=-1))  # [V, V]
    marg2 = p1 @ p2
    tv1 = 0.5 * np.abs(np.bincount(r[:, 0], minlength=v) / n - p1).sum()
    tv2 = 0.5 * np.abs(np.bincount(r[:, 1], minlength=v) / n - marg2).sum()
    rs = np.random.RandomState(0)
    null = lambda p: [0.5 * np.abs(rs.multinomial(n, p / p.sum()) / n - p).sum()  # noqa: E731
                      for _ in range(200)]
    null1, null2 = null(p1.astype(np.float64)), null(marg2.astype(np.float64))
    print(f"TV over {n} samples: first token {tv1:.4f} (exact draws: mean {np.mean(null1):.4f}, "
          f"max {np.max(null1):.4f}), second token {tv2:.4f} (exact draws: mean "
          f"{np.mean(null2):.4f}, max {np.max(null2):.4f})")
    assert tv1 < 1.5 * np.max(null1) and tv2 < 1.5 * np.max(null2)
    lp = np.asarray(out["logprobs"])
    np.testing.assert_allclose(lp[:, 0], np.log(p1[r[:, 0]]), atol=1e-5)
    np.testing.assert_allclose(lp[:, 1], np.log(p2[r[:, 0], r[:, 1]]), atol=1e-5)


# ---- log-probs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logprobs_match_scoring_pass(tiny, dtype):
    """temperature 0.8, top_k 40, top_p 0.9, EOS on: each token's log-prob is that of the
    filtered distribution it was drawn from, equal to `rollout.response_logprobs` over the same
    tokens with the same settings: to 1e-6 in float32; in bf16 (compute and cache) to
    LOGP_TOL_BF16 (measured 0.02-0.03)."""
    _, config, params = tiny
    config = config.replace(dtype=dtype)
    ps = prompts([6, 2, 4, 5, 11], config.vocab_size, seed=2)
    kw = dict(temperature=0.8, top_k=40, top_p=0.9)
    eng = Engine(config, slots=4, max_prompt_len=16, max_new_tokens=10,
                 eos_token_id=(7, 11, 13, 17), block=8, chunk=4, **kw)
    out = eng.run(params, [dict(prompt_ids=p, num_samples=2) for p in ps], seed=1)
    got, want, m = score(config, params, ps, out, kw["temperature"], kw["top_k"], kw["top_p"])
    err = np.max(np.abs(np.where(m, got - want, 0.0)))
    print(f"{dtype}: max |engine logprob - scoring pass| = {err:.2e}")
    assert err < (LOGP_TOL_F32 if dtype == "float32" else LOGP_TOL_BF16), err
    if dtype == "float32":
        _, plain, _ = score(config, params, ps, out, kw["temperature"])
        assert np.all(np.where(m, np.abs(got - plain), 1.0) > 1e-3)  # the filter renormalizes


def test_lora_adapters_are_merged(tiny):
    """Params with (non-zero) LoRA adapters sample exactly as their merged base model."""
    from easyrl.model import lora
    _, config, params = tiny
    cfg = config.replace(lora_rank=4, lora_targets="q|v|down")
    with_ad = lora.add_adapters(cfg, params, jax.random.PRNGKey(0))
    with_ad = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(p) else x, with_ad)
    ps = prompts([6, 3], config.vocab_size, seed=4)
    reqs = [dict(prompt_ids=p, num_samples=2) for p in ps]
    a = Engine(cfg, slots=3, **GREEDY).run(with_ad, reqs, seed=0)
    b = Engine(config, slots=3, **GREEDY).run(lora.merge(cfg, with_ad), reqs, seed=0)
    base = Engine(config, slots=3, **GREEDY).run(params, reqs, seed=0)
    assert a == b and a != base


def test_sharded_mesh_equals_single_device(tiny):
    _, config, params = tiny
    mesh = parallel.create_mesh("dp:2,fsdp:2,tp:2")
    sparams = parallel.shard_params(params, mesh)
    ps = prompts(LENGTHS[:4], config.vocab_size, seed=6)
    reqs = [dict(prompt_ids=p, num_samples=2) for p in ps]
    want = Engine(config, slots=4, **GREEDY).run(params, reqs, seed=0)
    got = Engine(config, slots=4, mesh=mesh, **GREEDY).run(sparams, reqs, seed=0)
    for a, b in zip(got, want):
        assert a["response_ids"] == b["response_ids"]
        np.testing.assert_allclose(np.concatenate(a["logprobs"]), np.concatenate(b["logprobs"]),
                                   atol=1e-5)


# ---- validation ---------------------------------------------------------------------------------
def test_too_long_requests_raise_before_any_compute(tiny):
    _, config, _ = tiny  # max_position_embeddings 256
    eng = Engine(config, slots=2, max_prompt_len=250, max_new_tokens=20, temperature=0.0)
    ok = dict(prompt_ids=[5] * 10)
    with pytest.raises(ValueError, match=r"request 1: prompt length 240 \+ max_new_tokens 20 = "
                                         r"260 exceeds the model's max_position_embeddings 256"):
        eng.run(None, [ok, dict(prompt_ids=[5] * 240)], seed=0)  # params None: nothing ran
    # a shorter limit makes the same prompt fit
    assert eng.check_requests([dict(prompt_ids=[5] * 240, max_new_tokens=16)])[0][2] == 16
    with pytest.raises(ValueError, match=r"request 0: prompt length 251 exceeds the engine's "
                                         r"max_prompt_len 250"):
        eng.run(None, [dict(prompt_ids=[5] * 251, max_new_tokens=1)], seed=0)
    with pytest.raises(ValueError, match=r"request 2: max_new_tokens 21 must be in \[1, 20\]"):
        eng.run(None, [ok, ok, dict(prompt_ids=[5], max_new_tokens=21)], seed=0)
    with pytest.raises(ValueError, match="request 0: empty prompt_ids"):
        eng.run(None, [dict(prompt_ids=[])], seed=0)
    with pytest.raises(ValueError, match="request 0: num_samples must be >= 1"):
        eng.run(None, [dict(prompt_ids=[4], num_samples=0)], seed=0)
    with pytest.raises(ValueError, match="slots must be >= 1"):
        Engine(config, slots=0, max_prompt_len=4, max_new_tokens=4)
