"""The fused Triton linear cross-entropy against float64 math and the reference.

CPU lane: the kernels run on the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are tiny and odd (not multiples of the 16-wide tiles
the interpreter config uses). GPU lane (`-m gpu`): realistic shapes in fp16 / bf16,
held to the FlashAttention rule (fused error to fp64 <= 2x the same-dtype reference's
error + a floor), no host synchronisation, and the memory bound.
"""
from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch

import unimrg_fast as uf
from unimrg_fast import backends

lce = importlib.import_module("unimrg_fast.ops.linear_cross_entropy")

try:
    from unimrg_fast.reference.cross_entropy import linear_cross_entropy as ref_lce
    REF_MISSING = None
except ImportError as exc:  # written concurrently by another issue
    ref_lce = None
    REF_MISSING = f"unimrg_fast.reference.cross_entropy is not importable yet: {exc}"

ON_CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_CUDA else "cpu")
needs_triton = pytest.mark.skipif(not backends.triton().available,
                                  reason=f"Triton cannot run here: {backends.triton().detail}")
pytestmark = needs_triton

# relative-error budgets to fp64 (DESIGN.md section 4)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


# ------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the kernels must fill starts as NaN (floats) or a sentinel (ints)."""

    def poisoned(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -123456
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(lce, "_empty", poisoned)


def _where(diff: torch.Tensor) -> str:
    flat = int(diff.reshape(-1).argmax())
    idx = []
    for size in reversed(diff.shape):
        idx.append(flat % size)
        flat //= size
    return str(tuple(reversed(idx)))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    den = want.norm().item()
    num = (got - want).norm().item()
    return num / den if den > 0 else num


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> float:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got64, want64 = got.detach().double().cpu(), want.detach().double().cpu()
    bad = ~torch.isfinite(got64) & torch.isfinite(want64)
    assert not bad.any(), (f"{name}: {int(bad.sum())} non-finite values where fp64 is finite, "
                           f"first at {_where(bad.to(torch.int8))}")
    err = rel_err(got64, want64)
    if not err <= tol:
        diff = (got64 - want64).abs()
        at = _where(diff) if diff.dim() else "()"
        g = got64.reshape(-1)[diff.reshape(-1).argmax()].item()
        w = want64.reshape(-1)[diff.reshape(-1).argmax()].item()
        raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e}; largest difference "
                             f"at {at}: got {g:.6g}, want {w:.6g}")
    return err


def f64_loss(hidden, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
             label_smoothing=0.0, z_loss=0.0, softcap=None, token_weight=None):
    """DESIGN.md 3.1 written out in float64: explicit logsumexp, no F.cross_entropy."""
    h = hidden.reshape(-1, hidden.shape[-1]).double()
    z = h @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    y = target.reshape(-1)
    valid = y != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    z_y = z.gather(1, torch.where(valid, y, 0)[:, None])[:, 0]
    e = label_smoothing
    per_row = (1 - e) * (lse - z_y) + e * (lse - z.mean(-1)) + z_loss * lse * lse
    w = torch.ones_like(lse) if token_weight is None else token_weight.reshape(-1).double()
    zero = torch.zeros((), dtype=torch.float64, device=lse.device)
    weighted = torch.where(valid, w * per_row, zero)
    if reduction == "none":
        return weighted
    if reduction == "sum":
        return weighted.sum()
    den = torch.where(valid, w, zero).sum()
    return torch.where(den > 0, weighted.sum() / torch.where(den > 0, den, 1.0), zero)


def make_inputs(n, h, v, dtype, *, lead=None, bias=False, ignore_frac=0.3, token_weight=False,
                scale=1.0, device=DEV, ignore_index=-100):
    # h ** -0.25 on both factors: logits of standard deviation ~scale
    hidden = torch.randn(*(lead or (n,)), h, device=device) * math.sqrt(scale) * h ** -0.25
    weight = torch.randn(v, h, device=device) * math.sqrt(scale) * h ** -0.25
    target = torch.randint(0, v, tuple(lead or (n,)), device=device)
    ignored = torch.rand(target.shape, device=device) < ignore_frac
    target = torch.where(ignored, torch.full_like(target, ignore_index), target)
    inputs = dict(hidden=hidden.to(dtype), weight=weight.to(dtype), target=target)
    if bias:
        inputs["bias"] = (torch.randn(v, device=device) * 0.5).to(dtype)
    if token_weight:
        inputs["token_weight"] = torch.rand(target.shape, device=device) + 0.25
    return inputs


def run(fn, inputs, grad_names, **options):
    """Loss and gradients of fn; the upstream gradient is random (and per-row for "none")."""
    leaves = {k: (t.detach().clone().requires_grad_(k in grad_names) if t.is_floating_point()
                  else t) for k, t in inputs.items()}
    out = fn(leaves["hidden"], leaves["weight"], leaves["target"],
             **{k: leaves[k] for k in ("bias", "token_weight") if k in leaves}, **options)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    g_out = (torch.rand(out.shape, generator=gen) + 0.5).to(out.device, out.dtype)
    (out * g_out).sum().backward()
    return out.detach(), {k: leaves[k].grad for k in grad_names}


def fused(hidden, weight, target, **kw):
    return uf.linear_cross_entropy(hidden, weight, target, impl="triton", **kw)


# ---------------------------------------------------------------------- CPU lane
CASES = {
    # name: (n, h, v, dtype, make_inputs kwargs, loss options)
    "fp32-mean-bias": (37, 45, 83, torch.float32, dict(bias=True), dict()),
    "fp32-sum-all-options": (29, 33, 71, torch.float32, dict(bias=True, token_weight=True),
                             dict(reduction="sum", label_smoothing=0.1, z_loss=1e-3, softcap=3.0)),
    "fp32-none-smooth-leading-dims": (None, 20, 50, torch.float32, dict(lead=(3, 7)),
                                      dict(reduction="none", label_smoothing=0.25, ignore_index=-1)),
    "fp32-N1-V-below-block": (1, 17, 9, torch.float32, dict(bias=True, ignore_frac=0.0),
                              dict(z_loss=0.01)),
    # p = 1 exactly: a z-loss folded into p's factor cancelled against the one-hot's 1
    "fp32-one-class-zloss": (13, 17, 1, torch.float32, dict(bias=True, ignore_frac=0.2),
                             dict(reduction="sum", z_loss=1e-3)),
    # a cap far above the logits: tanh's 1 - exp(-2x) cancelled, c * 2^-24 off each logit
    "fp32-softcap-far-above-logits": (48, 32, 200, torch.float32, dict(),
                                      dict(reduction="sum", softcap=1e4)),
    # small logits under Gemma's cap of 30: each was 30 * 2^-24 off, ~1e-4 of its size
    "fp32-one-class-softcap-30": (13, 17, 1, torch.float32, dict(ignore_frac=0.2, scale=1e-3),
                                  dict(reduction="sum", softcap=30.0, z_loss=1e-3)),
    "fp16-mean-weights-softcap": (40, 48, 100, torch.float16, dict(token_weight=True, bias=True),
                                  dict(softcap=2.0, label_smoothing=0.05)),
    "bf16-none-zloss": (23, 32, 61, torch.bfloat16, dict(), dict(reduction="none", z_loss=1e-2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_fp64_and_reference(case, seed):
    n, h, v, dtype, make_kw, options = CASES[case]
    if "ignore_index" in options:
        make_kw = dict(make_kw, ignore_index=options["ignore_index"])
    inputs = make_inputs(n, h, v, dtype, **make_kw)
    grads = ["hidden", "weight"] + [k for k in ("bias", "token_weight") if k in inputs]
    out, got = run(fused, inputs, grads, **options)
    out64, want = run(f64_loss, {k: (t.double() if t.is_floating_point() else t)
                                 for k, t in inputs.items()}, grads, **options)
    assert out.dtype == torch.float32
    for name in grads:
        assert got[name].dtype == inputs[name].dtype, f"d{name} must keep {inputs[name].dtype}"
    ignored = (inputs["target"] == options.get("ignore_index", -100)).reshape(-1)
    assert (got["hidden"].reshape(-1, h)[ignored] == 0).all(), "ignored rows got a gradient"
    if options.get("reduction") == "none":
        assert (out[ignored] == 0).all(), "ignored rows must hold exactly 0"

    tol = TOL[dtype]
    errs = {"loss": assert_close(f"[{case}] loss vs fp64", out, out64, tol)}
    for name in grads:
        errs[name] = assert_close(f"[{case}] d{name} vs fp64", got[name], want[name], tol)
    if ref_lce is None:
        pytest.skip(REF_MISSING)
    out_ref, ref = run(ref_lce, inputs, grads, **options)
    floor = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}[dtype]
    for name, a, b, b64 in [("loss", out, out_ref, out64)] + [
            (k, got[k], ref[k], want[k]) for k in grads]:
        assert_close(f"[{case}] d{name} vs reference", a, b, 2 * tol)
        ref_err = rel_err(b, b64)
        assert errs[name] <= 2 * ref_err + floor, (
            f"[{case}] {name}: fused error to fp64 {errs[name]:.3e} > 2 x reference error "
            f"{ref_err:.3e} + {floor:.0e}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_is_zero_with_zero_grads(reduction, seed):
    inputs = make_inputs(19, 24, 40, torch.float32, bias=True, token_weight=True, ignore_frac=1.1)
    grads = ["hidden", "weight", "bias", "token_weight"]
    out, got = run(fused, inputs, grads, reduction=reduction, z_loss=1e-3, label_smoothing=0.1)
    assert torch.equal(out, torch.zeros_like(out)), f"loss must be exactly 0, got {out}"
    for name in grads:
        assert torch.equal(got[name], torch.zeros_like(got[name])), f"d{name} must be exactly 0"


def test_ignored_rows_are_never_read(seed):
    # NaN hidden states in ignored rows: any kernel that loads them (into a dot, or
    # into dW = dz^T h where 0 * NaN = NaN) poisons the result.
    inputs = make_inputs(40, 24, 70, torch.float32, bias=True, ignore_frac=0.6)
    ignored = inputs["target"] == -100
    clean = {k: t.clone() for k, t in inputs.items()}
    inputs["hidden"][ignored] = float("nan")
    clean["hidden"][ignored] = 0.0
    out, got = run(fused, inputs, ["hidden", "weight", "bias"], label_smoothing=0.1)
    out64, want = run(f64_loss, {k: t.double() if t.is_floating_point() else t
                                 for k, t in clean.items()}, ["hidden", "weight", "bias"],
                      label_smoothing=0.1)
    assert_close("loss", out, out64, 1e-5)
    for name in ("hidden", "weight", "bias"):
        assert_close(f"d{name}", got[name], want[name], 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_token_weight_on_ignored_rows_stays_out(seed, dtype, bad):
    # A weight of 1 / (labelled tokens) is inf for a sample without labels: the reduction
    # masks the row, but its upstream gradient is 0 * inf = NaN. fp16's backward scales
    # the gradients by their max; taken over every row, that NaN reached all of them.
    inputs = make_inputs(40, 24, 70, dtype, bias=True, token_weight=True, ignore_frac=0.4)
    ignored = inputs["target"] == -100
    assert ignored.any() and not ignored.all()
    clean = {k: t.clone() for k, t in inputs.items()}
    inputs["token_weight"][ignored] = bad
    grads = ["hidden", "weight", "bias"]
    for reduction in ("mean", "sum"):
        out, got = run(fused, inputs, grads, reduction=reduction, z_loss=1e-3)
        out64, want = run(f64_loss, {k: t.double() if t.is_floating_point() else t
                                     for k, t in clean.items()}, grads,
                          reduction=reduction, z_loss=1e-3)
        assert_close(f"{reduction} loss", out, out64, TOL[dtype])
        for name in grads:
            assert_close(f"{reduction} d{name}", got[name], want[name], TOL[dtype])


@pytest.mark.skipif(not backends.triton_interpreted(), reason="counts the interpreter's dots")
def test_ignored_rows_cost_no_logits_work(seed, monkeypatch):
    from triton.runtime import interpreter

    work = []
    create_dot = interpreter.InterpreterBuilder.create_dot

    def counting_dot(self, a, b, *args, **kwargs):
        work.append(a.data.shape[0] * a.data.shape[1] * b.data.shape[1])
        return create_dot(self, a, b, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting_dot)
    n = 64
    block_m = lce._pick_config(torch.float32, True, n).block_m
    inputs = make_inputs(n, 32, 40, torch.float32, bias=True, ignore_frac=0.0)
    run(fused, inputs, ["hidden", "weight", "bias"])
    all_rows = sum(work)
    # 6 labelled rows spread over all four row blocks: sorting them first means one
    # row block of logits work in the forward and in the backward's dz kernel
    target = torch.full_like(inputs["target"], -100)
    keep = torch.tensor([1, 17, 30, 41, 50, 63])
    target[keep] = inputs["target"][keep]
    work.clear()
    out, got = run(fused, dict(inputs, target=target), ["hidden", "weight", "bias"])
    assert all_rows > 0 and sum(work) * (n // block_m) == all_rows, (
        f"matrix work with 6 of {n} rows labelled is {sum(work)}, expected "
        f"{all_rows // (n // block_m)} (1 of {n // block_m} row blocks)")
    out64, want = run(f64_loss, {k: t.double() if t.is_floating_point() else t
                                 for k, t in dict(inputs, target=target).items()},
                      ["hidden", "weight", "bias"])
    assert_close("loss", out, out64, 1e-5)
    assert_close("dweight", got["weight"], want["weight"], 1e-5)


def test_large_logits(seed):
    # |z| ~ 1e4: the online logsumexp must not overflow and must stay exact to fp32
    inputs = make_inputs(21, 16, 37, torch.float32, bias=True, scale=1e4)
    z = inputs["hidden"] @ inputs["weight"].T
    assert z.abs().max() > 3e3, "test setup: logits are not large"
    out, got = run(fused, inputs, ["hidden", "weight", "bias"], reduction="sum", z_loss=1e-4)
    out64, want = run(f64_loss, {k: t.double() if t.is_floating_point() else t
                                 for k, t in inputs.items()}, ["hidden", "weight", "bias"],
                      reduction="sum", z_loss=1e-4)
    assert_close("loss", out, out64, 1e-5)
    for name in ("hidden", "weight", "bias"):
        assert_close(f"d{name}", got[name], want[name], 1e-4)


def test_fp16_small_gradients_do_not_flush_to_zero(seed):
    """A mean over many rows scales dz by ~1/N; here an upstream factor of 1e-6 puts dz
    near 2e-8, below fp16's smallest subnormal, while dhidden = dz @ W (W ~ 100) stays
    a normal fp16 number. A backward that rounds dz to fp16 returns dhidden = 0."""
    inputs = make_inputs(24, 32, 40, torch.float16, ignore_frac=0.2)
    inputs["hidden"] = (inputs["hidden"].float() * 1e-2).half()
    inputs["weight"] = (inputs["weight"].float() * 1e2).half()
    hidden = inputs["hidden"].clone().requires_grad_()
    (fused(hidden, inputs["weight"], inputs["target"], reduction="sum") * 1e-6).backward()
    h64 = inputs["hidden"].double().requires_grad_()
    (f64_loss(h64, inputs["weight"].double(), inputs["target"], reduction="sum") * 1e-6).backward()
    assert h64.grad.abs().max() > 1e-4  # the premise: normal fp16 numbers
    assert_close("dhidden", hidden.grad, h64.grad, 3e-3)


def test_bad_target_poisons_its_row(seed):
    n, v = 20, 30
    inputs = make_inputs(n, 24, v, torch.float32, ignore_frac=0.2)
    target = inputs["target"].clone()
    target[3], target[11] = v + 2, -5  # neither a class nor ignore_index
    target[5] = -100
    with pytest.raises(ValueError, match="target"):  # checked up front where it is free
        fused(inputs["hidden"], inputs["weight"], target)
    # the kernels themselves (what a GPU runs without a host check): NaN, never a guess
    h = inputs["hidden"].clone().requires_grad_()
    w = inputs["weight"].clone().requires_grad_()
    loss, *_ = torch.ops.unimrg_fast.linear_cross_entropy_fwd(h, w, None, target, -100,
                                                              0.0, 0.0, None, False)
    bad = torch.zeros(n, dtype=torch.bool)
    bad[[3, 11]] = True
    assert torch.isnan(loss[bad]).all(), f"bad-target rows must be NaN, got {loss[bad]}"
    assert loss[5] == 0
    keep = ~bad
    want = f64_loss(inputs["hidden"][keep], inputs["weight"], target[keep], reduction="none")
    assert_close("loss of good rows", loss[keep], want, 1e-5)
    loss.sum().backward()
    assert torch.isnan(h.grad[bad]).all() and torch.isnan(w.grad).any(), \
        "gradients of a poisoned row must be NaN too"


@pytest.mark.parametrize("splitting", [dict(min_programs=1, split_tiles=99), {}],
                         ids=["one-split", "vocab-splits"])
def test_accuracy_count(splitting, seed, monkeypatch):
    # the argmax must survive both the walk over tiles and the merge of splits
    pick = lce._pick_config
    monkeypatch.setattr(lce, "_pick_config", lambda *a: dataclasses.replace(pick(*a), **splitting))
    n, h, v = 33, 24, 100
    inputs = make_inputs(n, h, v, torch.float32, bias=True, ignore_frac=0.25)
    z = inputs["hidden"].double() @ inputs["weight"].double().T + inputs["bias"].double()
    target = inputs["target"].clone()
    hit = torch.rand(n) < 0.5
    target = torch.where(hit & (target != -100), z.argmax(-1), target)
    want = int(((z.argmax(-1) == target) & (target != -100)).sum())
    assert want > 0
    loss, num_correct = lce.linear_cross_entropy_with_stats(
        inputs["hidden"], inputs["weight"], target, bias=inputs["bias"], impl="triton")
    assert num_correct.dtype == torch.int64 and num_correct.dim() == 0
    assert int(num_correct) == want, f"num_correct {int(num_correct)} != {want}"
    plain = fused(inputs["hidden"], inputs["weight"], target, bias=inputs["bias"])
    assert torch.equal(loss, plain), "tracking the argmax must not change the loss"
    if ref_lce is not None:
        _, ref_correct = lce.linear_cross_entropy_with_stats(
            inputs["hidden"], inputs["weight"], target, bias=inputs["bias"], impl="reference")
        assert int(ref_correct) == want


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_accuracy_count_under_softcap_takes_the_first_capped_max(impl, seed):
    # softcap is monotonic but saturates: every positive logit here is >= 20 = 40 c and
    # caps to exactly c in fp32, so the argmax is the first positive column, not the
    # largest raw logit. Logits are exact integers (multiples of 20), so both paths and
    # the check below see the same values bit for bit.
    if impl == "reference" and ref_lce is None:
        pytest.skip(REF_MISSING)
    n, h, v, cap = 24, 8, 40, 0.5
    hidden = 10.0 * torch.randint(0, 2, (n, h), device=DEV).float().mul(2).sub(1)
    weight = torch.randint(0, 2, (v, h), device=DEV).float().mul(2).sub(1)
    z = hidden @ weight.T
    target = z.argmax(-1)  # the raw logits' argmax: what an uncapped count would hit
    target[::5] = -100
    first_capped = (cap * torch.tanh(z / cap)).argmax(-1)
    want = int(((first_capped == target) & (target != -100)).sum())
    assert want < int((target != -100).sum()), "no row where capping changes the argmax"
    _, num_correct = lce.linear_cross_entropy_with_stats(hidden, weight, target, softcap=cap,
                                                         impl=impl)
    assert int(num_correct) == want, f"{impl}: num_correct {int(num_correct)} != {want}"


def test_mixed_dtypes_promote_and_grads_keep_dtypes(seed):
    inputs = make_inputs(18, 20, 33, torch.float32, bias=True)
    inputs["hidden"] = inputs["hidden"].half()
    out, got = run(fused, inputs, ["hidden", "weight", "bias"])
    out64, want = run(f64_loss, {k: t.double() if t.is_floating_point() else t
                                 for k, t in inputs.items()}, ["hidden", "weight", "bias"])
    assert got["hidden"].dtype == torch.float16 and got["weight"].dtype == torch.float32
    assert_close("loss", out, out64, 1e-5)
    assert_close("dhidden", got["hidden"], want["hidden"], TOL[torch.float16])
    assert_close("dweight", got["weight"], want["weight"], 1e-5)


def test_autocast_bf16_on_cpu(seed):
    # the interpreter computes bf16 tiles in fp32 after the load, so CPU autocast works
    inputs = make_inputs(26, 32, 50, torch.float32, bias=True)
    grads = ["hidden", "weight", "bias"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, got = run(fused, inputs, grads, label_smoothing=0.1)
    rounded = {k: (t.to(torch.bfloat16).double() if t.is_floating_point() else t)
               for k, t in inputs.items()}
    out64, want = run(f64_loss, rounded, grads, label_smoothing=0.1)
    for name in grads:
        assert got[name].dtype == torch.float32
    # the fp64 oracle sees the bf16-rounded inputs: a kernel that ignored autocast and
    # ran in fp32 would differ from it by ~1e-3 in the loss
    assert_close("loss", out, out64, 1e-5)
    if ref_lce is None:
        pytest.skip(REF_MISSING)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref, ref = run(ref_lce, inputs, grads, label_smoothing=0.1)
    for name in grads:
        err, ref_err = rel_err(got[name], want[name]), rel_err(ref[name], want[name])
        assert err <= 2 * ref_err + 1e-3, f"d{name}: {err:.3e} > 2 x {ref_err:.3e} + 1e-3"


def test_custom_ops_pass_opcheck(seed):
    inputs = make_inputs(9, 20, 19, torch.float32, bias=True)
    h = inputs["hidden"].requires_grad_()
    w = inputs["weight"].requires_grad_()
    b = inputs["bias"].requires_grad_()
    y = inputs["target"]
    fwd_args = (h, w, b, y, -100, 0.1, 1e-3, 5.0, True)
    torch.library.opcheck(torch.ops.unimrg_fast.linear_cross_entropy_fwd.default, fwd_args)
    loss, lse, _, order, count = torch.ops.unimrg_fast.linear_cross_entropy_fwd(*fwd_args)
    bwd_args = (torch.rand_like(loss), h.detach(), w.detach(), b.detach(), y, lse.detach(),
                order, count, 0.1, 1e-3, 5.0, True, True, True)
    torch.library.opcheck(torch.ops.unimrg_fast.linear_cross_entropy_bwd.default, bwd_args)
    only_dw = bwd_args[:-3] + (False, True, False)
    torch.library.opcheck(torch.ops.unimrg_fast.linear_cross_entropy_bwd.default, only_dw)


@pytest.mark.parametrize("grads", [["hidden"], ["weight", "bias"]], ids=["frozen-head", "frozen-hidden"])
def test_only_some_inputs_need_grad(grads, seed):
    inputs = make_inputs(17, 20, 35, torch.float32, bias=True)
    out, got = run(fused, inputs, grads, z_loss=1e-3)
    out64, want = run(f64_loss, {k: t.double() if t.is_floating_point() else t
                                 for k, t in inputs.items()}, grads, z_loss=1e-3)
    assert_close("loss", out, out64, 1e-5)
    for name in grads:
        assert_close(f"d{name}", got[name], want[name], 1e-5)


def test_strided_inputs(seed):
    # hidden every other column of a wider buffer, weight a transposed [H, V] buffer
    inputs = make_inputs(19, 40, 30, torch.float32, bias=True)
    wide = torch.randn(19, 80)
    wide[:, ::2] = inputs["hidden"]
    w_t = inputs["weight"].T.contiguous()
    h_view, w_view = wide[:, ::2], w_t.T
    assert h_view.stride() == (80, 2) and w_view.stride() == (1, 30)
    out = fused(h_view, w_view, inputs["target"], bias=inputs["bias"], reduction="none")
    want = f64_loss(inputs["hidden"], inputs["weight"], inputs["target"], bias=inputs["bias"],
                    reduction="none")
    assert_close("loss", out, want, 1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_input(reduction):
    inputs = make_inputs(0, 16, 20, torch.float32, bias=True)
    out, got = run(fused, inputs, ["hidden", "weight", "bias"], reduction=reduction)
    assert out.shape == ((0,) if reduction == "none" else ()) and not out.isnan().any()
    assert got["hidden"].shape == (0, 16)
    assert torch.equal(got["weight"], torch.zeros_like(got["weight"]))


def test_torch_compile_fullgraph(seed):
    torch._dynamo.reset()
    inputs = make_inputs(15, 20, 27, torch.float32, bias=True, token_weight=True)
    grads = ["hidden", "weight", "bias"]
    compiled = torch.compile(lce._triton, fullgraph=True, backend="aot_eager")
    out_c, got_c = run(compiled, inputs, grads, label_smoothing=0.1, softcap=4.0)
    out_e, got_e = run(lce._triton, inputs, grads, label_smoothing=0.1, softcap=4.0)
    assert_close("compiled loss", out_c, out_e, 1e-6)
    for name in grads:
        assert_close(f"compiled d{name}", got_c[name], got_e[name], 1e-6)


def test_dispatch(seed):
    name, fn = backends.resolve("linear_cross_entropy", "triton", device=DEV)
    assert name == "triton" and fn is lce._triton
    if not ON_CUDA:  # the interpreter is exact but slow: "auto" keeps the reference on CPU
        assert backends.resolve("linear_cross_entropy", "auto", device=DEV)[0] == "reference"


# ------------------------------------------------------------ the backward's dz chunks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_in_many_dz_chunks_matches_float64(seed, monkeypatch, dtype):
    # A dz chunk of 2 row blocks: 61 rows take 2 chunks (the last one ragged), and with
    # 60% ignored rows the second holds only rows past the count (all-zero dz whose
    # hidden rows are NaN: a product that read them would poison dW).
    block_m = lce._pick_config(dtype, True, 61).block_m
    monkeypatch.setattr(lce, "DZ_CHUNK_BYTES", 2 * block_m * 37 * dtype.itemsize)
    assert lce._dz_chunk_rows(61, 37, dtype.itemsize, block_m) == 2 * block_m
    inputs = make_inputs(61, 24, 37, dtype, bias=True, token_weight=True, ignore_frac=0.6)
    ignored = inputs["target"] == -100
    clean = {k: t.clone() for k, t in inputs.items()}
    inputs["hidden"][ignored] = float("nan")
    clean["hidden"][ignored] = 0.0
    grads = ["hidden", "weight", "bias"]
    out, got = run(fused, inputs, grads, label_smoothing=0.1, z_loss=1e-3)
    out64, want = run(f64_loss, {k: t.double() if t.is_floating_point() else t
                                 for k, t in clean.items()}, grads,
                      label_smoothing=0.1, z_loss=1e-3)
    assert_close("loss", out, out64, TOL[dtype])
    for name in grads:
        assert_close(f"d{name}", got[name], want[name], TOL[dtype])
    assert torch.equal(got["hidden"][ignored], torch.zeros_like(got["hidden"][ignored]))


def test_dw_accumulates_in_place_where_the_fp32_output_product_exists(monkeypatch):
    # dW's later chunks add into the fp32 accumulator (no [V, H] product of their own) by
    # addmm.dtype_out where a one-off dispatch probe finds it; elsewhere by addmm_ on
    # upcast operands. CPU torch has no addmm.dtype_out kernel: the probe says no.
    monkeypatch.setattr(lce, "_ADDMM_F32_WORKS", {})
    cpu = torch.device("cpu")
    assert lce._addmm_f32_works(cpu, torch.float16) is False
    a = torch.randn(9, 5).half().t()  # column-major, like dz.t()
    b = torch.randn(9, 7).half()
    acc = torch.randn(5, 7)
    want = acc.double() + a.double() @ b.double()
    assert lce._add_mm_f32_(acc, a, b) is acc
    torch.testing.assert_close(acc.double(), want, rtol=1e-6, atol=1e-6)

    calls = []

    def emulated(acc, a, b):  # what cuBLAS does: fp32 sums of the 16-bit products
        calls.append(a.dtype)
        acc.add_(a.float() @ b.float())

    monkeypatch.setattr(lce, "_addmm_f32_out", emulated)
    monkeypatch.setattr(lce, "_ADDMM_F32_WORKS", {})
    acc = torch.zeros(5, 7)
    lce._add_mm_f32_(acc, a, b)
    assert calls == [torch.float16, torch.float16]  # the probe, then the product
    torch.testing.assert_close(acc.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-6)
    lce._add_mm_f32_(acc, a, b)
    assert len(calls) == 3  # probed once per (device, dtype)
    lce._add_mm_f32_(torch.zeros(5, 7), a.float(), b.float())
    assert len(calls) == 3  # fp32 operands take addmm_ as they are


def test_dz_chunk_rows():
    # whole row blocks within the budget, at least one block, no more than the rows need
    assert lce.DZ_CHUNK_BYTES == 1 << 30
    assert lce._dz_chunk_rows(10_000, 151_936, 2, 128) == 3456   # 3,533 rows fit: 27 blocks
    assert lce._dz_chunk_rows(300, 151_936, 2, 128) == 384
    assert lce._dz_chunk_rows(10_000, 10 ** 9, 4, 64) == 64


@pytest.mark.gpu
def test_gpu_backward_is_bitwise_reproducible():
    # No atomics in dh and dW (the chunked products replaced them). Only a GPU can tell:
    # the interpreter runs the programs one after another, so atomics there add in a
    # fixed order too, and the fp32-atomic backward this replaced passed on a CPU.
    torch.manual_seed(0)
    inputs = make_inputs(4096, 1024, 32000, torch.bfloat16, device=DEV, ignore_frac=0.1)
    _, first = run(fused, inputs, ["hidden", "weight"])
    _, second = run(fused, inputs, ["hidden", "weight"])
    for name in ("hidden", "weight"):
        assert torch.equal(first[name], second[name]), name


# ---------------------------------------------------------------------- GPU lane
def _fa_rule(dtype, n, h, v, options, ignore_frac=0.1):
    torch.manual_seed(0)
    inputs = make_inputs(n, h, v, dtype, ignore_frac=ignore_frac, device=DEV,
                         bias=options.pop("bias", False))
    grads = ["hidden", "weight"] + (["bias"] if "bias" in inputs else [])
    out, got = run(fused, inputs, grads, **options)
    out_ref, ref = run(ref_lce, inputs, grads, **options)
    out64, want = run(f64_loss, {k: t.double() if t.is_floating_point() else t
                                 for k, t in inputs.items()}, grads, **options)
    report = []
    for name, a, b, c in [("loss", out, out_ref, out64)] + [
            (k, got[k], ref[k], want[k]) for k in grads]:
        err, ref_err = rel_err(a, c), rel_err(b, c)
        report.append(f"{name}: fused {err:.2e} reference {ref_err:.2e}")
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        assert err <= 2 * ref_err + 1e-5, f"{name}: fused {err:.3e} > 2 x reference {ref_err:.3e}"
    return report


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_realistic_shape_flash_attention_rule(dtype):
    if ref_lce is None:
        pytest.skip(REF_MISSING)
    _fa_rule(dtype, 4096, 1536, 32000, {})


@pytest.mark.gpu
def test_gpu_options_bf16():
    if ref_lce is None:
        pytest.skip(REF_MISSING)
    _fa_rule(torch.bfloat16, 2048, 1024, 50257, dict(bias=True, label_smoothing=0.1,
                                                     z_loss=1e-4, softcap=30.0,
                                                     reduction="sum"), ignore_frac=0.5)


@pytest.mark.gpu
def test_gpu_fp32_is_exact():
    inputs = make_inputs(1000, 512, 5003, torch.float32, bias=True, device=DEV)
    grads = ["hidden", "weight", "bias"]
    out, got = run(fused, inputs, grads, label_smoothing=0.1)
    out64, want = run(f64_loss, {k: t.double() if t.is_floating_point() else t
                                 for k, t in inputs.items()}, grads, label_smoothing=0.1)
    assert_close("loss", out, out64, 1e-5)
    for name in grads:
        assert_close(f"d{name}", got[name], want[name], 1e-5)


@pytest.mark.gpu
def test_gpu_no_host_sync_and_bounded_memory():
    n, h, v = 4096, 1536, 32000
    inputs = make_inputs(n, h, v, torch.bfloat16, device=DEV, ignore_frac=0.1)
    hid = inputs["hidden"].requires_grad_()
    w = inputs["weight"].requires_grad_()
    fused(hid, w, inputs["target"]).backward()  # compile the kernels first
    hid.grad = w.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused(hid, w, inputs["target"]).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # fp32 dh and dW plus the bf16 gradients; one chunk's fp32 dh product and gathered
    # hidden rows; one chunk of bf16 dz (all n rows here: n * v * 2 = 262 MB); O(N)
    # bookkeeping. The [N, V] fp32 logits would add n * v * 4 = 524 MB.
    chunk = lce._dz_chunk_rows(n, v, 2, lce._pick_config(torch.bfloat16, False, n).block_m)
    bound = ((n * h + v * h) * (4 + 2) + n * h * (4 + 2) + min(chunk, n) * v * 2
             + 64 * n * 4 + (8 << 20))
    assert extra <= bound, f"peak extra memory {extra / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB"


@pytest.mark.gpu
def test_gpu_dw_chunks_add_in_place(monkeypatch):
    # bf16 on CUDA takes addmm.dtype_out (torch >= 2.8): no chunk after the first makes
    # an fp32 [V, H] product of its own, so 8 chunks peak like one plus their dz.
    n, h, v = 4096, 1536, 32000
    block_m = lce._pick_config(torch.bfloat16, False, n).block_m
    monkeypatch.setattr(lce, "DZ_CHUNK_BYTES", (n // 8) * v * 2)
    assert lce._dz_chunk_rows(n, v, 2, block_m) <= n // 8
    inputs = make_inputs(n, h, v, torch.bfloat16, device=DEV, ignore_frac=0.1)
    w = inputs["weight"].requires_grad_()
    assert lce._addmm_f32_works(w.device, torch.bfloat16)
    fused(inputs["hidden"], w, inputs["target"]).backward()  # compile first
    w.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused(inputs["hidden"], w, inputs["target"]).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # fp32 dW and its bf16 copy, one chunk of dz and gathered rows, O(N) bookkeeping; a
    # second fp32 [V, H] (v * h * 4 = 197 MB) would break the bound
    bound = v * h * (4 + 2) + (n // 8) * (v + h) * 2 + 64 * n * 4 + (8 << 20)
    assert extra <= bound, f"peak extra memory {extra / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB"
    # the sums: the same dW as one chunk (fp32 sums in another order, one bf16 rounding)
    chunked = w.grad.float()
    w.grad = None
    monkeypatch.setattr(lce, "DZ_CHUNK_BYTES", 1 << 30)
    fused(inputs["hidden"], w, inputs["target"]).backward()
    assert_close("dW, 8 chunks vs 1", chunked, w.grad.float(), 2e-3)


@pytest.mark.gpu
def test_gpu_ignored_rows_are_skipped():
    import triton.testing

    n, h, v = 8192, 1536, 32000
    inputs = make_inputs(n, h, v, torch.bfloat16, device=DEV, ignore_frac=0.0)
    hid = inputs["hidden"].requires_grad_()
    w = inputs["weight"].requires_grad_()
    sparse = torch.where(torch.rand(n, device=DEV) < 0.9, -100, inputs["target"])

    def step(target):
        return lambda: fused(hid, w, target).backward()

    dense_ms = triton.testing.do_bench(step(inputs["target"]))
    sparse_ms = triton.testing.do_bench(step(sparse))
    # The forward and the dz kernel skip ignored rows (half the matrix work); the two
    # cuBLAS products of the backward still multiply their zero dz rows (the host
    # cannot know how many rows are valid without a sync): about 0.5 expected.
    assert sparse_ms < 0.75 * dense_ms, (
        f"90% ignored rows: {sparse_ms:.2f} ms vs {dense_ms:.2f} ms with none ignored")
