"""What this process can run, and which implementation of each op to use.

This is the only module that probes the environment (CUDA, Triton native or
interpreted, flash-attn, xformers, apex, Liger-Kernel, Cut Cross-Entropy,
FlexAttention). Ops never import optional packages themselves: they ask
`resolve(op, impl, device=...)` for a callable.

Choosing an implementation:
- an explicit `impl="name"` is honoured or fails with an error that says how to get it;
- `impl="auto"` takes the first implementation, in the table's priority order, that is
  built, available here and accepts the call (for example FlashAttention only for
  layouts it can express, the Triton attention only for head dims and dtypes whose tiles
  fit the GPU); it falls back quietly and logs its choice once;
- the environment variable `UNIMRG_FAST_IMPL` overrides "auto": either one name for
  every op that has it (`UNIMRG_FAST_IMPL=reference`) or per op
  (`UNIMRG_FAST_IMPL=packed_attention=flex,linear_cross_entropy=reference`).

`python -m unimrg_fast.backends` prints what was found.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import sys
import logging
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

log = logging.getLogger("unimrg_fast")

ENV_IMPL = "UNIMRG_FAST_IMPL"


# --------------------------------------------------------------------------- probes
@dataclasses.dataclass(frozen=True)
class Probe:
    """The outcome of looking for one capability."""

    available: bool
    version: Optional[str] = None
    detail: str = ""  # why it is missing, or what was found (device name, mode)


_probe_results: Dict[Tuple[int, str], "Probe"] = {}   # (epoch, probe name) -> outcome
# Bumped by refresh(). The probes' cache keys include it, so code torch.compile traced
# (whose probe outcomes are constants of the graph) guards on its value: a graph traced
# before a refresh() is never reused after it, even one traced while the cache was empty.
_epoch = 0
_loaded: Dict[str, Callable] = {}  # "module:function" -> the function (Implementation.load)


def _memo(probe: Callable[[], "Probe"]) -> Callable[[], "Probe"]:
    """Runs a probe once per process (until refresh()). A plain dict rather than
    functools.lru_cache, because torch.compile traces resolve() and warns about (and may
    mistrust) lru_cache wrappers."""

    @functools.wraps(probe)
    def cached() -> "Probe":
        key = (_epoch, probe.__name__)
        if key not in _probe_results:
            _probe_results[key] = Probe(*_run_probe(probe))
        return _probe_results[key]

    return cached


@torch.compiler.assume_constant_result
def _run_probe(probe: Callable[[], "Probe"]) -> Tuple[bool, Optional[str], str]:
    """A probe's outcome as plain constants. torch.compile runs it at trace time (a probe
    imports packages, which would graph-break a compiled op that runs before any eager
    call) and keeps the result as a constant of the graph."""
    found = probe()
    return found.available, found.version, found.detail


def _import_probe(module: str, missing: str) -> Probe:
    """Imports `module`; an ImportError or a broken install (ABI mismatch) is 'missing'."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return Probe(False, None, f"{missing} ({exc.__class__.__name__}: {exc})")
    except Exception as exc:  # e.g. a CUDA extension built for another torch
        return Probe(False, None, f"{module} is installed but failed to import: {exc}")
    version = getattr(mod, "__version__", None)
    return Probe(True, str(version) if version is not None else None, module)


@_memo
def cuda() -> Probe:
    if not torch.cuda.is_available():
        return Probe(False, None, "no CUDA device visible to torch")
    major, minor = torch.cuda.get_device_capability()
    return Probe(True, f"sm_{major}{minor}", torch.cuda.get_device_name())


def cuda_capability() -> Optional[Tuple[int, int]]:
    return torch.cuda.get_device_capability() if cuda().available else None


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _release(version: Optional[str]) -> Tuple[int, ...]:
    """The leading numbers of a version string: "3.6.0+git1a2b" -> (3, 6, 0); None -> ()."""
    match = re.match(r"\d+(?:\.\d+)*", version or "")
    return tuple(int(n) for n in match.group(0).split(".")) if match else ()


def _numpy_version() -> str:
    import numpy   # a dependency; imported here so that the probes stay lazy

    return numpy.__version__


def interpreter_numpy_conflict(triton_version: Optional[str],
                               numpy_version: Optional[str]) -> Optional[str]:
    """Why this Triton interpreter cannot run our kernels under this numpy, or None.

    Triton's interpreter before 3.7 turns a scalar tensor into a loop bound with
    int() of a one-element array, which numpy 2.4 made an error: every kernel whose
    loop bound is computed (tl.minimum, a loaded count) fails inside the interpreter
    with "only 0-dimensional arrays can be converted to Python scalars". Say so here,
    naming the fix, instead of failing in the first kernel. Compiled Triton (GPU) is
    unaffected."""
    old_triton = (0,) < _release(triton_version) < (3, 7)
    new_numpy = _release(numpy_version) >= (2, 4)
    if old_triton and new_numpy:
        return (f"Triton {triton_version}'s interpreter cannot run under numpy {numpy_version} "
                "(its loop bounds fail on numpy >= 2.4); pip install 'numpy<2.4', or "
                "triton >= 3.7")
    return None


@_memo
def triton() -> Probe:
    found = _import_probe("triton", "pip install triton (Linux)")
    if not found.available:
        return found
    if triton_interpreted():
        conflict = interpreter_numpy_conflict(found.version, _numpy_version())
        if conflict:
            return Probe(False, found.version, conflict)
        return Probe(True, found.version, "interpreter")
    if cuda().available:
        return Probe(True, found.version, "native")
    return Probe(False, found.version,
                 "no CUDA device; set TRITON_INTERPRET=1 before importing unimrg_fast "
                 "to run the Triton kernels on the CPU interpreter")


@_memo
def flash_attn() -> Probe:
    return _import_probe("flash_attn", "pip install 'unimrg-fast[flash]' (builds flash-attn; needs CUDA)")


@_memo
def xformers() -> Probe:
    return _import_probe("xformers.ops", "pip install 'unimrg-fast[xformers]' (needs a matching torch build)")


@_memo
def apex() -> Probe:
    # NVIDIA apex is never a dependency: it is not on PyPI, and the PyPI project named
    # "apex" is unrelated. Tell them apart by a module only NVIDIA's has.
    found = _import_probe("apex", "NVIDIA apex is not installed (build it from NVIDIA's repository)")
    if not found.available:
        return found
    nvidia = _import_probe("apex.normalization", "")
    if not nvidia.available:
        return Probe(False, None, "the installed 'apex' is not NVIDIA apex (no apex.normalization)")
    return found


@_memo
def liger() -> Probe:
    return _import_probe("liger_kernel", "pip install liger-kernel")


@_memo
def cut_cross_entropy() -> Probe:
    return _import_probe("cut_cross_entropy", "pip install cut-cross-entropy")


@_memo
def flex_attention() -> Probe:
    return _import_probe("torch.nn.attention.flex_attention", "needs torch >= 2.5")


PROBES: Dict[str, Callable[[], Probe]] = {
    "cuda": cuda, "triton": triton, "flash_attn": flash_attn, "xformers": xformers,
    "apex": apex, "liger": liger, "cut_cross_entropy": cut_cross_entropy,
    "flex_attention": flex_attention,
}


def refresh() -> None:
    """Forgets every probe and logged choice (after installing a package, or in tests)."""
    global _epoch
    _epoch += 1
    _probe_results.clear()
    _loaded.clear()
    _logged_choices.clear()


def describe() -> Dict[str, Probe]:
    return {name: probe() for name, probe in PROBES.items()}


# ------------------------------------------------------------------ implementations
@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute an op.

    `target` is "module:function", imported only when first used. `requires` names
    probes that must be available. `accepts(device=..., **call)` returns None when this
    implementation can compute the call, else the reason it cannot (e.g. a mask
    FlashAttention cannot express, a head dim or dtype whose tiles do not fit the GPU):
    "auto" skips it then, an explicit request fails. It must stay cheap (no compilation,
    no device sync), and answer None for what the call does not say (see `resolve`).
    `prefer(device=..., **call)` is consulted by "auto" only: a reason not to choose
    it by default although it could run (the Triton interpreter is exact but slow).
    `planned` marks an implementation that a later issue delivers.
    """

    op: str
    name: str
    target: str
    requires: Tuple[str, ...] = ()
    accepts: Optional[Callable[..., Optional[str]]] = None
    prefer: Optional[Callable[..., Optional[str]]] = None
    auto: bool = True
    planned: Optional[str] = None
    # Differentiable under torch.func (jvp, grad, jacrev) and forward-mode AD: only
    # code made of PyTorch ops. A kernel's autograd knows the backward alone: under jvp
    # its tangent would come back zero, silently, so resolve() passes such entries by.
    transforms: bool = False

    def load(self) -> Callable:
        return _load(self.target)

    def unavailable_reason(self, device: Optional[torch.device]) -> Optional[str]:
        if self.planned:
            return f"not implemented yet ({self.planned})"
        for req in self.requires:
            probe = PROBES[req]()
            if not probe.available:
                return f"{req} is unavailable: {probe.detail}"
        if "triton" in self.requires and device is not None:
            if device.type == "cpu" and not triton_interpreted():
                return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
            if device.type == "cuda" and triton_interpreted():
                return "the Triton interpreter runs on CPU tensors only"
        return None


def _load(target: str) -> Callable:
    """The function named "module:function", cached. The package imports every module
    named in the table (unimrg_fast.ops), so under torch.compile this is a dict lookup
    and a sys.modules lookup, never an import (which would graph-break)."""
    if target not in _loaded:
        module, _, attr = target.partition(":")
        imported = sys.modules.get(module)
        if imported is None:
            imported = importlib.import_module(module)
        _loaded[target] = getattr(imported, attr)
    return _loaded[target]


def _not_interpreted_on_cpu(device: Optional[torch.device] = None, **_) -> Optional[str]:
    # The interpreter is exact but orders of magnitude slower than the reference on a
    # CPU, so "auto" never picks it; ask for impl="triton" explicitly to use it.
    if device is None or device.type != "cuda":
        return "the Triton kernels are chosen automatically for CUDA tensors only"
    return None


def kernel_dtype(dtype: Optional[torch.dtype] = None, **_) -> Optional[str]:
    """The decoder ops' kernels compute fp32 / fp16 / bf16: "auto" runs a float64 call
    (a float64 model, a gradcheck) on the reference instead of failing in the kernel."""
    if dtype == torch.float64:
        return "float64 (the kernels take fp32 / fp16 / bf16)"
    return None


def _predicate(target: str) -> Callable[..., Optional[str]]:
    """An `accepts` predicate that lives with its implementation ("module:function"): it
    knows the kernel's limits. Imported on first use, because the ops package imports
    this module."""
    def predicate(**call) -> Optional[str]:
        return _load(target)(**call)

    predicate.__name__ = target.partition(":")[2]
    return predicate


_PEERS = "unimrg_fast.ops.attention_peers"
_ATTN = "unimrg_fast.ops.packed_attention"

_REF = "unimrg_fast.reference"
_TABLE: List[Implementation] = [
    # Order within an op is the "auto" priority.
    Implementation("linear_cross_entropy", "triton", "unimrg_fast.ops.linear_cross_entropy:_triton",
                   ("triton",), prefer=_not_interpreted_on_cpu),
    Implementation("linear_cross_entropy", "reference", f"{_REF}:linear_cross_entropy",
                   transforms=True),
    Implementation("regression_loss", "triton", "unimrg_fast.ops.regression_loss:_triton",
                   ("triton",), prefer=_not_interpreted_on_cpu),
    Implementation("regression_loss", "reference", f"{_REF}:regression_loss", transforms=True),
    Implementation("joint_loss", "triton", "unimrg_fast.ops.joint_loss:_triton",
                   ("triton",), prefer=_not_interpreted_on_cpu),
    Implementation("joint_loss", "reference", f"{_REF}:joint_loss", transforms=True),
    # FlashAttention / xFormers come first where their one-flag-per-pack masks suffice;
    # flex is a benchmark peer and an explicit fallback, never picked by "auto".
    Implementation("packed_attention", "flash", f"{_PEERS}:flash", ("flash_attn",),
                   accepts=_predicate(f"{_PEERS}:flash_accepts")),
    Implementation("packed_attention", "xformers", f"{_PEERS}:xformers", ("xformers",),
                   accepts=_predicate(f"{_PEERS}:xformers_accepts")),
    Implementation("packed_attention", "flex", f"{_PEERS}:flex", ("flex_attention",),
                   accepts=_predicate(f"{_PEERS}:flex_accepts"), auto=False),
    # Triton refuses a head dim it lacks, or one whose smallest tiles overflow the GPU's
    # shared memory (fp32 at D > 128 on small GPUs): "auto" then takes the reference.
    Implementation("packed_attention", "triton", f"{_ATTN}:_triton", ("triton",),
                   accepts=_predicate(f"{_ATTN}:triton_accepts"), prefer=_not_interpreted_on_cpu),
    Implementation("packed_attention", "reference", f"{_REF}:packed_attention", transforms=True),
    # The decoder's elementwise ops (RMSNorm, SwiGLU, rotary): row-wise fused kernels.
    Implementation("rms_norm", "triton", "unimrg_fast.ops.rms_norm:_triton", ("triton",),
                   accepts=_predicate("unimrg_fast.ops.rms_norm:triton_accepts"),
                   prefer=_not_interpreted_on_cpu),
    Implementation("rms_norm", "reference", f"{_REF}:rms_norm", transforms=True),
    Implementation("swiglu", "triton", "unimrg_fast.ops.swiglu:_triton", ("triton",),
                   accepts=kernel_dtype, prefer=_not_interpreted_on_cpu),
    Implementation("swiglu", "reference", f"{_REF}:swiglu", transforms=True),
    Implementation("rotary_embedding", "triton", "unimrg_fast.ops.rotary:_triton", ("triton",),
                   accepts=_predicate("unimrg_fast.ops.rotary:triton_accepts"),
                   prefer=_not_interpreted_on_cpu),
    Implementation("rotary_embedding", "reference", f"{_REF}:rotary_embedding", transforms=True),
]


def implementations(op: str) -> List[Implementation]:
    found = [impl for impl in _TABLE if impl.op == op]
    if not found:
        known = sorted({impl.op for impl in _TABLE})
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(known)}")
    return found


def register(impl: Implementation, *, before: Optional[str] = None) -> None:
    """Adds or replaces an implementation (adapters and tests use this)."""
    global _TABLE
    _TABLE = [i for i in _TABLE if not (i.op == impl.op and i.name == impl.name)]
    names = [i.name for i in _TABLE if i.op == impl.op]
    if before is not None and before in names:
        pos = next(k for k, i in enumerate(_TABLE) if i.op == impl.op and i.name == before)
        _TABLE.insert(pos, impl)
    else:
        _TABLE.append(impl)
    _logged_choices.clear()


def forced_impl(op: str) -> Optional[str]:
    """The implementation UNIMRG_FAST_IMPL forces for `op`, if any."""
    spec = os.environ.get(ENV_IMPL, "").strip()
    if not spec:
        return None
    glob = None
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if "=" in part:
            name_op, _, name = part.partition("=")
            if name_op.strip() == op:
                return name.strip()
        else:
            glob = part
    if glob is not None and glob not in ("auto",):
        if any(i.name == glob for i in implementations(op)):
            return glob
        # A global name this op lacks (e.g. "flash" for a loss) leaves the op on "auto".
    return None


_logged_choices: set = set()


def _differentiating_transforms() -> bool:
    """Whether any torch.func transform now running differentiates (grad / jvp and what
    builds on them); vmap and functionalize alone do not, and kernels run under them."""
    functorch = getattr(torch._C, "_functorch", None)
    stack_of = getattr(functorch, "get_interpreter_stack", None)
    stack = stack_of() if stack_of is not None else None
    if not stack:
        return False
    kinds = getattr(functorch, "TransformType", None)
    if kinds is None:   # a torch without the enum: any transform counts
        return True
    return any(level.key() in (kinds.Grad, kinds.Jvp) for level in stack)


def derivative_transform(tensors: Sequence[object] = ()) -> Optional[str]:
    """Why this call needs derivatives a kernel's autograd does not give, or None: it runs
    under a torch.func derivative transform (jvp, grad, jacrev, ...; not vmap alone), or
    one of `tensors` carries a forward-mode tangent (torch.autograd.forward_ad). Either way
    a kernel's custom autograd, which knows the backward pass alone, would drop the
    tangent silently.
    Not checked while torch.compile traces (it cannot trace these private queries)."""
    if torch.compiler.is_compiling():
        return None
    if _differentiating_transforms():
        return "it runs under a torch.func derivative transform (jvp / grad / jacrev / ...)"
    forward_ad = torch.autograd.forward_ad
    if getattr(forward_ad, "_current_level", -1) >= 0:   # inside a dual_level()
        for t in tensors:
            if isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None:
                return "an input carries a forward-mode tangent (torch.autograd.forward_ad)"
    return None


def resolve(op: str, impl: str = "auto", *, device: Optional[torch.device] = None,
            tensors: Sequence[object] = (), **call) -> Tuple[str, Callable]:
    """Returns (name, function) of the implementation to run for this call.

    `device` and `call` describe the call for the `accepts` predicates, which read what
    concerns them and ignore the rest. The public ops pass what they know before any
    work: packed_attention `layout`, `dtype` (q's), `head_dim` (q's D) and
    `deterministic`. A key left out (or None) means "unknown": a predicate then accepts,
    and the implementation's own argument checks decide when it runs. `tensors`: the
    call's differentiable inputs, looked at for forward-mode tangents only; under a
    derivative transform (derivative_transform) only `transforms` entries can run.
    """
    if not isinstance(impl, str):
        raise TypeError(f"impl must be a string, got {type(impl).__name__}")
    table = implementations(op)
    transform = derivative_transform(tensors)
    if impl == "auto":
        forced = forced_impl(op)
        if forced is not None:
            return _explicit(op, forced, table, device, call, f"{ENV_IMPL}", transform)
        reasons = []
        for cand in table:
            if not cand.auto:
                continue
            why = cand.unavailable_reason(device)
            if why is None and transform is not None and not cand.transforms:
                why = f"{transform}, whose derivatives its kernels do not give"
            for predicate in (cand.accepts, cand.prefer):
                if why is None and predicate is not None:
                    why = predicate(device=device, **call)
            if why is None:
                key = (op, cand.name, device.type if device is not None else None)
                # logged once, from an eager call (torch.compile cannot trace a logger)
                if key not in _logged_choices and not torch.compiler.is_compiling():
                    _logged_choices.add(key)
                    skipped = "; ".join(reasons)
                    log.info("unimrg_fast: %s uses impl=%r%s", op, cand.name,
                             f" (skipped: {skipped})" if skipped else "")
                return cand.name, cand.load()
            reasons.append(f"{cand.name}: {why}")
        raise RuntimeError(f"no implementation of {op} can run this call: " + "; ".join(reasons))
    return _explicit(op, impl, table, device, call, "impl", transform)


def check_impl_name(op: str, impl: str, source: str = "impl", allow_auto: bool = True,
                    table: Optional[List[Implementation]] = None) -> None:
    """ValueError unless `impl` names an entry of `op`'s table (or is "auto", where
    allowed), naming `source`: resolve's check (with the table it holds), and the heads'
    when they are made."""
    names = [i.name for i in (table if table is not None else implementations(op))]
    if impl not in names and not (allow_auto and impl == "auto"):
        raise ValueError(f"{source}={impl!r} is not an implementation of {op}; "
                         f"choose one of {', '.join(['auto'] + names)}")


def _explicit(op, impl, table, device, call, source, transform=None) -> Tuple[str, Callable]:
    check_impl_name(op, impl, source, allow_auto=False, table=table)   # refuses op=auto too
    cand = next(i for i in table if i.name == impl)
    if transform is not None and not cand.transforms:
        raise ValueError(f"{op}(impl={impl!r}) cannot compute this call: {transform}, "
                         f"and its kernels give the backward pass alone (the tangent would "
                         f"be dropped); use impl='reference' or 'auto'")
    why = cand.unavailable_reason(device)
    if why is not None:
        if cand.planned:
            raise NotImplementedError(f"{op}(impl={impl!r}) is {why}; use impl='reference' "
                                      f"or impl='auto' meanwhile")
        raise RuntimeError(f"{op}(impl={impl!r}) cannot run here: {why}")
    if cand.accepts is not None:
        reason = cand.accepts(device=device, **call)
        if reason is not None:
            raise ValueError(f"{op}(impl={impl!r}) cannot compute this call: {reason}")
    return cand.name, cand.load()


def _main() -> None:
    print(f"torch {torch.__version__}")
    for name, probe in describe().items():
        state = "yes" if probe.available else "no "
        version = f" {probe.version}" if probe.version else ""
        print(f"  {name:18s} {state}{version}  {probe.detail}")
    ops = sorted({i.op for i in _TABLE})
    for op in ops:
        names = ", ".join(i.name + (" (planned)" if i.planned else "") for i in implementations(op))
        print(f"  {op}: {names}")


if __name__ == "__main__":
    _main()
