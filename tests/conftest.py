"""Shared test helpers: run the CLI in-process and capture its exit code and output."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch


@pytest.fixture
def cli(capsys):
    """cli(*args) -> (exit_code, stdout, stderr) of `attnconv ARGS`, run in this process."""
    from attnconv.cli import main

    def run(*args):
        capsys.readouterr()
        old = sys.argv
        sys.argv = ["attnconv", *map(str, args)]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.argv = old
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_for_the_session():
    """Every test on one intra-op thread: the tiny models gain nothing from a second one, and on shared cores its
    spin-waits made tests up to 10x slower (measured: test_mla_deepseek's reference-model KL, 139 -> 12 CPU s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def harness_task_names_of_this_run(tmp_path_factory):
    """lm-evaluation-harness's task names (attnconv/eval/task_names.py) cached in this run's temp folder, never
    read from the user's cache: built at most once per run, by one xdist worker while the others wait on its lock."""
    from attnconv.eval import task_names

    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "lm-eval-tasks"
    patch = pytest.MonkeyPatch()
    patch.setattr(task_names, "cache_folder", lambda: folder)
    yield folder
    patch.undo()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: on shared, oversubscribed cores two OpenMP threads run ~10x slower (measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A tiny Llama converted to GQA-2 (with its provenance), for the push tests."""
    from attnconv.convert.api import convert
    from attnconv.convert.settings import ConvertSettings
    from attnconv.testing import build_tiny_model

    root = tmp_path_factory.mktemp("converted")
    build_tiny_model("llama", root / "src", n_heads=4, n_kv_heads=4)
    convert(ConvertSettings(root / "src", root / "gqa", kv_heads=2), progress=False)
    return root / "gqa"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The local hub double (tests/hub_double.py) with huggingface_hub pointed at it: endpoint, token, Xet off (the
    double speaks LFS), the client's registry cache in tmp_path (not the user's HF_HOME), and every outgoing
    connection checked to go to 127.0.0.1."""
    import socket

    from hub_double import TOKEN, HubDouble
    from huggingface_hub import constants

    elsewhere = []
    real_connect = socket.socket.connect

    def loopback_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] != "127.0.0.1":
            elsewhere.append(address)
            raise ConnectionRefusedError(f"test traffic must stay on 127.0.0.1, not {address}")
        return real_connect(sock, address)

    with HubDouble(TOKEN) as double:
        monkeypatch.setattr(constants, "ENDPOINT", double.url)  # HfApi() reads it when constructed
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(socket.socket, "connect", loopback_only)
        yield double
    assert not elsewhere, elsewhere
    assert not double.state.unhandled, double.state.unhandled  # the client made no call the double ignores


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama with the GPT-2 tokenizer and a short text beside it, one per test module (the safety tests'
    common input; modules with another `tiny` define their own)."""
    from attnconv.testing import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    model = build_tiny_model("llama", root / "m", with_tokenizer=True, hidden=32, n_heads=4, max_positions=64)
    (root / "text.txt").write_text("To be, or not to be, that is the question. " * 40)
    return root, model


@pytest.fixture(scope="session")
def reference_tokens():
    """The reference model's first 4096 tokens of Tiny Shakespeare's train and test splits, [4096] each: from the
    first 30,000 characters of each (the same ids as from the whole split; tokenising the whole train split took
    ~1.2 s of every module that used these)."""
    from attnconv.eval.perplexity import tokenize_corpus
    from attnconv.loading import load_tokenizer
    from attnconv.reference import REFERENCE_DIR
    from attnconv.textdata import tinyshakespeare_split

    tok = load_tokenizer(REFERENCE_DIR)
    return tuple(tokenize_corpus(tok, [tinyshakespeare_split(split)[:30_000]])[:4096] for split in ("train", "test"))
