"""The plain PyTorch path: every op's reference twin, with the same signature as the
public op (minus `impl`) and the same semantics (DESIGN.md section 3). It is the
oracle the fused kernels are tested against and the baseline they are timed against,
written the way UMM codebases compute these things today."""
from unimrg_fast.reference.cross_entropy import linear_cross_entropy
from unimrg_fast.reference.regression import regression_loss
from unimrg_fast.reference.joint import joint_loss
from unimrg_fast.reference.attention import packed_attention
from unimrg_fast.reference.rms_norm import rms_norm
from unimrg_fast.reference.rotary import rotary_embedding
from unimrg_fast.reference.swiglu import swiglu

__all__ = ["linear_cross_entropy", "regression_loss", "joint_loss", "packed_attention", "rms_norm",
           "swiglu", "rotary_embedding"]
