"""unimrg-fast: fused kernels for UniMRG / SGT post-training of unified multimodal models.

Public surface (DESIGN.md section 2)::

    import unimrg_fast as uf
    uf.linear_cross_entropy(hidden, weight, target, impl="auto")
    uf.regression_loss(hidden, weight, target, impl="auto")
    uf.joint_loss(hidden, heads, num_tasks, impl="auto")
    uf.packed_attention(q, k, v, layout, impl="auto")
    uf.rms_norm(x, weight, out_dtype=torch.bfloat16, impl="auto")   # decoder elementwise ops,
    uf.swiglu(gate, up, impl="auto")                               # dropped into HF decoders
    uf.rotary_embedding(q, cos, sin, impl="auto")                  # by uf.hf.fuse_decoder_ops
    uf.PackedLayout.from_spans([[(1088, "full"), (40, "causal")], ...])

Every op takes impl="auto" | "triton" | "reference" (| peers); see unimrg_fast.backends.
"""
from unimrg_fast.layout import PackedLayout, TileMetadata
from unimrg_fast import heads  # noqa: F401  (uf.heads.LMHead, ...)
from unimrg_fast import hf  # noqa: F401  (uf.hf.fuse_decoder_ops: fused norms / MLP / rotary in HF decoders)
from unimrg_fast import targets  # noqa: F401  (uf.targets: latent / DDPM / flow-matching targets)
from unimrg_fast.ops import (joint_loss, linear_cross_entropy, linear_cross_entropy_with_stats,
                             packed_attention, regression_loss, rms_norm, rotary_embedding,
                             swiglu)
from unimrg_fast.specs import CEHeadSpec, JointLossOutput, RegressionHeadSpec

__version__ = "0.1.0"

__all__ = [
    "PackedLayout", "TileMetadata", "CEHeadSpec", "RegressionHeadSpec", "JointLossOutput",
    "linear_cross_entropy", "linear_cross_entropy_with_stats", "regression_loss", "joint_loss", "packed_attention",
    "rms_norm", "swiglu", "rotary_embedding",
]
