"""GALI's losses against hand-computed values (docs/method.md §1.3-1.6)."""

import math

import pytest
import torch
import torch.nn.functional as F

from gali.engine.method.losses import loss_weights, misclassification_loss, true_class_probability
from gali.kernels.kway_head import kway_losses


def _hand_losses(logits, batch, w_true, w_pair):
    """Literal double loop over rows and classes, in float64 Python arithmetic."""
    k = logits.shape[1]
    loss_d = loss_ge = 0.0
    for row, values in enumerate(logits.tolist()):
        y = row // batch
        lse = math.log(sum(math.exp(v) for v in values))
        loss_d += w_true[y] * (lse - values[y]) / batch
        loss_ge += sum(w_pair[y][j] * (lse - values[j]) for j in range(k)) / batch
    return loss_d, loss_ge


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("scheme", ["paper", "authors"])
def test_losses_match_hand_computation(k, scheme):
    batch = 3
    logits = torch.randn(k * batch, k, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    labels = torch.arange(k).repeat_interleave(batch)
    w_true, w_pair = loss_weights(k, scheme)
    loss_d, loss_ge = kway_losses(logits, labels, w_true.double(), w_pair.double(), 1 / batch)
    want_d, want_ge = _hand_losses(logits, batch, w_true.tolist(), w_pair.tolist())
    assert loss_d.item() == pytest.approx(want_d, rel=1e-6)
    assert loss_ge.item() == pytest.approx(want_ge, rel=1e-6)


def test_paper_weights_are_two_over_the_number_of_terms():
    w_true, w_pair = loss_weights(4)
    assert torch.allclose(w_true, torch.full((4,), 0.5))
    assert torch.allclose(w_pair.sum(), torch.tensor(2.0)) and w_pair.diagonal().abs().sum() == 0
    w_true, w_pair = loss_weights(8)
    assert torch.allclose(w_true, torch.full((8,), 0.25)) and w_pair[0, 1] == pytest.approx(1 / 28)


def test_authors_weights_reproduce_the_gali4_precedence_bug():
    w_true, w_pair = loss_weights(4, "authors")
    assert w_true.tolist() == [0.5, 1, 1, 1]
    assert w_pair[0, 1] == pytest.approx(1 / 6) and w_pair[0, 2] == 1 and w_pair[3, 0] == 1
    assert w_pair.diagonal().abs().sum() == 0 and (w_pair != 0).sum() == 12


def test_k2_is_the_standard_gan_with_non_saturating_generator_loss():
    batch = 5
    logits = torch.randn(2 * batch, 2, dtype=torch.float64)
    labels = torch.arange(2).repeat_interleave(batch)
    loss_d, loss_ge = kway_losses(logits, labels, *[w.double() for w in loss_weights(2)], 1 / batch)
    score = logits[:, 0] - logits[:, 1]  # one-logit form: class 0 = (x, E(x)) is "real"
    real, fake = score[:batch], score[batch:]
    bce = F.binary_cross_entropy_with_logits
    assert loss_d.item() == pytest.approx((bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))).item())
    # labels swapped, docs/method.md §1.2
    want_ge = bce(fake, torch.ones_like(fake)) + bce(real, torch.zeros_like(real))
    assert loss_ge.item() == pytest.approx(want_ge.item())


@pytest.mark.parametrize("k", [2, 4, 8])
def test_logit_gradients_match_the_closed_form(k):
    """dL_D/dℓ_i = w(p_i - [i=y])/B and dL_GE/dℓ_i = (S p_i - w_pair[y, i])/B, rows summing to 0."""
    batch = 2
    logits = torch.randn(k * batch, k, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(k).repeat_interleave(batch)
    w_true, w_pair = (w.double() for w in loss_weights(k))
    loss_d, loss_ge = kway_losses(logits, labels, w_true, w_pair, 1 / batch)
    (grad_d,) = torch.autograd.grad(loss_d, logits, retain_graph=True)
    (grad_ge,) = torch.autograd.grad(loss_ge, logits)
    p = logits.detach().softmax(1)
    onehot = F.one_hot(labels, k).double()
    assert torch.allclose(grad_d, w_true[labels, None] * (p - onehot) / batch)
    assert torch.allclose(grad_ge, (w_pair[labels].sum(1, keepdim=True) * p - w_pair[labels]) / batch)
    assert grad_d.sum(1).abs().max() < 1e-12 and grad_ge.sum(1).abs().max() < 1e-12


def test_optimum_value_of_product_of_terms_is_minus_k_k_minus_1_log_k():
    """At D = 1/K everywhere the unweighted G/E objective is K(K-1) log K (docs/method.md §5 item 12)."""
    k, batch = 4, 3
    logits = torch.zeros(k * batch, k)
    labels = torch.arange(k).repeat_interleave(batch)
    _, loss_ge = kway_losses(logits, labels, torch.ones(k), 1 - torch.eye(k), 1 / batch)
    assert loss_ge.item() == pytest.approx(k * (k - 1) * math.log(k))


def test_true_class_probability_per_class():
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 0.0], [0.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    p = true_class_probability(logits, labels, 2)
    sig = torch.sigmoid(torch.tensor(5.0)).item()
    assert p.tolist() == pytest.approx([sig, (0.5 + sig) / 2])


def _hand_objective_losses(logits, batch):
    """The rejected objectives of docs/method.md §1.4 by their definition, in float64 Python arithmetic.

    With D_k(t) = softmax(ℓ(t))_k, L the number of log-terms and weights 2/L:
    V = Σ_k mean_b log D_k(t_kb) (L = K terms); the D loss is −(2/K)·V; minimax: G/E minimise V, so
    their loss is (2/K)·V = −L_D; misclassification: G/E maximise Σ_k mean_b log(1 − D_k(t_kb)).
    """
    k = logits.shape[1]
    v = m = 0.0
    for row, values in enumerate(logits.tolist()):
        y = row // batch
        p = [math.exp(a) / sum(math.exp(b) for b in values) for a in values]
        v += math.log(p[y]) / batch
        m += math.log(1 - p[y]) / batch
    return -(2 / k) * v, (2 / k) * v, -(2 / k) * m


@pytest.mark.parametrize("k", [2, 4])
def test_rejected_objectives_match_their_definitions(k):
    batch = 3
    logits = torch.randn(k * batch, k, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + k))
    labels = torch.arange(k).repeat_interleave(batch)
    want_d, want_minimax, want_misclassification = _hand_objective_losses(logits, batch)
    w_true, w_pair = loss_weights(k, objective="minimax")
    loss_d, loss_ge = kway_losses(logits, labels, w_true.double(), w_pair.double(), 1 / batch)
    assert loss_d.item() == pytest.approx(want_d, rel=1e-9)
    assert loss_ge.item() == pytest.approx(want_minimax, rel=1e-9) and loss_ge.item() == pytest.approx(-loss_d.item())
    w_true, w_pair = loss_weights(k, objective="misclassification")
    assert w_pair.abs().sum() == 0  # the head contributes nothing to the G/E loss
    assert misclassification_loss(logits, labels, k, 1 / batch).item() == pytest.approx(
        want_misclassification, rel=1e-6
    )


def test_misclassification_loss_stays_finite_when_d_is_certain():
    logits = torch.tensor([[60.0, 0.0], [0.0, 60.0]])  # p_true = 1 in fp32
    loss = misclassification_loss(logits, torch.tensor([0, 1]), 2, 1.0)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(120.0, rel=1e-4)  # two rows of −log(1 − p) ≈ 60


def test_unknown_objective_is_refused():
    with pytest.raises(ValueError, match="unknown objective 'nash'"):
        loss_weights(4, objective="nash")
