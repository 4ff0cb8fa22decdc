"""Text corpora from a `--data SPEC`: a local file or folder, a `datasets` hub spec, or the shipped default.

SPEC forms:
  path/to/file.txt | .jsonl | .json | .parquet | .csv   a local file (column `text` unless `::column`)
  path/to/folder                                         every such file in it, in name order
  name[:config][:split][:column]                         a hub dataset through `datasets` (online users)
  wikitext-2-test                                        the WikiText-2 raw test split shipped with attnconv
  tinyshakespeare[:train|:test]                          Tiny Shakespeare shipped with attnconv (90/10 split)
"""

from __future__ import annotations

from pathlib import Path

from attnconv.errors import AttnconvError

DATA_DIR = Path(__file__).resolve().parent / "data"
WIKITEXT2_TEST = DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"
TINYSHAKESPEARE = DATA_DIR / "tinyshakespeare" / "input.txt"
DEFAULT_SPEC = "wikitext-2-test"
_FILE_BUILDERS = {".txt": "text", ".raw": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
                  ".csv": "csv"}


def tinyshakespeare_split(split: str = "train") -> str:
    """The first 90% of Tiny Shakespeare (train) or the last 10% (test), cut at a line boundary."""
    text = TINYSHAKESPEARE.read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
    if split == "train":
        return text[:cut]
    if split in ("test", "validation", "eval"):
        return text[cut:]
    raise AttnconvError(f"tinyshakespeare has splits train and test, not {split!r}")


def _load_files(files: list[Path], column: str | None) -> list[str]:
    suffixes = {f.suffix for f in files}
    if len(suffixes) != 1:
        raise AttnconvError(f"mixed file types {sorted(suffixes)}; put one kind of file in the folder")
    suffix = suffixes.pop()
    if _FILE_BUILDERS[suffix] == "text":
        # Whole files, byte-exact: word/byte counts must be those of the original text.
        return [f.read_text(encoding="utf-8") for f in files]
    from datasets import load_dataset

    ds = load_dataset(_FILE_BUILDERS[suffix], data_files=[str(f) for f in files], split="train")
    col = column or "text"
    if col not in ds.column_names:
        raise AttnconvError(f"{files[0]} has no column {col!r} (columns: {', '.join(ds.column_names)}); "
                            "name one with PATH::COLUMN")
    return [t for t in ds[col] if isinstance(t, str)]


def load_texts(spec: str | None = None) -> list[str]:
    """Documents (strings) from SPEC; raises AttnconvError when there is nothing to read."""
    spec = spec or DEFAULT_SPEC
    column = None
    if spec == DEFAULT_SPEC:
        texts = [WIKITEXT2_TEST.read_text(encoding="utf-8")]
    elif spec.split(":")[0] == "tinyshakespeare":
        texts = [tinyshakespeare_split(spec.split(":")[1] if ":" in spec else "train")]
    else:
        path_part, _, column = spec.partition("::")
        path = Path(path_part).expanduser()
        if path.is_file():
            if path.suffix not in _FILE_BUILDERS:
                raise AttnconvError(f"{path}: unsupported file type; use {', '.join(_FILE_BUILDERS)}")
            texts = _load_files([path], column or None)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _FILE_BUILDERS)
            if not files:
                raise AttnconvError(f"{path} holds no {'/'.join(_FILE_BUILDERS)} files")
            texts = _load_files(files, column or None)
        elif "/" in spec and not spec.startswith((".", "/", "~")) or ":" in spec:
            texts = _load_hub(spec)
        else:
            raise AttnconvError(f"{spec}: no such file or folder, and not a dataset spec "
                                "name[:config][:split][:column]")
    texts = [t for t in texts if t]
    if not texts or not any(t.strip() for t in texts):
        raise AttnconvError(f"{spec}: the data is empty; point --data at a file or dataset with text")
    return texts


def _load_hub(spec: str) -> list[str]:
    parts = spec.split(":")
    name, config, split, column = (parts + [None] * 4)[:4]
    try:
        from datasets import load_dataset

        ds = load_dataset(name, config or None, split=split or "test")
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AttnconvError(f"dataset {spec!r} could not be loaded ({first})") from None
    col = column or ("text" if "text" in ds.column_names else ds.column_names[0])
    if col not in ds.column_names:
        raise AttnconvError(f"dataset {name} has no column {col!r} (columns: {', '.join(ds.column_names)})")
    return [t for t in ds[col] if isinstance(t, str)]
