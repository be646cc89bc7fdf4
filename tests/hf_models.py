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


def hf_config(**kw):
    from transformers import LlamaConfig
    return LlamaConfig(**{**TINY, **kw})


def make_causal_lm(folder, seed=0, **kw):
    import torch
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    m = LlamaForCausalLM(hf_config(**kw)).eval()
    _perturb_norms(m, seed)
    m.save_pretrained(folder)
    return m


def make_reward_model(folder, seed=0, **kw):
    import torch
    from transformers import LlamaForSequenceClassification
    torch.manual_seed(seed)
    m = LlamaForSequenceClassification(hf_config(num_labels=1, **kw)).eval()
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
