"""LlamaConfig: the architecture (mirrors Hugging Face `LlamaConfig`) plus easyrl's runtime options.

The architecture fields round-trip through `from_hf` / `to_hf`; the runtime fields (dtypes, remat
policy, attention implementation) never reach a Hugging Face config.json.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple, Union

from easyrl.model.lora import check_targets

# one model serves these Hugging Face architectures: they differ from LLaMA in a few switches
# (`ARCH_SWITCHES`): mistral a sliding window, qwen2 q/k/v biases (and an optional window),
# qwen3 an RMSNorm over each head's queries and keys and an explicit head_dim
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "minimal")
ATTENTION_IMPLS = ("xla", "cudnn")

_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention", "lora_rank", "lora_alpha",
                   "lora_dropout", "lora_targets", "base_quant", "quant_block", "double_quant")
BASE_QUANTS = ("none", "int8", "nf4")
LORA_TARGETS_ALL = "q|k|v|o|gate|up|down"

# config.json keys easyrl reads, by type: required, optional (null = default), per rope type
_REQUIRED_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "max_position_embeddings")
_OPTIONAL_INTS = ("num_key_value_heads", "head_dim")
_POSITIVE_FLOATS = ("rope_theta", "rms_norm_eps")
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
SUPPORTED_ACTS = ("silu", "swish")  # the same function in transformers
_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings"),
              "yarn": ("factor",)}
# the config.json keys of each architecture that change the math, beyond the LLaMA ones; the
# keys transformers' own class does not read (e.g. attention_bias on mistral / qwen2, whose
# projections have fixed biases) are not read here either
_ARCH_KEYS = {"llama": ("attention_bias", "mlp_bias"),
              "mistral": ("sliding_window",),
              "qwen2": ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
              "qwen3": ("attention_bias", "use_sliding_window", "sliding_window",
                        "max_window_layers", "layer_types")}
_HEAD_DIM_DEFAULT = {"qwen3": 128}  # Qwen3Config.head_dim's default (others: hidden / heads)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_hf_config(hf, source: str = "config") -> None:
    """Raise a one-line ValueError naming `source` (the config.json path) and the key, when a key
    easyrl depends on is missing, of the wrong type or a value easyrl would not honour."""
    def bad(key, want, missing=False):
        if missing:
            raise ValueError(f"{source}: missing key {key!r} ({want})")
        raise ValueError(f"{source}: key {key!r} = {hf[key]!r}: {want}")
    if not isinstance(hf, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: unsupported architecture: model_type={model_type!r} "
                         f"(easyrl supports {SUPPORTED_MODEL_TYPES})")
    for k in _REQUIRED_INTS + _OPTIONAL_INTS:
        if hf.get(k) is None:
            if k in _REQUIRED_INTS:
                bad(k, "easyrl needs it: a positive int", missing=True)
        elif not (_int(hf[k]) and hf[k] > 0):
            bad(k, "expected a positive int")
    for k in _POSITIVE_FLOATS:
        if hf.get(k) is not None and not (_num(hf[k]) and hf[k] > 0):
            bad(k, "expected a positive number")
    if hf.get("initializer_range") is not None and not (_num(hf["initializer_range"])
                                                        and hf["initializer_range"] >= 0):
        bad("initializer_range", "expected a non-negative number")
    for k in _BOOLS:
        if hf.get(k) is not None and not isinstance(hf[k], bool):
            bad(k, "expected true or false")
    for k in ("sliding_window", "max_window_layers"):
        if hf.get(k) is not None and not (_int(hf[k]) and hf[k] >= (k == "sliding_window")):
            bad(k, "expected a positive int or null" if k == "sliding_window"
                else "expected a non-negative int or null")
    if hf.get("use_sliding_window") is not None and not isinstance(hf["use_sliding_window"], bool):
        bad("use_sliding_window", "expected true or false")
    lt = hf.get("layer_types")
    if lt is not None:
        if not (isinstance(lt, list) and all(t in ("full_attention", "sliding_attention")
                                             for t in lt)):
            bad("layer_types", "expected a list of 'full_attention' / 'sliding_attention'")
        if model_type in ("qwen2", "qwen3") and len(set(lt)) > 1:
            bad("layer_types", "easyrl's layers share one attention kind: all full_attention or "
                "all sliding_attention (mixed full / sliding layers are not supported)")
    for k in ("bos_token_id", "pad_token_id"):
        if hf.get(k) is not None and not _int(hf[k]):
            bad(k, "expected an int or null")
    eos = hf.get("eos_token_id")
    if eos is not None and not (_int(eos) or (isinstance(eos, list) and eos
                                              and all(_int(t) for t in eos))):
        bad("eos_token_id", "expected an int, a list of ints or null")
    if hf.get("hidden_act") is not None and hf["hidden_act"] not in SUPPORTED_ACTS:
        bad("hidden_act", f"easyrl's MLP computes silu (supported: {SUPPORTED_ACTS})")
    for k in ("rope_scaling", "rope_parameters"):
        rs = hf.get(k)
        if rs is None:
            continue
        if not isinstance(rs, dict):
            bad(k, "expected an object or null")
        if k == "rope_parameters" and rs.get("rope_theta") is not None and \
                not (_num(rs["rope_theta"]) and rs["rope_theta"] > 0):
            bad(k, "rope_theta: expected a positive number")
        rs = {a: v for a, v in rs.items() if v is not None}
        for rk in _ROPE_KEYS.get(rs.get("rope_type", rs.get("type")), ()):
            if not (_num(rs.get(rk)) and rs[rk] > 0):
                bad(k, f"{rk}: expected a positive number")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    # stored as a sorted tuple of (key, value) pairs so the config stays hashable (a jit static arg)
    rope_scaling: Optional[Tuple[Tuple[str, Any], ...]] = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # bias on q, k, v and o (llama, qwen3)
    mlp_bias: bool = False
    # architecture switches (`model_type` names the Hugging Face class written on export)
    model_type: str = "llama"
    qkv_bias: bool = False  # bias on q, k and v only (qwen2)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before rotary (qwen3)
    # keys at most sliding_window - 1 positions before the query (transformers'
    # `kv_idx > q_idx - sliding_window`), on the layers i >= max_window_layers (Qwen's rule;
    # easyrl's layers share one kind, so max_window_layers is 0 or >= the layer count)
    sliding_window: Optional[int] = None
    max_window_layers: int = 0
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[Union[int, Tuple[int, ...]]] = 2
    pad_token_id: Optional[int] = None
    # runtime options (not part of the HF config)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots | dots_no_batch | minimal
    attention: str = "xla"  # xla | cudnn (jax.nn.dot_product_attention)
    # LoRA adapters (easyrl.model.lora): rank 0 = none; targets: regex over q k v o gate up down
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = LORA_TARGETS_ALL
    # the frozen dense kernels (q k v o gate up down) stored quantized (easyrl.model.qlora):
    # none | int8 (per output channel) | nf4 (blocks of quant_block along the input axis,
    # double_quant: the block scales quantized too, QLoRA)
    base_quant: str = "none"
    quant_block: int = 64
    double_quant: bool = False

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, dict):
            set_("rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: expected one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={self.attention!r}: expected one of {ATTENTION_IMPLS}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank}: must be >= 0 (0 = no adapters)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout}: must be in [0, 1)")
        if self.lora_rank:
            check_targets(self.lora_targets, "lora_targets")
        if self.base_quant not in BASE_QUANTS:
            raise ValueError(f"base_quant={self.base_quant!r}: expected one of {BASE_QUANTS}")
        if self.base_quant == "nf4" and (self.quant_block < 2 or self.quant_block % 2):
            # any kernel size works: a last partial block is padded (quant.padded_in)
            raise ValueError(f"config model.lora.quant_block: {self.quant_block} must be an even "
                             f"int >= 2 (two 4-bit codes per byte)")
        rs = self.rope_scaling_dict
        if rs is not None:
            kind = rs.get("rope_type", rs.get("type", "default"))
            if kind not in SUPPORTED_ROPE_TYPES:
                raise ValueError(f"rope_scaling type {kind!r} is not supported "
                                 f"(supported: {SUPPORTED_ROPE_TYPES})")
            if rs.get("partial_rotary_factor", 1.0) != 1.0:
                raise ValueError(f"rope_scaling partial_rotary_factor="
                                 f"{rs['partial_rotary_factor']}: easyrl rotates the whole head")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}: expected one of "
                             f"{SUPPORTED_MODEL_TYPES}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window}: must be >= 1 (or None)")
        if self.sliding_window is not None and \
                0 < self.max_window_layers < self.num_hidden_layers:
            raise ValueError(
                f"max_window_layers={self.max_window_layers} with sliding_window="
                f"{self.sliding_window}: layers {self.max_window_layers}.."
                f"{self.num_hidden_layers - 1} would use the window and the others not; "
                f"easyrl's layers share one attention kind (mixed layers are not supported)")

    # ---- derived -------------------------------------------------------------------------
    @property
    def rope_scaling_dict(self) -> Optional[dict]:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def window(self) -> Optional[int]:
        """The sliding window every layer applies, or None (full causal attention)."""
        if self.sliding_window is None or self.max_window_layers >= self.num_hidden_layers:
            return None
        return self.sliding_window

    @property
    def num_params(self) -> int:
        """Parameter count of the causal LM (embeddings and head included)."""
        d, f, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        h, k, dh = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attn = d * h * dh * 2 + d * k * dh * 2
        if self.attention_bias or self.qkv_bias:
            attn += h * dh + 2 * k * dh + (d if self.attention_bias else 0)
        if self.qk_norm:
            attn += 2 * dh
        mlp = 3 * d * f + (2 * f + d if self.mlp_bias else 0)
        layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + l * layer + d + head

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)

    # ---- Hugging Face --------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict, *, source: str = "config", **runtime) -> "LlamaConfig":
        """Build from a Hugging Face config dict (config.json, checked by `check_hf_config`;
        `source` names it in errors); `runtime` sets dtype, remat, ..."""
        check_hf_config(hf, source)
        rope_theta = hf.get("rope_theta")
        rope_scaling = hf.get("rope_scaling")
        params = hf.get("rope_parameters")  # transformers >= 5 layout
        if isinstance(params, dict):
            rope_theta = params.get("rope_theta", rope_theta)
            if params.get("rope_type", "default") != "default":
                rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        if rope_scaling is not None:
            rope_scaling = {k: v for k, v in rope_scaling.items() if v is not None}
            if rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
                rope_scaling = None
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) \
                in ("yarn", "llama3"):  # transformers' standardize_rope_params default
            rope_scaling.setdefault("original_max_position_embeddings",
                                    hf["max_position_embeddings"])
        mt = hf["model_type"]
        arch = set(_ARCH_KEYS["llama"]) | {k for ks in _ARCH_KEYS.values() for k in ks}
        names = {f.name for f in dataclasses.fields(cls)} - set(_RUNTIME_FIELDS) - arch - {
            "model_type", "qkv_bias", "qk_norm"}
        kw = {k: hf[k] for k in names if k in hf and hf[k] is not None}
        kw["rope_theta"] = float(rope_theta if rope_theta is not None else 10000.0)
        kw["rope_scaling"] = rope_scaling
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            kw[k] = hf.get(k)
        if hf.get("head_dim") is None and mt in _HEAD_DIM_DEFAULT:
            kw["head_dim"] = _HEAD_DIM_DEFAULT[mt]
        kw.update(model_type=mt, qkv_bias=mt == "qwen2", qk_norm=mt == "qwen3")
        for k in ("attention_bias", "mlp_bias"):
            if k in _ARCH_KEYS[mt] and hf.get(k) is not None:
                kw[k] = hf[k]
        if mt == "mistral":
            kw["sliding_window"] = hf.get("sliding_window")
        elif mt in ("qwen2", "qwen3"):
            kw["sliding_window"] = hf.get("sliding_window") if hf.get("use_sliding_window") \
                else None
            mwl = hf.get("max_window_layers")
            lt = hf.get("layer_types")
            if lt is not None and kw["sliding_window"] is not None:  # transformers >= 5
                mwl = 0 if lt[0] == "sliding_attention" else hf["num_hidden_layers"]
            kw["max_window_layers"] = 28 if mwl is None else mwl  # Qwen2Config's default
        return cls(**kw, **runtime)

    def to_hf(self) -> dict:
        """The config.json of this architecture (`model_type`), in transformers' key names."""
        mt = self.model_type
        switches = ("qkv_bias", "qk_norm", "sliding_window", "max_window_layers",
                    "attention_bias", "mlp_bias")
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in _RUNTIME_FIELDS and f.name not in switches}
        out["rope_scaling"] = self.rope_scaling_dict
        if isinstance(self.eos_token_id, tuple):
            out["eos_token_id"] = list(self.eos_token_id)
        out.update(hidden_act="silu", attention_dropout=0.0, use_cache=True)
        out.update({k: getattr(self, k) for k in _ARCH_KEYS[mt]
                    if k in ("attention_bias", "mlp_bias", "sliding_window")})
        if mt == "llama":
            out["pretraining_tp"] = 1
        if mt == "qwen2" and self.head_dim == self.hidden_size // self.num_attention_heads:
            del out["head_dim"]  # Qwen2Config has no head_dim key (transformers derives it)
        if mt in ("qwen2", "qwen3"):
            on = self.window is not None
            out.update(use_sliding_window=on, max_window_layers=self.max_window_layers,
                       layer_types=[("sliding_attention" if on else "full_attention")] *
                       self.num_hidden_layers)
        return out

    def to_json_dict(self) -> dict:
        """Everything, runtime options included (easyrl checkpoints)."""
        out = self.to_hf()
        out.update({k: getattr(self, k) for k in _RUNTIME_FIELDS})
        return out

    @classmethod
    def from_json_dict(cls, d: dict) -> "LlamaConfig":
        runtime = {k: d[k] for k in _RUNTIME_FIELDS if k in d}
        return cls.from_hf(d, **runtime)


PRESETS = {
    # test / CPU sizes
    "tiny": LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        rms_norm_eps=1e-6),
    "small": LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rms_norm_eps=1e-6),
    "bench_100m": LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                              num_hidden_layers=12, num_attention_heads=12,
                              max_position_embeddings=2048, rms_norm_eps=1e-5),
    "bench_1b": LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                            num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                            max_position_embeddings=2048, rms_norm_eps=1e-5),
    # published Hugging Face configs (meta-llama/*)
    "llama2_7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                             max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama2_13b": LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                              num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                              max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama2_70b": LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                              num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                              max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama3_8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                             max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                             bos_token_id=128000, eos_token_id=128001),
    "llama3_70b": LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                              num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                              max_position_embeddings=8192, rms_norm_eps=1e-5,
                              rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001),
    "llama31_8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                              num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                              max_position_embeddings=131072, rms_norm_eps=1e-5,
                              rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
                              rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192}),
    # mistralai/Mistral-7B-v0.1 (the base of Zephyr-7B): a 4096-token sliding window
    "mistral_7b": LlamaConfig(model_type="mistral", vocab_size=32000, hidden_size=4096,
                              intermediate_size=14336, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=8,
                              max_position_embeddings=32768, rms_norm_eps=1e-5,
                              sliding_window=4096, bos_token_id=1, eos_token_id=2),
    # Qwen/Qwen2.5-7B-Instruct and Qwen/Qwen2.5-1.5B-Instruct (q/k/v biases; the small sizes
    # tie the embeddings); window off (use_sliding_window false, max_window_layers 28)
    "qwen25_7b": LlamaConfig(model_type="qwen2", qkv_bias=True, vocab_size=152064,
                             hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                             num_attention_heads=28, num_key_value_heads=4,
                             max_position_embeddings=32768, rms_norm_eps=1e-6,
                             rope_theta=1000000.0, max_window_layers=28,
                             bos_token_id=151643, eos_token_id=151645),
    "qwen25_1_5b": LlamaConfig(model_type="qwen2", qkv_bias=True, vocab_size=151936,
                               hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                               num_attention_heads=12, num_key_value_heads=2,
                               max_position_embeddings=32768, rms_norm_eps=1e-6,
                               rope_theta=1000000.0, tie_word_embeddings=True,
                               max_window_layers=21, bos_token_id=151643,
                               eos_token_id=151645),
    # Qwen/Qwen3-8B (q/k RMSNorm, head_dim 128)
    "qwen3_8b": LlamaConfig(model_type="qwen3", qk_norm=True, vocab_size=151936,
                            hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                            max_position_embeddings=40960, rms_norm_eps=1e-6,
                            rope_theta=1000000.0, max_window_layers=36, bos_token_id=151643,
                            eos_token_id=151645),
}


def get_preset(name: str, **overrides) -> LlamaConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def rope_inv_freq(config: LlamaConfig):
    """Inverse frequencies [Dh/2] (float32, computed as transformers does), scaling applied."""
    import numpy as np
    dh = config.head_dim
    f32 = np.float32
    inv = f32(1.0) / (f32(config.rope_theta) ** (np.arange(0, dh, 2).astype(f32) / f32(dh)))
    rs = config.rope_scaling_dict
    if rs is None:
        return inv
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        return (inv / f32(rs["factor"])).astype(f32)
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
        return np.where(medium, smoothed, scaled).astype(f32)
    if kind == "yarn":  # transformers' _compute_yarn_parameters (YaRN, arXiv 2309.00071)
        factor, base = rs["factor"], config.rope_theta
        old = rs.get("original_max_position_embeddings", config.max_position_embeddings)
        fast, slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

        def corr_dim(rot):
            return dh * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))
        lo, hi = corr_dim(fast), corr_dim(slow)
        if rs.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dh - 1)
        if lo == hi:
            hi += 0.001
        pos = f32(base) ** (np.arange(0, dh, 2).astype(f32) / f32(dh))
        ramp = np.clip((np.arange(dh // 2, dtype=f32) - f32(lo)) / f32(hi - lo), 0, 1)
        extra = f32(1) - ramp.astype(f32)
        return ((f32(1) / (f32(factor) * pos)) * (f32(1) - extra)
                + (f32(1) / pos) * extra).astype(f32)
    return inv


def rope_attention_factor(config: LlamaConfig) -> float:
    """The factor transformers multiplies cos and sin by: yarn's attention_factor (given, or
    0.1 ln(factor) + 1, with mscale / mscale_all_dim when both are set); 1 otherwise."""
    rs = config.rope_scaling_dict
    if rs is None or rs.get("rope_type", rs.get("type")) != "yarn":
        return 1.0
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    f, m, m_all = rs["factor"], rs.get("mscale"), rs.get("mscale_all_dim")
    if m and m_all:
        return float(mscale(f, m) / mscale(f, m_all))
    return float(mscale(f))
