"""fastvae/reference.py (the spec and the `torch` backend) against independent truths:
torch.distributions, the textbook formulas under float64 autograd, and brute force."""
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Normal, kl_divergence

from fastvae import reference

SEED = torch.tensor([4242])
REDUCTIONS = ["none", "sum", "mean", "batchmean"]


def _reduce(value, reduction, batch):
    return {"none": value, "sum": value.sum(), "mean": value.mean(), "batchmean": value.sum() / batch}[reduction]


def _gaussian_inputs(shape=(6, 5)):
    mu = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    return mu, logvar


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prior", ["standard", "full", "broadcast"])
def test_gaussian_kl_matches_torch_distributions(reduction, prior):
    mu, logvar = _gaussian_inputs()
    if prior == "standard":
        pm = plv = None
        p_loc, p_scale = torch.zeros(()), torch.ones(())
    else:
        shape = mu.shape if prior == "full" else (mu.shape[1],)
        pm = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        plv = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        p_loc, p_scale = pm, torch.exp(0.5 * plv)
    truth = _reduce(kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(p_loc, p_scale)), reduction, mu.shape[0])
    ours = reference.gaussian_kl(mu, logvar, pm, plv, reduction)
    torch.testing.assert_close(ours, truth)
    grad = torch.randn_like(truth)
    inputs = [t for t in (mu, logvar, pm, plv) if t is not None]
    expected = torch.autograd.grad(truth, inputs, grad)
    got = reference.gaussian_kl_backward(grad, mu.detach(), logvar.detach(), None if pm is None else pm.detach(),
                                         None if plv is None else plv.detach(), reduction)
    for g, e, t in zip(got, expected, inputs):
        torch.testing.assert_close(g.sum_to_size(t.shape), e)


def test_reparameterize_is_mu_plus_std_times_stream_and_its_gradient():
    mu, logvar = _gaussian_inputs((3, 7))
    eps = reference.normal_stream(SEED, mu.shape, "cpu", torch.float64)
    truth = mu + torch.exp(0.5 * logvar) * eps
    torch.testing.assert_close(reference.reparameterize(mu, logvar, SEED), truth)
    grad = torch.randn_like(truth)
    _, expected_logvar_grad = torch.autograd.grad(truth, (mu, logvar), grad)
    (got,) = reference.reparameterize_backward(grad, mu.detach(), logvar.detach(), truth.detach(), SEED, False)
    torch.testing.assert_close(got, expected_logvar_grad)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reparameterize_kl_gradients(reduction):
    mu, logvar = _gaussian_inputs((4, 3))
    eps = reference.normal_stream(SEED, mu.shape, "cpu", torch.float64)
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = _reduce(0.5 * (torch.exp(logvar) + mu**2 - 1 - logvar), reduction, mu.shape[0])
    z_ref, kl_ref = reference.reparameterize_kl(mu, logvar, SEED, reduction)
    torch.testing.assert_close(z_ref, z)
    torch.testing.assert_close(kl_ref, kl)
    gz, gkl = torch.randn_like(z), torch.randn_like(kl)
    expected = torch.autograd.grad((z, kl), (mu, logvar), (gz, gkl))
    got = reference.reparameterize_kl_backward(gz, gkl, mu.detach(), logvar.detach(), z.detach(), SEED, reduction)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_softmax_is_softmax_of_perturbed_logits(dim, hard):
    logits = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    tau = 0.7
    moved = logits.movedim(dim, -1)
    noise = reference.gumbel_stream(SEED, moved.numel() // moved.shape[-1], moved.shape[-1], "cpu", torch.float64)
    soft = torch.softmax((moved.reshape(noise.shape) + noise) / tau, -1).reshape(moved.shape).movedim(-1, dim)
    y = reference.gumbel_softmax(logits, SEED, tau, hard, dim % 3)
    if hard:
        # exact one-hot at the soft sample's argmax, as F.gumbel_softmax(hard=True) selects
        expected = F.one_hot(soft.argmax(dim).movedim(-1, -1), soft.shape[dim]).movedim(-1, dim % 3).double()
        assert torch.equal(y, expected)
    else:
        torch.testing.assert_close(y, soft)
    grad = torch.randn_like(soft)
    expected_grad, = torch.autograd.grad(soft, logits, grad)
    torch.testing.assert_close(reference.gumbel_softmax_backward(grad, logits.detach(), SEED, tau, dim % 3),
                               expected_grad)


def test_gumbel_softmax_masks_and_empty_rows():
    logits = torch.tensor([[0.0, float("-inf"), 1.0], [float("-inf")] * 3])
    for hard in (False, True):
        y = reference.gumbel_softmax(logits, SEED, 1.0, hard, 1)
        assert y[0, 1] == 0 and y[0].sum() == pytest.approx(1.0)
        assert torch.equal(y[1], torch.zeros(3))
    grad = reference.gumbel_softmax_backward(torch.randn(2, 3), logits, SEED, 1.0, 1)
    assert torch.isfinite(grad).all() and torch.equal(grad[1], torch.zeros(3))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prior", [None, "full", "broadcast"])
def test_categorical_kl_matches_torch_distributions(reduction, prior):
    logits = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    if prior is None:
        prior_logits = None
        q = Categorical(logits=torch.zeros(6, dtype=torch.float64))
    else:
        prior_logits = torch.randn((4, 3, 6) if prior == "full" else (6,), dtype=torch.float64, requires_grad=True)
        q = Categorical(logits=prior_logits)
    truth = _reduce(kl_divergence(Categorical(logits=logits), q), reduction, logits.shape[0])
    torch.testing.assert_close(reference.categorical_kl(logits, prior_logits, 2, reduction), truth)
    grad = torch.randn_like(truth)
    inputs = [t for t in (logits, prior_logits) if t is not None]
    expected = torch.autograd.grad(truth, inputs, grad)
    got = reference.categorical_kl_backward(grad, logits.detach(),
                                            None if prior_logits is None else prior_logits.detach(), 2, reduction)
    for g, e, t in zip(got, expected, inputs):
        torch.testing.assert_close(g.sum_to_size(t.shape), e)


def test_categorical_kl_other_dim_and_masks():
    logits = torch.randn(5, 4, dtype=torch.float64)
    truth = kl_divergence(Categorical(logits=logits.t()), Categorical(logits=torch.zeros(5, dtype=torch.float64)))
    torch.testing.assert_close(reference.categorical_kl(logits, None, 0, "none"), truth)
    masked = torch.tensor([[0.5, float("-inf"), -0.5]], dtype=torch.float64)
    kl = reference.categorical_kl(masked, masked, 1, "none")
    assert kl.item() == pytest.approx(0.0, abs=1e-12)  # masked classes contribute 0, no NaN


def test_nearest_code_matches_brute_force():
    x = torch.randn(300, 16, dtype=torch.float64)
    codebook = torch.randn(50, 16, dtype=torch.float64)
    distances = ((x[:, None, :] - codebook[None]) ** 2).sum(-1)
    indices, sq_dist = reference.nearest_code(x, codebook)
    assert torch.equal(indices, distances.argmin(1))
    torch.testing.assert_close(sq_dist, distances.min(1).values)


def test_nearest_code_ties_go_to_lowest_index():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    indices, _ = reference.nearest_code(torch.tensor([[1.0, 0.0], [0.5, 0.5]]), codebook)
    assert indices.tolist() == [0, 0]


def test_vector_quantize_gradients_match_textbook_formula():
    x = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    codebook = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    beta = 0.3
    indices = ((x[:, None] - codebook[None]) ** 2).sum(-1).argmin(1)
    e = codebook[indices]
    quantized = x + (e - x).detach()
    loss = F.mse_loss(e, x.detach()) + beta * F.mse_loss(x, e.detach())
    q_ref, i_ref, loss_ref = reference.vector_quantize(x.detach(), codebook.detach(), beta)
    assert torch.equal(i_ref, indices)
    torch.testing.assert_close(q_ref, quantized)
    torch.testing.assert_close(loss_ref, loss)
    gq, gl = torch.randn_like(quantized), torch.randn(())
    expected = torch.autograd.grad((quantized, loss), (x, codebook), (gq, gl))
    got = reference.vector_quantize_backward(gq, gl, x.detach(), codebook.detach(), indices, beta)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_kl_reductions_do_not_depend_on_the_thread_count():
    """float32 sums split across threads round differently unless accumulated wider."""
    mu, logvar, logits = torch.randn(300_000), torch.randn(300_000), 3 * torch.randn(100_000, 3)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append([reference.gaussian_kl(mu, logvar, None, None, reduction) for reduction in REDUCTIONS[1:]]
                            + [reference.categorical_kl(logits, None, 1, reduction) for reduction in REDUCTIONS[1:]])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
