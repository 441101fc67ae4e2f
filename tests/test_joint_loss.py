"""joint_loss (DESIGN.md 3.3), reference and fused, against an independent float64 loop over tasks."""
import pytest
import torch

import unimrg_fast as uf
from unimrg_fast.reference.joint import joint_loss
from unimrg_fast.specs import CEHeadSpec, JointLossOutput, RegressionHeadSpec
from numerics import assert_rel


# ------------------------------------------------------- independent float64 oracle
def ce_rows64(h, w, b, y, spec):
    z = h @ w.t() + (0 if b is None else b)
    if spec.softcap is not None:
        z = spec.softcap * torch.tanh(z / spec.softcap)
    m = z.max(dim=1, keepdim=True).values.detach()
    lse = m.squeeze(1) + torch.log(torch.exp(z - m).sum(dim=1))
    valid = y != spec.ignore_index
    z_y = z.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
    e = spec.label_smoothing
    loss = (1 - e) * (lse - z_y) + e * (lse - z.mean(dim=1)) + spec.z_loss * lse ** 2
    return loss, valid


def mse_rows64(h, w, b, t):
    p = h @ w.t() + (0 if b is None else b)
    return ((p - t.double()) ** 2).mean(dim=1), torch.ones(h.shape[0], dtype=torch.bool)


def joint_float64(hidden64, heads, params64, num_tasks, task_weights):
    """Loops over tasks in Python, the obvious way, in float64."""
    rows_loss, rows_w, rows_task = [], [], []
    for spec, (w64, b64) in zip(heads, params64):
        h = hidden64[spec.rows]
        if isinstance(spec, CEHeadSpec):
            loss, valid = ce_rows64(h, w64, b64, spec.target, spec)
        else:
            loss, valid = mse_rows64(h, w64, b64, spec.target)
        r = spec.rows.shape[0]
        tw = torch.ones(r, dtype=torch.float64) if spec.token_weight is None \
            else spec.token_weight.double()
        task = torch.full((r,), spec.task) if isinstance(spec.task, int) else spec.task
        rows_loss.append(loss[valid] * tw[valid])
        rows_w.append(tw[valid])
        rows_task.append(task[valid])
    loss, w, task = torch.cat(rows_loss), torch.cat(rows_w), torch.cat(rows_task)
    total = hidden64.sum() * 0
    sums, wsums, counts = [], [], []
    for t in range(num_tasks):
        sel = task == t
        sums.append(loss[sel].sum())
        wsums.append(w[sel].sum())
        counts.append(int(sel.sum()))
        if counts[-1] > 0:
            total = total + float(task_weights[t]) * sums[-1] / wsums[-1]
    return total, torch.stack(sums), torch.stack(wsums), torch.tensor(counts)


# -------------------------------------------------------------------------- inputs
T, H = 61, 13
# The fused path shares the oracle: every pack test runs both implementations.
IMPLS = ["reference", "triton"]


def leaf(*shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_()


def make_pack(dtype=torch.float32):
    """4 tasks: 0 understanding (text CE), 1/2 generation rows split between an image-
    codebook CE head and two regression heads, 3 with no rows in this pack."""
    hidden = leaf(T, H, dtype=dtype)
    perm = torch.randperm(T)
    text_rows, code_rows, reg_rows, reg2_rows = perm[:17], perm[17:40], perm[40:55], perm[55:]
    text_target = torch.randint(0, 50, (17,))
    text_target[torch.rand(17) < 0.4] = -100
    code_target = torch.randint(0, 37, (23,))
    code_target[torch.rand(23) < 0.2] = -1
    heads = [
        CEHeadSpec(weight=leaf(50, H, scale=0.3, dtype=dtype), rows=text_rows, target=text_target,
                   task=0),
        CEHeadSpec(weight=leaf(37, H, scale=0.3, dtype=dtype), rows=code_rows, target=code_target,
                   task=torch.randint(1, 3, (23,)), bias=leaf(37, dtype=dtype),
                   token_weight=torch.rand(23) + 0.5, ignore_index=-1, label_smoothing=0.1,
                   z_loss=1e-3, softcap=4.0),
        RegressionHeadSpec(weight=leaf(7, H, scale=0.3, dtype=dtype), rows=reg_rows,
                           target=torch.randn(15, 7), task=torch.randint(1, 3, (15,)),
                           bias=leaf(7, dtype=dtype), token_weight=torch.rand(15) + 0.5),
        RegressionHeadSpec(weight=leaf(5, H, scale=0.3, dtype=dtype), rows=reg2_rows,
                           target=torch.randn(6, 5), task=2),
    ]
    return hidden, heads


def params(heads):
    return [(s.weight, s.bias) for s in heads]


def to64(heads):
    return [(w.detach().double().requires_grad_(),
             None if b is None else b.detach().double().requires_grad_()) for w, b in params(heads)]


def check_pack(hidden, heads, num_tasks, task_weights, *, tol, grad_tol, impl="reference"):
    out = uf.joint_loss(hidden, heads, num_tasks, task_weights=task_weights, impl=impl)
    assert isinstance(out, JointLossOutput)
    h64 = hidden.detach().double().requires_grad_()
    p64 = to64(heads)
    lam = [1.0] * num_tasks if task_weights is None else [float(x) for x in task_weights]
    total, sums, wsums, counts = joint_float64(h64, heads, p64, num_tasks, lam)
    assert out.total.dtype == out.task_loss_sum.dtype == out.task_weight_sum.dtype == torch.float32
    assert out.task_rows.dtype == torch.int64 and out.task_rows.shape == (num_tasks,)
    assert torch.equal(out.task_rows, counts), f"task_rows {out.task_rows} != {counts}"
    assert_rel(out.task_loss_sum, sums, tol, "task_loss_sum")
    assert_rel(out.task_weight_sum, wsums, 1e-6, "task_weight_sum")
    assert_rel(out.total, total, tol, "total")
    out.total.backward()
    total.backward()
    assert_rel(hidden.grad, h64.grad, grad_tol, "dhidden")
    for k, ((w, b), (w64, b64)) in enumerate(zip(params(heads), p64)):
        assert_rel(w.grad, w64.grad, grad_tol, f"dweight of heads[{k}]")
        if b is not None:
            assert_rel(b.grad, b64.grad, grad_tol, f"dbias of heads[{k}]")
    return out


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("task_weights", [None, [1.0, 0.5, 2.0, 3.0], "tensor"])
@pytest.mark.parametrize("impl", IMPLS)
def test_pack_matches_float64_loop_over_tasks(seed, impl, task_weights):
    hidden, heads = make_pack()
    if task_weights == "tensor":
        task_weights = torch.tensor([0.25, 1.0, 1.5, 7.0])
    out = check_pack(hidden, heads, 4, task_weights, tol=1e-5, grad_tol=1e-5, impl=impl)
    # task 3 has no rows: contributes 0, no NaN anywhere
    assert out.task_rows[3] == 0 and out.task_loss_sum[3] == 0 and out.task_weight_sum[3] == 0
    assert torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_task_with_only_ignored_rows_counts_nothing(seed, impl):
    hidden, heads = make_pack()
    text = heads[0]
    heads[0] = CEHeadSpec(weight=text.weight, rows=text.rows,
                          target=torch.full_like(text.target, -100), task=0)
    out = check_pack(hidden, heads, 4, [2.0, 1.0, 1.0, 1.0], tol=1e-5, grad_tol=1e-5,
                     impl=impl)
    assert out.task_rows[0] == 0 and out.task_loss_sum[0] == 0 and out.task_weight_sum[0] == 0
    assert (heads[0].weight.grad == 0).all(), "a head whose rows are all ignored gets zero gradient"


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_weight_on_a_scored_row_gives_a_nan_loss_not_zero(seed, impl):
    # The gradients are NaN then; a loss that reads 0 would hide that from the logs (and
    # from a trainer's non-finite check of the loss). Only an exact 0 weight sum is "empty".
    h = leaf(6, 4)
    w, y, t = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 4, 0]), torch.randn(6, 5)
    tw = torch.ones(6)
    tw[2] = float("nan")
    ce = uf.linear_cross_entropy(h, w, y, token_weight=tw, impl=impl)
    reg = uf.regression_loss(h, w, t, token_weight=tw, impl=impl)
    out = uf.joint_loss(h, [CEHeadSpec(w, torch.arange(6), y, 0, token_weight=tw)], 2, impl=impl)
    assert ce.isnan() and reg.isnan() and out.total.isnan()
    assert out.task_weight_sum[1] == 0   # the empty task still counts 0, not NaN
    zero = uf.linear_cross_entropy(h, w, y, token_weight=torch.zeros(6), impl=impl)
    assert zero == 0 and torch.autograd.grad(zero, h)[0].eq(0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_half_precision_pack(seed, impl):
    hidden, heads = make_pack(torch.bfloat16)
    check_pack(hidden, heads, 4, None, tol=2e-2, grad_tol=3e-2, impl=impl)
    assert hidden.grad.dtype == torch.bfloat16 and heads[2].weight.grad.dtype == torch.bfloat16


def test_per_task_normalisation_by_weight_sums(seed):
    hidden, heads = make_pack()
    out = joint_loss(hidden, heads, 4)
    per_task = [out.task_loss_sum[t] / out.task_weight_sum[t] if out.task_rows[t] > 0
                else torch.zeros(()) for t in range(4)]
    assert_rel(out.total, torch.stack(per_task).sum(), 1e-6, "total from sums")
    # Doubling every row's weight doubles the sums and leaves each task mean and the total.
    doubled = []
    for s in heads:
        w = torch.ones(s.rows.shape[0]) if s.token_weight is None else s.token_weight
        fields = {f: getattr(s, f) for f in s.__dataclass_fields__}
        fields["token_weight"] = 2 * w
        doubled.append(type(s)(**fields))
    again = joint_loss(hidden, doubled, 4)
    assert_rel(again.task_loss_sum, 2 * out.task_loss_sum, 1e-6, "doubled loss sums")
    assert_rel(again.task_weight_sum, 2 * out.task_weight_sum, 1e-6, "doubled weight sums")
    assert_rel(again.total, out.total, 1e-6, "total under doubled weights")
    assert torch.equal(again.task_rows, out.task_rows)


def test_empty_heads_and_empty_pack(seed):
    hidden = leaf(5, H)
    out = joint_loss(hidden, [], 3, task_weights=[1.0, 2.0, 3.0])
    assert out.total == 0 and (out.task_rows == 0).all() and (out.task_loss_sum == 0).all()
    head = CEHeadSpec(weight=leaf(9, H), rows=torch.zeros(0, dtype=torch.int64),
                      target=torch.zeros(0, dtype=torch.int64), task=1)
    out = joint_loss(hidden, [head], 3)
    assert out.total == 0 and not out.total.isnan()
    out.total.backward()
    assert (hidden.grad == 0).all() and (head.weight.grad == 0).all()


def test_public_op_dispatches_to_reference(seed):
    hidden, heads = make_pack()
    got = uf.joint_loss(hidden, heads, 4, task_weights=[1.0, 2.0, 3.0, 4.0], impl="reference")
    want = joint_loss(hidden, heads, 4, task_weights=[1.0, 2.0, 3.0, 4.0])
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def _ce(**kw):
    base = dict(weight=torch.randn(9, H), rows=torch.tensor([0, 3, 4]),
                target=torch.tensor([1, 2, 8]), task=0)
    base.update(kw)
    return CEHeadSpec(**base)


def _reg(**kw):
    base = dict(weight=torch.randn(4, H), rows=torch.tensor([1, 2]), target=torch.randn(2, 4),
                task=1)
    base.update(kw)
    return RegressionHeadSpec(**base)


BAD = [
    (dict(heads=_ce()), TypeError, "heads must be a sequence"),
    (dict(heads=[_ce(), "lm_head"]), TypeError, r"heads\[1\] must be a CEHeadSpec or a RegressionHeadSpec"),
    (dict(heads=[_ce(rows=torch.tensor([0, 5, 1]))]), ValueError,
     r"heads\[0\].rows must hold values in \[0, 5\)"),
    (dict(heads=[_ce(rows=torch.tensor([0, 1, 2], dtype=torch.int32))]), TypeError,
     r"heads\[0\].rows must have dtype int64"),
    (dict(heads=[_reg(task=3)]), ValueError, r"heads\[0\].task must be in \[0, num_tasks\) = \[0, 3\)"),
    (dict(heads=[_reg(task=torch.tensor([0, 3]))]), ValueError, r"heads\[0\].task must hold values in \[0, 3\)"),
    (dict(heads=[_reg(task=torch.tensor([0, 1, 2]))]), ValueError, r"heads\[0\].task must have shape \[R\]"),
    (dict(heads=[_reg(task=1.0)]), TypeError, r"heads\[0\].task must be an int"),
    (dict(heads=[_ce(target=torch.tensor([1, 2]))]), ValueError, r"heads\[0\].target must have shape \[R\]"),
    (dict(heads=[_ce(target=torch.tensor([1, 2, 9]))]), ValueError,
     r"heads\[0\] \(CEHeadSpec\): target must hold values in \[0, 9\)"),
    (dict(heads=[_ce(), _reg(target=torch.randn(2, 3))]), ValueError,
     r"heads\[1\] \(RegressionHeadSpec\): target must have shape \[N, C\]"),
    (dict(heads=[_ce(), _reg(target=torch.randn(8))]), ValueError,
     r"heads\[1\].target must have 2 dimension"),
    (dict(heads=[_ce(weight=torch.randn(9, H + 1))]), ValueError,
     r"heads\[0\] \(CEHeadSpec\): weight must have shape \[V, H\]"),
    (dict(heads=[_ce(label_smoothing=2.0)]), ValueError, r"heads\[0\] \(CEHeadSpec\): label_smoothing"),
    (dict(heads=[_ce()], task_weights=[1.0, 1.0]), ValueError,
     r"task_weights must have shape \[num_tasks\] = \(3,\)"),
    (dict(heads=[_ce()], task_weights=torch.ones(3, dtype=torch.int64)), TypeError,
     "task_weights must have dtype"),
    (dict(heads=[_ce()], num_tasks=0), ValueError, "num_tasks must be an int >= 1"),
    (dict(heads=[_ce()], hidden=torch.randn(2, 3, H)), ValueError, "hidden must have 2 dimension"),
]


@pytest.mark.parametrize("call,exc,match", BAD)
def test_bad_arguments_raise(call, exc, match):
    call = dict(call)
    hidden = call.pop("hidden", torch.randn(5, H))
    num_tasks = call.pop("num_tasks", 3)
    with pytest.raises(exc, match=match):
        joint_loss(hidden, call.pop("heads"), num_tasks, **call)


@pytest.mark.gpu
def test_no_host_sync_on_cuda(seed):
    hidden, heads = make_pack()
    ref = joint_loss(hidden, heads, 4, task_weights=torch.tensor([1.0, 0.5, 2.0, 3.0]))
    h = hidden.detach().cuda().requires_grad_()
    moved = []
    for s in heads:
        fields = {f: getattr(s, f) for f in s.__dataclass_fields__}
        for f, v in fields.items():
            if isinstance(v, torch.Tensor):
                fields[f] = v.detach().cuda()
        moved.append(type(s)(**fields))
    lam = torch.tensor([1.0, 0.5, 2.0, 3.0], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        out = joint_loss(h, moved, 4, task_weights=lam)
        out.total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_rel(out.total.cpu(), ref.total, 1e-3, "total on CUDA (tf32 allowed)")
    assert torch.equal(out.task_rows.cpu(), ref.task_rows)


@pytest.mark.gpu
def test_gpu_fused_pack_matches_reference_without_logits():
    """A UniMRG-shaped pack on the GPU: same result as the plain path, and peak memory far
    below the [R, V] fp32 logits the plain path materialises."""
    torch.manual_seed(0)
    dev, t, h, v = "cuda", 8192, 1536, 151936
    hidden = (torch.randn(t, h, device=dev) * 0.05).bfloat16().requires_grad_()
    lm = (torch.randn(v, h, device=dev) * 0.02).bfloat16().requires_grad_()
    codebook = (torch.randn(8192, h, device=dev) * 0.02).bfloat16().requires_grad_()
    depth = (torch.randn(16, h, device=dev) * 0.02).bfloat16().requires_grad_()
    rows = torch.randperm(t, device=dev)
    heads = [CEHeadSpec(lm, rows[:2048], torch.randint(0, v, (2048,), device=dev), task=0),
             CEHeadSpec(codebook, rows[2048:5120], torch.randint(0, 8192, (3072,), device=dev), task=1),
             RegressionHeadSpec(depth, rows[5120:], torch.randn(t - 5120, 16, device=dev), task=2)]
    lam = torch.ones(4, device=dev)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused = uf.joint_loss(hidden, heads, 4, task_weights=lam, impl="triton")
    fused.total.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = [p.grad.clone() for p in (hidden, lm, codebook, depth)]
    for p in (hidden, lm, codebook, depth):
        p.grad = None
    plain = uf.joint_loss(hidden, heads, 4, task_weights=lam, impl="reference")
    plain.total.backward()
    assert_rel(fused.task_loss_sum, plain.task_loss_sum, 2e-2, "task_loss_sum vs reference")
    for name, g, p in zip(("hidden", "lm", "codebook", "depth"), grads, (hidden, lm, codebook, depth)):
        assert_rel(g.float(), p.grad.float(), 3e-2, f"d{name} vs reference")
    # Allowed: the LM head's fp32 dW and its bf16 copy (V x H x 6 bytes), and one chunk of
    # bf16 dz (here all 2048 rows: R x V x 2 bytes), plus 256 MiB for the small heads and
    # the hidden states' gradients (an H200 measured 2.10 GB in all, 2.02 GB of it the
    # first two terms). Not allowed: the [R, V] fp32 logits (R x V x 4 bytes more, 1.24
    # GB), which the plain path keeps.
    allowed = v * h * 6 + 2048 * v * 2 + 256 * 2 ** 20
    assert peak < allowed, f"peak extra memory {peak / 2**30:.2f} GiB > {allowed / 2**30:.2f}"
    assert peak + 2048 * v * 4 > allowed  # the test can tell fp32 logits apart


@pytest.mark.parametrize("impl", IMPLS)
def test_traces_under_torch_compile(seed, impl):
    """The trainer compiles its step: the joint loss must trace (custom ops, no host sync)
    and give the eager result."""
    hidden, heads = make_pack()
    torch._dynamo.reset()
    compiled = torch.compile(lambda h: uf.joint_loss(h, heads, 4, impl=impl), backend="aot_eager")
    got = compiled(hidden)
    want = uf.joint_loss(hidden, heads, 4, impl=impl)
    assert_rel(got.total, want.total, 1e-6, "compiled total")
    assert torch.equal(got.task_rows, want.task_rows)
    got.total.backward()
    assert torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0


def test_fused_losses_and_attention_refuse_a_device_the_kernels_cannot_run_on():
    # meta stands in for any device that is neither CUDA nor the interpreter's CPU: the
    # error names the argument instead of coming from deep inside autocast.
    m = "meta"
    h, w = torch.randn(3, 4, device=m), torch.randn(7, 4, device=m)
    y = torch.zeros(3, dtype=torch.long, device=m)
    q = torch.randn(5, 1, 4, device=m)
    layout = uf.PackedLayout.from_spans([[(5, "full")]], device=m)
    calls = {
        "hidden": lambda: uf.linear_cross_entropy(h, w, y, impl="triton"),
        "hidden ": lambda: uf.joint_loss(h, [], 1, impl="triton"),
        "q": lambda: uf.packed_attention(q, q, q, layout, impl="triton"),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"{name.strip()} must be a CUDA tensor for the "
                                             "Triton kernels, got meta"):
            call()
