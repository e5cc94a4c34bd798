"""Dense supervision of a vision tower's patch tokens: per-cell attribute classification.

A tower trained only contrastively learns what tells whole images apart; its patch tokens need not say what
their own region holds. LLaVA reads those patch tokens, so the tower's stand-in on the built-in world can be
given a small auxiliary head that names each grid cell's contents from the tokens over it (the
``cell_head`` option of the ``image_text_contrastive`` task).
"""

import torch.nn.functional as F
from torch import Tensor


def pool_patches_to_cells(patches: Tensor, grid: int) -> Tensor:
    """Mean of the patch tokens over each cell of a ``grid x grid`` layout.

    ``patches`` ``[B, P, D]`` in raster order of a square ``side x side`` patch grid with ``side`` a
    multiple of ``grid`` -> ``[B, grid * grid, D]`` in raster order of the cells.
    """
    b, p, d = patches.shape
    side = round(p**0.5)
    if side * side != p or side % grid:
        raise ValueError(f"{p} patches do not form a square grid that {grid}x{grid} cells divide evenly")
    k = side // grid
    cells = patches.reshape(b, grid, k, grid, k, d).mean(dim=(2, 4))  # [B, grid, grid, D]
    return cells.reshape(b, grid * grid, d)


def cell_attribute_loss(logits: list[Tensor], labels: Tensor) -> Tensor:
    """Mean over attributes of the cross-entropy over all cells.

    ``logits[a]`` ``[B, C, K_a]``: attribute ``a``'s class scores per cell; ``labels`` int ``[B, C, A]``
    (class 0 = the cell is empty).
    """
    if len(logits) != labels.shape[-1]:
        raise ValueError(f"{len(logits)} attribute heads for {labels.shape[-1]} label columns")
    losses = [F.cross_entropy(lg.flatten(0, 1), labels[..., a].flatten()) for a, lg in enumerate(logits)]
    return sum(losses) / len(losses)
