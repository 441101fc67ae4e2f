"""Public ops: each validates its arguments once, then dispatches through
`unimrg_fast.backends.resolve` to the fused kernel, the reference or a peer."""
from unimrg_fast.ops.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_with_stats
from unimrg_fast.ops.regression_loss import regression_loss
from unimrg_fast.ops.joint_loss import joint_loss
from unimrg_fast.ops.packed_attention import packed_attention
from unimrg_fast.ops.rms_norm import rms_norm
from unimrg_fast.ops.rotary import rotary_embedding
from unimrg_fast.ops.swiglu import swiglu
# Every module backends.resolve can dispatch to is imported with the package: resolve then
# finds it in sys.modules, which torch.compile traces (an import would graph-break it).
from unimrg_fast.ops import attention_peers  # noqa: F401,E402

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_stats", "regression_loss", "joint_loss", "packed_attention", "rms_norm",
           "swiglu", "rotary_embedding"]
