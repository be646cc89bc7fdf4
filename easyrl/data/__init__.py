"""Data layer: tokenizers, templates, formats, batching (numpy only; no JAX).

See ``encode`` for batch keys and shapes, ``formats`` for accepted data formats and
``synthetic`` for the built-in letter-sorting task.
"""

from easyrl.data.formats import FORMATS, KINDS, DataError, detect_format, load_data, load_rows
from easyrl.data.iterator import (BatchIterator, preference_iterator, prompt_iterator, rrhf_iterator,
                                  sft_iterator, unpaired_iterator)
from easyrl.data.templates import (TEMPLATES, render_prompt, tokenize_messages, tokenize_prompt,
                                   tokenize_prompt_completion)
from easyrl.data.tokenizer import TokenizerLoadError, load_tokenizer, pad_id, save_tokenizer

__all__ = [
    "FORMATS", "KINDS", "TEMPLATES", "BatchIterator", "DataError", "TokenizerLoadError",
    "detect_format", "load_data", "load_rows", "load_tokenizer", "pad_id", "preference_iterator",
    "prompt_iterator", "render_prompt", "rrhf_iterator", "save_tokenizer", "sft_iterator",
    "tokenize_messages", "tokenize_prompt", "tokenize_prompt_completion", "unpaired_iterator",
]
