"""nn.Module heads over the fused ops: the text LM head, the image-token (codebook) head
of AR models, and the regression heads of the pixel / depth / segmentation latents.

Each head owns its weights and offers three ways to use them:

    head(hidden)                     -> predictions (logits or latents): for sampling
    head.loss(hidden, target, ...)   -> the fused loss, never materialising the logits
    head.spec(rows, target, task)    -> a CEHeadSpec / RegressionHeadSpec for joint_loss

    heads = [lm.spec(text_rows, text_targets, task=UND),
             depth.spec(depth_rows, eps_targets, task=DEPTH, token_weight=t_weights)]
    out = uf.joint_loss(hidden, heads, num_tasks=4)
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from unimrg_fast import backends
from unimrg_fast._validation import check_sizes
from unimrg_fast.ops import linear_cross_entropy, regression_loss
from unimrg_fast.reference.cross_entropy import check_ce_options
from unimrg_fast.specs import CEHeadSpec, RegressionHeadSpec


class LMHead(nn.Module):
    """Linear head H -> V scored by cross-entropy (DESIGN.md 3.1).

    Args:
        hidden_size: H. vocab_size: V (151,936 for Qwen2.5's text vocabulary).
        bias: add a [V] bias. ignore_index, label_smoothing, z_loss, softcap: the loss
            options of linear_cross_entropy, fixed per head.
        impl: implementation for the loss ("auto", "triton", "reference").
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, bias: bool = False,
                 ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: Optional[float] = None, impl: str = "auto",
                 device=None, dtype=None) -> None:
        super().__init__()
        check_sizes(hidden_size=hidden_size, vocab_size=vocab_size)
        # the loss would refuse bad options at its first call, but forward() (sampling)
        # would use them: softcap = 0 gives all-zero logits, a negative one acts as |c|
        check_ce_options(ignore_index, label_smoothing, z_loss, softcap)
        backends.check_impl_name("linear_cross_entropy", impl)
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, device=device, dtype=dtype))
        self.bias = (nn.Parameter(torch.zeros(vocab_size, device=device, dtype=dtype))
                     if bias else None)
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.z_loss, self.softcap, self.impl = z_loss, softcap, impl
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] (softcapped like the loss sees them). For sampling, not training."""
        logits = nn.functional.linear(hidden, self.weight, self.bias)
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def loss(self, hidden: torch.Tensor, target: torch.Tensor, *,
             token_weight: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
        return linear_cross_entropy(hidden, self.weight, target, bias=self.bias,
                                    ignore_index=self.ignore_index, reduction=reduction,
                                    label_smoothing=self.label_smoothing, z_loss=self.z_loss,
                                    softcap=self.softcap, token_weight=token_weight, impl=self.impl)

    def spec(self, rows: torch.Tensor, target: torch.Tensor, task: Union[torch.Tensor, int], *,
             token_weight: Optional[torch.Tensor] = None) -> CEHeadSpec:
        return CEHeadSpec(self.weight, rows, target, task, bias=self.bias, token_weight=token_weight,
                          ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                          z_loss=self.z_loss, softcap=self.softcap)

    def extra_repr(self) -> str:
        v, h = self.weight.shape
        return f"hidden_size={h}, vocab_size={v}, bias={self.bias is not None}"


class ImageTokenHead(LMHead):
    """Codebook head of AR models (Show-o-like): predicts an image token's discrete code
    (masked-token prediction over e.g. 8,192 VQ codes) for the pixel, depth or
    segmentation target image."""

    def __init__(self, hidden_size: int, num_codes: int = 8192, **kwargs) -> None:
        super().__init__(hidden_size, num_codes, **kwargs)


class RegressionHead(nn.Module):
    """Linear head H -> C scored by per-row MSE (DESIGN.md 3.2): continuous latent
    tokens of the pixel / depth / segmentation targets (latent MSE, DDPM epsilon or flow
    velocity; unimrg_fast.targets builds the target)."""

    def __init__(self, hidden_size: int, out_channels: int, *, bias: bool = True,
                 impl: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        check_sizes(hidden_size=hidden_size, out_channels=out_channels)
        backends.check_impl_name("regression_loss", impl)
        self.weight = nn.Parameter(torch.empty(out_channels, hidden_size, device=device, dtype=dtype))
        self.bias = (nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
                     if bias else None)
        self.impl = impl
        # nn.Linear's initialisation, so a head swapped in for nn.Linear trains alike.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = hidden_size ** -0.5
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.weight, self.bias)

    def loss(self, hidden: torch.Tensor, target: torch.Tensor, *,
             token_weight: Optional[torch.Tensor] = None, reduction: str = "mean") -> torch.Tensor:
        return regression_loss(hidden, self.weight, target, bias=self.bias,
                               token_weight=token_weight, reduction=reduction, impl=self.impl)

    def spec(self, rows: torch.Tensor, target: torch.Tensor, task: Union[torch.Tensor, int], *,
             token_weight: Optional[torch.Tensor] = None) -> RegressionHeadSpec:
        return RegressionHeadSpec(self.weight, rows, target, task, bias=self.bias,
                                  token_weight=token_weight)

    def extra_repr(self) -> str:
        c, h = self.weight.shape
        return f"hidden_size={h}, out_channels={c}, bias={self.bias is not None}"
