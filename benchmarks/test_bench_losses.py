"""Losses, forward + backward, bf16, side by side (DESIGN.md section 5).

    group                 variants (role)
    linear-ce-1.5b        eager (baseline) | torch.compile (peer) | fused (fused) |
    linear-ce-7b          Liger-Kernel (peer) | Cut Cross-Entropy (peer)
    regression-head       reference (baseline) | fused (fused)
    joint-loss-unimrg     reference (baseline) | fused (fused)

The regression and joint-loss groups run under bf16 autocast, as the trainer does
(`as_the_trainer_runs`): the reference is then the trainer's plain path, bf16 matmuls.

Every timed call is one training step of the loss alone: forward, `loss.backward()`,
then the gradients are dropped (`p.grad = None`, no synchronisation), so each call
allocates its gradients afresh and the peak-memory figure counts them while the
inputs stay excluded. Inputs are built once, outside the timed callable, by the plain
builder functions below (`make_linear_ce_inputs`, `make_regression_inputs`,
`make_unimrg_pack`), which tests/test_benchmark_builders.py reuses at tiny sizes on
the CPU so that this file is known to work before a GPU is lent.

Before timing, each variant runs once (torch.compile compiles there) and its loss is
checked against an fp32 value computed independently, so a peer called with the wrong
arguments or another reduction fails loudly instead of being timed.

Run: python -m pytest benchmarks/test_bench_losses.py --benchmark-only [--results-save NAME]
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

import unimrg_fast as uf
from unimrg_fast import backends
from unimrg_fast.specs import CEHeadSpec, RegressionHeadSpec

IGNORE_INDEX = -100
DTYPE = torch.bfloat16
LOSS_RTOL = 1e-2  # bf16 inputs: every variant's loss within 1% of the fp32 value

# Qwen2.5 backbones (DESIGN.md section 5)
LINEAR_CE_SHAPES = {
    "1.5b": dict(n=16_384, h=1_536, v=151_936),
    "7b": dict(n=8_192, h=3_584, v=152_064),
}
LINEAR_CE_IGNORE_FRAC = 0.1
REGRESSION_SHAPE = dict(n=16_384, h=1_536, c=16)
UNIMRG_PACK_SHAPE = dict(t=16_384, h=1_536)


# ============================================================================ builders
def _generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def _randn(shape, g, device, dtype, scale=1.0, requires_grad=False) -> torch.Tensor:
    """N(0, scale^2) drawn in fp32 on `device`, then cast (a leaf tensor)."""
    x = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * scale
    return x.to(dtype).requires_grad_(requires_grad)


@dataclasses.dataclass
class LinearCEInputs:
    hidden: torch.Tensor  # [N, H] leaf, requires grad
    weight: torch.Tensor  # [V, H] leaf, requires grad
    target: torch.Tensor  # [N] int64, IGNORE_INDEX at ignored rows
    n_valid: int          # rows with a target (known on the host: no sync to read)

    @property
    def params(self) -> Tuple[torch.Tensor, ...]:
        return self.hidden, self.weight

    @property
    def useful_flops(self) -> float:
        """6 * N_valid * H * V: forward logits 2 N_valid H V, backward dh = dz W
        (2 N_valid H V) and dW = dz^T h (2 N_valid H V). Ignored rows are not useful
        work (the fused path skips them; the eager one does not)."""
        return 6.0 * self.n_valid * self.hidden.shape[1] * self.weight.shape[0]


def make_linear_ce_inputs(n: int, h: int, v: int, dtype: torch.dtype = DTYPE,
                          device="cuda", ignore_frac: float = LINEAR_CE_IGNORE_FRAC,
                          *, seed: int = 0) -> LinearCEInputs:
    """hidden ~ N(0, 1), weight ~ N(0, 1/H) (logits ~ N(0, 1)), uniform targets with
    round(ignore_frac * n) rows, chosen at random, set to IGNORE_INDEX."""
    g = _generator(device, seed)
    hidden = _randn((n, h), g, device, dtype, requires_grad=True)
    weight = _randn((v, h), g, device, dtype, scale=h ** -0.5, requires_grad=True)
    target = torch.randint(0, v, (n,), generator=g, device=device, dtype=torch.int64)
    n_ignored = int(round(ignore_frac * n))
    ignored = torch.randperm(n, generator=g, device=device)[:n_ignored]
    target[ignored] = IGNORE_INDEX
    return LinearCEInputs(hidden, weight, target, n - n_ignored)


def linear_ce_fp32(x: LinearCEInputs, chunk: int = 2048) -> float:
    """The mean loss over non-ignored rows, fp32 math in row chunks (no [N, V] buffer
    of the whole batch); an independent check of every variant. Syncs: not timed."""
    total = 0.0
    with torch.no_grad():
        w = x.weight.float()
        for start in range(0, x.hidden.shape[0], chunk):
            z = F.linear(x.hidden[start:start + chunk].float(), w)
            total += float(F.cross_entropy(z, x.target[start:start + chunk],
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
    return total / max(x.n_valid, 1)


@dataclasses.dataclass
class RegressionInputs:
    hidden: torch.Tensor  # [N, H] leaf, requires grad
    weight: torch.Tensor  # [C, H] leaf, requires grad
    bias: torch.Tensor    # [C] leaf, requires grad
    target: torch.Tensor  # [N, C]

    @property
    def params(self) -> Tuple[torch.Tensor, ...]:
        return self.hidden, self.weight, self.bias

    @property
    def useful_flops(self) -> float:
        """6 * N * H * C: forward p = h W^T (2NHC), backward dh (2NHC) and dW (2NHC)."""
        n, h = self.hidden.shape
        return 6.0 * n * h * self.weight.shape[0]


def make_regression_inputs(n: int, h: int, c: int, dtype: torch.dtype = DTYPE,
                           device="cuda", *, seed: int = 0) -> RegressionInputs:
    """A latent-regression head H -> C with a flow-matching-like target (eps - x0 ~ N(0, 2))."""
    g = _generator(device, seed)
    hidden = _randn((n, h), g, device, dtype, requires_grad=True)
    weight = _randn((c, h), g, device, dtype, scale=h ** -0.5, requires_grad=True)
    bias = _randn((c,), g, device, dtype, scale=0.1, requires_grad=True)
    target = _randn((n, c), g, device, dtype, scale=math.sqrt(2.0))
    return RegressionInputs(hidden, weight, bias, target)


# Task ids of a UniMRG pack (UniMRG: understanding plus the auxiliary generation of
# pixel, depth and segmentation targets); the segmentation target here is the one an
# AR model predicts as image-codebook tokens.
TASK_UNDERSTANDING, TASK_SEGMENTATION_CODES, TASK_DEPTH, TASK_PIXEL = range(4)
NUM_TASKS = 4


@dataclasses.dataclass
class UniMRGPack:
    hidden: torch.Tensor               # [T, H] leaf, requires grad
    heads: List[object]                # CEHeadSpec / RegressionHeadSpec
    num_tasks: int
    task_weights: torch.Tensor         # [num_tasks] fp32 on the device (lambda_t)
    params: Tuple[torch.Tensor, ...]   # hidden, then every head's weight (and bias)
    useful_flops: float


def make_unimrg_pack(t: int, h: int, device="cuda", dtype: torch.dtype = DTYPE, *,
                     vocab: int = 151_936, codes: int = 8_192, channels: int = 16,
                     text_rows: int = 1_000, code_rows: int = 4_096, depth_rows: int = 4_096,
                     pixel_rows: int = 4_096, seed: int = 0) -> UniMRGPack:
    """A task-interleaved pack of `t` rows scored by four heads, one task each:

        task 0  understanding   LM head [vocab, H], CE on `text_rows` answer rows
        task 1  segmentation    codebook head [codes, H], CE on `code_rows` image-token rows
        task 2  depth           regression head [channels, H] + bias, MSE on `depth_rows`
        task 3  pixel           regression head [channels, H] + bias, MSE on `pixel_rows`

    The scored rows are disjoint, drawn at random from the pack and sorted; the other
    rows (condition images, prompts) are scored by no head. lambda_t = 1 for all tasks,
    as a device tensor. Every row of a head has a target (no ignored rows), so the
    useful work is sum over heads of 6 * R * H * out (forward 2RH out, backward dh and
    dW 2RH out each).
    """
    counts = (text_rows, code_rows, depth_rows, pixel_rows)
    if sum(counts) > t:
        raise ValueError(f"the heads score {sum(counts)} rows, more than the pack's {t}")
    g = _generator(device, seed)
    hidden = _randn((t, h), g, device, dtype, requires_grad=True)
    perm = torch.randperm(t, generator=g, device=device)
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    rows = [perm[a:b].sort().values for a, b in zip(bounds[:-1], bounds[1:])]

    lm_w = _randn((vocab, h), g, device, dtype, scale=h ** -0.5, requires_grad=True)
    code_w = _randn((codes, h), g, device, dtype, scale=h ** -0.5, requires_grad=True)
    depth_w = _randn((channels, h), g, device, dtype, scale=h ** -0.5, requires_grad=True)
    depth_b = _randn((channels,), g, device, dtype, scale=0.1, requires_grad=True)
    pixel_w = _randn((channels, h), g, device, dtype, scale=h ** -0.5, requires_grad=True)
    pixel_b = _randn((channels,), g, device, dtype, scale=0.1, requires_grad=True)
    randint = lambda high, n: torch.randint(0, high, (n,), generator=g, device=device)  # noqa: E731
    heads = [
        CEHeadSpec(lm_w, rows[0], randint(vocab, text_rows), TASK_UNDERSTANDING),
        CEHeadSpec(code_w, rows[1], randint(codes, code_rows), TASK_SEGMENTATION_CODES),
        RegressionHeadSpec(depth_w, rows[2],
                           _randn((depth_rows, channels), g, device, dtype, math.sqrt(2.0)),
                           TASK_DEPTH, bias=depth_b),
        RegressionHeadSpec(pixel_w, rows[3],
                           _randn((pixel_rows, channels), g, device, dtype, math.sqrt(2.0)),
                           TASK_PIXEL, bias=pixel_b),
    ]
    flops = sum(6.0 * r * h * out for r, out in zip(counts, (vocab, codes, channels, channels)))
    return UniMRGPack(hidden, heads, NUM_TASKS,
                      torch.ones(NUM_TASKS, dtype=torch.float32, device=device),
                      (hidden, lm_w, code_w, depth_w, depth_b, pixel_w, pixel_b), flops)


def joint_loss_fp32(pack: UniMRGPack) -> float:
    """sum_t lambda_t * mean loss of task t, in fp32, one task per head (as built)."""
    total = 0.0
    with torch.no_grad():
        h32 = pack.hidden.float()
        for head in pack.heads:
            hr = h32[head.rows]
            if isinstance(head, CEHeadSpec):
                loss = F.cross_entropy(F.linear(hr, head.weight.float()), head.target)
            else:
                p = F.linear(hr, head.weight.float(), head.bias.float())
                loss = ((p - head.target.float()) ** 2).mean()
            total += float(pack.task_weights[head.task]) * float(loss)
    return total


# ================================================================== timed callables
def make_step(compute_loss: Callable[[], torch.Tensor], params: Sequence[torch.Tensor]
              ) -> Callable[[], Tuple[torch.Tensor, Tuple[Optional[torch.Tensor], ...]]]:
    """One forward + backward of `compute_loss`, as the benchmarks time it.

    Returns (loss detached, the gradients of `params`); the parameters' .grad are reset
    to None before and after (no synchronisation), so the calls do not accumulate and
    the harness frees each call's gradients when it drops the result.
    """
    params = tuple(params)

    def step():
        for p in params:
            p.grad = None
        loss = compute_loss()
        loss.backward()
        grads = tuple(p.grad for p in params)
        for p in params:
            p.grad = None
        return loss.detach(), grads

    return step


def plain_linear_ce(hidden: torch.Tensor, weight: torch.Tensor,
                    target: torch.Tensor) -> torch.Tensor:
    """What UMM codebases write: logits, upcast, F.cross_entropy. The function the
    torch.compile peer compiles (the eager baseline is impl="reference", the same math
    plus the contract's checks)."""
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def _first_tensor(out) -> torch.Tensor:
    """A peer's loss from whatever its version returns: a tensor, a tuple (loss, z_loss,
    ...), or an output object with `.loss`."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "loss"):
        return out.loss
    raise TypeError(f"cannot find the loss in a {type(out).__name__}")


def liger_linear_ce() -> Callable:
    """Liger-Kernel's fused linear CE, as fn(hidden, weight, target); skips when absent.

    Public API (liger-kernel 0.3 .. 0.6): LigerFusedLinearCrossEntropyLoss(ignore_index=,
    reduction=) called as loss_fn(lin_weight, _input, target, bias=None), weight FIRST.
    Importing liger_kernel.transformers may pull in Hugging Face transformers; without
    it, fall back to the autograd Function, whose first four positional arguments
    (input, weight, target, bias) are the same in every version.
    """
    probe = backends.liger()
    if not probe.available:
        pytest.skip(f"Liger-Kernel peer: not available ({probe.detail})")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:
        try:
            from liger_kernel.transformers.fused_linear_cross_entropy import \
                LigerFusedLinearCrossEntropyLoss
        except Exception:
            LigerFusedLinearCrossEntropyLoss = None
    if LigerFusedLinearCrossEntropyLoss is not None:
        module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")
        return lambda hidden, weight, target: _first_tensor(module(weight, hidden, target))
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import \
            LigerFusedLinearCrossEntropyFunction
    except Exception as exc:
        pytest.skip(f"Liger-Kernel peer: liger_kernel {probe.version} has neither "
                    f"liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss nor "
                    f"liger_kernel.ops.fused_linear_cross_entropy ({exc!r})")
    # defaults after bias: ignore_index=-100, reduction="mean"
    return lambda hidden, weight, target: _first_tensor(
        LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, target, None))


def cce_linear_ce() -> Callable:
    """Apple's Cut Cross-Entropy, as fn(hidden, weight, target); skips when absent.

    Public API (cut-cross-entropy 24.x / 25.x): linear_cross_entropy(e, c, targets,
    bias=None, ignore_index=-100, softcap=None, reduction="mean", ...). Its default
    impl ("cce") filters gradient tiles below bf16 resolution (filter_eps="auto"):
    the configuration its authors recommend and benchmark.
    """
    probe = backends.cut_cross_entropy()
    if not probe.available:
        pytest.skip(f"Cut Cross-Entropy peer: not available ({probe.detail})")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:
        pytest.skip(f"Cut Cross-Entropy peer: cut_cross_entropy {probe.version} has no "
                    f"linear_cross_entropy ({exc!r})")
    return lambda hidden, weight, target: _first_tensor(
        linear_cross_entropy(hidden, weight, target, ignore_index=IGNORE_INDEX,
                             reduction="mean"))


# variant -> role in the ratio table
LINEAR_CE_VARIANTS = {"eager": "baseline", "compile": "peer", "fused": "fused",
                      "liger": "peer", "cce": "peer"}
PEERS = ("compile", "liger", "cce")


def linear_ce_loss_fn(variant: str) -> Callable:
    """fn(hidden, weight, target) -> mean loss over non-ignored rows, for a variant."""
    if variant == "eager":
        return lambda h, w, y: uf.linear_cross_entropy(h, w, y, impl="reference")
    if variant == "fused":
        return lambda h, w, y: uf.linear_cross_entropy(h, w, y, impl="triton")
    if variant == "compile":
        # mode default; static shapes so that the second group's shapes get their own
        # specialised graph rather than a dynamic-shape recompile of the first.
        return torch.compile(plain_linear_ce, dynamic=False)
    if variant == "liger":
        return liger_linear_ce()
    if variant == "cce":
        return cce_linear_ce()
    raise ValueError(f"unknown linear CE variant {variant!r}")


def linear_ce_step(x: LinearCEInputs, variant: str, fn: Optional[Callable] = None):
    fn = fn if fn is not None else linear_ce_loss_fn(variant)
    return make_step(lambda: fn(x.hidden, x.weight, x.target), x.params)


def as_the_trainer_runs(device: torch.device, autocast: Optional[bool] = None):
    """bf16 autocast, the trainer's setting (on by default on CUDA, where the benchmarks
    run). Without it the regression reference (the plain path's math) upcasts hidden,
    weight and bias to fp32 and multiplies in fp32: a baseline doing other work than the
    trainer's plain path, with two fp32 [N, H] copies in its memory figure."""
    enabled = torch.device(device).type == "cuda" if autocast is None else autocast
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def regression_step(x: RegressionInputs, impl: str, autocast: Optional[bool] = None):
    def loss():
        with as_the_trainer_runs(x.hidden.device, autocast):
            return uf.regression_loss(x.hidden, x.weight, x.target, bias=x.bias, impl=impl)
    return make_step(loss, x.params)


def joint_loss_step(pack: UniMRGPack, impl: str, autocast: Optional[bool] = None):
    def loss():
        with as_the_trainer_runs(pack.hidden.device, autocast):
            return uf.joint_loss(pack.hidden, pack.heads, pack.num_tasks,
                                 task_weights=pack.task_weights, impl=impl).total
    return make_step(loss, pack.params)


# ======================================================================== benchmarks
def _first_call(step, variant: str, expected: float, peer: bool) -> None:
    """Runs the step once before timing (torch.compile compiles here) and checks its
    loss against the fp32 value. A peer that cannot run on this machine (a version
    mismatch with this torch / triton) is skipped with its error; ours must run."""
    try:
        loss, grads = step()
        got = float(loss)
    except Exception as exc:
        if not peer:
            raise
        pytest.skip(f"peer {variant!r} failed on this machine: {exc!r}")
    assert math.isfinite(got) and abs(got - expected) <= LOSS_RTOL * abs(expected), \
        (f"{variant}: loss {got:.6g} differs from the fp32 value {expected:.6g} "
         f"by more than {LOSS_RTOL:.0%}")
    assert all(gr is not None for gr in grads), f"{variant}: a parameter got no gradient"
    del loss, grads


def _bench_linear_ce(gpu_bench, variant: str, shape: str) -> None:
    fn = linear_ce_loss_fn(variant)  # an absent peer skips before ~1 GB of inputs exist
    dims = LINEAR_CE_SHAPES[shape]
    x = make_linear_ce_inputs(**dims, dtype=DTYPE, device="cuda", ignore_frac=LINEAR_CE_IGNORE_FRAC)
    step = linear_ce_step(x, variant, fn)
    _first_call(step, variant, linear_ce_fp32(x), peer=variant in PEERS)
    gpu_bench(step, flops=x.useful_flops, role=LINEAR_CE_VARIANTS[variant], variant=variant,
              n=dims["n"], h=dims["h"], v=dims["v"], n_valid=x.n_valid, dtype="bf16")


@pytest.mark.benchmark(group="linear-ce-1.5b")
@pytest.mark.parametrize("variant", list(LINEAR_CE_VARIANTS))
def test_bench_linear_ce_1_5b(gpu_bench, variant):
    _bench_linear_ce(gpu_bench, variant, "1.5b")


@pytest.mark.benchmark(group="linear-ce-7b")
@pytest.mark.parametrize("variant", list(LINEAR_CE_VARIANTS))
def test_bench_linear_ce_7b(gpu_bench, variant):
    _bench_linear_ce(gpu_bench, variant, "7b")


IMPL_ROLES = {"reference": "baseline", "triton": "fused"}


@pytest.mark.benchmark(group="regression-head")
@pytest.mark.parametrize("impl", list(IMPL_ROLES))
def test_bench_regression_head(gpu_bench, impl):
    x = make_regression_inputs(**REGRESSION_SHAPE, dtype=DTYPE, device="cuda")
    with torch.no_grad():
        p = F.linear(x.hidden.float(), x.weight.float(), x.bias.float())
        expected = float(((p - x.target.float()) ** 2).mean())
    step = regression_step(x, impl)
    _first_call(step, impl, expected, peer=False)
    gpu_bench(step, flops=x.useful_flops, role=IMPL_ROLES[impl], impl=impl, dtype="bf16",
              **REGRESSION_SHAPE)


@pytest.mark.benchmark(group="joint-loss-unimrg")
@pytest.mark.parametrize("impl", list(IMPL_ROLES))
def test_bench_joint_loss_unimrg(gpu_bench, impl):
    pack = make_unimrg_pack(**UNIMRG_PACK_SHAPE, device="cuda", dtype=DTYPE)
    step = joint_loss_step(pack, impl)
    _first_call(step, impl, joint_loss_fp32(pack), peer=False)
    gpu_bench(step, flops=pack.useful_flops, role=IMPL_ROLES[impl], impl=impl, dtype="bf16",
              rows_per_head=[int(hd.rows.shape[0]) for hd in pack.heads], **UNIMRG_PACK_SHAPE)
