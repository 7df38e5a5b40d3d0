"""GALI's loss weights and the statistics and extra terms around the K-way losses (docs/method.md §1.3-1.6).

Rows of ``logits`` are grouped by class: ``labels[i]`` is the class the i-th row's tuple was drawn
from, and every class has the same number B of rows (``nn.CrossEntropyLoss`` averages over B).

    L_D  = Σ_k w_true[k] · mean_b CE(ℓ_kb, k)                     (D maximises Eq. 3)
    L_GE = Σ_k Σ_j w_pair[k, j] · mean_b CE(ℓ_kb, j)              (Product of Terms, Eq. 4)

with the paper's weights w_true = 2/K and w_pair = 2/(K(K-1)) off the diagonal (§1.6). The
'authors' scheme reproduces the GALI-4 scripts' operator-precedence bug (§5 item 1): only the
first term of each sum is scaled. The math on the logits lives beside the fused kernel that must
match it (``gali.kernels.kway_head.kway_losses``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def loss_weights(num_classes: int, scheme: str = "paper") -> tuple[Tensor, Tensor]:
    """``(w_true (K,), w_pair (K, K))`` for the 'paper' weights or the 'authors' precedence bug."""
    k = num_classes
    off_diagonal = 1.0 - torch.eye(k)
    if scheme == "paper":
        return torch.full((k,), 2.0 / k), off_diagonal * (2.0 / (k * (k - 1)))
    if scheme == "authors":
        # loss_d = 0.5*CE(o1,0) + CE(o2,1) + ...; loss_g = (1/6)*CE(o1,1) + CE(o1,2) + ...
        w_true = torch.ones(k)
        w_true[0] = 2.0 / k
        w_pair = off_diagonal.clone()
        w_pair[0, 1] = 2.0 / (k * (k - 1))
        return w_true, w_pair
    raise ValueError(f"unknown loss-weight scheme {scheme!r}; accepted: paper, authors")


def true_class_probability(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Mean softmax probability D gives each class's rows for their own class, shape (K,)."""
    p_true = F.softmax(logits.detach().float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    return p_true.view(num_classes, -1).mean(dim=1)


def reconstruction_loss(target: Tensor, output: Tensor) -> Tensor:
    """ALICE's pixel MSE between x and G(E(x)) in [-1, 1] space (docs/method.md §2.5)."""
    return F.mse_loss(output.float(), target.float())
