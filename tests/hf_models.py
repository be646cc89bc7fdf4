"""Tiny Hugging Face LLaMA models, random init, saved to local folders (no network)."""
import numpy as np

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=0)

VARIANTS = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "head_dim": dict(num_key_value_heads=2, head_dim=24),
    "tied": dict(tie_word_embeddings=True),
    "llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 16}),
    "odd_vocab": dict(vocab_size=251),
    "bias": dict(attention_bias=True, mlp_bias=True),
}


# the other architectures one easyrl model serves (arch -> transformers class prefix), and
# variants of each: a window shorter than the test batches' 12 tokens, yarn rope, ties
ARCHS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
ARCH_VARIANTS = {
    "mistral": dict(arch="mistral", num_key_value_heads=2, sliding_window=None),
    "mistral_window": dict(arch="mistral", num_key_value_heads=2, sliding_window=5),
    "qwen2": dict(arch="qwen2", num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True),
    "qwen2_window": dict(arch="qwen2", num_key_value_heads=2, use_sliding_window=True,
                         sliding_window=4, max_window_layers=0),
    "qwen2_yarn": dict(arch="qwen2", num_key_value_heads=2,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                     "original_max_position_embeddings": 64}),
    "qwen3": dict(arch="qwen3", num_key_value_heads=2, head_dim=24),
    "qwen3_bias_window": dict(arch="qwen3", num_key_value_heads=2, head_dim=8,
                              attention_bias=True, use_sliding_window=True, sliding_window=6,
                              max_window_layers=0),
}


def hf_config(arch="llama", **kw):
    import transformers
    return getattr(transformers, ARCHS[arch] + "Config")(**{**TINY, **kw})


def make_causal_lm(folder, seed=0, arch="llama", **kw):
    import torch
    import transformers
    torch.manual_seed(seed)
    cls = getattr(transformers, ARCHS[arch] + "ForCausalLM")
    m = cls(hf_config(arch, **kw)).eval()
    _perturb_norms(m, seed)
    m.save_pretrained(folder)
    return m


def make_reward_model(folder, seed=0, arch="llama", **kw):
    import torch
    import transformers
    torch.manual_seed(seed)
    cls = getattr(transformers, ARCHS[arch] + "ForSequenceClassification")
    m = cls(hf_config(arch, num_labels=1, **kw)).eval()
    _perturb_norms(m, seed)
    m.save_pretrained(folder)
    return m


def _perturb_norms(m, seed):
    """Random init leaves norm weights at 1 and biases at 0; perturb so mapping bugs show."""
    import torch
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif n.endswith(".bias"):
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def batch(vocab, b=3, t=12, seed=0, padding="right"):
    """ids [B,T] and mask [B,T] with different lengths per row (row 0 full)."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, vocab, size=(b, t)).astype(np.int64)
    mask = np.ones((b, t), np.int64)
    for i in range(1, b):
        n = t - 2 * i - 1
        if padding == "right":
            mask[i, n:] = 0
        else:
            mask[i, : t - n] = 0
    ids = np.where(mask > 0, ids, 0)
    return ids, mask


def left_pad(prompt_list):
    """ids [B, P] and mask [B, P] (int64) of token lists, left-padded with 0 to the longest."""
    p = max(len(x) for x in prompt_list)
    ids = np.zeros((len(prompt_list), p), np.int64)
    mask = np.zeros_like(ids)
    for i, x in enumerate(prompt_list):
        ids[i, p - len(x):] = x
        mask[i, p - len(x):] = 1
    return ids, mask
