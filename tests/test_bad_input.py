"""Bad input raises TypeError/ValueError naming the argument, before anything runs:
no seed is drawn (the default generator does not move) and no input is written."""
import numpy as np
import pytest
import torch

import fastvae
from helpers import requires

MU, LOGVAR = torch.randn(4, 3), torch.randn(4, 3)
LOGITS = torch.randn(4, 5)
X, CODEBOOK = torch.randn(6, 3), torch.randn(8, 3)
META = torch.randn(4, 3, device="meta")
# made here, not inside the calls, so the calls themselves draw nothing
RANDN = {shape: torch.randn(shape) for shape in [(5,), (2, 4, 3), (8, 4), (8,), (0, 3), (3,), (4, 0), (6, 0),
                                                  (8, 0)]}

CASES = [
    ("reparameterize", lambda: fastvae.reparameterize([1.0], LOGVAR), TypeError, "mu must be a torch.Tensor"),
    ("reparameterize", lambda: fastvae.reparameterize(MU.long(), LOGVAR), TypeError, "mu must be a float"),
    ("reparameterize", lambda: fastvae.reparameterize(MU, LOGVAR[:2]), ValueError, "logvar has shape"),
    ("reparameterize", lambda: fastvae.reparameterize(MU, LOGVAR.half()), TypeError, "logvar has dtype"),
    ("reparameterize", lambda: fastvae.reparameterize(MU, META), ValueError, "logvar is on meta"),
    ("reparameterize", lambda: fastvae.reparameterize(MU, LOGVAR, generator=3), TypeError, "generator must be"),
    ("gaussian_kl", lambda: fastvae.gaussian_kl(MU, LOGVAR, reduction="avg"), ValueError, "reduction must be"),
    ("gaussian_kl", lambda: fastvae.gaussian_kl(MU, LOGVAR, RANDN[(5,)]), ValueError, "prior_mu of shape"),
    ("gaussian_kl", lambda: fastvae.gaussian_kl(MU, LOGVAR, None, torch.ones(3, dtype=torch.int32)), TypeError,
     "prior_logvar must be a float"),
    ("gaussian_kl", lambda: fastvae.gaussian_kl(MU, LOGVAR, RANDN[(2, 4, 3)]), ValueError, "prior_mu of shape"),
    ("reparameterize_kl", lambda: fastvae.reparameterize_kl(MU, LOGVAR, reduction=None), ValueError,
     "reduction must be"),
    ("gumbel_softmax", lambda: fastvae.gumbel_softmax(LOGITS, tau=0.0), ValueError, "tau must be"),
    ("gumbel_softmax", lambda: fastvae.gumbel_softmax(LOGITS, tau=-1.0), ValueError, "tau must be"),
    ("gumbel_softmax", lambda: fastvae.gumbel_softmax(LOGITS, tau=float("nan")), ValueError, "tau must be"),
    ("gumbel_softmax", lambda: fastvae.gumbel_softmax(LOGITS.int()), TypeError, "logits must be a float"),
    ("gumbel_softmax", lambda: fastvae.gumbel_softmax(LOGITS, dim=2), ValueError, "dim=2 is out of range"),
    ("gumbel_softmax", lambda: fastvae.gumbel_softmax(LOGITS, hard="yes"), TypeError, "hard must be a bool"),
    ("gumbel_softmax", lambda: fastvae.gumbel_softmax(torch.tensor(1.0)), ValueError, "at least one dimension"),
    ("categorical_kl", lambda: fastvae.categorical_kl(LOGITS, RANDN[(3,)]), ValueError, "prior_logits of shape"),
    ("categorical_kl", lambda: fastvae.categorical_kl(LOGITS, reduction="batch"), ValueError, "reduction must be"),
    ("nearest_code", lambda: fastvae.nearest_code(X, RANDN[(8, 4)]), ValueError, "must equal the codebook's dim"),
    ("nearest_code", lambda: fastvae.nearest_code(X, RANDN[(8,)]), ValueError, "codebook must be 2-D"),
    ("nearest_code", lambda: fastvae.nearest_code(X, RANDN[(0, 3)]), ValueError, "at least one code"),
    ("nearest_code", lambda: fastvae.nearest_code(X.long(), CODEBOOK), TypeError, "x must be a float"),
    ("nearest_code", lambda: fastvae.nearest_code(X, CODEBOOK.to("meta")), ValueError, "codebook is on meta"),
    ("vector_quantize", lambda: fastvae.vector_quantize(X, CODEBOOK.int()), TypeError, "codebook must be a float"),
    ("vector_quantize", lambda: fastvae.vector_quantize(X, CODEBOOK, beta="0.25"), TypeError, "beta must be"),
    ("vector_quantize", lambda: fastvae.vector_quantize(X, CODEBOOK, beta=-1.0), ValueError,
     "beta must be a finite number >= 0"),
    ("vector_quantize", lambda: fastvae.vector_quantize(X, CODEBOOK, beta=float("nan")), ValueError,
     "beta must be a finite number >= 0"),
    ("vector_quantize", lambda: fastvae.vector_quantize(X, CODEBOOK, beta=float("inf")), ValueError,
     "beta must be a finite number >= 0"),
    ("vector_quantize", lambda: fastvae.vector_quantize(X, CODEBOOK, beta=True), TypeError,
     "beta must be a real number, got bool"),
    ("vector_quantize", lambda: fastvae.vector_quantize(RANDN[(6, 0)], RANDN[(8, 0)]), ValueError,
     "x and codebook have 0 features"),
    ("nearest_code", lambda: fastvae.nearest_code(RANDN[(6, 0)], RANDN[(8, 0)]), ValueError,
     "x and codebook have 0 features"),
    ("gumbel_softmax", lambda: fastvae.gumbel_softmax(LOGITS, tau=torch.tensor(1)), TypeError,
     "tau must be a number or a floating-point tensor, got a torch.int64 tensor"),
    ("gumbel_softmax", lambda: fastvae.gumbel_softmax(LOGITS, tau=True), TypeError, "tau must be a real number"),
    ("gumbel_softmax", lambda: fastvae.gumbel_softmax(LOGITS, hard=torch.tensor(True)), TypeError,
     "hard must be a bool, got Tensor"),
    ("gumbel_softmax", lambda: fastvae.gumbel_softmax(RANDN[(4, 0)]), ValueError,
     "logits has no classes: its size along dim=1 is 0"),
    ("gumbel_softmax", lambda: fastvae.gumbel_softmax(RANDN[(4, 0)].t(), dim=0), ValueError, "along dim=0 is 0"),
    ("categorical_kl", lambda: fastvae.categorical_kl(RANDN[(4, 0)]), ValueError, "logits has no classes"),
]


@pytest.mark.parametrize("op, call, error, message", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_raises_naming_the_argument_and_touches_nothing(op, call, error, message):
    inputs = [t.clone() for t in (MU, LOGVAR, LOGITS, X, CODEBOOK)]
    rng_state = torch.get_rng_state()
    with pytest.raises(error, match=message):
        call()
    assert torch.equal(torch.get_rng_state(), rng_state), "a seed was drawn before the input was checked"
    for before, after in zip(inputs, (MU, LOGVAR, LOGITS, X, CODEBOOK)):
        assert torch.equal(before, after)


def test_numbers_and_flags_are_taken_as_pytorch_takes_them(backend):
    """NumPy scalars for ``beta`` and ``tau``, ints and NumPy bools for ``hard`` (as
    ``F.gumbel_softmax``, which tests ``if hard``): the same result as the Python values."""
    requires(backend, "vector_quantize", "gumbel_softmax")
    expected = fastvae.vector_quantize(X, CODEBOOK, beta=0.5)
    for beta in (np.float32(0.5), np.float64(0.5)):
        for got, want in zip(fastvae.vector_quantize(X, CODEBOOK, beta=beta), expected):
            assert torch.equal(got, want)
    for hard, python_hard in [(1, True), (np.bool_(True), True), (0, False), (np.bool_(False), False)]:
        generator = torch.Generator().manual_seed(3)
        got = fastvae.gumbel_softmax(LOGITS, np.float32(0.5), hard, generator=generator)
        generator.manual_seed(3)
        assert torch.equal(got, fastvae.gumbel_softmax(LOGITS, 0.5, python_hard, generator=generator))
