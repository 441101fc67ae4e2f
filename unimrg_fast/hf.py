"""Drop the fused decoder ops into a Hugging Face Qwen2 / Llama decoder, in place.

    import unimrg_fast as uf
    counts = uf.hf.fuse_decoder_ops(model, impl="triton")   # {"rms_norm": 57, "swiglu": 28, ...}
    uf.hf.set_decoder_impl(model, "reference")               # back to the model's own code

Outside attention and the heads, a decoder's step is elementwise work: RMSNorm (upcast,
square, mean, rsqrt, two multiplies), SwiGLU (silu, multiply) and the rotary embedding
(two multiplies, a rotate-half copy, a negation and an add per q and k), each op a
kernel of its own over the [T, H] rows and as many again in autograd's backward. On a
16k-token pack of a 1.5B decoder this was ~150 ms of a 460 ms step on an H200
(benchmarks/results/NOTES.md). fuse_decoder_ops makes each of them one pass each way.

How: every RMSNorm, MLP and attention module of the families below gets a subclass of
its own class (weights, state_dict keys, hooks and FSDP wrapping are untouched) whose
forward asks `unimrg_fast.backends.resolve` for the op. Where that resolves to
"reference" the module runs its original forward, so impl="reference" is the unpatched
model exactly. The attention's rotary embedding is a module-level function of the
family's modeling file: it is wrapped once, and the wrapper takes the fused path only
inside the forward of an attention module that fuse_decoder_ops swapped, so every other
model in the process keeps the original. The impl is an attribute of each module, not a
context around the call, so that activation checkpointing's recomputation in the
backward runs the same code as the forward did.

Under autocast the fused ops return the autocast dtype: the eager norm and rotary return
fp32 there (fp32 residual stream, fp32 cos / sin) and the next matmul casts them, so the
fused result is that value rounded once, in the kernel. Not the decoder's final norm:
its output is the model's, in the dtype the model's own code gives.

Only the family's own code is fused: a rotary patched into the modeling file, or a norm /
MLP class whose forward was replaced (before fusing or since), runs as patched.
"""
from __future__ import annotations

import contextvars
import functools
import importlib
import sys
from typing import Callable, Dict, Optional

import torch
from torch import nn

from unimrg_fast import backends

FAMILIES = ("qwen2", "llama")   # decoders whose norm / MLP / rotary code this matches
IMPLS = ("auto", "triton", "reference")

# the impl of the attention module whose forward is running (None: not a fused one)
_rotary_impl: contextvars.ContextVar = contextvars.ContextVar("unimrg_rotary_impl", default=None)
# The same while torch.compile traces: Dynamo cannot trace a ContextVar (a fullgraph compile
# of ANY Qwen2 / Llama model would break once one is fused), but it traces a list's
# appends and pops. Only read and written under is_compiling(): eager code never sees it.
_traced_rotary_impls: list = []


def _current_rotary_impl() -> Optional[str]:
    if torch.compiler.is_compiling():
        return _traced_rotary_impls[-1] if _traced_rotary_impls else None
    return _rotary_impl.get()


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _resolve(op: str, impl: str, x: torch.Tensor, *more: torch.Tensor, **call):
    """backends.resolve for a call on x (and the other inputs `more`, whose forward-mode
    tangents steer it to the model's own code as well)."""
    return backends.resolve(op, impl, device=x.device, dtype=x.dtype, tensors=(x, *more),
                            **call)


def _hooked(module: nn.Module) -> bool:
    """Whether a hook would see `module` run, forward or backward (its own or a global
    one): the fused SwiGLU never calls act_fn, so it must not bypass a hook that steers or
    records it."""
    from torch.nn.modules import module as base

    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or base._global_forward_hooks
                or base._global_forward_pre_hooks or base._global_backward_hooks
                or base._global_backward_pre_hooks)


# ----------------------------------------------------------------------------- mixins
class _FusedRMSNorm:
    fused_impl = "reference"
    # Set by fuse_decoder_ops on a decoder layer's two norms, whose output only a
    # projection reads: under autocast they return the autocast dtype (see the module
    # docstring). Any other norm (the decoder's final one, whose output is the model's)
    # returns the dtype the model's own code gives.
    fused_feeds_projection = False

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not _own_forward_intact(self):
            return super().forward(hidden_states)
        name, fn = _resolve("rms_norm", self.fused_impl, hidden_states, self.weight,
                            hidden=hidden_states.shape[-1])
        if name == "reference":
            return super().forward(hidden_states)
        out_dtype = _autocast_dtype(hidden_states) if self.fused_feeds_projection else None
        return fn(hidden_states, self.weight, eps=float(self.variance_epsilon),
                  out_dtype=out_dtype)


class _FusedSwiGLUMLP:
    fused_impl = "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # act_fn is looked at per call: swapped after fusing (ReLU-fication, ablations) or
        # hooked, the model's own forward runs it
        if not _is_silu(self.act_fn) or _hooked(self.act_fn) or not _own_forward_intact(self):
            return super().forward(x)
        name, fn = _resolve("swiglu", self.fused_impl, x, self.gate_proj.weight,
                            self.gate_proj.bias, self.up_proj.weight, self.up_proj.bias)
        if name == "reference":
            return super().forward(x)
        return self.down_proj(fn(self.gate_proj(x), self.up_proj(x)))


class _FusedRotaryAttention:
    fused_impl = "reference"

    def forward(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            # No try / finally here: Dynamo cannot resume inside one, so a graph break in
            # the attention ran this wrapper eagerly and compiled the inner forward as a
            # frame of its own, which saw an empty list: HF's rotary, silently. Without
            # it the wrapper breaks at the call and the inner frame reads the list. An
            # exception out of the attention leaves its entry behind: a model compiled
            # later in the process may then rotate with the fused kernel, which computes
            # the same function (fp32 rounding apart).
            depth = len(_traced_rotary_impls)
            _traced_rotary_impls.append(self.fused_impl)
            out = super().forward(*args, **kwargs)
            while len(_traced_rotary_impls) > depth:
                _traced_rotary_impls.pop()
            return out
        token = _rotary_impl.set(self.fused_impl)
        try:
            return super().forward(*args, **kwargs)
        finally:
            _rotary_impl.reset(token)


def _fused_rotary(original: Callable) -> Callable:
    """The family's apply_rotary_pos_emb, fused inside a swapped attention's forward."""
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        impl = _current_rotary_impl()
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[-1] if args else 1)
        # only HF's [B, H, T, D] layout with [B, T, D] cos / sin (unsqueeze_dim = 1), one
        # table per batch row or one for all; 1-D position_ids give [T, D] tables, which
        # HF broadcasts against the head axis: its own code keeps that meaning
        if impl is None or unsqueeze_dim != 1 or len(args) > 1 or cos.requires_grad \
                or q.dim() != 4 or cos.dim() != 3 or cos.shape[0] not in (1, q.shape[0]) \
                or cos.shape[1] != q.shape[2]:
            return original(q, k, cos, sin, *args, **kwargs)
        name, fn = _resolve("rotary_embedding", impl, q, k, cos, sin)
        if name == "reference":
            return original(q, k, cos, sin, *args, **kwargs)
        out_dtype = _autocast_dtype(q)
        return fn(q, cos, sin, out_dtype=out_dtype), fn(k, cos, sin, out_dtype=out_dtype)

    apply_rotary_pos_emb.unimrg_fast_original = original
    return apply_rotary_pos_emb


# ------------------------------------------------------------------------------ patching
_MIXINS = {"RMSNorm": _FusedRMSNorm, "MLP": _FusedSwiGLUMLP, "Attention": _FusedRotaryAttention}
_OPS = {"RMSNorm": "rms_norm", "MLP": "swiglu", "Attention": "rotary_embedding"}
_subclasses: Dict[type, type] = {}
# a decoder layer's norms, whose output goes to the attention's / MLP's projections only
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def _family(module: nn.Module) -> Optional[str]:
    """The module's decoder family and its part ("RMSNorm" / "MLP" / "Attention"), or None."""
    cls = type(module)
    for family in FAMILIES:
        if cls.__module__ != f"transformers.models.{family}.modeling_{family}":
            continue
        for part in _MIXINS:
            if cls.__name__.endswith(part) and cls.__name__[:-len(part)].lower() == family:
                return part
    return None


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _family_code(fn: object, modeling) -> bool:
    """Whether `fn` is the family modeling file's own code, not a replacement patched in
    (a variant's rotary, a class's forward swapped for another): its code lives in that
    file. The rotary wrapper counts as the function it wraps."""
    fn = getattr(fn, "unimrg_fast_original", fn)
    code = getattr(fn, "__code__", None)
    return code is not None and code.co_filename == getattr(modeling, "__file__", None)


def _own_forward(cls: type) -> Optional[Callable]:
    """The norm / MLP class's forward when it is the family's own code, else None."""
    forward = vars(cls).get("forward")
    return forward if _family_code(forward, sys.modules[cls.__module__]) else None


def _own_forward_intact(module: nn.Module) -> bool:
    """Whether the norm / MLP class still has the forward it had when fused, the family's
    own code, which the fused op computes: a forward patched onto the class since (or
    before the fused class was made) runs instead."""
    base, own = type(module).unimrg_fast_base, type(module).unimrg_fast_own_forward
    return own is not None and base.forward is own   # (Dynamo cannot trace vars(base))


def _fused_class(cls: type, part: str) -> type:
    """The fused subclass of a decoder class, made once. It is named `Fused<Name>` in this
    module, where pickle looks it up (see __getattr__ below)."""
    if cls not in _subclasses:
        _subclasses[cls] = type(f"Fused{cls.__name__}", (_MIXINS[part], cls),
                                {"__module__": __name__, "unimrg_fast_base": cls,
                                 "unimrg_fast_own_forward": _own_forward(cls)})
    if part == "Attention":
        _wrap_rotary(importlib.import_module(cls.__module__))
    return _subclasses[cls]


def _swap(module: nn.Module, part: str) -> None:
    module.__class__ = _fused_class(type(module), part)


def __getattr__(name: str) -> type:
    """`Fused<Name>` for a decoder class of a family here (PEP 562): pickle finds a fused
    module's class by that name, also in a process that has fused nothing yet (torch.save
    of a fused model, a DataLoader worker, multiprocessing)."""
    base = name[len("Fused"):] if name.startswith("Fused") else ""
    for family in FAMILIES:
        for part in _MIXINS:
            if base.lower() == family + part.lower():
                modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
                cls = getattr(modeling, base, None)
                if cls is not None:
                    return _fused_class(cls, part)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _wrap_rotary(modeling) -> None:
    """Wraps the family's own apply_rotary_pos_emb, once; a replacement patched into the
    modeling file (a variant's rotary) is left alone, and runs."""
    current = modeling.apply_rotary_pos_emb
    if not hasattr(current, "unimrg_fast_original") and _family_code(current, modeling):
        modeling.apply_rotary_pos_emb = _fused_rotary(current)


def _fusable(module: nn.Module, part: str) -> bool:
    """Whether the fused op computes what the module's code does now: an MLP's activation
    is SiLU, a norm's / MLP's forward is the family's own, and the family's rotary is the
    one the fused attention wraps."""
    if part == "MLP" and not _is_silu(module.act_fn):
        return False
    cls = type(module)
    if isinstance(module, tuple(_MIXINS.values())):
        cls = cls.unimrg_fast_base
    if part == "Attention":
        modeling = sys.modules[cls.__module__]
        _wrap_rotary(modeling)
        return hasattr(modeling.apply_rotary_pos_emb, "unimrg_fast_original")
    return _own_forward(cls) is not None


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")


def fuse_decoder_ops(model: nn.Module, impl: str = "auto") -> Dict[str, int]:
    """Swaps, in place, every Qwen2 / Llama RMSNorm, SwiGLU MLP and attention module of
    `model` for one that runs unimrg_fast.rms_norm / swiglu / rotary_embedding under
    `impl` ("auto", "triton" or "reference": the model's own code). Safe to call twice.

    Returns how many modules run each op ({"rms_norm": n, "swiglu": n,
    "rotary_embedding": n}). An MLP whose activation is not SiLU keeps its own code.
    Raises ValueError when the model has none of these modules (not a decoder this
    knows), naming the families it knows.
    """
    _check_impl(impl)
    counts = {op: 0 for op in _OPS.values()}
    for name, module in model.named_modules():
        part = _family(module) or _fused_part(module)
        if part is None or not _fusable(module, part):
            continue
        if not isinstance(module, tuple(_MIXINS.values())):
            _swap(module, part)
        module.fused_impl = impl
        if part == "RMSNorm":
            module.fused_feeds_projection = name.rsplit(".", 1)[-1] in _LAYER_NORMS
        counts[_OPS[part]] += 1
    if not any(counts.values()):
        raise ValueError(f"fuse_decoder_ops found no RMSNorm, MLP or attention module of a "
                         f"{' / '.join(FAMILIES)} decoder in {type(model).__name__}")
    return counts


def _fused_part(module: nn.Module) -> Optional[str]:
    """The part of a module fuse_decoder_ops already swapped."""
    for part, mixin in _MIXINS.items():
        if isinstance(module, mixin):
            return part
    return None


def set_decoder_impl(model: nn.Module, impl: str) -> int:
    """Sets the impl of every module fuse_decoder_ops swapped in `model`; returns how many."""
    _check_impl(impl)
    swapped = 0
    for module in model.modules():
        if _fused_part(module) is not None:
            module.fused_impl = impl
            swapped += 1
    return swapped
