"""The data pipeline (Grain): documents -> sentencepiece tokens -> packed fixed-length batches.

    documents   text files (one document each), JSONL lines (a text field), or by default
                the embedded corpus: standard-library source files fixed by a manifest
                (moe/data/corpus.py)
    split       validation = data.val_paths, or a stable hash of each document's location
    shuffle     by seed, reshuffled every epoch (grain index shuffling; no buffers)
    tokenize    [bos] + pieces + [eos]; inputs = ids[:-1], targets = ids[1:]
    pack        concatenate then split into seq_len rows, with segment ids (1, 2, ...) and
                positions restarting per document; the model masks attention across them
    window      rows shuffled within data.shuffle_window, so one long document does not
                fill whole batches (checkpointable, like every stage)
    batch       [batch_size, seq_len] int32 arrays: inputs, targets, segment_ids, positions

The iterator's state (`get_state`/`set_state`) is small and JSON-serializable; it goes into
every checkpoint so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import ctypes
import glob
import json
import multiprocessing
import os
import signal
import sys
import zlib
from pathlib import Path

import grain
import numpy as np
from absl import flags

from moe.config import Config, DataConfig
from moe.data import chat_data, corpus
from moe.data import tokenizer as tokenizer_lib

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text", ""}


class DataError(ValueError):
    """Missing or unusable training data; the message says what and where."""


def corpus_files(cfg: DataConfig) -> list[Path]:
    """The embedded default corpus, checked against its manifest (data.corpus_check)."""
    try:
        return corpus.embedded_files(cfg.corpus_check)
    except corpus.CorpusError as e:
        raise DataError(str(e)) from None


def resolve_paths(patterns: tuple[str, ...]) -> list[Path]:
    """Files named by paths, directories (searched recursively) and globs, sorted."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise DataError(f"data path {pattern!r} matches no files or directories; check data.paths")
        for match in map(Path, matches):
            if match.is_dir():
                files += sorted(p for p in match.rglob("*") if p.is_file())
            else:
                files.append(match)
    return sorted(set(files))


def read_jsonl(path: str | Path, fields: tuple[str, ...], error: type[Exception] = DataError) -> list[dict]:
    """The JSON objects of a small JSONL file (blank lines skipped), each holding the string
    `fields`; a bad line raises `error` naming the file and line."""
    names = " and ".join(f'"{f}"' for f in fields)
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{number}: not JSON ({e.msg}); each line must be an object with {names}") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(f), str) for f in fields):
            raise error(f"{path}:{number}: each line must be an object with string {names}")
        rows.append(row)
    return rows


def _is_jsonl(path: Path, fmt: str) -> bool:
    return fmt == "jsonl" or (fmt == "auto" and path.suffix in (".jsonl", ".json"))


class DocumentSource:
    """Random access to documents, read lazily: (path, byte offset or -1 for a whole file)."""

    def __init__(self, locations: list[tuple[str, int]], text_field: str):
        self.locations, self.text_field = locations, text_field

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, index: int) -> str:
        path, offset = self.locations[index]
        if offset < 0:
            return Path(path).read_text(encoding="utf-8", errors="replace")
        with open(path, "rb") as f:
            f.seek(offset)
            record = json.loads(f.readline())
        if self.text_field not in record:
            raise DataError(f"{path} at byte {offset}: no field {self.text_field!r} (set data.text_field)")
        return str(record[self.text_field])


def locate_documents(files: list[Path], cfg: DataConfig) -> list[tuple[str, int]]:
    locations = []
    for path in files:
        if _is_jsonl(path, cfg.format):
            offset = 0
            with open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        locations.append((str(path), offset))
                    offset += len(line)
        elif path.stat().st_size > 0:
            locations.append((str(path), -1))
    return locations


def _hold_out(docs: list[tuple[str, int]], fraction: float) -> tuple[list, list]:
    """Split by a hash of each document's path relative to the corpus root (and offset), so
    the split is the same wherever the corpus lives; each side gets at least one document."""
    root = os.path.commonpath([path for path, _ in docs]) if len(docs) > 1 else ""
    score = {d: zlib.crc32(f"{os.path.relpath(d[0], root) if root else d[0]}:{d[1]}".encode()) % 10_000 for d in docs}
    val = [d for d in docs if score[d] < fraction * 10_000]
    if not val and len(docs) > 1:
        val = [min(docs, key=score.get)]
    if len(val) == len(docs) and len(docs) > 1:
        val.remove(max(docs, key=score.get))
    held = set(val)
    return [d for d in docs if d not in held], val


def split_documents(cfg: DataConfig) -> tuple[DocumentSource, DocumentSource]:
    """(train, validation) document sources; refuses an empty corpus or split."""
    files = resolve_paths(cfg.paths) if cfg.paths else corpus_files(cfg)
    docs = locate_documents(files, cfg)
    if not docs:
        raise DataError(f"the corpus is empty: {len(files)} files matched data.paths but hold no text")
    if cfg.val_paths:
        train, val = docs, locate_documents(resolve_paths(cfg.val_paths), cfg)
    else:
        train, val = _hold_out(docs, cfg.val_fraction)
    if not train or not val:
        which = "training" if not train else "validation"
        raise DataError(
            f"the {which} split is empty ({len(docs)} documents in all); add documents, "
            "set data.val_paths, or change data.val_fraction"
        )
    return DocumentSource(train, cfg.text_field), DocumentSource(val, cfg.text_field)


NO_SHM = 2**62  # grain copies arrays of at least this many bytes to shared memory: none
VAL_SEED = 20240101  # the validation set does not depend on the run's seed


class Tokenize(grain.transforms.Map):
    """text -> {"inputs": ids[:-1], "targets": ids[1:]} with ids = [bos] + pieces + [eos]."""

    def __init__(self, spec: str):
        self.spec = spec

    def map(self, text: str) -> dict:
        sp = tokenizer_lib.load(self.spec)
        ids = np.asarray([sp.bos_id(), *sp.encode(text), sp.eos_id()], np.int32)
        return {"inputs": ids[:-1], "targets": ids[1:]}


def _to_batch(packed: dict) -> dict:
    return {
        "inputs": packed["inputs"],
        "targets": packed["targets"],
        "segment_ids": packed["inputs_segment_ids"].astype(np.int32),
        "positions": packed["inputs_positions"].astype(np.int32),
    }


def dataset(source, cfg: Config, *, seed: int, workers: int) -> grain.IterDataset:
    """An endless IterDataset of batches: text (below), or chat and preference data
    (moe/data/chat_data.py), read by `workers` processes."""
    if is_chat(cfg.data):
        ds = chat_data.batches(source, cfg, seed)
    else:
        ds = text_batches(source, cfg, seed)
    if workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
            flags.FLAGS.mark_as_parsed()
        # Batches of token ids are small: they travel pickled through the workers' pipes, not
        # in shared memory segments, which grain leaves behind (leaked, until a reboot) when a
        # run stops while batches are in flight.
        ds = grain.experimental.WithOptionsIterDataset(ds, grain.experimental.DatasetOptions(min_shm_size=NO_SHM))
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=die_with_parent)
    return ds


def is_chat(cfg: DataConfig) -> bool:
    return cfg.format in ("chat", "preference")


def text_batches(source: DocumentSource, cfg: Config, seed: int) -> grain.IterDataset:
    """Packed batches [batch_size, seq_len]: documents shuffled by `seed`, packed, and the
    packed sequences shuffled again within data.shuffle_window (a long document's
    consecutive pieces would otherwise fill whole batches)."""
    ds = grain.MapDataset.source(source).shuffle(seed=seed)
    ds = ds.repeat(None).map(Tokenize(cfg.data.tokenizer)).to_iter_dataset()
    seq_len = cfg.train.seq_len
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"inputs": seq_len, "targets": seq_len})
    if cfg.data.shuffle_window > 1:
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=cfg.data.shuffle_window, seed=seed)
    return ds.map(_to_batch).batch(cfg.train.batch_size, drop_remainder=True)


def die_with_parent(worker_index: int = 0, worker_count: int = 0) -> None:
    """Make this worker process exit when the process that started it dies, SIGKILL
    included (Linux prctl PR_SET_PDEATHSIG); without it, a killed training process leaves
    its Grain workers running as orphans, holding their memory, on every preemption."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before prctl took effect
        os._exit(1)


def check(cfg: Config):
    """(train, validation) sources, with everything that can be wrong with the data found
    before compiling anything (chat data: every row checked and rendered)."""
    tokenizer_lib.check_vocab(cfg.data.tokenizer, cfg.model.vocab_size)
    if not is_chat(cfg.data):
        return split_documents(cfg.data)

    files = resolve_paths(cfg.data.paths) if cfg.data.paths else []
    if not files:
        raise DataError(f"data.format={cfg.data.format} needs data.paths (JSONL files); the default corpus is text")
    rows = chat_data.locate(files)
    if cfg.data.val_paths:
        train, val = rows, chat_data.locate(resolve_paths(cfg.data.val_paths))
    else:
        line_of = {(p, o): n for p, o, n in rows}
        train, val = (
            sorted((p, o, line_of[p, o]) for p, o in part)
            for part in _hold_out([(p, o) for p, o, _ in rows], cfg.data.val_fraction)
        )
    train, val = chat_data.check(cfg, train), chat_data.check(cfg, val)
    if not len(train) or not len(val):
        raise DataError(
            f"no {'training' if not len(train) else 'validation'} rows left ({train.dropped + val.dropped} "
            "dropped as longer than train.seq_len); raise train.seq_len or add data"
        )
    return train, val


def train_iterator(cfg: Config, source: DocumentSource):
    return iter(dataset(source, cfg, seed=cfg.seed, workers=cfg.data.workers))


def from_json_state(state):
    """An iterator state read back from JSON, as grain wrote it: JSON turns the packer's
    (start, stop) remainder slices into lists, which grain then misreads as pending data."""
    if isinstance(state, list):
        return [from_json_state(v) for v in state]
    if not isinstance(state, dict):
        return state
    out = {k: from_json_state(v) for k, v in state.items()}
    if isinstance(state.get("remainder_slices"), dict):
        out["remainder_slices"] = {k: tuple(v) for k, v in state["remainder_slices"].items()}
    return out


def restore(iterator, state) -> None:
    """Put a checkpoint's iterator state (as read back from JSON) into a fresh iterator."""
    try:
        iterator.set_state(from_json_state(state))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise DataError(
            f"the checkpoint's data iterator state does not fit this pipeline ({type(e).__name__}: {e}); "
            "it was written with other data settings. A run from before data.shuffle_window existed "
            "resumes with data.shuffle_window=0; otherwise use the run's own data config or a new --run-dir"
        ) from None


def val_batches(cfg: Config, source: DocumentSource) -> list[dict]:
    """The fixed validation set: the first eval_batches batches, drawn with a fixed seed (the
    same for every run, whatever its seed) from across the held-out documents."""
    it = iter(dataset(source, cfg, seed=VAL_SEED, workers=0))
    return [next(it) for _ in range(cfg.train.eval_batches)]
