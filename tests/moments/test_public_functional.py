"""The public functional moments API (``gradstats.moments``) against a float64 reference."""

import torch

import gradstats.moments as gm


def _summary(values):
    x = torch.tensor(values, dtype=torch.float64)
    n = torch.tensor(float(len(values)), dtype=torch.float64)
    return gm.Moments(n, n.clone(), n.clone(), x.mean(), (x - x.mean()).square().sum())


def test_combine_is_the_one_pass_summary_in_either_order():
    for a, b in (([1.0, 2.0], [3.0, 4.0]), ([3.0, 4.0], [1.0, 2.0])):
        merged = gm.combine(_summary(a), _summary(b))
        reference = _summary([1.0, 2.0, 3.0, 4.0])
        torch.testing.assert_close(merged.count, reference.count)
        torch.testing.assert_close(merged.mean, reference.mean)
        torch.testing.assert_close(merged.m2, reference.m2)  # 5.0


def test_safe_inverse_is_zero_where_the_weight_is_not_positive():
    w = torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(
        gm.safe_inverse(w), torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    )


def test_reductions_are_no_ops_without_a_process_group():
    state = _summary([1.0, 5.0])
    assert gm.all_reduce_moments(state) is state
    tensors = [torch.ones(2), torch.zeros(())]
    assert all(a is b for a, b in zip(gm.all_reduce_sum_(tensors), tensors, strict=True))
