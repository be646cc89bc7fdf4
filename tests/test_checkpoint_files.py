"""Checkpoint files, nothing lost and nothing silent (issue 15): malformed safetensors are one
clear SafetensorsError, a weight index cannot point outside its folder, config.json keys are
type-checked, and exports replace an older export atomically."""
import json
import os
import struct

import jax
import numpy as np
import pytest

from easyrl import hf, peft
from easyrl import model as M
from easyrl.st_io import SafetensorsError, SafetensorsFile, write_streaming

CONFIG = M.get_preset("tiny").replace(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_attention_heads=2, num_key_value_heads=2)


def _params(config=CONFIG, seed=0, kind="causal_lm"):
    """Random numpy parameters (eager init is slow on 2 cores)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        M.param_shapes(config, kind))


def _raw(path, header, data=b"", n=None):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob) if n is None else n) + blob + data)
    return str(path)


def _t(dtype, shape, start, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


# ---- safetensors reader -----------------------------------------------------------------------
BAD_FILES = {  # name: (header, data, n, message)
    "huge_header_length": ({}, b"", 2**62, r"header length 4611686018427387904 exceeds"),
    "header_past_eof": ({}, b"", 1000, r"header length 1000 runs past the end of the file"),
    "json_list": (b"[1, 2]", b"", None, r"header is a JSON list, expected an object"),
    "not_json": (b"{nope", b"", None, r"not valid UTF-8 JSON"),
    "metadata_not_str": ({"__metadata__": {"format": 1}}, b"", None, r"__metadata__ must map str to str"),
    "f8_dtype": ({"w": _t("F8_E4M3", [4], 0, 4)}, bytes(4), None,
                 r"tensor 'w': dtype 'F8_E4M3' is not read by easyrl"),
    "unknown_dtype": ({"w": _t("XX", [4], 0, 4)}, bytes(4), None, r"'XX' is not a safetensors dtype"),
    "negative_offset": ({"w": _t("F32", [4], -16, 0)}, bytes(16), None, r"tensor 'w': data_offsets \[-16, 0\]"),
    "float_shape": ({"w": _t("F32", [4.0], 0, 16)}, bytes(16), None, r"tensor 'w': shape \[4.0\]"),
    # lm_head reading the embedding's bytes
    "overlap": ({"embed": _t("F32", [4], 0, 16), "lm_head": _t("F32", [4], 0, 16)}, bytes(16), None,
                r"tensor 'lm_head': data_offsets \[0, 16\] overlaps tensor 'embed'"),
    # an I32 range reinterpreted by a wrong size: 16 bytes for 2 floats
    "size_mismatch": ({"w": _t("F32", [2], 0, 16)}, bytes(16), None,
                      r"tensor 'w': data_offsets \[0, 16\] span 16 bytes, F32 x \[2\] needs 8"),
    "past_end": ({"w": _t("F32", [8], 0, 32)}, bytes(16), None, r"tensor 'w'.*past the end of the data"),
    "gap": ({"w": _t("F32", [2], 8, 16)}, bytes(16), None, r"leaves a gap after byte 0"),
    "trailing": ({"w": _t("F32", [2], 0, 8)}, bytes(16), None, r"8 bytes after the last tensor"),
    "repeated_name": (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                      b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', bytes(8), None,
                      r"name 'w' appears twice"),
    "entry_not_object": ({"w": 5}, b"", None, r"tensor 'w': entry must be an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_safetensors_is_one_clear_error(tmp_path, case):
    header, data, n, message = BAD_FILES[case]
    path = _raw(tmp_path / f"{case}.safetensors", header, data, n)
    with pytest.raises(SafetensorsError, match=message) as e:
        f = SafetensorsFile(path)
        [f.get(name) for name in f.names()]
    assert str(e.value).startswith(path + ":") and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_well_formed_edge_cases_read(tmp_path):
    p = _raw(tmp_path / "ok.safetensors",
             {"__metadata__": {"format": "pt"}, "s": _t("F32", [], 0, 4), "z": _t("I8", [0, 3], 4, 4),
              "b": _t("BF16", [2], 4, 8)}, np.float32(1.5).tobytes() + bytes(4))
    f = SafetensorsFile(p)
    assert f.get("s") == 1.5 and f.get("z").shape == (0, 3) and f.get("b").shape == (2,)
    assert f.metadata == {"format": "pt"}
    # the writer's files pass the reader's checks and round-trip
    w = str(tmp_path / "w.safetensors")
    a = np.arange(6, dtype=np.float16).reshape(2, 3)
    write_streaming(w, [("a", (2, 3), np.float16), ("i", (5,), np.int64)],
                    lambda n: a if n == "a" else np.arange(5), metadata={"format": "pt"})
    f = SafetensorsFile(w)
    np.testing.assert_array_equal(f.get("a"), a)
    np.testing.assert_array_equal(f.get("i"), np.arange(5))


def test_integer_weight_refused_by_load(tmp_path):
    hf.save(str(tmp_path), CONFIG, _params())
    from safetensors.numpy import load_file, save_file
    t = load_file(str(tmp_path / "model.safetensors"))
    t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.norm\.weight' is not floating"):
        hf.load(str(tmp_path))


# ---- weight index ---------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["../other/model-00001-of-00002.safetensors", "ABS"])
def test_index_entry_outside_the_folder_refused(tmp_path, entry):
    other, model = tmp_path / "other", tmp_path / "model"
    hf.save(str(other), CONFIG, _params(seed=1), max_shard_size=20_000)
    hf.save(str(model), CONFIG, _params(), max_shard_size=20_000)
    ip = model / "model.safetensors.index.json"
    index = json.loads(ip.read_text())
    name = next(iter(index["weight_map"]))
    if entry == "ABS":
        entry = str(other / "model-00001-of-00002.safetensors")
    index["weight_map"][name] = entry
    ip.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"index\.json: weight_map\['{name}'\] = .*points outside"):
        hf.load(str(model))


# ---- config.json -------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,message", [
    ("hidden_act", "gelu", r"key 'hidden_act' = 'gelu': easyrl's MLP computes silu"),
    ("max_position_embeddings", None, r"missing key 'max_position_embeddings'"),
    ("hidden_size", "64", r"key 'hidden_size' = '64': expected a positive int"),
    ("num_hidden_layers", 0, r"key 'num_hidden_layers' = 0: expected a positive int"),
    ("rms_norm_eps", "1e-6", r"key 'rms_norm_eps' = '1e-6': expected a positive number"),
    ("rope_theta", "1e4", r"key 'rope_theta' = '1e4': expected a positive number"),
    ("tie_word_embeddings", "false", r"key 'tie_word_embeddings' = 'false': expected true or false"),
    ("eos_token_id", "2", r"key 'eos_token_id' = '2'"),
    ("rope_scaling", {"rope_type": "linear"}, r"key 'rope_scaling' = .*factor: expected a positive"),
])
def test_config_json_key_checked(tmp_path, key, value, message):
    hf.save(str(tmp_path), CONFIG, _params())
    cp = tmp_path / "config.json"
    cfg = json.loads(cp.read_text())
    if value is None:
        del cfg[key]
    else:
        cfg[key] = value
    cp.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message) as e:
        hf.load(str(tmp_path))
    assert str(e.value).startswith(f"{cp}: ") and "\n" not in str(e.value)


# ---- atomic exports -----------------------------------------------------------------------------
def _kernel(params):
    return np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"])


def test_export_over_older_sharded_export_leaves_nothing_stale(tmp_path):
    out = tmp_path / "export"
    hf.save(str(out), CONFIG, _params(seed=1), max_shard_size=20_000)
    assert (out / "model.safetensors.index.json").exists()
    new = _params(seed=2)
    hf.save(str(out), CONFIG, new, generation={"max_new_tokens": 7})
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7
    _, got = hf.load(str(out))
    np.testing.assert_array_equal(_kernel(got), _kernel(new))
    assert os.listdir(tmp_path) == ["export"]  # no temporary folder left beside it


def test_export_killed_midway_leaves_previous_export(tmp_path, monkeypatch):
    out = tmp_path / "export"
    old = _params(seed=1)
    hf.save(str(out), CONFIG, old, max_shard_size=20_000)
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    calls = []

    def dying(x):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt("killed")
        return np.asarray(x)
    monkeypatch.setattr(hf, "to_host", dying)
    with pytest.raises(KeyboardInterrupt):
        hf.save(str(out), CONFIG, _params(seed=2))
    monkeypatch.undo()
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["export"]
    _, got = hf.load(str(out))
    np.testing.assert_array_equal(_kernel(got), _kernel(old))


@pytest.mark.parametrize("processes", [1, 2])
def test_export_refuses_a_folder_with_other_files(tmp_path, monkeypatch, processes):
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    out.mkdir(), cwd.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    # with several processes, process 0 still streams (to nowhere) so the others' gathers finish
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    with pytest.raises(ValueError, match=r"holds files an export does not write \(\['notes.txt'\]\)"):
        hf.save(str(out), CONFIG, _params())
    assert os.listdir(out) == ["notes.txt"] and os.listdir(cwd) == []
    assert sorted(os.listdir(tmp_path)) == ["cwd", "out"]


def test_peft_export_is_atomic(tmp_path, monkeypatch):
    cfg = CONFIG.replace(lora_rank=2, lora_targets="q|v")
    out = tmp_path / "adapter"
    peft.save_peft(str(out), cfg, _params(cfg, seed=1))
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    monkeypatch.setattr(hf, "to_host", lambda x: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(RuntimeError):
        peft.save_peft(str(out), cfg, _params(cfg, seed=2))
    monkeypatch.undo()
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["adapter"]
    peft.save_peft(str(out), cfg, _params(cfg, seed=2))
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (out / "adapter_model.safetensors").read_bytes() != before["adapter_model.safetensors"]
