"""Per-cell pooling and the cell-attribute loss against naive loops, in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from mmfactory.losses.dense import cell_attribute_loss, pool_patches_to_cells


def naive_pool(patches, grid):
    b, p, d = patches.shape
    side = int(p**0.5)
    k = side // grid
    out = torch.zeros(b, grid * grid, d, dtype=patches.dtype)
    for n in range(b):
        for cell in range(grid * grid):
            row, col = divmod(cell, grid)
            members = [patches[n, (row * k + i) * side + col * k + j] for i in range(k) for j in range(k)]
            out[n, cell] = torch.stack(members).mean(0)
    return out


@pytest.mark.parametrize("side", [3, 6])
def test_pooling_matches_a_loop_over_cells(side):
    patches = torch.randn(2, side * side, 5, dtype=torch.float64, requires_grad=True)
    fast, slow = pool_patches_to_cells(patches, 3), naive_pool(patches, 3)
    torch.testing.assert_close(fast, slow)
    weights = torch.randn_like(fast)
    (g_fast,) = torch.autograd.grad((fast * weights).sum(), patches)
    (g_slow,) = torch.autograd.grad((slow * weights).sum(), patches)
    torch.testing.assert_close(g_fast, g_slow)
    if side == 3:  # one patch per cell: the identity
        torch.testing.assert_close(fast, patches)


def test_pooling_refuses_a_grid_that_does_not_divide_the_patches():
    with pytest.raises(ValueError, match="do not form a square grid"):
        pool_patches_to_cells(torch.zeros(1, 16, 2), 3)


def test_cell_loss_is_the_mean_of_per_cell_cross_entropies():
    torch.manual_seed(0)
    logits = [torch.randn(2, 9, 9, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    labels = torch.randint(9, (2, 9, 2))
    loss = cell_attribute_loss(logits, labels)
    per_attribute = []
    for a, lg in enumerate(logits):
        terms = [-F.log_softmax(lg[n, c], -1)[labels[n, c, a]] for n in range(2) for c in range(9)]
        per_attribute.append(torch.stack(terms).mean())
    naive = torch.stack(per_attribute).mean()
    torch.testing.assert_close(loss, naive)
    grads = torch.autograd.grad(loss, logits)
    naive_grads = torch.autograd.grad(naive, logits)
    for g, n in zip(grads, naive_grads, strict=True):
        torch.testing.assert_close(g, n)


def test_cell_loss_refuses_a_head_count_that_does_not_match_the_labels():
    with pytest.raises(ValueError, match="1 attribute heads for 2"):
        cell_attribute_loss([torch.zeros(1, 9, 3)], torch.zeros(1, 9, 2, dtype=torch.long))
