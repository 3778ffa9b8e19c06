"""Tiny random models and tokenizers built in the test process: no downloads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Never touch the user's cache or the network from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MAMBALLAMA_CACHE", str(tmp_path_factory.mktemp("mlcache")))


def pytest_collection_modifyitems(config, items):
    import torch

    has_cuda = torch.cuda.is_available()
    n_gpu = torch.cuda.device_count() if has_cuda else 0
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "multigpu" in item.keywords and n_gpu < 2:
            item.add_marker(pytest.mark.skip(reason="needs two or more CUDA devices"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and spinning threads crawl on a shared machine
    (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny teacher and the hybrid converted from it (layers 0 and 2 Mamba), both saved with tokenizers."""
    import torch
    from helpers import save_teacher, tiny_llama, tiny_tokenizer

    from mamballama_cli.convert.converter import convert_model

    root = tmp_path_factory.mktemp("models")
    teacher = tiny_llama(seed=0, n_heads=4, n_kv=2)
    tdir = save_teacher(root / "teacher", model=teacher)
    hybrid, _ = convert_model(teacher, [1, 3], dtype=torch.float32, seed=0,
                              teacher_info={"name_or_path": str(tdir), "kind": "dir"})
    hybrid.save_pretrained(root / "hybrid")
    tiny_tokenizer().save_pretrained(root / "hybrid")
    return {"teacher": tdir, "hybrid": root / "hybrid", "root": root}


# MAMBALLAMA_GPU_TIMES=FILE: one JSON line per test saying where its time went (tests/gpu_times.py); set by
# benchmarks/gpu_session.sh for the gpu suite's parts. Installed here, before any test imports the ops modules.
_GPU_TIMES = os.environ.get("MAMBALLAMA_GPU_TIMES")
if _GPU_TIMES:
    import gpu_times

    gpu_times.install()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        import time

        gpu_times.LEDGER.reset()
        start = time.perf_counter()
        yield
        gpu_times.write(_GPU_TIMES, gpu_times.LEDGER.record(item.nodeid, time.perf_counter() - start,
                                                            gpu_times.worker_id()))
