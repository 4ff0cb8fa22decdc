"""Held-out by default: convert calibrates on the first half of the shipped WikiText-2 test split, eval scores the
second half, and eval warns when a model's attnconv.json records calibration or training on the scored text."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from attnconv.calibration import calibration_tokens
from attnconv.eval.api import overlap_warnings
from attnconv.textdata import (
    CALIBRATION_SPEC,
    DATA_DIR,
    DEFAULT_SPEC,
    WIKITEXT2_TEST,
    load_texts,
    texts_overlap,
    wikitext2_part,
)


def test_halves_partition_the_split_at_an_article():
    whole = WIKITEXT2_TEST.read_text(encoding="utf-8")
    calib, heldout = wikitext2_part("calib"), wikitext2_part("eval")
    assert calib + heldout == whole  # nothing lost, nothing shared
    assert 0.45 < len(calib) / len(whole) < 0.55
    assert heldout.startswith(" \n = ") and heldout.split("\n")[1].count("=") == 2  # an article's heading
    assert load_texts(DEFAULT_SPEC) == [heldout] and load_texts("wikitext-2-test") == [whole]


def test_default_calibration_tokens_come_from_the_first_half_only():
    tok = AutoTokenizer.from_pretrained(DATA_DIR / "gpt2-tokenizer")
    ids = calibration_tokens(None, tok, 512, 64).flatten().tolist()
    assert ids == tok(wikitext2_part("calib")[:8000], add_special_tokens=False)["input_ids"][:512]
    assert CALIBRATION_SPEC == "wikitext-2-test:calib" and not texts_overlap(CALIBRATION_SPEC, DEFAULT_SPEC)


@pytest.mark.parametrize("a, b, overlap", [
    ("wikitext-2-test:calib", "wikitext-2-test:eval", False),
    ("wikitext-2-test:calib", "wikitext-2-test", True),
    ("wikitext-2-test", None, True),  # None: eval's default, the second half
    ("wikitext-2-test:calib", None, False),
    (str(WIKITEXT2_TEST), "wikitext-2-test:eval", True),  # the shipped file named by its path
    ("tinyshakespeare", "tinyshakespeare:test", False),
    ("tinyshakespeare:train", "tinyshakespeare", True),
    ("some/dataset:cfg:train", "some/dataset:cfg:train", True),
    ("some/dataset:cfg:train", "tinyshakespeare:test", False),
])
def test_texts_overlap(a, b, overlap):
    assert texts_overlap(a, b) is overlap


def test_eval_warns_in_one_line_per_model_that_saw_the_scored_text(tmp_path):
    seen, clean = tmp_path / "seen", tmp_path / "clean"
    for folder, calib, train in ((seen, "wikitext-2-test", "wikitext-2-test:eval"),
                                 (clean, "wikitext-2-test:calib", "tinyshakespeare:train")):
        folder.mkdir()
        record = {"conversion": {"calibration": {"data": calib}}, "uptrain": {"data": train}}
        (folder / "attnconv.json").write_text(json.dumps(record), encoding="utf-8")
    (tmp_path / "plain").mkdir()  # no attnconv.json: nothing known, nothing said
    lines = overlap_warnings([str(seen), str(clean), str(tmp_path / "plain")], "wikitext-2-test:eval")
    assert len(lines) == 2 and all("\n" not in w and w.startswith(f"warning: {seen} was") for w in lines)
    assert "calibrated on wikitext-2-test," in lines[0] and "uptrained on wikitext-2-test:eval" in lines[1]
