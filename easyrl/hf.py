"""Hugging Face <-> easyrl: one name-mapping table and streaming weight io.

`load` reads config.json and safetensors (single or sharded with an index) or `.bin` files
(`torch.load(weights_only=True)`, when torch is installed) tensor by tensor from memory maps and
places each slice straight onto its device sharding. `save` writes config.json,
generation_config.json and safetensors shards, one tensor in host memory at a time.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from easyrl import model as M
from easyrl.model import qlora
from easyrl.model.config import LlamaConfig, check_hf_config
from easyrl.model.trainable import has_adapters
from easyrl.parallel import PARTITION_RULES, named_shardings, path_str, to_host
from easyrl.st_io import SafetensorsFile, write_streaming

log = logging.getLogger(__name__)

# (easyrl path regex, HF name template, transpose). `{i}` = layer index of a stacked parameter.
NAME_MAP = (
    (r"embed_tokens/embedding", "model.embed_tokens.weight", False),
    (r"layers/(self_attn|mlp)/(\w+_proj)/kernel", r"model.layers.{i}.\1.\2.weight", True),
    (r"layers/(self_attn|mlp)/(\w+_proj)/bias", r"model.layers.{i}.\1.\2.bias", False),
    (r"layers/(\w+_layernorm)/scale", r"model.layers.{i}.\1.weight", False),
    (r"layers/self_attn/(q_norm|k_norm)/scale", r"model.layers.{i}.self_attn.\1.weight", False),
    (r"norm/scale", "model.norm.weight", False),
    (r"lm_head/kernel", "lm_head.weight", True),
    (r"score/kernel", "score.weight", True),
)
# tensors some checkpoints carry that easyrl recomputes or does not use
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|lm_head\.weight|score\.weight)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "added_tokens.json")
# what an export (this module, easyrl.peft, the pipeline's model card) or transformers'
# save_pretrained puts in a model folder: only a folder holding nothing else is replaced
EXPORT_FILES = re.compile(
    r"(config\.json|generation_config\.json|README\.md|model(-\d+-of-\d+)?\.safetensors|"
    r"model\.safetensors\.index\.json|pytorch_model(-\d+-of-\d+)?\.bin|"
    r"pytorch_model\.bin\.index\.json|adapter_config\.json|adapter_model\.safetensors|"
    r"vocab\.(json|txt)|merges\.txt|spiece\.model|tokenizer[\w.-]*|[\w-]*\.jinja|"
    + "|".join(map(re.escape, TOKENIZER_FILES)) + ")")
KINDS = {"causal_lm": "ForCausalLM", "reward": "ForSequenceClassification",
         "value": "ForSequenceClassification"}
# transformers' class-name prefix of each model_type
CLASS_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def architecture(config: LlamaConfig, kind: str) -> str:
    """The transformers class an export of `kind` loads as, e.g. Qwen3ForSequenceClassification."""
    return CLASS_PREFIX[config.model_type] + KINDS[kind]


def hf_names(path: str, num_layers: int):
    """[(hf_name, layer index or None)], transpose flag for one easyrl parameter path."""
    for pattern, template, transpose in NAME_MAP:
        m = re.fullmatch(pattern, path)
        if m:
            name = m.expand(template)
            if path.startswith("layers/"):
                return [(name.replace("{i}", str(i)), i) for i in range(num_layers)], transpose
            return [(name, None)], transpose
    raise ValueError(f"no Hugging Face name for easyrl parameter {path!r}; add it to easyrl.hf.NAME_MAP")


# ---- reading ------------------------------------------------------------------------------
class _TensorIndex:
    """name -> file, over safetensors (single/sharded) or pytorch .bin files of one folder."""

    def __init__(self, folder: str):
        self.folder = folder
        self._files: Dict[str, object] = {}
        self.where: Dict[str, str] = {}
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            ip = os.path.join(folder, index_name)
            if os.path.exists(ip):
                try:
                    with open(ip) as f:
                        wm = json.load(f)["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{ip}: unreadable weight index ({e})") from e
                if not isinstance(wm, dict):
                    raise ValueError(f"{ip}: weight_map is a {type(wm).__name__}, expected an object")
                for name, fname in wm.items():
                    _check_inside(ip, name, fname)
                self.where = dict(wm)
                return
        for single in ("model.safetensors", "pytorch_model.bin"):
            fp = os.path.join(folder, single)
            if os.path.exists(fp):
                self.where = {n: single for n in self._open(single).names()}
                return
        raise FileNotFoundError(f"{folder}: no model weights found (expected model.safetensors, "
                                f"model.safetensors.index.json, or pytorch_model.bin)")

    def _open(self, fname: str):
        if fname not in self._files:
            fp = os.path.join(self.folder, fname)
            if not os.path.exists(fp):
                raise FileNotFoundError(f"{fp}: listed in the weight index but missing")
            self._files[fname] = SafetensorsFile(fp) if fname.endswith(".safetensors") else _BinFile(fp)
        return self._files[fname]

    def get(self, name: str) -> np.ndarray:
        return self._open(self.where[name]).get(name)

    def is_float(self, name: str) -> bool:
        return self._open(self.where[name]).is_float(name)

    def file_of(self, name: str) -> str:
        return os.path.join(self.folder, self.where[name])

    def shape(self, name: str):
        return tuple(self._open(self.where[name]).shape(name))


def _check_inside(index_path: str, name, fname) -> None:
    """A weight-index entry must name a file inside the model folder: a relative path that does
    not climb out (`..`). Symlinks are not resolved (the Hugging Face cache links into blobs/)."""
    if not isinstance(fname, str) or not fname:
        raise ValueError(f"{index_path}: weight_map[{name!r}] = {fname!r}: expected a file name")
    norm = os.path.normpath(fname)
    if os.path.isabs(fname) or norm == ".." or norm.startswith(".." + os.sep) or \
            (os.altsep and norm.startswith(".." + os.altsep)) or os.path.splitdrive(fname)[0]:
        raise ValueError(f"{index_path}: weight_map[{name!r}] = {fname!r} points outside the "
                         f"model folder; refusing to read it")


class _BinFile:
    """A pytorch_model*.bin read with torch.load(weights_only=True, mmap=True)."""

    def __init__(self, path: str):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"{path}: reading .bin checkpoints needs torch "
                              f"(pip install 'easyrl[torch]'), or convert it to safetensors") from e
        self._torch = torch
        self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)

    def names(self):
        return list(self._sd)

    def shape(self, name):
        return tuple(self._sd[name].shape)

    def is_float(self, name):
        return self._sd[name].is_floating_point()

    def get(self, name):
        t = self._sd[name]
        return (t.float() if t.dtype == self._torch.bfloat16 else t).numpy()


def read_config(folder: str) -> dict:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a directory (expected a Hugging Face model folder)")
    cp = os.path.join(folder, "config.json")
    if not os.path.exists(cp):
        raise FileNotFoundError(f"{cp}: missing config.json (not a Hugging Face model folder?)")
    try:
        with open(cp) as f:
            cfg = json.load(f)
    except ValueError as e:
        raise ValueError(f"{cp}: invalid JSON ({e})") from e
    check_hf_config(cfg, cp)
    return cfg


def load(path: str, kind: str = "causal_lm", dtype=None, *, mesh=None, rules=PARTITION_RULES,
         init_missing_head: bool = False, rng=None, **runtime) -> Tuple[LlamaConfig, dict]:
    """Load a local HF LLaMA folder -> (LlamaConfig, params).

    kind: causal_lm | reward | value (reward/value read `score.weight`; with
    `init_missing_head=True` a missing score head is drawn from N(0, 1/(D+1)), e.g. to start a
    reward model from an SFT checkpoint). dtype: parameter dtype (default float32). With `mesh`,
    every tensor is placed straight onto its partition-rule sharding.
    """
    hf_cfg = read_config(path)
    if dtype is not None:
        runtime["param_dtype"] = jnp.dtype(dtype).name
    config = LlamaConfig.from_hf(hf_cfg, source=os.path.join(path, "config.json"), **runtime)
    index = _TensorIndex(path)
    shapes = M.param_shapes(config, kind)
    if mesh is not None:
        shardings = named_shardings(shapes, mesh, rules)
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: dev, shapes)
    used = set()
    quantized, plain = None, {}
    if config.base_quant != "none":  # the plain kernels' shapes, to check the HF tensors
        quantized = _QuantizedReader(config, index)
        plain = {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(
            M.param_shapes(config.replace(base_quant="none"), kind))[0]}

    def load_leaf(kpath, sds, sharding):
        p = path_str(kpath)
        qm = qlora.QUANT_PART.search(p) if quantized is not None else None
        if qm:  # a part of a quantized kernel: read the HF tensor, quantize it, take the part
            return _load_quant_part(qm.group(1), qm.group(2), sds, sharding, plain, quantized,
                                    used)
        names, transpose = hf_names(p, config.num_hidden_layers)
        stacked = names[0][1] is not None
        missing = [n for n, _ in names if n not in index.where]
        if missing:
            if p == "score/kernel" and init_missing_head:
                key = jax.random.PRNGKey(0) if rng is None else rng
                std = 1.0 / np.sqrt(config.hidden_size + 1)
                val = (jax.random.normal(key, sds.shape, jnp.float32) * std).astype(sds.dtype)
                return jax.device_put(val, sharding)
            raise KeyError(f"{path}: missing tensor {missing[0]!r} (needed for easyrl parameter "
                           f"{p!r}, kind={kind!r})")
        want = tuple(sds.shape[1:] if stacked else sds.shape)
        want_hf = want[::-1] if transpose else want
        for n, _ in names:
            got = index.shape(n)
            if got != want_hf:
                raise ValueError(f"{index.file_of(n)}: tensor {n!r} has shape {got}, expected "
                                 f"{want_hf} from config.json")
            if not index.is_float(n):  # e.g. quantized int8 weights: a cast would be garbage
                raise ValueError(f"{index.file_of(n)}: tensor {n!r} is not floating point "
                                 f"(easyrl loads float weights only)")
            used.add(n)

        def read(n):
            a = index.get(n)
            return a.T if transpose else a

        def callback(idx):
            if stacked:
                layers = range(sds.shape[0])[idx[0]]
                out = np.stack([read(names[i][0])[idx[1:]] for i in layers])
            else:
                out = read(names[0][0])[idx]
            return np.asarray(out).astype(sds.dtype)

        return jax.make_array_from_callback(sds.shape, sharding, callback)

    params = jax.tree_util.tree_map_with_path(load_leaf, shapes, shardings)
    quantized = None  # frees the reader's cache of quantized tensors
    extra = [n for n in index.where if n not in used and not _IGNORED.search(n)]
    if extra:
        log.warning("%s: %d tensors not used by easyrl (e.g. %s)", path, len(extra), extra[:3])
    return config, params


class _QuantizedReader:
    """HF tensors quantized one at a time (`qlora.quantize_kernel`, on the host CPU), the most
    recent kept up to `budget` bytes of quantized arrays: a stacked kernel's parts (codes,
    absmax, ...) are separate leaves that each read every layer, so with every layer of one
    kernel in the cache each tensor is read and quantized once."""

    def __init__(self, config, index, budget: int = 2 * 2**30):
        self.config, self.index, self.budget = config, index, budget
        self.cache: Dict[str, dict] = {}

    def get(self, name: str) -> dict:
        if name not in self.cache:
            w = self.index.get(name).T.astype(np.float32)  # HF [out, in] -> [in, out]
            with jax.default_device(jax.devices("cpu")[0]):
                q = qlora.quantize_kernel(self.config, jnp.asarray(w), name)
                self.cache[name] = {k: np.asarray(v) for k, v in q.items()}
            while len(self.cache) > 1 and sum(
                    a.nbytes for q in self.cache.values() for a in q.values()) > self.budget:
                self.cache.pop(next(iter(self.cache)))
        return self.cache[name]


def _load_quant_part(kernel_path, part, sds, sharding, plain, reader, used):
    """One array of a quantized stacked kernel [L, ...], each layer's HF tensor quantized while
    streaming (no full-precision copy of the model in host or device memory)."""
    names, _ = hf_names(kernel_path, reader.config.num_hidden_layers)
    want_hf = tuple(plain[kernel_path].shape[1:])[::-1]
    for n, _ in names:
        if n not in reader.index.where:
            raise KeyError(f"{reader.index.folder}: missing tensor {n!r} (needed for easyrl "
                           f"parameter {kernel_path!r})")
        if reader.index.shape(n) != want_hf:
            raise ValueError(f"{reader.index.file_of(n)}: tensor {n!r} has shape "
                             f"{reader.index.shape(n)}, expected {want_hf} from config.json")
        used.add(n)

    def callback(idx):
        layers = range(sds.shape[0])[idx[0]]
        return np.stack([reader.get(names[i][0])[part][idx[1:]] for i in layers])

    return jax.make_array_from_callback(sds.shape, sharding, callback)


# ---- writing ------------------------------------------------------------------------------
# A tensor to write: (file name of the tensor, easyrl path in `flat`, layer index of a stacked
# parameter or None, transpose).
def tensor_spec(entry, flat: dict, dtype=None) -> Tuple[str, Tuple[int, ...], np.dtype]:
    """(name, shape, dtype) in the file of one entry over the flat ('/'-path) parameters `flat`;
    dtype None: the parameter's own."""
    n, p, i, tr = entry
    shape = flat[p].shape[1:] if i is not None else flat[p].shape
    return n, tuple(shape[::-1] if tr else shape), np.dtype(jnp.dtype(dtype or flat[p].dtype))


def write_safetensors(path: str, entries, flat: dict, dtype=None) -> int:
    """Stream `entries` (see `tensor_spec`) into the safetensors file `path`, one tensor in host
    memory at a time. Every process must call it (sharded arrays are gathered); process 0
    writes, the others stream to os.devnull. Returns the number of data bytes."""
    by_name = {e[0]: e for e in entries}

    def produce(name):
        _, p, i, tr = by_name[name]
        a = to_host(flat[p] if i is None else flat[p][i])
        return a.T if tr else a

    target = path if jax.process_index() == 0 else os.devnull
    return write_streaming(target, [tensor_spec(e, flat, dtype) for e in entries], produce,
                           metadata={"format": "pt"})


def hf_config_dict(config: LlamaConfig, kind: str, dtype, pad_token_id=None) -> dict:
    out = config.to_hf()
    out["architectures"] = [architecture(config, kind)]
    out["torch_dtype"] = out["dtype"] = jnp.dtype(dtype).name
    if pad_token_id is not None:
        out["pad_token_id"] = pad_token_id
    if kind != "causal_lm":
        out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        if out.get("pad_token_id") is None:  # sequence classification needs it for batches
            eos = config.eos_token_id
            out["pad_token_id"] = eos[0] if isinstance(eos, tuple) else eos
    return out


def save(path: str, config: LlamaConfig, params, kind: str = "causal_lm", tokenizer=None,
         dtype=None, max_shard_size: int = 5 * 2**30, extra_config: Optional[dict] = None,
         generation: Optional[dict] = None) -> None:
    """Write an HF folder that `AutoModelForCausalLM` / `AutoModelForSequenceClassification`
    `.from_pretrained` loads. `tokenizer`: an HF tokenizer object or a folder to copy files from;
    `generation`: extra generation_config.json entries. Streams one tensor at a time; shards
    above `max_shard_size` bytes with an index. Atomic (`export_folder`): the folder appears, or
    replaces an older export, only once complete; every process calls it, process 0 writes."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {tuple(KINDS)}")
    flat = {path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    if has_adapters(params):
        raise ValueError("params carry LoRA adapters: merge them first (`easyrl convert "
                         "easyrl-to-hf --merge-lora`, easyrl.model.lora.merge) or export the "
                         "adapter alone (`easyrl convert easyrl-to-peft`)")
    dtype = np.dtype(jnp.dtype(dtype or next(iter(flat.values())).dtype))
    want = {path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(M.param_shapes(config, kind))[0]}
    if set(flat) != want:
        raise ValueError(f"params do not match a {kind} model of this config: missing "
                         f"{sorted(want - set(flat))[:3]}, unexpected {sorted(set(flat) - want)[:3]}")
    entries = []  # (hf_name, easyrl path, layer, transpose) in HF order
    order = lambda p: (0 if p.startswith("embed") else 1 if p.startswith("layers") else 2, p)  # noqa: E731
    per_layer = []
    for p in sorted(flat, key=order):
        names, tr = hf_names(p, config.num_hidden_layers)
        (per_layer if names[0][1] is not None else entries).append((p, names, tr))
    ordered = [(n, p, None, tr) for p, names, tr in entries if p.startswith("embed") for n, _ in names]
    for i in range(config.num_hidden_layers):
        ordered += [(names[i][0], p, i, tr) for p, names, tr in per_layer]
    ordered += [(n, p, None, tr) for p, names, tr in entries if not p.startswith("embed") for n, _ in names]

    shards, cur, size = [], [], 0
    for e in ordered:
        nbytes = int(np.prod(tensor_spec(e, flat, dtype)[1])) * dtype.itemsize
        if cur and size + nbytes > max_shard_size:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += nbytes
    shards.append(cur)
    with export_folder(path) as tmp:
        _write_folder(tmp, config, flat, shards, kind, dtype, tokenizer, extra_config, generation)


def _write_folder(path, config, flat, shards, kind, dtype, tokenizer, extra_config,
                  generation) -> None:
    """The files of `save` into folder `path` (None on processes other than 0)."""
    total, weight_map = 0, {}
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(os.path.join(path, fname) if path else os.devnull, shard, flat, dtype)
        weight_map.update({e[0]: fname for e in shard})
    if path is None:
        return
    if len(shards) > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None and not isinstance(tokenizer, str) else None
    cfg = hf_config_dict(config, kind, dtype, pad_token_id=pad)
    cfg.update(extra_config or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": cfg.get("eos_token_id"),
           "pad_token_id": cfg.get("pad_token_id"), **(generation or {})}
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in gen.items() if v is not None}, f, indent=2)
    if tokenizer is not None:
        save_tokenizer_files(tokenizer, path)


@contextlib.contextmanager
def export_folder(path: str):
    """Write an export atomically: yields a fresh temporary folder beside `path` (None on
    processes other than 0, which write nothing) and, once the block completes, renames it to
    `path`, replacing an older export there only then. An exception (or a kill) leaves `path` as
    it was; the temporary folder is removed on an exception (a kill leaves a hidden
    `.<name>.tmp-*` beside it). `path`, when it exists, must be a folder holding only files an
    export writes (EXPORT_FILES): a folder with anything else is refused before anything is
    written, so an export never deletes unrelated files. With several processes a refusal is
    raised after the block (process 0 still takes part in its gathers, writing nothing)."""
    if jax.process_index() != 0:
        yield None
        return
    try:
        tmp = _temp_beside(path)
    except Exception:
        if jax.process_count() > 1:
            yield None
        raise
    try:
        yield tmp
        target = os.path.abspath(path)
        if os.path.lexists(target):
            old = tmp + ".old"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _temp_beside(path: str) -> str:
    """A new empty folder beside `path`, once `path` is checked to be replaceable."""
    target = os.path.abspath(path)
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise FileExistsError(f"{path}: exists and is not a folder; refusing to export there")
        foreign = sorted(n for n in os.listdir(target) if not EXPORT_FILES.fullmatch(n))
        if foreign:
            raise ValueError(f"{path}: holds files an export does not write ({foreign[:3]}"
                             f"{' ...' if len(foreign) > 3 else ''}); export into a new or empty "
                             f"folder (an export replaces the whole folder)")
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    return tmp


def save_tokenizer_files(tokenizer, path: str) -> None:
    """Tokenizer object -> save_pretrained; a folder -> copy its tokenizer files."""
    if isinstance(tokenizer, (str, os.PathLike)):
        src = str(tokenizer)
        if os.path.isfile(src):  # a sentencepiece .model
            shutil.copy(src, os.path.join(path, "tokenizer.model"))
            return
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), os.path.join(path, name))
    else:
        tokenizer.save_pretrained(path)
