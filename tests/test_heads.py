"""unimrg_fast.heads: module wrappers over the ops, for both implementations."""
import pytest
import torch

import unimrg_fast as uf
from unimrg_fast.heads import ImageTokenHead, LMHead, RegressionHead
from unimrg_fast.specs import CEHeadSpec, RegressionHeadSpec

IMPLS = ["reference", "triton"]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("impl", IMPLS)
def test_lm_head_loss_is_the_op_on_its_weights(impl, seed):
    head = LMHead(24, 53, bias=True, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, impl=impl)
    with torch.no_grad():
        head.bias.normal_()
    hidden = torch.randn(2, 9, 24)
    target = torch.randint(0, 53, (2, 9))
    target[0, :3] = -100
    got = head.loss(hidden, target)
    want = uf.linear_cross_entropy(hidden, head.weight, target, bias=head.bias, label_smoothing=0.1,
                                   z_loss=1e-3, softcap=5.0, impl="reference")
    assert _rel(got, want) < 1e-5
    got.backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    assert head.weight.grad.abs().sum() > 0


def test_lm_head_forward_gives_the_capped_logits_the_loss_sees(seed):
    head = LMHead(16, 30, softcap=2.0)
    hidden = torch.randn(5, 16) * 10
    logits = head(hidden)
    assert logits.shape == (5, 30) and logits.abs().max() <= 2.0
    target = torch.randint(0, 30, (5,))
    by_hand = torch.nn.functional.cross_entropy(logits.float(), target)
    assert _rel(head.loss(hidden, target, reduction="mean"), by_hand) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_regression_head_loss_and_nn_linear_init(impl, seed):
    head = RegressionHead(20, 7, impl=impl)
    bound = 20 ** -0.5
    assert head.weight.abs().max() <= bound + 1e-6 and head.bias.abs().max() <= bound + 1e-6
    hidden, target = torch.randn(11, 20), torch.randn(11, 7)
    weight = torch.rand(11)
    got = head.loss(hidden, target, token_weight=weight, reduction="sum")
    want = (weight * ((head(hidden) - target) ** 2).mean(-1)).sum()
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_specs_feed_joint_loss(impl, seed):
    text, codes, depth = LMHead(12, 40), ImageTokenHead(12, num_codes=33), RegressionHead(12, 4)
    assert codes.weight.shape == (33, 12) and ImageTokenHead(8).weight.shape == (8192, 8)
    hidden = torch.randn(30, 12)
    rows = torch.randperm(30)
    heads = [text.spec(rows[:10], torch.randint(0, 40, (10,)), 0),
             codes.spec(rows[10:20], torch.randint(0, 33, (10,)), 1),
             depth.spec(rows[20:], torch.randn(10, 4), 2)]
    assert isinstance(heads[0], CEHeadSpec) and isinstance(heads[2], RegressionHeadSpec)
    out = uf.joint_loss(hidden, heads, 3, impl=impl)
    # One task per head, unit weights: each task's mean is that head's own mean loss.
    per_head = torch.stack([text.loss(hidden[rows[:10]], heads[0].target),
                            codes.loss(hidden[rows[10:20]], heads[1].target),
                            depth.loss(hidden[rows[20:]], heads[2].target)])
    assert _rel(out.task_loss_sum / out.task_weight_sum, per_head.detach()) < 1e-5
    assert _rel(out.total, per_head.sum()) < 1e-5


@pytest.mark.parametrize("cls,args,name", [
    (LMHead, (0, 10), "hidden_size"), (LMHead, (8, 0), "vocab_size"),
    (RegressionHead, (8, 0), "out_channels"), (LMHead, ("8", 10), "hidden_size"),
    (LMHead, (None, 10), "hidden_size"), (LMHead, (8.0, 10), "hidden_size"),
    (LMHead, (True, 10), "hidden_size"), (RegressionHead, (8, 4.0), "out_channels")])
def test_bad_sizes(cls, args, name):
    with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
        cls(*args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(softcap=0.0), "softcap must be None or a finite float > 0"),   # all-zero logits
    (dict(softcap=-2.0), "softcap must be None or a finite float > 0"),  # acted as +2
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(z_loss=-1.0), "z_loss"),
    (dict(impl="bogus"), "impl='bogus' is not an implementation of linear_cross_entropy"),
])
def test_lm_head_refuses_bad_loss_options_when_made(kwargs, match):
    # forward() (sampling) used them unchecked; only the loss refused them, later
    with pytest.raises(ValueError, match=match):
        LMHead(8, 11, **kwargs)


def test_regression_head_refuses_an_unknown_impl_when_made():
    with pytest.raises(ValueError, match="impl='fast' is not an implementation of regression_loss"):
        RegressionHead(8, 4, impl="fast")
