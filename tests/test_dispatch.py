"""attend(..., backend=...): the Triton path and the torch path are interchangeable, and both equal the reference.

backend "triton" selects and attends with the kernels (here on the CPU Triton interpreter), "torch" selects and
attends with torch, "auto" the kernels on CUDA, a method's own CPU path on the CPU (dense has one) and the torch
path elsewhere. Both backends must give the same outputs as each method's plain-torch reference, count the same
bytes (the formulas of docs/sparse-attention.md) and reject the same bad parameters with InvalidParameter.
"""

import pytest
import torch
from kernel_support import HKV, poisoned_allocations, scattered_store

from kvcache import InProcessClient, InvalidParameter
from kvcache.methods import METHODS
from kvcache.methods.attend import attend
from kvcache.methods.base import AttentionMethod
from kvcache.methods.inputs import LayerInputs

G, D, P = 4, 64, 8  # HKV comes from kernel_support, whose stores these tests use
DTYPE = torch.float16
ITEMSIZE = 2
LENGTHS = (37, 11, 61)  # mixed and odd: every last page is partly filled
PARAMS = {
    "dense": {},
    "sparq": {"r": 8, "k": 6, "local_window": 2},
    "quest": {"top_pages": 3},
}
RTOL = ATOL = 2e-3  # float16 outputs of unit scale
LSE_TOL = 1e-5


@pytest.fixture(scope="module")
def batch():
    """(store, seq ids, q) shared by the tests of this module; nothing here writes to the store."""
    store, ids = scattered_store(LENGTHS, d=D, page_size=P, dtype=DTYPE)
    q = torch.randn((len(ids), HKV * G, D), generator=torch.Generator().manual_seed(1)).to(DTYPE)
    return store, ids, q


@pytest.fixture(scope="module")
def both_backends(batch):
    """Per method: (torch result, triton result), each through its own InProcessClient, and the
    clients' counters after one call of every method."""
    store, ids, q = batch
    by_torch, by_triton = InProcessClient(store), InProcessClient(store)
    results = {}
    for method, params in PARAMS.items():
        reference = by_torch.attend(ids, 0, q, method, params, backend="torch")
        with poisoned_allocations():
            kernel = by_triton.attend(ids, 0, q, method, params, backend="triton")
        results[method] = (reference, kernel)
    return results, by_torch.counters.snapshot(), by_triton.counters.snapshot()


def expected_bytes(method, params):
    """Bytes the method reads, written out from docs/sparse-attention.md (summaries and vbar are float32)."""
    total = 0
    for S in LENGTHS:
        if method == "dense":
            per_head = 2 * S * D * ITEMSIZE
        elif method == "sparq":
            per_head = (S * params["r"] + 2 * params["k"] * D) * ITEMSIZE + D * 4
        else:
            n = -(-S // P)
            t = min(params["top_pages"], n)
            rows = (t - 1) * P + (S - (n - 1) * P)  # t - 1 full pages and the partial last one
            per_head = n * 2 * D * 4 + 2 * rows * D * ITEMSIZE
        total += per_head * HKV
    return total


@pytest.mark.parametrize("method", list(PARAMS))
def test_triton_backend_equals_torch_backend(both_backends, method):
    reference, kernel = both_backends[0][method]
    assert kernel.out.dtype == DTYPE and kernel.out.shape == reference.out.shape
    assert not kernel.out.isnan().any() and not kernel.lse.isnan().any(), "an output element was never written"
    torch.testing.assert_close(kernel.out.float(), reference.out.float(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(kernel.lse, reference.lse, rtol=LSE_TOL, atol=LSE_TOL)


@pytest.mark.parametrize("method", list(PARAMS))
def test_both_backends_count_the_bytes_of_the_formula(both_backends, method):
    reference, kernel = both_backends[0][method]
    assert kernel.bytes_read == reference.bytes_read == expected_bytes(method, PARAMS[method])


def test_client_counters_are_identical_between_backends(both_backends):
    _, by_torch, by_triton = both_backends
    assert set(by_torch) == set(by_triton) == set(PARAMS)
    for method in PARAMS:
        assert by_triton[method]["calls"] == by_torch[method]["calls"] == 1
        expected = expected_bytes(method, PARAMS[method])
        assert by_triton[method]["bytes_read"] == by_torch[method]["bytes_read"] == expected


class KernelCalled(Exception):
    pass


def _refuse(*args, **kwargs):
    raise KernelCalled


@pytest.mark.parametrize("method", list(PARAMS))
def test_the_torch_path_equals_the_methods_reference(batch, method):
    store, ids, q = batch
    m = METHODS[method]
    got = attend(store, ids, 0, q, method, PARAMS[method], backend="torch")
    reference = m.reference(q, LayerInputs(store, ids, 0, store.page_table(ids, 0)), m.parse(PARAMS[method]))
    torch.testing.assert_close(got.out, reference.out, rtol=0, atol=0)
    torch.testing.assert_close(got.lse, reference.lse, rtol=0, atol=0)
    assert got.bytes_read == reference.bytes_read


@pytest.mark.parametrize("method", list(PARAMS))
def test_auto_on_a_cpu_store_runs_the_cpu_path_or_the_torch_path(batch, monkeypatch, method):
    store, ids, q = batch
    monkeypatch.setattr(METHODS[method], "select_gpu", _refuse)
    with pytest.raises(KernelCalled):  # the patch is where attend looks for the GPU selection
        attend(store, ids, 0, q, method, PARAMS[method], backend="triton")
    auto = attend(store, ids, 0, q, method, PARAMS[method], backend="auto")
    reference = attend(store, ids, 0, q, method, PARAMS[method], backend="torch")
    if type(METHODS[method]).run_cpu is AttentionMethod.run_cpu:
        torch.testing.assert_close(auto.out, reference.out, rtol=0, atol=0)
        torch.testing.assert_close(auto.lse, reference.lse, rtol=0, atol=0)
    else:  # its own path (one float16 rounding apart), never the reference's
        torch.testing.assert_close(auto.out, reference.out, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(auto.lse, reference.lse, rtol=LSE_TOL, atol=LSE_TOL)
        monkeypatch.setattr(METHODS[method], "run_cpu", _refuse)
        with pytest.raises(KernelCalled):
            attend(store, ids, 0, q, method, PARAMS[method], backend="auto")
        attend(store, ids, 0, q, method, PARAMS[method], backend="torch")  # "torch" never takes the CPU path
    assert auto.bytes_read == reference.bytes_read


def test_the_client_defaults_to_auto(batch, monkeypatch):
    store, ids, q = batch
    monkeypatch.setattr(METHODS["dense"], "select_gpu", _refuse)
    result = InProcessClient(store).attend(ids, 0, q)
    assert not result.out.isnan().any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "method, params",
    [
        pytest.param("sparq", {"r": D + 1, "k": 6}, id="sparq-r-above-d"),
        pytest.param("sparq", {"r": 0, "k": 6}, id="sparq-r-zero"),
        pytest.param("sparq", {"r": 8, "k": min(LENGTHS) + 1}, id="sparq-k-above-S"),
        pytest.param("sparq", {"r": 8, "k": 6, "local_window": 7}, id="sparq-window-above-k"),
        pytest.param("quest", {"top_pages": 0}, id="quest-top-pages-zero"),
    ],
)
def test_invalid_parameters_raise_invalid_parameter_on_both_backends(batch, monkeypatch, backend, method, params):
    store, ids, q = batch
    monkeypatch.setattr(METHODS[method], "select_gpu", _refuse)
    with pytest.raises(InvalidParameter):  # before any kernel runs: _refuse would raise KernelCalled
        attend(store, ids, 0, q, method, params, backend=backend)


@pytest.mark.parametrize("backend", ["cuda", "Triton", ""])
def test_an_unknown_backend_raises_invalid_parameter(batch, backend):
    store, ids, q = batch
    with pytest.raises(InvalidParameter, match="backend"):
        attend(store, ids, 0, q, "dense", backend=backend)
    with pytest.raises(InvalidParameter, match="backend"):
        InProcessClient(store).attend(ids, 0, q, backend=backend)
