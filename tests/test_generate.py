"""The KV-cache sampler (`easyrl.generate`) and the `easyrl generate` command."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easyrl import hf, parallel
from easyrl import model as M
from easyrl.generate import filter_logits, generate, make_sampler

from hf_models import make_causal_lm

N_NEW = 10
TV_TOL = 0.05  # total variation between empirical first-token frequencies and softmax(logits / T)
LOGP_TOL = 1e-4
LENGTHS = [7, 3, 5, 1]  # prompt lengths of the shared left-padded batch (4 rows: divisible by dp*fsdp)


def forward(config, params, ids, mask=None):
    """Jitted `M.forward` (compiled once per config and shape)."""
    mask = jnp.ones(jnp.shape(ids), jnp.int32) if mask is None else mask
    return _forward(config, params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))


_forward = jax.jit(M.forward, static_argnums=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("gen_model"))
    torch_model = make_causal_lm(folder, num_key_value_heads=2)
    config, params = hf.load(folder)
    return folder, torch_model, config, params


def left_padded(lengths, vocab, seed=0, pad=0):
    rs = np.random.RandomState(seed)
    p = max(lengths)
    ids = np.full((len(lengths), p), pad, np.int32)
    mask = np.zeros((len(lengths), p), np.int32)
    for i, n in enumerate(lengths):
        ids[i, p - n:] = rs.randint(3, vocab, n)
        mask[i, p - n:] = 1
    return ids, mask


def peaked(config, params, prompt, ppl=16.0):
    """Scale the LM head so the next-token distribution after `prompt` has perplexity ~ppl
    (random init gives near-uniform logits, useless for frequency tests)."""
    lg = np.asarray(forward(config, params, [prompt]))[0, -1]
    lg = lg.astype(np.float64)

    def perplexity(s):
        z = s * lg - (s * lg).max()
        p = np.exp(z) / np.exp(z).sum()
        return np.exp(-(p * np.log(p + 1e-300)).sum())

    lo, hi = 1.0, 1000.0
    for _ in range(60):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if perplexity(mid) > ppl else (lo, mid)
    scaled = jax.tree.map(lambda x: x, params)
    scaled["lm_head"] = {"kernel": params["lm_head"]["kernel"] * lo}
    return scaled


def rescore(config, params, out, prompt_mask, temperature, top_k=0, top_p=1.0):
    """log softmax(forward logits / T) at the response tokens, from one full forward pass
    (with top_k / top_p: over the tokens the filter keeps)."""
    from easyrl.losses.common import filtered_logprobs
    p = prompt_mask.shape[1]
    full_mask = jnp.concatenate([jnp.asarray(prompt_mask), out["response_mask"]], axis=1)
    logits = forward(config, params, out["tokens"], full_mask)[:, p - 1:-1]
    if top_k or top_p < 1.0:
        return np.asarray(filtered_logprobs(logits, out["response"], temperature, top_k, top_p))
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    return np.asarray(jnp.take_along_axis(logp, out["response"][..., None], axis=-1)[..., 0])


# ---- correctness against transformers --------------------------------------------------------
@pytest.mark.parametrize("decode", ["unrolled", "scan"])
def test_greedy_matches_transformers_left_padded(tiny, decode):
    """Both decode loops (unrolled layers: the CPU default; scanned stack: accelerators)."""
    import torch
    _, tm, config, params = tiny
    ids, mask = left_padded(LENGTHS, config.vocab_size)
    out = generate(config, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0),
                   max_new_tokens=N_NEW, temperature=0.0, eos_token_id=(), decode=decode)
    tm.generation_config.eos_token_id = None  # no early stop on either side
    with torch.no_grad():
        want = tm.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                           do_sample=False, max_new_tokens=N_NEW, pad_token_id=0)
    want = want[:, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(np.asarray(out["response"]), want)
    np.testing.assert_array_equal(np.asarray(out["tokens"][:, :ids.shape[1]]), ids)
    assert np.all(np.asarray(out["response_mask"]) == 1) and not np.any(np.asarray(out["has_eos"]))
    # greedy logprobs are log softmax(logits) (T = 1)
    np.testing.assert_allclose(np.asarray(out["logprobs"]), rescore(config, params, out, mask, 1.0),
                               atol=LOGP_TOL)


@pytest.mark.parametrize("decode", ["unrolled", "scan"])
def test_logprobs_match_scoring_pass(tiny, decode):
    """Sampled with temperature + top-k + top-p: logprobs are those of the distribution sampled
    from (log softmax(logits/T) over the kept tokens), as a scoring pass over the final tokens
    with the same filter computes them (masked positions are 0); not the unfiltered ones."""
    _, _, config, params = tiny
    ids, mask = left_padded([6, 2, 4, 5], config.vocab_size, seed=1)
    t = 0.8
    out = generate(config, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(3),
                   max_new_tokens=N_NEW, temperature=t, top_k=40, top_p=0.9,
                   eos_token_id=(7, 11, 13, 17), pad_token_id=0, decode=decode)
    want = rescore(config, params, out, mask, t, top_k=40, top_p=0.9)
    m = np.asarray(out["response_mask"]) > 0
    got = np.asarray(out["logprobs"])
    err = np.max(np.abs(np.where(m, got - want, 0.0)))
    print(f"max |logprob - scoring pass| = {err:.2e} (tolerance {LOGP_TOL})")
    assert err < LOGP_TOL, err
    assert np.all(got[~m] == 0.0)
    unfiltered = rescore(config, params, out, mask, t)
    assert np.all(np.where(m, got - unfiltered, 1.0) > 1e-3)  # the filter renormalizes


@pytest.mark.parametrize("decode", ["unrolled", "scan"])
def test_bf16_sampler_matches_bf16_scoring_pass(tiny, decode):
    """bf16 compute and cache (on CPU the cache is held as uint16 bit patterns so each step's
    write is in place): greedy tokens are the argmax of a bf16 scoring pass over the final
    tokens and the log-probs agree with it to bf16 precision."""
    from easyrl.model.llama import cache_storage_dtype
    from easyrl.platform_tuning import platform_of, tuning_for_mesh
    _, _, config, params = tiny
    config = config.replace(dtype="bfloat16")
    if platform_of() == "cpu":
        assert cache_storage_dtype("bfloat16", tuning_for_mesh().kv_cache_as_bits) == jnp.uint16
    ids, mask = left_padded([6, 2, 4, 5], config.vocab_size, seed=2)
    out = generate(config, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0),
                   max_new_tokens=N_NEW, temperature=0.0, eos_token_id=(), decode=decode)
    full_mask = jnp.concatenate([jnp.asarray(mask), out["response_mask"]], axis=1)
    logits = forward(config, params, out["tokens"], full_mask)[:, ids.shape[1] - 1:-1]
    logits = np.asarray(logits)
    picked = np.take_along_axis(logits, np.asarray(out["response"])[..., None], -1)[..., 0]
    # the greedy pick is the scoring pass's argmax up to bf16 rounding of near-ties
    assert np.all(picked >= logits.max(-1) - 0.05), np.max(logits.max(-1) - picked)
    assert np.mean(picked == logits.max(-1)) > 0.7
    np.testing.assert_allclose(np.asarray(out["logprobs"]), rescore(config, params, out, mask, 1.0),
                               atol=0.05)


def test_tied_embeddings(tiny):
    """The prefill LM head also works for tied embeddings (no lm_head parameter)."""
    _, _, config, params = tiny
    config = config.replace(tie_word_embeddings=True)
    params = {k: v for k, v in params.items() if k != "lm_head"}
    ids, mask = left_padded([5, 2, 4], config.vocab_size, seed=7)
    out = generate(config, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0),
                   max_new_tokens=5, temperature=0.0, eos_token_id=())
    np.testing.assert_allclose(np.asarray(out["logprobs"]), rescore(config, params, out, mask, 1.0),
                               atol=LOGP_TOL)
    full_mask = jnp.concatenate([jnp.asarray(mask), out["response_mask"]], axis=1)
    logits = forward(config, params, out["tokens"], full_mask)[:, ids.shape[1] - 1:-1]
    np.testing.assert_array_equal(np.asarray(jnp.argmax(logits, -1)), np.asarray(out["response"]))


# ---- sampling distribution -------------------------------------------------------------------
def test_first_token_frequencies_match_softmax(tiny):
    _, _, config, params = tiny
    prompt = [5, 17, 99, 42]
    params = peaked(config, params, prompt, ppl=16.0)
    t, n = 0.7, 20000
    logits = np.asarray(forward(config, params, jnp.asarray([prompt], jnp.int32)))[0, -1]
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits) / t))
    ids = jnp.asarray(np.tile(prompt, (n, 1)), jnp.int32)
    out = generate(config, params, ids, jnp.ones_like(ids), jax.random.PRNGKey(1),
                   max_new_tokens=1, temperature=t, eos_token_id=())
    freq = np.bincount(np.asarray(out["response"][:, 0]), minlength=config.vocab_size) / n
    tv = 0.5 * np.abs(freq - probs).sum()
    print(f"first-token TV over {n} samples at T={t}: {tv:.4f} (tolerance {TV_TOL})")
    assert tv < TV_TOL
    # the logprob reported for each sample is log softmax(logits / T) at that token
    np.testing.assert_allclose(np.asarray(out["logprobs"][:, 0]),
                               np.log(probs[np.asarray(out["response"][:, 0])]), atol=LOGP_TOL)


def test_top_k_stays_in_top_k(tiny):
    _, _, config, params = tiny
    k, b = 5, 256
    ids, mask = left_padded([5] * b, config.vocab_size, seed=2)
    ids[:] = ids[0]  # one prompt, many samples
    out = generate(config, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(2),
                   max_new_tokens=4, temperature=1.0, top_k=k, eos_token_id=())
    logits = np.asarray(forward(config, params, out["tokens"]))[:, ids.shape[1] - 1:-1]
    resp = np.asarray(out["response"])
    kth = np.sort(logits, axis=-1)[..., -k]
    chosen = np.take_along_axis(logits, resp[..., None], axis=-1)[..., 0]
    assert np.all(chosen >= kth - 1e-5)
    first = set(resp[:, 0].tolist())
    assert len(first) == k  # all k candidates show up in 256 draws over a near-uniform top-k


def test_top_p_stays_in_nucleus(tiny):
    _, _, config, params = tiny
    prompt = [9, 30, 77, 4, 120]
    params = peaked(config, params, prompt, ppl=16.0)
    t, top_p, b = 1.0, 0.6, 512
    ids = jnp.asarray(np.tile(prompt, (b, 1)), jnp.int32)
    out = generate(config, params, ids, jnp.ones_like(ids), jax.random.PRNGKey(4),
                   max_new_tokens=3, temperature=t, top_p=top_p, eos_token_id=())
    logits = np.asarray(forward(config, params, out["tokens"]))[:, len(prompt) - 1:-1] / t
    resp = np.asarray(out["response"])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    p_tok = np.take_along_axis(probs, resp[..., None], axis=-1)
    mass_above = np.sum(np.where(probs > p_tok, probs, 0.0), axis=-1)  # mass ranked before it
    assert np.all(mass_above < top_p + 1e-5)
    nucleus0 = int(np.sum(np.cumsum(np.sort(probs[0, 0])[::-1]) - np.sort(probs[0, 0])[::-1] < top_p))
    assert 1 < len(set(resp[:, 0].tolist())) <= nucleus0


def test_filter_logits_small_cases():
    x = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    neg = np.finfo(np.float32).min
    kept = lambda y: (np.asarray(y)[0] > neg).tolist()  # noqa: E731
    assert kept(filter_logits(x, top_k=2)) == [True, True, False, False]
    assert kept(filter_logits(x, top_p=0.5)) == [True, False, False, False]  # 0.5 >= 0.5
    assert kept(filter_logits(x, top_p=0.51)) == [True, True, False, False]
    assert kept(filter_logits(x, top_p=0.01)) == [True, False, False, False]  # top always kept
    assert kept(filter_logits(x, top_p=0.96)) == [True] * 4


# ---- EOS handling ----------------------------------------------------------------------------
def test_eos_stops_rows(tiny):
    _, _, config, params = tiny
    ids, mask = left_padded(LENGTHS, config.vocab_size)  # same shapes: no recompilation
    args = (config, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0))
    free = np.asarray(generate(*args, max_new_tokens=N_NEW, temperature=0.0,
                               eos_token_id=())["response"])
    eos = int(free[0, 3])
    stop0 = int(np.argmax(free[0] == eos))
    pad = 250
    out = generate(*args, max_new_tokens=N_NEW, temperature=0.0, eos_token_id=eos, pad_token_id=pad)
    resp, m = np.asarray(out["response"]), np.asarray(out["response_mask"])
    for r in range(len(free)):
        hits = np.flatnonzero(free[r] == eos)
        stop = hits[0] if len(hits) else N_NEW
        np.testing.assert_array_equal(resp[r, :stop + 1], free[r, :stop + 1])
        assert np.all(m[r, :stop + 1] == 1) and np.all(m[r, stop + 1:] == 0)
        assert np.all(resp[r, stop + 1:] == pad)
        assert np.all(np.asarray(out["logprobs"])[r, stop + 1:] == 0.0)
        assert bool(out["has_eos"][r]) == bool(len(hits))
    assert bool(out["has_eos"][0]) and stop0 <= 3
    # every row stops at its first token -> the loop exits early, the rest is padding
    out = generate(*args, max_new_tokens=N_NEW, temperature=0.0,
                   eos_token_id=tuple(int(x) for x in free[:, 0]), pad_token_id=pad)
    assert np.all(np.asarray(out["has_eos"]))
    np.testing.assert_array_equal(np.asarray(out["response"])[:, 0], free[:, 0])
    assert np.all(np.asarray(out["response"])[:, 1:] == pad)
    assert np.all(np.asarray(out["response_mask"]).sum(1) == 1)


def test_make_sampler_is_cached_and_validates(tiny):
    _, _, config, params = tiny
    ids, mask = left_padded(LENGTHS, config.vocab_size)
    a = make_sampler(config, max_new_tokens=N_NEW, temperature=0.0, eos_token_id=())
    b = make_sampler(config, max_new_tokens=N_NEW, temperature=0.0, eos_token_id=(5, 9),
                     pad_token_id=1)
    assert a.jitted is b.jitted  # EOS / pad ids are traced: one compilation for both
    a(params, ids, mask, jax.random.PRNGKey(0))
    size = a.jitted._cache_size()
    b(params, ids, mask, jax.random.PRNGKey(1))
    assert a.jitted._cache_size() == size
    for bad in (dict(max_new_tokens=0), dict(max_new_tokens=4, temperature=-1.0),
                dict(max_new_tokens=4, top_p=0.0), dict(max_new_tokens=4, top_k=-2),
                dict(max_new_tokens=4, decode="fast")):
        with pytest.raises(ValueError):
            make_sampler(config, **bad)


def test_platform_settings_resolved_from_the_mesh(tiny):
    """make_sampler resolves decode="auto" and the cache storage from the platform of its
    mesh's devices (the default backend without one): `platform_tuning.tuning_for_mesh`."""
    from easyrl.platform_tuning import (ACCELERATOR, CPU, platform_of, tuning_for,
                                        tuning_for_mesh)
    _, _, config, _ = tiny
    assert (CPU.decode, CPU.kv_cache_as_bits, CPU.wgrad_barrier) == ("unrolled", True, True)
    assert (ACCELERATOR.decode, ACCELERATOR.kv_cache_as_bits, ACCELERATOR.wgrad_barrier) == \
        ("scan", False, False)
    assert tuning_for("cpu") is CPU and tuning_for("gpu") is tuning_for("tpu") is ACCELERATOR
    mesh = parallel.create_mesh("dp:2,fsdp:2,tp:2")
    assert platform_of(mesh) == platform_of() == jax.devices()[0].platform
    for m in (None, mesh):
        tuning = tuning_for_mesh(m)
        if platform_of() == "cpu":
            assert tuning is CPU
        kw = dict(max_new_tokens=4, eos_token_id=(), mesh=m)
        assert make_sampler(config, **kw).jitted is \
            make_sampler(config, decode=tuning.decode, **kw).jitted


# ---- sharded ---------------------------------------------------------------------------------
def test_sharded_mesh_greedy_equals_single_device(tiny):
    folder, _, config, params = tiny
    assert jax.device_count() == 8
    mesh = parallel.create_mesh("dp:2,fsdp:2,tp:2")
    ids, mask = left_padded(LENGTHS, config.vocab_size, seed=6)
    kw = dict(max_new_tokens=N_NEW, temperature=0.0, eos_token_id=())
    want = generate(config, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0), **kw)
    sparams = parallel.shard_params(params, mesh)
    assert sparams["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec(None, "fsdp", "tp")
    gb = parallel.to_global_batch({"ids": ids, "mask": mask}, mesh)
    for m in (None, mesh):  # plain propagation, and with the cache pinned to the mesh
        for decode in (("unrolled", "scan") if m is not None else ("unrolled",)):
            got = generate(config, sparams, gb["ids"], gb["mask"], jax.random.PRNGKey(0), mesh=m,
                           decode=decode, **kw)
            np.testing.assert_array_equal(np.asarray(got["response"]), np.asarray(want["response"]))
            np.testing.assert_allclose(np.asarray(got["logprobs"]), np.asarray(want["logprobs"]),
                                       atol=1e-4)


# ---- CLI -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    from easyrl.data import synthetic
    from easyrl.data.tokenizer import load_tokenizer, save_tokenizer
    folder = str(tmp_path_factory.mktemp("gen_cli_model"))
    make_causal_lm(folder, seed=3, pad_token_id=3, bos_token_id=1, eos_token_id=2)
    tok = load_tokenizer(synthetic.synthetic_tokenizer_path())
    save_tokenizer(tok, folder)
    return folder, tok


def _run_cli(argv, capsys):
    from easyrl import cli
    cli.main(["generate", *argv])
    return capsys.readouterr()


def test_cli_end_to_end(cli_model, tmp_path, capsys):
    from easyrl.convert import hf_to_easyrl
    from easyrl.data.templates import tokenize_prompt
    folder, tok = cli_model
    rows = [{"prompt": "sort: f b d a"}, {"prompt": "sort: c a"},
            {"messages": [{"role": "user", "content": "sort: p o n m l"}]},
            {"prompt": "sort: b a"}, {"prompt": "sort: k j i h g f", "id": 5}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "out" / "gen.jsonl"
    n = 6
    common = ["--prompts", str(prompts), "--max_new_tokens", str(n), "--temperature", "0",
              "--batch_size", "2", "--template", "tulu"]
    _run_cli(["--model", folder, "--out", str(out), *common], capsys)
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(got) == len(rows)
    config, params = hf.load(folder)
    enc = [tokenize_prompt("tulu", r.get("prompt", r.get("messages")), tok) for r in rows]
    ids = np.full((len(rows), max(map(len, enc))), tok.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for i, e in enumerate(enc):  # one left-padded batch, padded differently from the CLI's
        ids[i, ids.shape[1] - len(e):], mask[i, ids.shape[1] - len(e):] = e, 1
    ref = generate(config, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0),
                   max_new_tokens=n, temperature=0.0, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
    for i, (row, g) in enumerate(zip(rows, got)):
        assert set(g) >= {"prompt", "response", "response_ids"}
        if "prompt" in row:
            assert g["prompt"] == row["prompt"]
        want = [int(t) for t, m in zip(ref["response"][i], ref["response_mask"][i]) if m]
        assert g["response_ids"] == want and 1 <= len(want) <= n  # the single-sample shape
        assert g["responses_ids"] == [want] and g["responses"] == [g["response"]]
        assert g["logprobs"] == g["responses_logprobs"][0] and len(g["logprobs"]) == len(want)
        assert g["response"] == tok.decode(want, skip_special_tokens=True)

    # the same model as an easyrl checkpoint (tokenizer copied to <dir>/tokenizer/) -> same output
    ckpt = str(tmp_path / "ckpt")
    hf_to_easyrl(folder, ckpt)
    out2 = tmp_path / "out2.jsonl"
    _run_cli(["--model", ckpt, "--out", str(out2), *common], capsys)
    assert [json.loads(x) for x in out2.read_text().splitlines()] == got


@pytest.mark.parametrize("content,expect", [
    ('{"prompt": "sort: b a"}\n{"text": "no prompt here"}\n', ":2: row has no 'prompt'"),
    ('{"prompt": "sort: b a"}\n{"prompt": "sort: c a"}\n{"prompt": \n', ":3: invalid JSON"),
])
def test_cli_bad_input(cli_model, tmp_path, capsys, content, expect):
    folder, _ = cli_model
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(content)
    with pytest.raises(SystemExit) as e:
        _run_cli(["--model", folder, "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
                  "--max_new_tokens", "2"], capsys)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(prompts) + expect in err, err


def test_cli_missing_prompt_file(cli_model, tmp_path, capsys):
    folder, _ = cli_model
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(SystemExit):
        _run_cli(["--model", folder, "--prompts", missing, "--out", str(tmp_path / "o.jsonl")], capsys)
    assert f"{missing}: prompt file not found" in capsys.readouterr().err


# ---- CLI: clear errors (issue 15) -----------------------------------------------------------
def test_cli_prompt_beyond_max_position_embeddings(cli_model, tmp_path, capsys):
    folder, tok = cli_model  # max_position_embeddings=256
    prompts = tmp_path / "long.jsonl"
    long = "sort: " + "a " * 100
    prompts.write_text(json.dumps({"prompt": "sort: b a"}) + "\n\n" + json.dumps({"prompt": long}) + "\n")
    n = len(tokenize_prompt_ids(long, tok))
    with pytest.raises(SystemExit) as e:
        _run_cli(["--model", folder, "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
                  "--max_new_tokens", "200"], capsys)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"easyrl generate: error: {prompts}:3: prompt of {n} tokens + "
                          f"--max_new_tokens 200 = {n + 200} exceeds the model's "
                          f"max_position_embeddings=256"), err
    assert not (tmp_path / "o.jsonl").exists()


def tokenize_prompt_ids(text, tok):
    from easyrl.data.templates import tokenize_prompt
    return tokenize_prompt("plain", text, tok)


def test_cli_out_is_a_folder(cli_model, tmp_path, capsys):
    folder, _ = cli_model
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "sort: b a"}\n')
    for out in (tmp_path, prompts / "o.jsonl"):
        with pytest.raises(SystemExit) as e:
            _run_cli(["--model", folder, "--prompts", str(prompts), "--out", str(out),
                      "--max_new_tokens", "2"], capsys)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"easyrl generate: error: --out {out}:") and err.count("\n") == 1, err


def test_cli_help_documents_greedy(capsys):
    from easyrl import cli
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--temperature 0 is greedy decoding" in out, out


# ---- top-k / top-p exactly as transformers' warpers (issue 15) ------------------------------
def _hf_filter(z64, top_k, top_p):
    """transformers' TopKLogitsWarper then TopPLogitsWarper (as `generate` applies them) on
    float64 logits: (kept mask, distance of the nearest cumulative probability to 1 - top_p)."""
    import torch
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    s = torch.tensor(z64)
    if top_k:
        s = TopKLogitsWarper(top_k)(None, s)
    margin = np.full(len(z64), np.inf)
    if top_p < 1.0:
        cum = torch.sort(s)[0].softmax(-1).cumsum(-1).numpy()
        margin = np.min(np.abs(cum - (1 - top_p)), axis=-1)
        s = TopPLogitsWarper(top_p)(None, s)
    return np.isfinite(s.numpy()), margin


def test_filter_logits_ties_match_transformers():
    """Logits with many ties: the kept sets equal transformers' warpers for several k and p
    (top-k keeps the ties of the k-th logit; top-p keeps only as many tied tokens as the cut-off
    needs). V = 16: torch sorts stably there, so the masks are equal token for token; V = 64:
    torch's sort is not stable, so which tied tokens HF keeps is up to torch, but the number
    kept and the kept values are equal. Rows whose cumulative probability lies within 1e-6 of
    1 - top_p (float32 vs float64 rounding decides them) are left out."""
    x = jnp.log(jnp.asarray([[0.4, 0.2, 0.2, 0.2]]))
    kept = np.asarray(filter_logits(x, top_p=0.5))[0] > np.finfo(np.float32).min
    assert kept.tolist() == [True, False, False, True]  # HF: two tokens, not all four
    assert kept.tolist() == _hf_filter(np.asarray(x, np.float64), 0, 0.5)[0][0].tolist()
    fl = jax.jit(filter_logits, static_argnums=(1, 2))
    rs = np.random.RandomState(0)
    for v in (16, 64):
        z = (rs.randint(0, 6, (256, v)) * 0.75).astype(np.float32)  # many ties
        z[::4] += rs.randn(64, v).astype(np.float32) * (rs.rand(64, v) < 0.5)  # some untied
        compared = 0
        for top_k in (0, 1, 3, 7, v, v + 3):
            for top_p in (0.07, 0.31, 0.47, 0.77, 0.93, 1.0):  # no tie-made 1/m cut-offs
                if top_k == 0 and top_p == 1.0:
                    continue
                want, margin = _hf_filter(z.astype(np.float64), top_k, top_p)
                got = np.asarray(fl(jnp.asarray(z), top_k, top_p)) > np.finfo(np.float32).min
                ok = margin > 1e-6
                assert ok.mean() > 0.95, (v, top_k, top_p)
                compared += ok.sum()
                if v <= 16:
                    np.testing.assert_array_equal(got[ok], want[ok], err_msg=f"k={top_k} p={top_p}")
                else:
                    np.testing.assert_array_equal(got.sum(-1)[ok], want.sum(-1)[ok])
                    for r in np.flatnonzero(ok):
                        np.testing.assert_array_equal(np.sort(z[r][got[r]]), np.sort(z[r][want[r]]))
        assert compared > 0.95 * 256 * 35


def test_shared_prefix_samples_equal_repeated_prompts(tiny):
    """num_samples=G prefills each prompt once and copies its cache: greedy output and log-probs
    equal those of the prompts repeated G times; sampled rows of one prompt differ."""
    _, _, config, params = tiny
    rng = np.random.default_rng(5)
    ids = rng.integers(3, config.vocab_size, (3, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :4] = 0
    kw = dict(max_new_tokens=N_NEW, eos_token_id=())
    a = generate(config, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(0),
                 temperature=0.0, num_samples=4, **kw)
    b = generate(config, params, jnp.asarray(np.repeat(ids, 4, 0)),
                 jnp.asarray(np.repeat(mask, 4, 0)), jax.random.PRNGKey(0), temperature=0.0, **kw)
    np.testing.assert_array_equal(np.asarray(a["tokens"]), np.asarray(b["tokens"]))
    np.testing.assert_allclose(np.asarray(a["logprobs"]), np.asarray(b["logprobs"]), atol=1e-5)
    s = generate(config, params, jnp.asarray(ids), jnp.asarray(mask), jax.random.PRNGKey(1),
                 temperature=1.0, num_samples=4, **kw)
    r = np.asarray(s["response"]).reshape(3, 4, -1)
    assert all(len({tuple(x) for x in r[i]}) > 1 for i in range(3))
    with pytest.raises(ValueError, match="num_samples"):
        make_sampler(config, max_new_tokens=N_NEW, num_samples=0)


def test_cli_num_samples_logprobs_and_summary(cli_model, tmp_path, capsys):
    """--num_samples G: G responses per line from one prefill, their ids and the sampler's
    log-probs (equal to a scoring pass over the same tokens), and a summary line on stderr."""
    from easyrl import rollout
    from easyrl.data.templates import tokenize_prompt
    folder, tok = cli_model
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "sort: f b d a"}\n{"prompt": "sort: c a"}\n')
    out = tmp_path / "g.jsonl"
    res = _run_cli(["--model", folder, "--out", str(out), "--prompts", str(prompts),
                    "--num_samples", "3", "--max_new_tokens", "5", "--temperature", "1",
                    "--top_p", "0.9", "--batch_size", "2", "--seed", "4"], capsys)
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [len(g["responses"]) for g in got] == [3, 3]
    total = sum(len(x) for g in got for x in g["responses_ids"])
    for g in got:  # the flat keys are the first sample's, whatever G is
        assert (g["response"], g["response_ids"], g["logprobs"]) == (
            g["responses"][0], g["responses_ids"][0], g["responses_logprobs"][0])
    last = res.err.strip().splitlines()[-1]
    assert last.startswith("easyrl generate: 2 requests, 6 samples, ") and f"{total} generated" in last
    config, params = hf.load(folder)
    for g in got:
        p_ids = tokenize_prompt("plain", g["prompt"], tok)
        for ids, lps in zip(g["responses_ids"], g["responses_logprobs"]):
            assert len(ids) == len(lps) >= 1
            tokens = jnp.asarray([p_ids + ids], jnp.int32)
            lp, _ = rollout.response_logprobs(config, params, tokens, jnp.ones_like(tokens),
                                              len(p_ids), 1.0, 0, 0.9)
            np.testing.assert_allclose(np.asarray(lp)[0], lps, atol=2e-5)


def test_cli_batch_slots_engine_matches_static_greedy(cli_model, tmp_path, capsys):
    """--batch_slots runs the continuous-batching engine: greedy output equal to the static
    batches' (more prompts than slots, G = 2)."""
    folder, _ = cli_model
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["sort: f b d a", "sort: c a", "sort: k j i h g f", "sort: b a",
                                "sort: m l"]))
    common = ["--model", folder, "--prompts", str(prompts), "--num_samples", "2",
              "--max_new_tokens", "6", "--temperature", "0"]
    _run_cli([*common, "--out", str(tmp_path / "static.jsonl"), "--batch_size", "2"], capsys)
    res = _run_cli([*common, "--out", str(tmp_path / "engine.jsonl"), "--batch_slots", "3"], capsys)
    a = [json.loads(x) for x in (tmp_path / "static.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "engine.jsonl").read_text().splitlines()]
    assert [x["responses_ids"] for x in a] == [x["responses_ids"] for x in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.concatenate(x["responses_logprobs"]),
                                   np.concatenate(y["responses_logprobs"]), atol=1e-4)
    assert "easyrl generate: 5 requests, 10 samples" in res.err


def test_cli_rejects_negative_batch_slots_before_loading(tmp_path, capsys):
    """--batch_slots -1 is refused with the other arguments, before the model is read (the
    model folder does not even exist here)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    from easyrl import cli
    with pytest.raises(SystemExit):
        cli.main(["generate", "--model", str(tmp_path / "missing"), "--prompts", str(prompts),
                  "--out", str(tmp_path / "o.jsonl"), "--batch_slots", "-1"])
    err = capsys.readouterr().err
    assert "--batch_slots must be >= 0" in err and "missing" not in err


def test_cli_greedy_matches_transformers_for_a_tokenizer_without_bos(cli_model, tmp_path,
                                                                     capsys):
    """A tokenizer whose config adds no BOS: `easyrl generate` encodes the prompt as
    `tokenizer(text)` does (no BOS), so greedy output equals transformers `generate` on those
    ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, tok = cli_model
    tok.save_pretrained(str(tmp_path / "bos"))
    AutoTokenizer.from_pretrained(str(tmp_path / "bos"), add_bos_token=False).save_pretrained(
        str(tmp_path / "nobos"))
    nobos = AutoTokenizer.from_pretrained(str(tmp_path / "nobos"))
    texts = ["sort: f b d a", "sort: c a"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = tmp_path / "g.jsonl"
    _run_cli(["--model", folder, "--tokenizer", str(tmp_path / "nobos"), "--out", str(out),
              "--prompts", str(prompts), "--max_new_tokens", "6", "--temperature", "0"], capsys)
    got = [json.loads(x) for x in out.read_text().splitlines()]
    tm = AutoModelForCausalLM.from_pretrained(folder).eval()
    for t, g in zip(texts, got):
        ids = nobos(t)["input_ids"]
        assert ids[0] != nobos.bos_token_id
        with torch.no_grad():
            want = tm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                               dtype=torch.long),
                               do_sample=False, max_new_tokens=6, eos_token_id=2,
                               pad_token_id=3)[0, len(ids):].tolist()
        if 2 in want:
            want = want[:want.index(2) + 1]
        assert g["response_ids"] == want, (t, g["response_ids"], want)
