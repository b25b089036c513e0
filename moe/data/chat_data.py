"""The Grain pipeline of chat and preference data (rows and rendering: moe/data/chat.py).

    rows      JSONL lines of data.paths (or data.val_paths / a held-out fraction), every
              one checked and rendered once before training: errors name file and line;
              rows too long for train.seq_len are truncated or dropped, and counted
    chat      shuffled by seed, rendered, packed first-fit into rows of seq_len: whole
              conversations only, each with its segment id and positions; the loss mask
              rides along, so packing and resume keep it
    preference  one comparison per batch entry, [2, seq_len] arrays (chosen, rejected),
              padded with segment id 0

Batches: inputs, targets, segment_ids, positions and loss_mask, [batch, seq] for chat and
[batch, 2, seq] for preference pairs.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from moe.config import Config
from moe.data import chat


@dataclasses.dataclass
class RowSource:
    """Random access to the checked rows: (path, byte offset, line number) each."""

    locations: list
    fmt: str
    truncated: int = 0  # rows that lost their oldest turns to fit
    dropped: int = 0  # rows left out: too long (or data.overflow=drop)

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, index: int) -> dict:
        return chat.read_row(*self.locations[index], self.fmt)


def locate(files) -> list[tuple[str, int, int]]:
    out = []
    for path in files:
        offset = 0
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    out.append((str(path), offset, number))
                offset += len(line)
    return out


def _fit_row(cfg: Config, tokenizer: str, row: dict):
    """[(ids, mask, dropped turns)] for the row's sequences (one, or chosen and rejected),
    or None when one cannot fit."""
    limit, overflow = cfg.train.seq_len + 1, cfg.data.overflow
    if "chosen" not in row:
        fitted = chat.fit(tokenizer, row["messages"], limit, overflow)
        return None if fitted is None else [fitted]
    out = []
    for key in ("chosen", "rejected"):
        fitted = chat.fit(
            tokenizer, row["messages"] + [{"role": "assistant", "content": row[key]}], limit, overflow, last_only=True
        )
        if fitted is None:
            return None
        out.append(fitted)
    return out


def check(cfg: Config, locations: list) -> RowSource:
    """Every row parsed and rendered once: a malformed one raises ChatDataError (file:line);
    rows that cannot fit are left out and counted."""
    source = RowSource(locations, cfg.data.format)
    tokenizer = chat.tokenizer_path(cfg.data.tokenizer)
    kept = []
    for i, location in enumerate(locations):
        fitted = _fit_row(cfg, tokenizer, source[i])
        if fitted is None:
            source.dropped += 1
            continue
        source.truncated += any(dropped for _, _, dropped in fitted)
        kept.append(location)
    source.locations = kept
    return source


class RenderChat(grain.transforms.Map):
    def __init__(self, cfg: Config):
        self.cfg, self.tokenizer = cfg, chat.tokenizer_path(cfg.data.tokenizer)

    def map(self, row: dict) -> dict:
        ids, mask, _ = _fit_row(self.cfg, self.tokenizer, row)[0]
        return chat.example(ids, mask)


class RenderPair(grain.transforms.Map):
    """A comparison as [2, seq_len] arrays: row 0 the chosen answer, row 1 the rejected."""

    def __init__(self, cfg: Config):
        self.cfg, self.tokenizer = cfg, chat.tokenizer_path(cfg.data.tokenizer)

    def map(self, row: dict) -> dict:
        seq = self.cfg.train.seq_len
        out = {k: np.zeros((2, seq), np.int32) for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
        for i, (ids, mask, _) in enumerate(_fit_row(self.cfg, self.tokenizer, row)):
            ex, n = chat.example(ids, mask), len(ids) - 1
            for key in ("inputs", "targets", "loss_mask"):
                out[key][i, :n] = ex[key]
            out["segment_ids"][i, :n] = 1
            out["positions"][i, :n] = np.arange(n)
        return out


def _packed_batch(packed: dict) -> dict:
    return {
        "inputs": packed["inputs"],
        "targets": packed["targets"],
        "segment_ids": packed["inputs_segment_ids"].astype(np.int32),
        "positions": packed["inputs_positions"].astype(np.int32),
        "loss_mask": packed["loss_mask"].astype(np.int32),
    }


def batches(source: RowSource, cfg: Config, seed: int) -> grain.IterDataset:
    """Endless batches of chat (packed) or preference (paired) data."""
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    seq = cfg.train.seq_len
    if cfg.data.format == "preference":
        return ds.map(RenderPair(cfg)).to_iter_dataset().batch(cfg.train.batch_size, drop_remainder=True)
    ds = ds.map(RenderChat(cfg)).to_iter_dataset()
    ds = grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct={"inputs": seq, "targets": seq, "loss_mask": seq},
        num_packing_bins=cfg.train.batch_size,
        seed=seed,
    )
    return ds.map(_packed_batch).batch(cfg.train.batch_size, drop_remainder=True)
