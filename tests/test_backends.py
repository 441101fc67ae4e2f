"""backends.py: detection of optional packages, impl selection, UNIMRG_FAST_IMPL."""
import logging

import pytest
import torch

import unimrg_fast as uf
from unimrg_fast import backends
from stand_ins import absent, fake_module


@pytest.fixture(autouse=True)
def fresh_probes(monkeypatch):
    monkeypatch.delenv(backends.ENV_IMPL, raising=False)
    backends.refresh()
    table = list(backends._TABLE)  # tests register stand-ins; put the real table back
    yield
    backends._TABLE[:] = table
    backends.refresh()


# ------------------------------------------------------------------ detection
def test_flash_attn_detected_with_a_stand_in(monkeypatch):
    fake_module(monkeypatch, "flash_attn", __version__="2.7.4", flash_attn_varlen_func=None)
    probe = backends.flash_attn()
    assert probe.available and probe.version == "2.7.4"


def test_flash_attn_missing_says_how_to_install(monkeypatch):
    absent(monkeypatch, "flash_attn")
    probe = backends.flash_attn()
    assert not probe.available
    assert "unimrg-fast[flash]" in probe.detail


def test_broken_install_is_reported_not_raised(monkeypatch):
    def failing_import(name, *args, **kwargs):
        if name == "xformers.ops":
            raise OSError("undefined symbol: _ZN3c10...")
        return real_import(name, *args, **kwargs)

    real_import = backends.importlib.import_module
    monkeypatch.setattr(backends.importlib, "import_module", failing_import)
    probe = backends.xformers()
    assert not probe.available and "failed to import" in probe.detail and "undefined symbol" in probe.detail


def test_xformers_detected_with_a_stand_in(monkeypatch):
    fake_module(monkeypatch, "xformers", __version__="0.0.29")
    fake_module(monkeypatch, "xformers.ops", memory_efficient_attention=None)
    assert backends.xformers().available


def test_pypi_apex_is_not_nvidia_apex(monkeypatch):
    # The unrelated PyPI project "apex" imports fine but has no apex.normalization.
    fake_module(monkeypatch, "apex", __version__="0.9.10dev")
    absent(monkeypatch, "apex.normalization")
    probe = backends.apex()
    assert not probe.available and "not NVIDIA apex" in probe.detail


def test_nvidia_apex_detected(monkeypatch):
    fake_module(monkeypatch, "apex")
    fake_module(monkeypatch, "apex.normalization", FusedRMSNorm=None)
    assert backends.apex().available


def test_triton_mode_follows_the_interpreter_flag(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU lane check: with CUDA Triton runs natively")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backends.refresh()
    assert backends.triton().detail == "interpreter"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backends.refresh()
    probe = backends.triton()
    assert not probe.available and "TRITON_INTERPRET=1" in probe.detail


@pytest.mark.parametrize("triton_version, numpy_version, conflict", [
    ("3.6.0", "2.4.6", True),      # the pair that fails inside the interpreter
    ("3.5.1+git9f2a", "2.4.0", True),
    ("3.6.0", "2.3.5", False),     # older numpy: int() of a 1-element array still works
    ("3.7.1", "2.4.6", False),     # 3.7's interpreter squeezes the array first
    ("3.9.0", "3.0.0", False),
    (None, "2.4.6", False),        # no triton version known: nothing to say
])
def test_interpreter_numpy_conflict(triton_version, numpy_version, conflict):
    reason = backends.interpreter_numpy_conflict(triton_version, numpy_version)
    assert (reason is not None) == conflict
    if conflict:
        assert "numpy<2.4" in reason and triton_version in reason


def test_old_triton_interpreter_under_new_numpy_is_unavailable_with_the_fix(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CPU lane check: with CUDA Triton runs natively")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fake_module(monkeypatch, "triton", __version__="3.6.0")
    monkeypatch.setattr(backends, "_numpy_version", lambda: "2.4.6")
    backends.refresh()
    probe = backends.triton()
    assert not probe.available and "numpy<2.4" in probe.detail
    with pytest.raises(RuntimeError, match=r"numpy<2\.4"):
        backends.resolve("linear_cross_entropy", "triton", device=torch.device("cpu"))
    # "auto" never picks the interpreter on CPU anyway; it still resolves.
    assert backends.resolve("linear_cross_entropy", "auto", device=torch.device("cpu"))[0] == "reference"


def test_cuda_probe_matches_torch():
    assert backends.cuda().available == torch.cuda.is_available()
    assert (backends.cuda_capability() is None) == (not torch.cuda.is_available())


def test_describe_lists_every_probe():
    found = backends.describe()
    assert set(found) >= {"cuda", "triton", "flash_attn", "xformers", "apex"}
    assert all(isinstance(p, backends.Probe) for p in found.values())


# ------------------------------------------------------------------ selection
def test_auto_on_cpu_resolves_to_the_reference():
    name, fn = backends.resolve("linear_cross_entropy", "auto", device=torch.device("cpu"))
    assert name == "reference"
    from unimrg_fast.reference import linear_cross_entropy

    assert fn is linear_cross_entropy


def test_auto_logs_its_choice_once(caplog):
    with caplog.at_level(logging.INFO, logger="unimrg_fast"):
        for _ in range(3):
            backends.resolve("regression_loss", "auto", device=torch.device("cpu"))
    choices = [r for r in caplog.records if "regression_loss uses impl='reference'" in r.getMessage()]
    assert len(choices) == 1


def test_unknown_impl_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of auto, .*reference"):
        backends.resolve("packed_attention", "cudnn", device=torch.device("cpu"))


def test_unknown_op():
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        backends.resolve("softmax")


def test_impl_must_be_a_string():
    with pytest.raises(TypeError, match="impl must be a string"):
        backends.resolve("joint_loss", None)


def test_missing_backend_raises_with_install_hint(monkeypatch):
    absent(monkeypatch, "flash_attn")
    backends.register(backends.Implementation(
        "packed_attention", "flash", "unimrg_fast.reference:packed_attention", ("flash_attn",)))
    try:
        with pytest.raises(RuntimeError, match=r"impl='flash'.*pip install 'unimrg-fast\[flash\]'"):
            backends.resolve("packed_attention", "flash", device=torch.device("cpu"))
        # ... while "auto" falls back quietly.
        name, _ = backends.resolve("packed_attention", "auto", device=torch.device("cpu"))
        assert name == "reference"
    finally:
        backends._TABLE[:] = [i for i in backends._TABLE if i.name != "flash"]


def test_accepts_predicate_steers_auto_and_rejects_explicit(monkeypatch):
    fake_module(monkeypatch, "flash_attn", __version__="2.7.4")
    only_causal = lambda device=None, layout=None, **_: None if layout == "causal" else "mask too rich"
    backends.register(backends.Implementation(
        "packed_attention", "flash", "unimrg_fast.reference:packed_attention", ("flash_attn",),
        accepts=only_causal), before="reference")
    try:
        cpu = torch.device("cpu")
        assert backends.resolve("packed_attention", "auto", device=cpu, layout="causal")[0] == "flash"
        assert backends.resolve("packed_attention", "auto", device=cpu, layout="mixed")[0] == "reference"
        with pytest.raises(ValueError, match="mask too rich"):
            backends.resolve("packed_attention", "flash", device=cpu, layout="mixed")
    finally:
        backends._TABLE[:] = [i for i in backends._TABLE if i.name != "flash"]


@pytest.mark.parametrize("op", ["linear_cross_entropy", "regression_loss", "joint_loss",
                                "packed_attention"])
def test_planned_triton_impl_is_a_clear_not_implemented(op):
    impl = next(i for i in backends.implementations(op) if i.name == "triton")
    if impl.planned is None:
        pytest.skip(f"{op}'s Triton kernel has landed")
    with pytest.raises(NotImplementedError, match=r"not implemented yet \(issue #\d\).*impl='reference'"):
        backends.resolve(op, "triton", device=torch.device("cpu"))


def test_env_forces_one_impl_for_every_op(monkeypatch):
    monkeypatch.setenv(backends.ENV_IMPL, "reference")
    for op in ("linear_cross_entropy", "packed_attention"):
        assert backends.resolve(op, "auto", device=torch.device("cpu"))[0] == "reference"


def test_env_per_op_and_unknown_name(monkeypatch):
    monkeypatch.setenv(backends.ENV_IMPL, "linear_cross_entropy=nope")
    with pytest.raises(ValueError, match="UNIMRG_FAST_IMPL='nope'"):
        backends.resolve("linear_cross_entropy", "auto", device=torch.device("cpu"))
    # Other ops are untouched by a per-op setting.
    assert backends.resolve("regression_loss", "auto", device=torch.device("cpu"))[0] == "reference"


def test_env_global_name_an_op_lacks_leaves_it_on_auto(monkeypatch):
    monkeypatch.setenv(backends.ENV_IMPL, "flash")
    assert backends.resolve("joint_loss", "auto", device=torch.device("cpu"))[0] == "reference"


def test_explicit_impl_wins_over_env(monkeypatch):
    monkeypatch.setenv(backends.ENV_IMPL, "linear_cross_entropy=nope")
    assert backends.resolve("linear_cross_entropy", "reference")[0] == "reference"


def test_public_ops_dispatch_through_backends(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return torch.zeros(())

    fake_module(monkeypatch, "spy_impl", regression_loss=spy)
    backends.register(backends.Implementation("regression_loss", "spy", "spy_impl:regression_loss"),
                      before="reference")
    try:
        h, w, t = torch.randn(3, 4), torch.randn(2, 4), torch.randn(3, 2)
        uf.regression_loss(h, w, t, reduction="sum", impl="spy")
        assert calls == [{"bias": None, "token_weight": None, "reduction": "sum"}]
    finally:
        backends._TABLE[:] = [i for i in backends._TABLE if i.name != "spy"]


def test_cli_prints_a_report(capsys):
    backends._main()
    out = capsys.readouterr().out
    assert "flash_attn" in out and "packed_attention:" in out


def _op_calls():
    """One small call of each public op but packed_attention (whose layout's tile
    metadata is host work, computed by an eager call first)."""
    h, w = torch.randn(9, 16), torch.randn(21, 16)
    t = torch.randint(0, 21, (9,))
    wr, tr = torch.randn(3, 16), torch.randn(9, 3)
    x, cos, sin = torch.randn(1, 2, 5, 8), torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    return {
        "linear_cross_entropy": lambda impl: uf.linear_cross_entropy(h, w, t, impl=impl),
        "regression_loss": lambda impl: uf.regression_loss(h, wr, tr, impl=impl),
        "rms_norm": lambda impl: uf.rms_norm(h, torch.ones(16), impl=impl),
        "swiglu": lambda impl: uf.swiglu(h, h, impl=impl),
        "rotary_embedding": lambda impl: uf.rotary_embedding(x, cos, sin, impl=impl),
    }


@pytest.mark.parametrize("impl", ["auto", "reference", "triton"])
@pytest.mark.parametrize("op", list(_op_calls()))
def test_public_op_traces_fullgraph_before_any_eager_call(op, impl, seed):
    """Dispatch must not graph-break, even when the compiled call is the process's first
    (the fixture forgot every probe and loaded function): a trainer compiles its whole
    step, and a warm-up eager call is easy to forget."""
    call = _op_calls()[op]
    torch._dynamo.reset()
    got = torch.compile(lambda: call(impl), fullgraph=True, backend="eager")()
    assert torch.equal(got, call(impl))


def test_refresh_retires_graphs_compiled_before_it(monkeypatch):
    """A graph traced while the probe cache was empty holds the probes' outcomes as
    constants; after refresh() (a package gone) neither it nor the eager path may use
    the old outcome."""
    import sys
    import types

    spy = types.ModuleType("spy_swiglu")
    spy.swiglu = lambda gate, up, **_: torch.full_like(gate, 42.0)
    monkeypatch.setitem(sys.modules, "spy_swiglu", spy)
    fake_module(monkeypatch, "flash_attn", __version__="9")
    backends.register(backends.Implementation("swiglu", "spy", "spy_swiglu:swiglu",
                                              ("flash_attn",)), before="triton")
    backends.refresh()
    h = torch.randn(4, 8)
    torch._dynamo.reset()
    compiled = torch.compile(lambda h: uf.swiglu(h, h), fullgraph=True, backend="eager")
    assert (compiled(h) == 42).all() and (compiled(h) == 42).all()
    absent(monkeypatch, "flash_attn")
    backends.refresh()
    want = torch.nn.functional.silu(h) * h
    assert torch.allclose(compiled(h), want)   # first after the refresh: the caches are empty
    assert not backends.flash_attn().available
    assert torch.allclose(uf.swiglu(h, h), want)


def _calls_of_one_input():
    """Each public op as a function of one differentiable input (then the impl)."""
    from unimrg_fast.specs import CEHeadSpec, RegressionHeadSpec

    w, t = torch.randn(21, 16), torch.randint(0, 21, (9,))
    wr, tr = torch.randn(3, 16), torch.randn(9, 3)
    cos, sin, up = torch.randn(1, 5, 8), torch.randn(1, 5, 8), torch.randn(9, 16)
    heads = [CEHeadSpec(weight=w, rows=torch.arange(4), target=t[:4], task=0),
             RegressionHeadSpec(weight=wr, rows=torch.arange(4, 9), target=tr[4:], task=1)]
    layout = uf.PackedLayout.from_spans([[(3, "full"), (4, "causal")], [(2, "causal")]])
    k = torch.randn(9, 1, 8)
    return {
        "linear_cross_entropy": (torch.randn(9, 16),
                                 lambda h, impl: uf.linear_cross_entropy(h, w, t, impl=impl)),
        "regression_loss": (torch.randn(9, 16),
                            lambda h, impl: uf.regression_loss(h, wr, tr, impl=impl)),
        "joint_loss": (torch.randn(9, 16),
                       lambda h, impl: uf.joint_loss(h, heads, 2, impl=impl).total),
        "packed_attention": (torch.randn(9, 2, 8),
                             lambda q, impl: uf.packed_attention(q, k, k, layout, impl=impl)),
        "rms_norm": (torch.randn(9, 16), lambda h, impl: uf.rms_norm(h, w[0], impl=impl)),
        "swiglu": (torch.randn(9, 16), lambda h, impl: uf.swiglu(h, up, impl=impl)),
        "rotary_embedding": (torch.randn(1, 2, 5, 8),
                             lambda x, impl: uf.rotary_embedding(x, cos, sin, impl=impl)),
    }


@pytest.mark.parametrize("op", list(_calls_of_one_input()))
def test_forward_mode_derivatives_never_reach_a_kernel(monkeypatch, op):
    """A kernel's autograd knows the backward pass alone: under torch.func.jvp its
    tangent came back zero, silently (MeanFlow-style training differentiates forward).
    Auto takes the reference then, and an explicit kernel is refused, also for a tensor
    carrying a forward-mode tangent (torch.autograd.forward_ad)."""
    import dataclasses

    # auto as on a GPU: the kernel preferred although the interpreter runs it here
    monkeypatch.setattr(backends, "_TABLE", [dataclasses.replace(i, prefer=None)
                                             for i in backends._TABLE])
    x, call = _calls_of_one_input()[op]
    assert backends.resolve(op, "auto", device=x.device)[0] == "triton"
    tangent = torch.randn_like(x)
    _, want = torch.func.jvp(lambda x: call(x, "reference"), (x,), (tangent,))
    assert want.abs().max() > 0
    _, got = torch.func.jvp(lambda x: call(x, "auto"), (x,), (tangent,))
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=rf"{op}\(impl='triton'\).*torch.func derivative transform"):
        torch.func.jvp(lambda x: call(x, "triton"), (x,), (tangent,))
    forward_ad = torch.autograd.forward_ad
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, tangent)
        torch.testing.assert_close(forward_ad.unpack_dual(call(dual, "auto")).tangent, want)
        with pytest.raises(ValueError, match="forward-mode tangent"):
            call(dual, "triton")
        call(x, "triton")   # a call without a tangent still runs the kernel


def test_a_tangent_on_a_regression_target_or_under_vmap(monkeypatch):
    """joint_loss looks at its heads' targets too (a regression target can carry a
    tangent); vmap alone is no derivative transform: an explicit kernel still runs there."""
    import dataclasses

    from unimrg_fast.specs import RegressionHeadSpec

    monkeypatch.setattr(backends, "_TABLE", [dataclasses.replace(i, prefer=None)
                                             for i in backends._TABLE])
    hidden, weight, target = torch.randn(6, 16), torch.randn(3, 16), torch.randn(6, 3)
    forward_ad = torch.autograd.forward_ad

    def loss(target, impl):
        head = RegressionHeadSpec(weight=weight, rows=torch.arange(6), target=target, task=0)
        return uf.joint_loss(hidden, [head], 1, impl=impl).total

    with forward_ad.dual_level():
        dual = forward_ad.make_dual(target, torch.ones_like(target))
        want = forward_ad.unpack_dual(loss(dual, "reference")).tangent
        assert want is not None and want.abs() > 0
        torch.testing.assert_close(forward_ad.unpack_dual(loss(dual, "auto")).tangent, want)
        with pytest.raises(ValueError, match="forward-mode tangent"):
            loss(dual, "triton")
    x = torch.randn(3, 2, 16)
    got = torch.func.vmap(lambda r: uf.rms_norm(r, weight[0], impl="triton"))(x)
    torch.testing.assert_close(got, uf.rms_norm(x, weight[0], impl="reference"))
