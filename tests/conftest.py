"""Test lanes.

CPU lane: with no CUDA device, Triton kernels run on the interpreter. TRITON_INTERPRET
must be set before any module defines a @triton.jit kernel, which is why this happens
here, at conftest import, before a test module imports unimrg_fast.
GPU lane: tests marked `gpu` run only where CUDA is present; elsewhere they are skipped
with the reason.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    if HAS_CUDA:
        return ("lanes: CUDA visible, Triton compiles for the GPU; the CPU lane is checked on "
                "the interpreter (CUDA_VISIBLE_DEVICES= pytest tests -m 'not gpu')")
    return "lanes: no CUDA device, Triton on the interpreter; gpu tests skip"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="GPU lane: needs a CUDA device (none visible to torch)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def seed(request):
    """A fresh seed per test (DESIGN.md 4: fresh random inputs), shown when a test fails.

    UNIMRG_TEST_SEED=<int> replays a failure.
    """
    value = int(os.environ.get("UNIMRG_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    request.node.user_properties.append(("seed", value))
    torch.manual_seed(value)
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for key, value in item.user_properties:
            if key == "seed":
                report.sections.append(("seed", f"replay with UNIMRG_TEST_SEED={value}"))
