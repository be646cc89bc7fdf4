"""Mesh parsing, the partition table, sharded init/loading, and sharded == unsharded forward."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from easyrl import hf, parallel
from easyrl import model as M

from hf_models import batch, make_causal_lm


def test_parse_mesh_spec():
    assert parallel.parse_mesh_spec("dp:1,fsdp:-1,tp:1", 8) == {"dp": 1, "fsdp": 8, "tp": 1}
    assert parallel.parse_mesh_spec("dp:2,fsdp:2,tp:2", 8) == {"dp": 2, "fsdp": 2, "tp": 2}
    assert parallel.parse_mesh_spec("tp:2", 8) == {"dp": 1, "fsdp": 1, "tp": 2}
    for bad in ("dp:-1,fsdp:-1", "xx:2", "dp:3,fsdp:-1", "dp:16"):
        with pytest.raises(ValueError, match="mesh spec"):
            parallel.parse_mesh_spec(bad, 8)


def test_rules_cover_params_and_optimizer_state():
    config = M.get_preset("tiny").replace(attention_bias=True, mlp_bias=True)
    for kind in ("causal_lm", "reward"):
        shapes = M.param_shapes(config, kind)
        specs = parallel.partition_specs(shapes)
        opt = jax.eval_shape(optax.adamw(1e-3).init, shapes)
        ospecs = parallel.partition_specs(opt)
        mu = ospecs[0].mu
        assert jax.tree.leaves(mu, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) == \
            jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def test_unmatched_parameter_is_an_error():
    with pytest.raises(ValueError, match="no partition rule matches parameter 'foo/bar'"):
        parallel.partition_specs({"foo": {"bar": np.zeros((2, 2))}})


def test_sharded_forward_equals_single_device(tmp_path):
    assert jax.device_count() == 8
    make_causal_lm(tmp_path, num_key_value_heads=2, vocab_size=250)
    config, params = hf.load(str(tmp_path))
    mesh = parallel.create_mesh("dp:2,fsdp:2,tp:2")
    _, sparams = hf.load(str(tmp_path), mesh=mesh)
    q = sparams["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tp")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 32, 32)
    ids, mask = batch(config.vocab_size, b=4, padding="left")
    want = np.asarray(M.forward(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    gb = parallel.to_global_batch({"ids": ids.astype(np.int32), "mask": mask.astype(np.int32)}, mesh)
    fwd = jax.jit(lambda p, i, m: M.forward(config, p, i, m))
    got = np.asarray(fwd(sparams, gb["ids"], gb["mask"]))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_sharded_init_is_born_sharded():
    config = M.get_preset("tiny")
    mesh = parallel.create_mesh("dp:1,fsdp:4,tp:2")
    params = parallel.sharded_init(lambda r: M.init_params(config, r), mesh, jax.random.PRNGKey(0))
    emb = params["embed_tokens"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tp", "fsdp")
    ref = M.init_params(config, jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(emb), np.asarray(ref["embed_tokens"]["embedding"]), atol=1e-7)
