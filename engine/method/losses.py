"""GALI's loss weights and the statistics and extra terms around the K-way losses (docs/method.md §1.3-1.6).

Rows of ``logits`` are grouped by class: ``labels[i]`` is the class of row i's tuple, and every class has the same
number B of rows. L_D = Σ_k w_true[k] · mean_b CE(ℓ_kb, k) and L_GE = Σ_k Σ_j w_pair[k, j] · mean_b CE(ℓ_kb, j), with
the paper's w_true = 2/K and w_pair = 2/(K(K-1)) off the diagonal; the 'authors' scheme scales only the first term of
each sum (their precedence bug, §5 item 1). The logit math lives beside the fused kernel
(``gali.kernels.kway_head.kway_losses``). ``method.objective`` also offers the objectives the paper rejects (§1.4):
'minimax', L_GE = −L_D, the product form with w_pair = −diag(w_true); 'misclassification', L_GE = −(2/K) Σ_k mean_b
log(1 − p_k(t_kb)) (:func:`misclassification_loss`), not a sum of cross-entropies, so its w_pair is 0 and the step adds
it on the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

OBJECTIVES = ("product", "minimax", "misclassification")


def loss_weights(num_classes: int, scheme: str = "paper", objective: str = "product") -> tuple[Tensor, Tensor]:
    """``(w_true (K,), w_pair (K, K))`` for the 'paper' weights or the 'authors' precedence bug.

    ``objective`` 'product' is Eq. 4; 'minimax' gives w_pair = −diag(w_true) (L_GE = −L_D);
    'misclassification' gives w_pair = 0 (its G/E loss is :func:`misclassification_loss`).
    """
    k = num_classes
    off_diagonal = 1.0 - torch.eye(k)
    if scheme == "paper":
        w_true, w_pair = torch.full((k,), 2.0 / k), off_diagonal * (2.0 / (k * (k - 1)))
    elif scheme == "authors":
        # loss_d = 0.5*CE(o1,0) + CE(o2,1) + ...; loss_g = (1/6)*CE(o1,1) + CE(o1,2) + ...
        w_true = torch.ones(k)
        w_true[0] = 2.0 / k
        w_pair = off_diagonal.clone()
        w_pair[0, 1] = 2.0 / (k * (k - 1))
    else:
        raise ValueError(f"unknown loss-weight scheme {scheme!r}; accepted: paper, authors")
    if objective == "minimax":
        return w_true, -torch.diag(w_true)
    if objective == "misclassification":
        return w_true, torch.zeros(k, k)
    if objective != "product":
        raise ValueError(f"unknown objective {objective!r}; accepted: {', '.join(OBJECTIVES)}")
    return w_true, w_pair


def misclassification_loss(logits: Tensor, labels: Tensor, num_classes: int, inv_batch: float) -> Tensor:
    """The misclassification G/E loss, −(2/K) · inv_batch · Σ_rows log(1 − p_y) (docs/method.md §1.4, App 7.1).

    log(1 − p_y) is computed as logsumexp over the other classes minus logsumexp over all, which
    stays finite where p_y rounds to 1. Computed in fp32.
    """
    logits = logits.float()
    own = F.one_hot(labels, num_classes).bool()
    others = torch.logsumexp(logits.masked_fill(own, float("-inf")), dim=1)
    log_not_true = others - torch.logsumexp(logits, dim=1)
    return -(2.0 / num_classes) * inv_batch * log_not_true.sum()


def true_class_probability(logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Mean softmax probability D gives each class's rows for their own class, shape (K,)."""
    p_true = F.softmax(logits.detach().float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    return p_true.view(num_classes, -1).mean(dim=1)


def reconstruction_loss(target: Tensor, output: Tensor) -> Tensor:
    """ALICE's pixel MSE between x and G(E(x)) in [-1, 1] space (docs/method.md §2.5)."""
    return F.mse_loss(output.float(), target.float())
