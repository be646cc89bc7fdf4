"""Load and save tokenizers (always local: no network).

``load_tokenizer(path)`` accepts
  * a Hugging Face tokenizer folder (``tokenizer.json`` / ``tokenizer_config.json``...), loaded with
    ``AutoTokenizer.from_pretrained(path, trust_remote_code=False)``;
  * a sentencepiece ``.model`` file (e.g. a LLaMA ``tokenizer.model``, or
    ``easyrl.data.synthetic.synthetic_tokenizer_path()``), or a folder holding only
    ``tokenizer.model``: a LLaMA-style tokenizer (``LlamaTokenizer``: BOS added by default,
    metaspace pre-tokenizer, the model's own unk/bos/eos pieces) is built from it.

Pad token: if the tokenizer defines none, the pad token is set to the **unk** token when there is
one, else to the **eos** token (a warning is logged). Batches always carry attention masks, so the
pad id is never mistaken for content; unk is preferred so "first EOS" searches stay unambiguous.

When a sentencepiece model has no byte-fallback pieces, characters outside its vocabulary are
mapped to unk (rather than silently dropped, which a plain ``LlamaTokenizer`` would do).

``save_tokenizer(tok, dir)`` writes a folder that ``AutoTokenizer.from_pretrained(dir)`` loads
back with identical encodings (it checks this, and records the generic fast-tokenizer class when
the model-specific class would rebuild a different backend).
"""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)

_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt")
_PROBE_TEXTS = (
    "Hello world! sort: f b d a",
    "<|user|>\nsort: c a\n<|assistant|>\na c",
    "Question: 1 + 2?\n\nAnswer:  three   spaces\tTab",
    "\n\nHuman: hi\n\nAssistant: yo é ü 中",
)


class TokenizerLoadError(ValueError):
    """Raised when a tokenizer path is missing or cannot be loaded."""


def _read_spm_proto(path: str):
    from sentencepiece import sentencepiece_model_pb2 as pb2

    proto = pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    if not proto.pieces:
        raise ValueError("no pieces in the model (not a sentencepiece model?)")
    return proto


def _load_sentencepiece(path: str):
    from transformers import LlamaTokenizer

    proto = _read_spm_proto(path)
    spec = proto.trainer_spec
    pieces = proto.pieces
    kwargs = {"vocab_file": path, "add_bos_token": True, "add_eos_token": False, "legacy": False}
    for name in ("unk", "bos", "eos", "pad"):
        idx = getattr(spec, f"{name}_id")
        if 0 <= idx < len(pieces):
            kwargs[f"{name}_token"] = pieces[idx].piece
    kwargs = LlamaTokenizer.convert_to_native_format(**kwargs)
    tok = LlamaTokenizer(**kwargs)
    tok.vocab_file = path
    has_bytes = any(p.type == 6 for p in pieces)  # ModelProto.SentencePiece.BYTE
    if not has_bytes and tok.unk_token is not None:
        model = tok.backend_tokenizer.model
        model.byte_fallback = False
        model.unk_token = tok.unk_token
    return tok


def _ensure_pad(tok, path: str):
    if tok.pad_token is None:
        fallback = tok.unk_token if tok.unk_token is not None else tok.eos_token
        if fallback is None:
            raise TokenizerLoadError(f"tokenizer at {path} has no pad, unk or eos token to pad with")
        logger.warning("tokenizer at %s has no pad token: using %r as pad", path, fallback)
        tok.pad_token = fallback
    return tok


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id (an error when it has none: load it with `load_tokenizer`)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("tokenizer has no pad token; load it with easyrl.data.load_tokenizer")
    return int(pad)


def load_tokenizer(path: str):
    """Load a tokenizer from a local HF folder or a sentencepiece ``.model`` file (see module doc).

    Returns a ``transformers`` tokenizer with ``pad_token_id`` set. Raises ``TokenizerLoadError``
    naming ``path`` when it is missing or unreadable.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TokenizerLoadError(f"tokenizer path does not exist: {path}")
    try:
        if os.path.isdir(path):
            names = set(os.listdir(path))
            if not names & set(_HF_FILES) and "tokenizer.model" in names:
                tok = _load_sentencepiece(os.path.join(path, "tokenizer.model"))
            else:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        else:
            tok = _load_sentencepiece(path)
    except TokenizerLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise TokenizerLoadError(f"could not load a tokenizer from {path}: {type(e).__name__}: {e}") from e
    return _ensure_pad(tok, path)


def _same_encodings(a, b) -> bool:
    texts = list(_PROBE_TEXTS)
    for special in (a.bos_token, a.eos_token, a.pad_token, a.unk_token):
        if special:
            texts.append(f"x{special}y")
    for t in texts:
        for add in (True, False):
            if a.encode(t, add_special_tokens=add) != b.encode(t, add_special_tokens=add):
                return False
    return (a.pad_token_id, a.bos_token_id, a.eos_token_id) == (b.pad_token_id, b.bos_token_id, b.eos_token_id)


def save_tokenizer(tok, directory: str) -> str:
    """Save ``tok`` to ``directory`` so ``AutoTokenizer.from_pretrained(directory)`` reproduces it.

    Returns ``directory``. Raises ``RuntimeError`` if the reloaded tokenizer encodes differently.
    """
    from transformers import AutoTokenizer

    os.makedirs(directory, exist_ok=True)
    tok.save_pretrained(directory)
    if _same_encodings(tok, AutoTokenizer.from_pretrained(directory)):
        return directory
    # The model-specific class rebuilt its backend differently: record the generic fast class, which
    # loads tokenizer.json verbatim.
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    if not _same_encodings(tok, AutoTokenizer.from_pretrained(directory)):
        raise RuntimeError(f"tokenizer saved to {directory} does not reload with identical encodings")
    return directory
