"""The native CPU kernels' large outputs come from a bounded cache of warm blocks
(csrc/output_cache.cpp): a released block is handed to the next output of its size, and
must then be written whole, resize like any tensor's storage, and survive release from
another thread."""
import os
import subprocess
import sys
import threading

import pytest
import torch

import fastvae
from fastvae import reference

pytestmark = pytest.mark.skipif("native" not in fastvae.available_backends(), reason="needs the native extension")

SHAPE = (1024, 1100)  # a 4.3 MiB float32 output: above the cache's 4 MiB threshold
SEED = torch.tensor([31], dtype=torch.int64)


def _native_sample(mu, logvar, seed=SEED):
    with fastvae.use_backend("native"):
        return torch.ops.fastvae.reparameterize(mu, logvar, seed)


def _inputs():
    gen = torch.Generator().manual_seed(8)
    return torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)


def test_a_released_output_block_is_reused_and_written_whole():
    mu, logvar = _inputs()
    first = _native_sample(mu, logvar, torch.tensor([1]))
    address = first.data_ptr()
    first.fill_(float("nan"))  # whatever the block held must not show through
    del first
    elsewhere = torch.empty(3 << 20).fill_(0.0)  # would take the freed range, were it unmapped
    second = _native_sample(mu, logvar)
    assert elsewhere.data_ptr() != address
    assert second.data_ptr() == address
    expected = reference.reparameterize(mu.double(), logvar.double(), SEED)
    torch.testing.assert_close(second.double(), expected, atol=4e-5, rtol=4e-5)


def test_cached_outputs_resize_and_are_released_from_other_threads():
    mu, logvar = _inputs()
    z = _native_sample(mu, logvar)
    head = z[:3].clone()
    z.resize_(2 * SHAPE[0], SHAPE[1])  # grows the storage through the cache's allocator
    assert torch.equal(z[:3], head)
    z.resize_(SHAPE)
    outputs = [_native_sample(mu, logvar) for _ in range(3)]
    releaser = threading.Thread(target=outputs.clear)  # the autograd engine frees grads off the main thread
    releaser.start()
    releaser.join()
    assert torch.equal(_native_sample(mu, logvar), z)


_FAULTS_OF_A_REMADE_OUTPUT = """
import resource, torch, fastvae
mu, lv, seed = torch.randn(1024, 1100), torch.randn(1024, 1100), torch.tensor([3])
with fastvae.use_backend("native"):
    first = torch.ops.fastvae.reparameterize(mu, lv, seed)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = torch.ops.fastvae.reparameterize(mu, lv, seed)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts Linux page faults")
@pytest.mark.parametrize("capacity_mb", ["256", "0"])
def test_a_remade_output_takes_no_page_faults_unless_the_cache_is_off(capacity_mb):
    """The point of the cache: the second output of a size lands on warm pages. Without
    huge pages a fresh 4.3 MiB output takes about 1100 faults of 4 KiB."""
    env = dict(os.environ, FASTVAE_OUTPUT_CACHE_MB=capacity_mb, FASTVAE_HUGE_PAGES="0")
    result = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_REMADE_OUTPUT], env=env, check=True, timeout=300,
                            capture_output=True, text=True)
    faults = int(result.stdout.split()[-1])
    assert faults < 100 if capacity_mb != "0" else faults > 500, faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts Linux page faults")
@pytest.mark.parametrize("variable, value", [("FASTVAE_OUTPUT_CACHE_MB", "-1"), ("FASTVAE_OUTPUT_CACHE_MB", "garbage"),
                                             ("FASTVAE_OUTPUT_CACHE_MB", "1e3"), ("FASTVAE_OUTPUT_CACHE_MB", " 64"),
                                             ("FASTVAE_OUTPUT_CACHE_MB", "99999999999999999999999"),
                                             ("FASTVAE_OUTPUT_CACHE_MB", "65537"), ("FASTVAE_HUGE_PAGES", "yes")])
def test_a_bad_setting_is_reported_and_the_default_bound_kept(variable, value):
    """Not a whole number within bounds: strtoull read "-1" as no bound at all (1.6 GiB
    kept), "garbage" as 0 and "1e3" as 1 MiB, silently. Now a warning names the variable
    and the default (256 MiB, which keeps the remade output's block) is used."""
    env = {**os.environ, "FASTVAE_HUGE_PAGES": "0", variable: value}
    result = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_REMADE_OUTPUT], env=env, check=True, timeout=300,
                            capture_output=True, text=True)
    assert f'ignoring {variable}="{value}": it must be a whole number from 0 to' in result.stderr, result.stderr
    assert int(result.stdout.split()[-1]) < 100, "the default bound keeps the block"
