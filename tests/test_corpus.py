import logging

import pytest

from moe import config as C
from moe.data import corpus
from moe.data import pipeline as D


def fake_stdlib(root, texts):
    for rel, text in texts.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def two_versions(tmp_path):
    """Two standard libraries sharing a.py and pkg/b.py; c.py differs, d.py is in one only."""
    old = fake_stdlib(tmp_path / "old", {"a.py": "A = 1\n", "pkg/b.py": "B = 2\n", "c.py": "C = 3\n", "d.py": "D\n"})
    new = fake_stdlib(tmp_path / "new", {"a.py": "A = 1\n", "pkg/b.py": "B = 2\n", "c.py": "C = 4\n"})
    (old / "empty.py").write_text("")
    (new / "empty.py").write_text("")
    return old, new


def test_the_manifest_names_only_files_identical_in_every_version(tmp_path):
    old, new = two_versions(tmp_path)
    n = corpus.write_manifest([old, new], tmp_path / "m.tsv", "two fakes")
    entries = corpus.read_manifest(tmp_path / "m.tsv")
    assert n == 2 and [rel for rel, _ in entries] == ["a.py", "pkg/b.py"]
    assert dict(entries)["a.py"] == corpus.sha256(old / "a.py")


def test_the_shipped_manifest_reads_and_names_python_files():
    entries = corpus.read_manifest(corpus.MANIFEST)
    assert len(entries) > 500 and all(rel.endswith(".py") for rel, _ in entries)
    assert len({rel for rel, _ in entries}) == len(entries)


def test_a_changed_or_missing_file_is_reported_and_strict_refuses(tmp_path, caplog):
    old, new = two_versions(tmp_path)
    manifest = tmp_path / "m.tsv"
    corpus.write_manifest([old, new], manifest, "two fakes")
    assert corpus.embedded_files("strict", root=old, manifest=manifest) == [old / "a.py", old / "pkg/b.py"]
    (old / "a.py").write_text("A = 2\n")
    (old / "pkg/b.py").unlink()
    with caplog.at_level(logging.WARNING, logger="moe.data.corpus"):
        files = corpus.embedded_files("warn", root=old, manifest=manifest)
    assert files == [old / "a.py"]  # the changed file is read as it is; the missing one is gone
    assert "1 files changed and 1 missing of 2" in caplog.text and "a.py" in caplog.text
    with pytest.raises(corpus.CorpusError, match="data.corpus_check=warn"):
        corpus.embedded_files("strict", root=old, manifest=manifest)


def test_the_pipeline_refuses_a_changed_corpus_under_strict(tmp_path, monkeypatch):
    old, new = two_versions(tmp_path)
    manifest = tmp_path / "m.tsv"
    corpus.write_manifest([old, new], manifest, "two fakes")
    monkeypatch.setattr(corpus, "MANIFEST", manifest)
    monkeypatch.setattr(corpus, "stdlib_root", lambda: new)
    cfg = C.load("tiny-moe", ["data.corpus_check=strict", "data.val_fraction=0.5"])
    train, val = D.split_documents(cfg.data)
    assert len(train) + len(val) == 2
    (new / "a.py").write_text("changed\n")
    with pytest.raises(D.DataError, match="1 files changed"):
        D.split_documents(cfg.data)
    with pytest.raises(C.ConfigError, match="corpus_check"):
        C.load("tiny-moe", ["data.corpus_check=never"])


def test_a_malformed_manifest_line_names_its_line(tmp_path):
    (tmp_path / "m.tsv").write_text("# header\nnot-a-hash\tx.py\n")
    with pytest.raises(corpus.CorpusError, match="m.tsv:2"):
        corpus.read_manifest(tmp_path / "m.tsv")
