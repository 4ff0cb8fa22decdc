"""Text corpora from a `--data SPEC`: a local file or folder, a `datasets` hub spec, or the shipped default.

SPEC forms:
  path/to/file.txt | .jsonl | .json | .parquet | .csv   a local file (column `text` unless `::column`)
  path/to/folder                                         every such file in it, in name order
  name[:config][:split][:column]                         a hub dataset through `datasets` (online users)
  wikitext-2-test[:calib|:eval]                          the WikiText-2 raw test split shipped with attnconv: whole,
                                                         or its first half (calib) / second half (eval), cut
                                                         between articles so the halves never overlap
  tinyshakespeare[:train|:test]                          Tiny Shakespeare shipped with attnconv (90/10 split)

Defaults: eval scores wikitext-2-test:eval (EVAL_SPEC), convert calibrates on wikitext-2-test:calib
(CALIBRATION_SPEC): held-out by default. `wikitext-2-test` is the whole split, as published perplexities use.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from attnconv.errors import AttnconvError

DATA_DIR = Path(__file__).resolve().parent / "data"
WIKITEXT2_TEST = DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"
TINYSHAKESPEARE = DATA_DIR / "tinyshakespeare" / "input.txt"
WIKITEXT2 = "wikitext-2-test"
EVAL_SPEC = "wikitext-2-test:eval"  # what eval scores by default
CALIBRATION_SPEC = "wikitext-2-test:calib"  # what convert calibrates on by default: disjoint from EVAL_SPEC
DEFAULT_SPEC = EVAL_SPEC
_FILE_BUILDERS = {".txt": "text", ".raw": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
                  ".csv": "csv"}


def is_data_file(path: str | Path) -> bool:
    """Whether PATH ends in the suffix of a file type attnconv reads as data (a key of _FILE_BUILDERS)."""
    return Path(path).suffix in _FILE_BUILDERS


def tinyshakespeare_split(split: str = "train") -> str:
    """The first 90% of Tiny Shakespeare (train) or the last 10% (test), cut at a line boundary."""
    text = TINYSHAKESPEARE.read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
    if split == "train":
        return text[:cut]
    if split in ("test", "validation", "eval"):
        return text[cut:]
    raise AttnconvError(f"tinyshakespeare has splits train and test, not {split!r}")


def wikitext2_part(part: str | None = None) -> str:
    """The shipped WikiText-2 test split: whole (None), or its first half ('calib') or second half ('eval'),
    cut at the first article heading past the middle, so each half holds whole articles."""
    text = WIKITEXT2_TEST.read_text(encoding="utf-8")
    if part is None:
        return text
    heading = re.compile(r"(?m)^ = [^=].* = $")  # ' = Title = ': an article's first line (sections use ' = = ')
    cut = next(m.start() for m in heading.finditer(text, len(text) // 2)) - 2  # the ' \n' that opens an article
    if part == "calib":
        return text[:cut]
    if part == "eval":
        return text[cut:]
    raise AttnconvError(f"wikitext-2-test has the parts calib (first half) and eval (second half), not {part!r}")


def _text_identity(spec: str) -> tuple[str, frozenset[str]]:
    """(which text, which parts of it) a spec reads, for telling whether two specs share text."""
    name, _, part = spec.partition(":")
    halves = frozenset({"calib", "eval"})
    if name == WIKITEXT2:
        return WIKITEXT2, frozenset({part}) if part else halves
    if name == "tinyshakespeare":
        return name, frozenset({"test" if part in ("test", "validation", "eval") else "train"})
    path = Path(spec.partition("::")[0]).expanduser()
    if path.exists():
        if path.resolve() == WIKITEXT2_TEST:
            return WIKITEXT2, halves
        return str(path.resolve()), frozenset({"all"})
    return spec, frozenset({"all"})


def texts_overlap(a: str | None, b: str | None) -> bool:
    """Whether two --data specs read some of the same text (None: the command's default, passed resolved)."""
    (text_a, parts_a), (text_b, parts_b) = _text_identity(a or DEFAULT_SPEC), _text_identity(b or DEFAULT_SPEC)
    return text_a == text_b and bool(parts_a & parts_b)


def load_texts(spec: str | None = None) -> list[str]:
    """Whole documents (strings) from SPEC, a hub dataset's test split by default; raises AttnconvError when
    there is nothing to read. Word and byte counts of evaluation need the original text, so pieces of large
    files are joined back."""
    texts, parts = [], []
    for text, ends_document in Corpus(spec, default_split="test"):
        parts.append(text)
        if ends_document:
            texts.append("".join(parts))
            parts = []
    if not any(t.strip() for t in texts):
        raise AttnconvError(f"{spec or DEFAULT_SPEC}: the data is empty; point --data at a file or dataset with text")
    return texts


BIG_TEXT_FILE = 8 << 20  # text files larger than this are read (and tokenised) in pieces
PIECE_BYTES = 1 << 20  # read size for those pieces (each cut at the last lone line break of its second half)


class Corpus:
    """The documents of a --data SPEC, read lazily, for training on corpora larger than memory.

    Iterating yields (text, ends_document) pieces, afresh each time (tokenising reads it twice: once to
    fingerprint it for the token cache, once to tokenise). Text files up to BIG_TEXT_FILE are one piece,
    as `load_texts` reads them; larger ones are cut into pieces of about PIECE_BYTES after a lone line
    break between two words, where byte-level BPE tokenizers (GPT-2, Llama 3) split anyway, so the ids
    are those of the whole file (SentencePiece tokenizers may differ by a token at a cut). Rows of
    .jsonl/.parquet/.csv files and hub datasets are read through `datasets` (memory-mapped Arrow) a batch
    at a time.
    """

    def __init__(self, spec: str | None = None, default_split: str = "train"):
        self.spec, self.default_split = spec or DEFAULT_SPEC, default_split
        self._pieces = self._resolve()

    def _resolve(self):
        spec = self.spec
        if spec.split(":")[0] == WIKITEXT2:
            text = wikitext2_part(spec.split(":")[1] if ":" in spec else None)
            return lambda: iter([(text, True)])
        if spec.split(":")[0] == "tinyshakespeare":
            text = tinyshakespeare_split(spec.split(":")[1] if ":" in spec else "train")
            return lambda: iter([(text, True)])
        path_part, _, column = spec.partition("::")
        path = Path(path_part).expanduser()
        if path.is_file() or path.is_dir():
            files = [path] if path.is_file() else sorted(
                p for p in path.rglob("*") if p.is_file() and is_data_file(p))
            if not files:
                raise AttnconvError(f"{path} holds no {'/'.join(_FILE_BUILDERS)} files")
            if not all(is_data_file(f) for f in files):
                raise AttnconvError(f"{path}: unsupported file type; use {', '.join(_FILE_BUILDERS)}")
            if len({f.suffix for f in files}) != 1:
                raise AttnconvError(f"mixed file types {sorted({f.suffix for f in files})}; "
                                    "put one kind of file in the folder")
            if _FILE_BUILDERS[files[0].suffix] == "text":
                return lambda: (piece for f in files for piece in _text_file_pieces(f))
            ds = _load_dataset(str(path), _FILE_BUILDERS[files[0].suffix], data_files=[str(f) for f in files],
                               split="train")
            return _rows(ds, column or "text", f"{files[0]} has no column {{col!r}} (columns: {{cols}}); "
                                              "name one with PATH::COLUMN")
        if "/" in spec and not spec.startswith((".", "/", "~")) or ":" in spec:
            parts = spec.split(":")
            name, config, split, column = (parts + [None] * 4)[:4]
            ds = _load_dataset(f"dataset {spec!r}", name, config or None, split=split or self.default_split)
            default = "text" if "text" in ds.column_names else ds.column_names[0]
            return _rows(ds, column or default, f"dataset {name} has no column {{col!r}} (columns: {{cols}})")
        raise AttnconvError(f"{spec}: no such file or folder, and not a dataset spec name[:config][:split][:column]")

    def __iter__(self):
        return self._pieces()


def _load_dataset(what: str, *args, **kwargs):
    try:
        from datasets import load_dataset

        return load_dataset(*args, **kwargs)
    except Exception as e:  # offline hub, a malformed file, ...: one line, not datasets' traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AttnconvError(f"{what} could not be loaded ({first})") from None


def _rows(ds, col: str, missing: str):
    if col not in ds.column_names:
        raise AttnconvError(missing.format(col=col, cols=", ".join(ds.column_names)))

    def pieces():
        for batch in ds.iter(batch_size=1024):  # a batch at a time out of the memory-mapped Arrow table
            for t in batch[col]:
                if isinstance(t, str) and t:
                    yield t, True

    return pieces


_PIECE_CUT = re.compile(r"(?<=\S)\n(?=\S)")  # a lone line break between words


def _text_file_pieces(path: Path):
    """(text, ends_document) pieces of one text file; the whole file at once when it is small."""
    try:
        yield from _decoded_pieces(path)
    except UnicodeDecodeError as e:
        raise AttnconvError(f"{path} is not UTF-8 text ({e.reason}); convert it to UTF-8 "
                            "or point --data at another file") from None


def _decoded_pieces(path: Path):
    if path.stat().st_size <= BIG_TEXT_FILE:
        text = path.read_text(encoding="utf-8")
        if text:
            yield text, True
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending = ""
    with open(path, "rb") as f:
        while block := f.read(PIECE_BYTES):
            pending += decoder.decode(block)
            cut = max((m.end() for m in _PIECE_CUT.finditer(pending, len(pending) // 2)), default=0)
            if cut:
                yield pending[:cut], False
                pending = pending[cut:]
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending, True
