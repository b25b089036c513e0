import json

import numpy as np
import pytest

from moe import config as C
from moe.data import corpus
from moe.data import pipeline as D
from moe.data import tokenizer as T

from helpers import ROOT


def cfg_with(*overrides):
    return C.load(
        ROOT / "configs/tiny-moe.yaml", ["train.batch_size=2", "train.seq_len=32", "data.workers=0", *overrides]
    )


def write_docs(folder, n=12):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"doc{i}.txt").write_text(f"Document number {i}. " + "words and more words " * (i + 1))
    return folder


def test_embedded_default_corpus_is_the_manifests_standard_library_files():
    train, val = D.split_documents(cfg_with().data)
    assert len(train) > 500 and len(val) > 10
    train_files = {path for path, _ in train.locations}
    assert not train_files & {path for path, _ in val.locations}  # split by file
    listed = {str(corpus.stdlib_root() / rel) for rel, _ in corpus.read_manifest(corpus.MANIFEST)}
    assert train_files | {p for p, _ in val.locations} == listed


def test_globs_directories_and_jsonl(tmp_path):
    write_docs(tmp_path / "txt")
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"json document {i}", "id": i}) + "\n")
    cfg = cfg_with(f"data.paths=[{tmp_path / 'txt'}, '{tmp_path}/*.jsonl']", "data.val_fraction=0.2")
    train, val = D.split_documents(cfg.data)
    assert len(train) + len(val) == 42
    texts = [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]
    assert sum(t.startswith("json document") for t in texts) == 30
    bad_field = cfg_with(f"data.paths=['{tmp_path}/*.jsonl']", "data.text_field=body")
    with pytest.raises(D.DataError, match="no field 'body'"):
        D.split_documents(bad_field.data)[0][0]


def test_packed_batches_have_segments_and_restarting_positions(tmp_path):
    cfg = cfg_with(f"data.paths=[{write_docs(tmp_path)}]", "data.val_fraction=0.1")
    train, _ = D.check(cfg)
    batch = next(D.train_iterator(cfg, train))
    assert {k: v.shape for k, v in batch.items()} == {
        k: (2, 32) for k in ("inputs", "targets", "segment_ids", "positions")
    }
    sp = T.load("mistral-v1")
    for row in range(2):
        seg, pos = batch["segment_ids"][row], batch["positions"][row]
        for i in range(1, 32):
            if seg[i] != seg[i - 1]:
                assert pos[i] == 0 and seg[i] == seg[i - 1] + 1  # a new document starts at 0
            else:
                assert pos[i] == pos[i - 1] + 1
        # targets are the inputs shifted by one within a document
        same = seg[1:] == seg[:-1]
        np.testing.assert_array_equal(batch["targets"][row][:-1][same], batch["inputs"][row][1:][same])
    assert sp.bos_id() in batch["inputs"]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.slow
def test_iterator_state_resumes_the_same_batches(tmp_path, workers):
    cfg = cfg_with(f"data.paths=[{write_docs(tmp_path, 30)}]", f"data.workers={workers}")
    train, _ = D.check(cfg)
    it = D.train_iterator(cfg, train)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives JSON, as in a checkpoint
    expected = [next(it) for _ in range(4)]
    resumed = D.train_iterator(cfg, train)
    resumed.set_state(D.from_json_state(state))
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_shuffle_is_deterministic_by_seed(tmp_path):
    folder = write_docs(tmp_path, 30)
    first = lambda seed: next(
        D.train_iterator(
            cfg_with(f"data.paths=[{folder}]", f"seed={seed}"), D.check(cfg_with(f"data.paths=[{folder}]"))[0]
        )
    )["inputs"]
    np.testing.assert_array_equal(first(0), first(0))
    assert not np.array_equal(first(0), first(1))


def test_missing_data_path_is_clear(tmp_path):
    with pytest.raises(D.DataError, match="data path '.*nothing-here' matches no files"):
        D.check(cfg_with(f"data.paths=[{tmp_path / 'nothing-here'}]"))


def test_empty_corpus_is_clear(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(D.DataError, match="the corpus is empty"):
        D.check(cfg_with(f"data.paths=[{tmp_path / 'empty.txt'}]"))


def test_tokenizer_vocabulary_must_match_the_model():
    with pytest.raises(
        ValueError, match="vocabulary of 32000 but model.vocab_size is 1000; set model.vocab_size=32000"
    ):
        D.check(cfg_with("model.vocab_size=1000"))


def test_missing_tokenizer_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model .* not found"):
        D.check(cfg_with(f"data.tokenizer={tmp_path / 'none.model'}"))


def test_train_a_tokenizer_on_a_corpus(tmp_path):
    folder = write_docs(tmp_path / "docs", 20)
    path = T.train(sorted(folder.glob("*.txt")), tmp_path / "tok" / "small", vocab_size=300)
    sp = T.load(str(path))
    assert sp.vocab_size() == 300 and (sp.bos_id(), sp.eos_id()) == (1, 2)
    assert sp.decode(sp.encode("Document number 3.")) == "Document number 3."


def test_a_state_from_another_pipeline_is_refused_with_the_fix(tmp_path):
    folder = write_docs(tmp_path, 30)
    old = cfg_with(f"data.paths=[{folder}]", "data.shuffle_window=0")
    it = D.train_iterator(old, D.check(old)[0])
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    new = cfg_with(f"data.paths=[{folder}]")
    with pytest.raises(D.DataError, match="data.shuffle_window=0"):
        D.restore(D.train_iterator(new, D.check(new)[0]), state)


def test_the_validation_set_does_not_depend_on_the_runs_seed(tmp_path):
    folder = write_docs(tmp_path, 40)
    sets = []
    for seed in (0, 7):
        cfg = cfg_with(f"data.paths=[{folder}]", "data.val_fraction=0.3", "train.eval_batches=2", f"seed={seed}")
        sets.append(D.val_batches(cfg, D.check(cfg)[1]))
    for a, b in zip(*sets):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_val_paths_hold_exactly_the_named_documents(tmp_path):
    train_dir, val_dir = write_docs(tmp_path / "train", 10), tmp_path / "val"
    val_dir.mkdir()
    (val_dir / "held.txt").write_text("only this one is validation text")
    cfg = cfg_with(f"data.paths=[{train_dir}]", f"data.val_paths=[{val_dir}]")
    train, val = D.check(cfg)
    assert len(train) == 10 and [val[i] for i in range(len(val))] == ["only this one is validation text"]
    batch = D.val_batches(cfg, val)[0]  # every row: pieces of that one document, repeated
    sp = T.load("mistral-v1")
    allowed = {sp.bos_id(), *sp.encode("only this one is validation text")}  # eos is only a target
    assert set(batch["inputs"][batch["segment_ids"] != 0].tolist()) == allowed
