"""Training data: corpora larger than memory are tokenised piece by piece into a memory-mapped cache."""

from __future__ import annotations

import errno
import json
import tracemalloc

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from attnconv import textdata
from attnconv.errors import AttnconvError
from attnconv.testing import TOKENIZER_DIR
from attnconv.uptrain import data
from attnconv.uptrain.data import pack_blocks, tokenize_cached


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _whole(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def _big_file(path, copies: int) -> str:
    base = textdata.tinyshakespeare_split("test")  # ~100 KB
    text = "".join(f"{i} café\n\n  {base}" for i in range(copies))  # multi-byte characters across reads
    path.write_text(text, encoding="utf-8")
    return text


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(textdata, "BIG_TEXT_FILE", 256 << 10)
    monkeypatch.setattr(textdata, "PIECE_BYTES", 64 << 10)
    monkeypatch.setattr(data, "BATCH_CHARS", 64 << 10)


def test_big_text_file_is_tokenised_in_pieces_to_the_whole_file_tokens(tok, tmp_path, small_pieces):
    path = tmp_path / "big.txt"
    text = _big_file(path, 10)
    pieces = list(textdata.Corpus(str(path)))
    assert len(pieces) > 10 and [e for _, e in pieces] == [False] * (len(pieces) - 1) + [True]
    assert "".join(t for t, _ in pieces) == text
    assert textdata.load_texts(str(path)) == [text]  # eval's whole documents: the pieces joined back
    stream, key = tokenize_cached(textdata.Corpus(str(path)), tok, tmp_path / "cache")
    # cut only where the tokenizer splits anyway: the same ids as tokenising the file whole
    assert stream.tolist() == _whole(tok, text)
    assert isinstance(stream, np.memmap)


def test_tokenising_memory_does_not_grow_with_the_corpus(tok, tmp_path, small_pieces):
    tok("warm up")
    peaks, sizes = [], []
    for copies in (4, 16):
        path = tmp_path / f"c{copies}.txt"
        sizes.append(len(_big_file(path, copies).encode()))
        tracemalloc.start()
        tokenize_cached(textdata.Corpus(str(path)), tok, tmp_path / "cache")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # 4x the text: Python-side memory grows by far less than the text itself (holding the corpus's token
    # ids as Python ints would take ~10x the text)
    assert peaks[1] - peaks[0] < 0.1 * (sizes[1] - sizes[0]), (peaks, sizes)


def test_cache_is_reused_memory_mapped_without_tokenising(tok, tmp_path, monkeypatch):
    texts = ["First document.", "", "Second one,\nwith two lines."]
    stream, key = tokenize_cached(texts, tok, tmp_path)
    assert stream.tolist() == _whole(tok, texts[0]) + _whole(tok, texts[2])
    monkeypatch.setattr(data, "_token_chunks", lambda *a: pytest.fail("tokenised again"))
    again, key2 = tokenize_cached(texts, tok, tmp_path)
    assert key2 == key and isinstance(again, np.memmap) and again.tolist() == stream.tolist()
    assert not list(tmp_path.glob(".tokens-*"))  # no temporary file left


def test_unwritable_cache_tokenises_in_memory(tok, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    stream, _ = tokenize_cached(["Some text here."], tok, blocker / "cache")
    assert stream.tolist() == _whole(tok, "Some text here.")


def test_jsonl_rows_are_documents(tok, tmp_path):
    rows = [{"text": "Row one."}, {"text": ""}, {"text": "Row two, longer."}, {"other": 1, "text": None}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    stream, _ = tokenize_cached(textdata.Corpus(str(path)), tok, tmp_path / "cache")
    assert stream.tolist() == _whole(tok, "Row one.") + _whole(tok, "Row two, longer.")
    with pytest.raises(AttnconvError, match="no column 'body'"):
        textdata.Corpus(f"{path}::body")


def test_empty_corpus_is_refused(tok, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n")
    with pytest.raises(AttnconvError, match="the data is empty"):
        tokenize_cached(textdata.Corpus(str(path)), tok, tmp_path / "cache")


def test_token_blocks_index_like_the_reshaped_tensor():
    stream = np.arange(103, dtype=np.int32)
    blocks = pack_blocks(stream, 10)
    ref = torch.arange(100).view(10, 10)
    assert len(blocks) == 10 and blocks.shape == (10, 10)
    assert torch.equal(blocks[3], ref[3]) and blocks[3].dtype == torch.int64
    assert torch.equal(blocks[2:5], ref[2:5])
    idx = torch.tensor([7, 0, 7, 9])
    assert torch.equal(blocks[idx], ref[idx])
    assert torch.equal(blocks[[1, 2]], ref[[1, 2]])


def test_full_disk_while_caching_falls_back_to_memory(tok, tmp_path, monkeypatch):
    def no_space(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data.os, "replace", no_space)
    stream, _ = tokenize_cached(["Some text here."], tok, tmp_path)
    assert stream.tolist() == _whole(tok, "Some text here.")
    assert list(tmp_path.iterdir()) == []  # the partial cache file is gone


def test_unreadable_data_is_a_one_line_error(tok, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(AttnconvError, match="not UTF-8 text"):
        tokenize_cached(textdata.Corpus(str(bad)), tok, tmp_path / "cache")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(AttnconvError, match="could not be loaded"):
        textdata.Corpus(str(broken))


def test_a_truncated_or_edited_token_cache_is_rebuilt_and_bad_ids_refused(tok, tmp_path, capsys):
    texts = ["First document.", "Second one, with more words in it."]
    stream, key = tokenize_cached(texts, tok, tmp_path)
    expected = stream.tolist()
    cache = tmp_path / f"tokens-{key}.i32"
    raw = cache.read_bytes()
    vocab = max(tok.get_vocab().values()) + 1
    beyond = raw[:4] + np.int32(vocab + 5).tobytes() + raw[8:-24] + raw[-24:-8] + np.int64(vocab + 5).tobytes()
    for damaged in (raw[:-28] + raw[-24:], raw[:8], beyond):  # one id cut (at a multiple of 4), most cut, an id
        cache.write_bytes(damaged)
        again, _ = tokenize_cached(texts, tok, tmp_path)
        assert again.tolist() == expected
        assert "is damaged; tokenising again" in capsys.readouterr().err
    # An id changed behind the trailer's back is refused where a batch reads it, in one line.
    raw = cache.read_bytes()
    cache.write_bytes(np.int32(vocab + 7).tobytes() + raw[4:])
    blocks = pack_blocks(tokenize_cached(texts, tok, tmp_path)[0], 4, vocab)
    with pytest.raises(AttnconvError, match=f"token id {vocab + 7} is outside the model's vocabulary of {vocab}"):
        blocks[[0]]
    assert blocks[[1]].max() < vocab
