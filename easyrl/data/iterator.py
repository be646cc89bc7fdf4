"""Deterministic, resumable, host-sliced batch iterators, and one builder per trainer kind.

``BatchIterator`` shuffles item indices with ``np.random.default_rng([seed, epoch])`` each epoch,
cuts them into global batches of ``global_batch_size`` (an incomplete last batch is dropped so
every host sees equal shapes) and gives process ``i`` of ``n`` rows ``[i*G/n, (i+1)*G/n)`` of each
global batch. Its position is ``{"epoch": e, "index": k}`` (JSON-able): ``set_state`` on a fresh
iterator built from the same data and arguments continues at exactly the next batch.

Builders (``sft_iterator``, ``preference_iterator``, ``unpaired_iterator``, ``rrhf_iterator``,
``prompt_iterator``) load a source (see ``formats.load_data``), tokenize with a template, and
return a ``BatchIterator`` whose ``stats`` dict counts rows, bad rows skipped, truncations and
dropped examples. Rows dropped while tokenizing (a prompt that leaves no target within
``seq_len``, chosen == rejected) give ONE warning line naming the source, the counts and the
reasons; a source left with less than one global batch is a ``DataError`` saying the same.
Unpaired (KTO) data whose kept examples all have one label gives one warning line too. Batch
keys and shapes are documented in ``easyrl.data.encode``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

from easyrl.data import encode, formats, templates
from easyrl.data.tokenizer import pad_id

log = logging.getLogger(__name__)


class BatchIterator:
    """Iterate host-local slices of global batches over ``items`` forever or for ``num_epochs``.

    Each ``next()`` returns ``collate([items[i] for i in local_indices])`` with
    ``global_batch_size // process_count`` items.
    """

    def __init__(self, items: Sequence[Any], collate: Callable[[list], dict], global_batch_size: int,
                 *, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                 process_index: int = 0, process_count: int = 1, stats: dict | None = None):
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ValueError(f"bad process_index {process_index} for process_count {process_count}")
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count "
                             f"{process_count}")
        if len(items) < global_batch_size:
            raise ValueError(f"dataset has {len(items)} examples, fewer than one global batch "
                             f"({global_batch_size})")
        self.items = items
        self.collate = collate
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.process_index, self.process_count = process_index, process_count
        self.steps_per_epoch = len(items) // global_batch_size
        self.stats = dict(stats or {})
        self.epoch, self.index = 0, 0
        self._perm_epoch, self._perm = None, None

    # -- position
    def get_state(self) -> dict:
        """``{"epoch": int, "index": int}``: the next batch is batch ``index`` of epoch ``epoch``."""
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def set_state(self, state: dict) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.steps_per_epoch:
            raise ValueError(f"bad iterator state {state}: index must be in [0, {self.steps_per_epoch})")
        self.epoch, self.index = epoch, index

    # -- batches
    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            n = len(self.items)
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                          else np.arange(n))
            self._perm_epoch = epoch
        return self._perm

    def global_indices(self, epoch: int, index: int) -> np.ndarray:
        g = self.global_batch_size
        return self.permutation(epoch)[index * g:(index + 1) * g]

    def local_indices(self, epoch: int, index: int) -> np.ndarray:
        lo = self.process_index * self.local_batch_size
        return self.global_indices(epoch, index)[lo:lo + self.local_batch_size]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        idx = self.local_indices(self.epoch, self.index)
        batch = self.collate([self.items[i] for i in idx])
        self.index += 1
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return batch

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.steps_per_epoch


def drop_reasons(stats: dict, seq_len: str) -> list[tuple[int, str]]:
    """[(count, reason)] of the examples tokenizing dropped (``seq_len``: e.g. "train.seq_len=64")."""
    long = stats.get("num_dropped_long_prompt", 0)
    cut = stats.get("num_dropped_identical_truncated", 0)
    out = [(long, f"prompt longer than {seq_len}"),
           (stats.get("num_dropped_no_target", 0) - long, "no target tokens"),
           (stats.get("num_dropped_identical", 0) - cut, "chosen == rejected"),
           (cut, f"chosen == rejected after truncation to {seq_len}")]
    return [(n, why) for n, why in out if n]


def _iterator(items, collate, stats, loaded, *, global_batch_size, seq_len=None,
              unit="examples", **kw) -> BatchIterator:
    stats = dict(stats, num_bad_rows=loaded.num_bad, format=loaded.format, source=loaded.source)
    where, names = loaded.where or loaded.source, loaded.names
    reasons = drop_reasons(stats, f"{names.get('seq_len', 'seq_len')}={seq_len}")
    dropped = sum(n for n, _ in reasons)
    summary = (f"dropped {dropped} of {stats['num_rows']} rows ("
               + ", ".join(f"{n} {why}" for n, why in reasons) + ")") if dropped else ""
    if len(items) < global_batch_size:
        bad = (f"; {loaded.num_bad} bad rows skipped" if loaded.num_bad else "")
        if not items:
            raise formats.DataError(f"{where}: no examples left" + (f": {summary}" if summary else "")
                                    + bad)
        batch = f"{names['global_batch_size']}=" if "global_batch_size" in names else ""
        n = len(items)
        raise formats.DataError(f"{where}: {n} {unit[:-1] if n == 1 else unit}, fewer than one global "
                                f"batch ({batch}{global_batch_size})"
                                + (f": {summary}" if summary else "") + bad)
    if summary and kw.get("process_index", 0) == 0:
        log.warning("%s: %s", where, summary)
    return BatchIterator(items, collate, global_batch_size, stats=stats, **kw)


def sft_iterator(source, tokenizer, *, seq_len: int, global_batch_size: int, template: str = "plain",
                 packing: bool = False, format: str | None = None, skip_bad_rows: bool = False,
                 split: str | None = None, **iter_kw) -> BatchIterator:
    """SFT batches (``input_ids, attention_mask, loss_mask, segment_ids, positions`` [B, T]).

    With ``packing`` each item is a row of whole examples packed sequentially into ``seq_len``.
    ``iter_kw``: seed, shuffle, num_epochs, process_index, process_count.
    """
    templates.check_template(template)
    loaded = formats.load_data(source, "sft", format, skip_bad_rows, split)
    examples, stats = encode.tokenize_sft(loaded.rows, tokenizer, template, seq_len)
    groups = encode.pack_examples(examples, seq_len) if packing else [[i] for i in range(len(examples))]
    rows = [[examples[i] for i in g] for g in groups]
    stats["num_packed_rows"] = len(rows)
    pad = pad_id(tokenizer)
    return _iterator(rows, lambda items: encode.collate_sft(items, seq_len, pad), stats, loaded,
                     global_batch_size=global_batch_size, seq_len=seq_len,
                     unit="packed rows" if packing else "examples", **iter_kw)


def preference_iterator(source, tokenizer, *, seq_len: int, global_batch_size: int,
                        template: str = "plain", format: str | None = None,
                        skip_bad_rows: bool = False, split: str | None = None, **iter_kw) -> BatchIterator:
    """Preference batches (``chosen_*``/``rejected_*`` [B, T], ``margin`` [B]) for RM and DPO."""
    templates.check_template(template)
    loaded = formats.load_data(source, "preference", format, skip_bad_rows, split)
    examples, stats = encode.tokenize_preference(loaded.rows, tokenizer, template, seq_len)
    pad = pad_id(tokenizer)
    return _iterator(examples, lambda items: encode.collate_preference(items, seq_len, pad), stats,
                     loaded, global_batch_size=global_batch_size, seq_len=seq_len, **iter_kw)


def unpaired_iterator(source, tokenizer, *, seq_len: int, global_batch_size: int,
                      template: str = "plain", format: str | None = None, skip_bad_rows: bool = False,
                      split: str | None = None, **iter_kw) -> BatchIterator:
    """Unpaired preference batches for KTO (``completion_*``/``kl_*`` [B, T], ``label`` [B]).

    Rows are ``unpaired`` (prompt, completion, label) or preference pairs, each unpaired into a
    desirable (chosen) and an undesirable (rejected) example (``stats["num_pairs_unpaired"]``).
    """
    templates.check_template(template)
    loaded = formats.load_data(source, "unpaired", format, skip_bad_rows, split)
    examples, stats = encode.tokenize_unpaired(loaded.rows, tokenizer, template, seq_len)
    stats["num_pairs_unpaired"] = 0 if loaded.format == "unpaired" else len(loaded.rows) // 2
    pad = pad_id(tokenizer)
    it = _iterator(examples, lambda items: encode.collate_unpaired(items, seq_len, pad), stats,
                   loaded, global_batch_size=global_batch_size, seq_len=seq_len, **iter_kw)
    n, good = stats["num_examples"], stats["num_desirable"]
    if good in (0, n) and iter_kw.get("process_index", 0) == 0:
        kind, label, other = (("desirable", "true", "undesirable") if good else
                              ("undesirable", "false", "desirable"))
        log.warning("%s: all %d examples are %s (label %s): KTO sees no %s examples (TRL warns the "
                    "same way)", loaded.where or loaded.source, n, kind, label, other)
    return it


def rrhf_iterator(source, tokenizer, *, seq_len: int, global_batch_size: int, template: str = "plain",
                  num_responses: int | None = None, format: str | None = None,
                  skip_bad_rows: bool = False, split: str | None = None, **iter_kw) -> BatchIterator:
    """RRHF batches ([B, N, T] ids/masks, ``scores``/``valid`` [B, N]); N defaults to the max in the data."""
    templates.check_template(template)
    loaded = formats.load_data(source, "rrhf", format, skip_bad_rows, split)
    n = num_responses or max(len(r["responses"]) for r in loaded.rows)
    examples, stats = encode.tokenize_rrhf(loaded.rows, tokenizer, template, seq_len, n)
    pad = pad_id(tokenizer)
    return _iterator(examples, lambda items: encode.collate_rrhf(items, n, seq_len, pad), stats,
                     loaded, global_batch_size=global_batch_size, seq_len=seq_len, **iter_kw)


def prompt_iterator(source, tokenizer, *, max_prompt_len: int, global_batch_size: int,
                    template: str = "plain", format: str | None = None, skip_bad_rows: bool = False,
                    split: str | None = None, truncate: str = "left",
                    max_prompt_len_key: str = "max_prompt_len", **iter_kw) -> BatchIterator:
    """Prompt batches for PPO / generation: LEFT-padded ``input_ids``, ``attention_mask`` [B, P],
    ``prompts`` (this host's prompt texts) and ``columns`` (their rows' other fields, ``{name:
    list}`` aligned with ``prompts``; see ``encode.collate_prompts``)."""
    templates.check_template(template)
    loaded = formats.load_data(source, "prompts", format, skip_bad_rows, split)
    try:
        examples, stats = encode.tokenize_prompts(loaded.rows, tokenizer, template, max_prompt_len,
                                                  truncate)
    except encode.PromptTooLong as e:
        raise formats.DataError(
            f"{loaded.where or loaded.source}: prompt row {e.index} has {e.length} tokens, more "
            f"than config {max_prompt_len_key}={max_prompt_len} (data.truncate_prompts=error; "
            f"raise {max_prompt_len_key}, or data.truncate_prompts=left cuts it from the "
            f"left)") from None
    pad = pad_id(tokenizer)
    return _iterator(examples, lambda items: encode.collate_prompts(items, max_prompt_len, pad),
                     stats, loaded, global_batch_size=global_batch_size, **iter_kw)
