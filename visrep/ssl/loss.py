"""The BYOL objective and the collapse monitor."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample ``|| p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z)``, with ``z`` detached (stop-gradient)."""
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.detach().float(), dim=-1)
    return 2.0 - 2.0 * (p * z).sum(dim=-1)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1_target: torch.Tensor, z2_target: torch.Tensor) -> torch.Tensor:
    """Symmetrised BYOL loss.

        L = mean_i [ (2 - 2 cos(q(z1_i), sg(z'2_i))) + (2 - 2 cos(q(z2_i), sg(z'1_i))) ]

    ``p1, p2``: online predictions of views 1 and 2; ``z1_target, z2_target``: target projections of
    the same views; ``sg`` is stop-gradient. Each term lies in [0, 4], so L lies in [0, 8]; the two
    swapped terms are summed, the batch is averaged. Computed in float32.

    Across ranks: each rank averages over its own batch; DDP averages the gradients over ranks, so with
    equal per-rank batches the update is that of the mean over the global batch (no all-gather needed:
    BYOL has no negatives).

    Paper: Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
    2020, arXiv:2006.07733, Eq. (2) and the symmetrised loss of Sec. 3.1.
    """
    return (regression_loss(p1, z2_target) + regression_loss(p2, z1_target)).mean()


@torch.no_grad()
def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: the per-dimension standard deviation of the L2-normalised outputs ``z``,
    averaged over dimensions. A collapsed representation (every sample mapped to one point) gives 0;
    outputs spread uniformly on the unit sphere give ``1/sqrt(d)`` (Chen & He, "Exploring Simple
    Siamese Representation Learning", 2020, arXiv:2011.10566, Sec. 4.1). Local to the rank's batch."""
    z = F.normalize(z.detach().float(), dim=-1)
    if z.shape[0] < 2:
        return z.new_zeros(())
    return z.std(dim=0).mean()
