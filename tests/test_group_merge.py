import pytest
import torch

from gmsa_rag.group_merge import group_merge


def test_matches_hand_computed_means_with_short_last_group():
    hidden = torch.arange(5 * 2, dtype=torch.float32).reshape(1, 5, 2)  # tokens 0..4, width 2
    merged, mask = group_merge(hidden, torch.ones(1, 5), 2)
    expected = torch.tensor([[[1.0, 2.0], [5.0, 6.0], [8.0, 9.0]]])  # means of (0,1), (2,3), (4)
    assert torch.equal(merged, expected)
    assert mask.tolist() == [[1, 1, 1]]


@pytest.mark.parametrize("rate", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("length", [1, 7, 16, 33])
def test_every_rate_and_length(rate, length):
    torch.manual_seed(0)
    hidden = torch.randn(1, length, 4)
    merged, mask = group_merge(hidden, torch.ones(1, length), rate)
    groups = -(-length // rate)
    assert merged.shape == (1, groups, 4) and int(mask.sum()) == groups
    for g in range(groups):
        assert torch.allclose(merged[0, g], hidden[0, g * rate : (g + 1) * rate].mean(0), atol=1e-6)


def test_padding_never_averaged_in_and_per_sample_rates():
    torch.manual_seed(0)
    a, b = torch.randn(6, 3), torch.randn(3, 3)
    hidden = torch.zeros(2, 6, 3)
    hidden[0], hidden[1, :3] = a, b
    hidden[1, 3:] = 1e6  # padding garbage must not leak
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    merged, gmask = group_merge(hidden, mask, torch.tensor([4, 2]))
    assert gmask.tolist() == [[1, 1], [1, 1]]
    assert torch.allclose(merged[0, 0], a[:4].mean(0)) and torch.allclose(merged[0, 1], a[4:].mean(0))
    assert torch.allclose(merged[1, 0], b[:2].mean(0)) and torch.allclose(merged[1, 1], b[2])


def test_left_padding_is_handled_like_right_padding():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 3)
    right, _ = group_merge(torch.cat([x, torch.zeros(1, 2, 3)], 1), torch.tensor([[1] * 5 + [0, 0]]), 2)
    left, _ = group_merge(torch.cat([torch.zeros(1, 2, 3), x], 1), torch.tensor([[0, 0] + [1] * 5]), 2)
    assert torch.allclose(right, left)
