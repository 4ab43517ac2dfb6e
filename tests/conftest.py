"""Shared fixtures: a client factory, random K/V, a contiguous reference of what was appended,
and a gather through the CSR page table written independently of kvcache.methods.gather.

Helpers are exposed as fixtures (not imported from this module) so tests work in any import mode.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass

import pytest
import torch

# The one place TRITON_INTERPRET is set, before anything imports triton (kvcache below does): without a
# CUDA device the kernels run under the Triton interpreter on the CPU; with one they compile for real.
# An explicit TRITON_INTERPRET in the environment wins either way.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvcache import InProcessClient, KVCacheConfig, KVStore  # noqa: E402

# ---- construction ------------------------------------------------------------------------------


def _make_client(
    num_layers: int = 2,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    page_size: int = 4,
    dtype: torch.dtype | str = torch.float32,
    device_pages: int = 256,
) -> InProcessClient:
    config = KVCacheConfig(
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=page_size,
        dtype=dtype,
        device="cpu",
        device_pages=device_pages,
    )
    return InProcessClient(config)


@pytest.fixture
def make_client():
    """Factory: make_client(num_layers=2, num_kv_heads=2, head_dim=16, page_size=4, dtype=float32, device_pages=256)."""
    return _make_client


def _random_kv(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype = torch.float32):
    """A pair (k, v) of standard-normal tensors of `shape`, drawn from `gen`, cast to `dtype`."""
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    return k, v


@pytest.fixture
def random_kv():
    """random_kv(gen, shape, dtype=float32) -> (k, v)."""
    return _random_kv


# ---- the contiguous reference ------------------------------------------------------------------


class ContiguousKV:
    """What was appended to each sequence, per layer, as plain tensors k, v [S, Hkv, d] (store dtype)."""

    def __init__(self, config: KVCacheConfig) -> None:
        self.config = config
        self.k: dict[str, list[torch.Tensor]] = {}
        self.v: dict[str, list[torch.Tensor]] = {}

    def add_sequence(self, seq_id: str) -> None:
        c = self.config
        empty = torch.empty((0, c.num_kv_heads, c.head_dim), dtype=c.dtype)
        self.k[seq_id] = [empty.clone() for _ in range(c.num_layers)]
        self.v[seq_id] = [empty.clone() for _ in range(c.num_layers)]

    def append(self, seq_id: str, k: torch.Tensor, v: torch.Tensor, layer: int | None = None) -> None:
        """k, v [L, T, Hkv, d] (all layers) or [T, Hkv, d] with `layer`."""
        layers = range(self.config.num_layers) if layer is None else [layer]
        if layer is not None:
            k, v = k[None], v[None]
        for i, layer_idx in enumerate(layers):
            self.k[seq_id][layer_idx] = torch.cat((self.k[seq_id][layer_idx], k[i]))
            self.v[seq_id][layer_idx] = torch.cat((self.v[seq_id][layer_idx], v[i]))

    def fork(self, parent: str, child: str) -> None:
        self.k[child] = [t.clone() for t in self.k[parent]]
        self.v[child] = [t.clone() for t in self.v[parent]]

    def drop(self, seq_id: str) -> None:
        del self.k[seq_id], self.v[seq_id]

    def length(self, seq_id: str, layer: int) -> int:
        return self.k[seq_id][layer].shape[0]


@pytest.fixture
def contiguous():
    """contiguous(config) -> a new ContiguousKV."""
    return ContiguousKV


# ---- reading the store back through the page table -----------------------------------------------


@dataclass
class Gathered:
    """One sequence's rows at one layer, read position by position through the CSR page table."""

    pages: torch.Tensor  # [n_pages] int64 page ids, in position order
    last_page_len: int
    k: torch.Tensor  # [S, Hkv, d] from k_seq
    v: torch.Tensor  # [S, Hkv, d] from v_seq
    k_from_dim: torch.Tensor  # [S, Hkv, d] from k_dim (read at [.., :, slot])
    summaries: torch.Tensor  # [n_pages, Hkv, 3, d] float32

    @property
    def length(self) -> int:
        return self.k.shape[0]


def _gather(store: KVStore, seq_ids: list[str], layer: int) -> list[Gathered]:
    """Read every sequence's rows through store.page_table(seq_ids, layer) (CSR)."""
    csr = store.page_table(seq_ids, layer)
    P = store.config.page_size
    assert csr.indptr.dtype == torch.int32 and csr.indices.dtype == torch.int32
    assert csr.indptr.shape == (len(seq_ids) + 1,) and int(csr.indptr[0]) == 0
    assert csr.last_page_len.shape == (len(seq_ids),)
    pool = store.pool
    out = []
    for b in range(len(seq_ids)):
        pages = csr.indices[int(csr.indptr[b]) : int(csr.indptr[b + 1])].long()
        last = int(csr.last_page_len[b])
        S = (len(pages) - 1) * P + last if len(pages) else 0
        if len(pages):
            assert 1 <= last <= P
        else:
            assert last == 0
        pos = torch.arange(S)
        page, slot = pages[pos // P], pos % P
        out.append(
            Gathered(
                pages=pages,
                last_page_len=last,
                k=pool.k_seq[layer, page, :, slot],
                v=pool.v_seq[layer, page, :, slot],
                k_from_dim=pool.k_dim[layer, page, :, :, slot],
                summaries=pool.k_summary[layer, pages].clone(),
            )
        )
    return out


@pytest.fixture
def gather():
    """gather(store, seq_ids, layer) -> [Gathered per sequence]."""
    return _gather


def _expected_summaries(k: torch.Tensor, page_size: int) -> torch.Tensor:
    """Min, max, mean of each page's rows of k [S, Hkv, d] -> [n_pages, Hkv, 3, d] float32."""
    rows = []
    for start in range(0, k.shape[0], page_size):
        page = k[start : start + page_size].float()  # [rows, Hkv, d]
        rows.append(torch.stack((page.amin(0), page.amax(0), page.mean(0)), dim=1))
    if not rows:
        return torch.empty((0, k.shape[1], 3, k.shape[2]))
    return torch.stack(rows)


@pytest.fixture
def expected_summaries():
    """expected_summaries(k [S, Hkv, d], page_size) -> [n_pages, Hkv, 3, d] (min, max, mean)."""
    return _expected_summaries


def _assert_store_matches(store: KVStore, ref: ContiguousKV, seq_ids: list[str] | None = None) -> None:
    """Every sequence, every layer: CSR, K, V, dim-major K, summaries and value mean equal the reference."""
    seq_ids = list(ref.k) if seq_ids is None else seq_ids
    P = store.config.page_size
    for layer in range(store.config.num_layers):
        gathered = _gather(store, seq_ids, layer)
        means = store.value_mean(seq_ids, layer)
        for sid, g, mean in zip(seq_ids, gathered, means):
            k_ref, v_ref = ref.k[sid][layer], ref.v[sid][layer]
            assert g.length == k_ref.shape[0], f"{sid} layer {layer}: length"
            assert len(g.pages) == -(-k_ref.shape[0] // P)
            torch.testing.assert_close(g.k, k_ref, rtol=0, atol=0)
            torch.testing.assert_close(g.v, v_ref, rtol=0, atol=0)
            torch.testing.assert_close(g.k_from_dim, k_ref, rtol=0, atol=0)
            exp = _expected_summaries(k_ref, P)
            torch.testing.assert_close(g.summaries[:, :, :2], exp[:, :, :2], rtol=0, atol=0)  # min, max exact
            torch.testing.assert_close(g.summaries[:, :, 2], exp[:, :, 2], rtol=1e-5, atol=1e-6)
            if k_ref.shape[0]:
                torch.testing.assert_close(mean, v_ref.float().mean(0), rtol=1e-5, atol=1e-5)
        # Distinct sequences never write into the same page: their page sets are disjoint
        # unless shared (refcount > 1).
        owners: dict[int, int] = {}
        for g in gathered:
            for p in g.pages.tolist():
                owners[p] = owners.get(p, 0) + 1
        for p, n in owners.items():
            assert int(store.allocator.refcount[p]) >= n


@pytest.fixture
def assert_store_matches():
    """assert_store_matches(store, ref, seq_ids=None): the paged store equals the contiguous reference."""
    return _assert_store_matches


def _snapshot(store: KVStore, seq_id: str) -> dict:
    """Everything observable about a sequence: lengths, page ids, per-layer K/V/summaries/value mean."""
    info = store.describe(seq_id)
    snap = {"lengths": info.lengths, "num_pages": info.num_pages, "layers": []}
    for layer in range(store.config.num_layers):
        (g,) = _gather(store, [seq_id], layer)
        snap["layers"].append(
            {
                "pages": g.pages.clone(),
                "k": g.k.clone(),
                "v": g.v.clone(),
                "k_dim": g.k_from_dim.clone(),
                "summaries": g.summaries.clone(),
                "value_mean": store.value_mean([seq_id], layer).clone(),
            }
        )
    return snap


def _assert_snapshot_equal(before: dict, after: dict) -> None:
    assert before["lengths"] == after["lengths"]
    assert before["num_pages"] == after["num_pages"]
    for b, a in zip(before["layers"], after["layers"]):
        for key in b:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=f"{key} changed")


@pytest.fixture
def snapshot():
    """snapshot(store, seq_id) -> dict of everything observable about that sequence."""
    return _snapshot


@pytest.fixture
def assert_unchanged():
    """assert_unchanged(before, after): two snapshots are identical."""
    return _assert_snapshot_equal


@pytest.fixture(params=["in_registers", "radix_levels"])
def select_path(request, monkeypatch):
    """The top-k by one program per row (what rows this short get) or, forced, by kvcache.kernels.topk's radix
    levels."""
    if request.param == "radix_levels":
        monkeypatch.setattr("kvcache.kernels.topk.ROW_SELECT_MAX", 0)
        monkeypatch.setattr("kvcache.kernels.topk.ROW_SELECT_MAX_MANY", 0)
    return request.param



def pytest_configure(config):
    # Under pytest-xdist, each worker's torch ops get an equal share of the cores: with torch's default (every
    # core in each process) the workers' thread pools contend and the suite runs slower than serially.
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))


# ---- markers: kernel, service, gpu, slow (registered in pyproject.toml) ------------------------------------------
#
# Assigned here by module, fixture, parameter or name rather than test by test. `make test-fast` deselects slow and
# service; `pytest -m gpu` selects the tests that skip without CUDA. Which tests launch a Triton kernel or start a
# server or subprocess was found by running the suite with subprocess.Popen, grpc.server and the Triton launch
# wrapped; the same wrappers stay on (pytest_runtest_protocol below) and warn when a test does either without its
# marker, or takes over 5 s without `slow`.

# kernel: runs a Triton kernel (under the interpreter without a GPU, compiled on one).
KERNEL_MODULES = ("test_kernel_*.py", "test_gate_kernels.py", "test_sparq_edge_cases.py", "test_pdl.py",
                  "test_graph_decode.py")
KERNEL_FIXTURES = {"both_backends"}  # test_dispatch: attends through backend="triton" for every method
KERNEL_TESTS = {
    "test_gate_prefill.py": {"test_a_small_budget_reads_its_blocks_and_the_kernel_attends_to_exactly_them",
                             "test_bfloat16_gate_prefill_on_the_gpu"},
    "test_window.py": {"test_float16_on_the_triton_path_matches_the_reference"},
}
# ... and every test parametrized with backend="triton".

# service: starts a `kvcache serve` subprocess, an in-process gRPC server or another subprocess (torchrun, a fresh
# interpreter), or uses a fixture that did.
SERVICE_MODULES = ("test_service*.py", "test_*_service.py", "test_bench_rpc.py", "test_local_plane.py",
                   "test_bench_e2e.py")
SERVER_FIXTURES = {"server", "servers", "tiered_server", "certificate"}
SERVICE_TESTS = {
    "test_attend_batcher.py": {"test_concurrent_streams_on_a_real_server_are_merged_and_answered_as_alone"},
    "test_byte_budget.py": {"test_a_remote_call_asks_for_bytes_as_an_in_process_one"},
    "test_engine_generate.py": {"test_generation_over_grpc_equals_in_process",
                                "test_generation_on_a_servers_shared_pool_equals_in_process"},
    "test_engine_gguf.py": {"test_generate_command_against_a_server_gives_the_in_process_answer"},
    "test_engine_minference.py": {"test_over_grpc_the_served_variants_give_the_in_process_answer"},
    "test_gate.py": {"test_gate_over_the_attend_rpc"},
    "test_serve_cli_memory.py": {"test_serve_exits_2_with_the_reason",
                                 "test_serve_logs_the_allocation_on_stderr_before_and_after"},
    "test_star_eval.py": {"test_the_shards_can_be_kvcache_serve_processes"},
    "test_star_phase1.py": {"test_parallel_mode_under_torchrun_times_both_ranks_and_the_baseline"},
    "test_transformers_integration.py": {
        "test_greedy_tokens_over_a_kvcache_serve_process_equal_those_of_transformers_own_cache"},
    "test_wheel.py": {"test_the_wheel_holds_only_the_kvcache_namespace_with_its_data"},
    "test_window.py": {"test_over_grpc_it_answers_as_in_process"},
    "test_wire.py": {"test_importing_the_client_turns_the_event_engine_tcp_paths_off",
                     "test_an_explicit_grpc_experiments_setting_wins", "test_nothing_is_set_once_grpc_is_loaded"},
}
# ... and every test whose `client` or `small_client` is a remote one, over gRPC or the local data plane
# (test_client_protocol).

# gpu: needs CUDA; each of these skips without it (and no other test does). A name with [..] is that case only.
GPU_TESTS = {
    "test_attend_batcher.py": {"test_concurrent_streams_on_a_real_server_are_merged_and_answered_as_alone[cuda]"},
    "test_engine_generate.py": {"test_the_model_and_store_on_cuda_generate_what_the_cpu_does"},
    "test_gate_cache.py": {"test_cuda_decode_appends_with_a_gate_attached_never_wait_for_the_gpu"},
    "test_graph_decode.py": {"test_graph_steps_give_the_eager_tokens_and_recapture_past_their_capacity",
                             "test_a_greedy_loop_fed_its_own_tokens_on_the_device_gives_the_host_fed_tokens"},
    "test_gate_kernels.py": {"test_the_gate_step_on_cuda_bfloat16_matches_the_reference"},
    "test_gate_prefill.py": {"test_bfloat16_gate_prefill_on_the_gpu"},
    "test_kernel_paged_decode.py": {"test_bfloat16_matches_dense_on_the_gpu"},
    "test_kernel_quest.py": {"test_bfloat16_matches_the_reference_on_the_gpu"},
    "test_kernel_sparq.py": {"test_bfloat16_matches_the_reference_on_the_gpu"},
    "test_kernel_sparse_prefill.py": {"test_bfloat16_matches_the_reference_on_the_gpu"},
    "test_kernel_topk.py": {"test_long_rows_on_the_gpu_give_the_torch_topk"},
    "test_oracle.py": {"test_on_cuda_the_oracle_runs_the_reference_on_the_device"},
    "test_pdl.py": {"test_pdl_only_for_small_steps",
                    "test_the_gate_step_as_a_dependent_chain_equals_it_launched_in_turn"},
    "test_service.py": {"test_a_cuda_server_attends_as_the_in_process_cuda_store_does"},
    "test_shared_pool_service.py": {
        "test_a_cuda_server_s_pool_serves_an_engine_s_eager_and_graph_steps_as_its_own_store"},
    "test_window.py": {"test_bfloat16_on_the_gpu_matches_the_reference"},
}

# slow: over ~2 s for the test itself (its call and function-scoped setup; a module fixture's one-off setup is not
# counted, except where only these tests use it). Measured on the 2-core CPU machine with three runs of
# `pytest tests -n 2 --durations=0` (setup + call + teardown, fastest-slowest run in the comments; the slowest run
# shared the machine with another test run). Re-measure when adding a long test: one over 5 s warns (below).
# test_engine_smollm2: every test needs the SmolLM2-135M weights (3-7 s to load), then 1-4 s; test_soak: 32
# clients for a minute (80-90 s).
SLOW_MODULES = ("test_engine_smollm2.py", "test_soak.py")
SLOW_TESTS = {
    "test_bench_rpc.py": {"test_bench_rpc_reports_every_client_and_concurrent_engine_processes",  # 3.9-14 s
                          "test_bench_rpc_pins_server_and_engines_where_asked",  # 2.8-6.3 s
                          "test_bench_rpc_floor_reports_the_wire_the_host_wait_and_their_sum"},  # 1.4-4.8 s
    "test_bench_e2e.py": {"test_every_method_and_path_gives_a_row_with_its_bytes_and_bound"},  # 5.9 s alone
    "test_decode_step.py": {"test_a_planned_step_equals_the_per_call_path"},  # the Triton cases 3.4-6.5 s
    "test_faults.py": {"test_the_oversized_quest_attend_is_refused_and_the_server_s_memory_is_unchanged"},  # 3-6 s
    "test_leases.py": {"test_the_sequences_of_a_client_killed_mid_stream_are_reclaimed_within_the_lease_and_a_second"},
    "test_engine_generate.py": {"test_generation_over_grpc_equals_in_process",  # 2.3-8.8 s
                                "test_generation_on_a_servers_shared_pool_equals_in_process"},  # 3.2 s
    "test_engine_gguf.py": {"test_truncated_smollm2_file_is_refused",  # 2.3-6.4 s
                            "test_generate_command_against_a_server_gives_the_in_process_answer"},  # 1.7-6.3 s
    "test_engine_minference.py": {"test_smollm2_with_its_searched_patterns_answers_as_with_dense_prefill",  # 7.8-27 s
                                  "test_over_grpc_the_served_variants_give_the_in_process_answer"},  # 2.1-5.8 s
    "test_gate.py": {"test_gate_over_the_attend_rpc"},  # 2.2-2.8 s
    "test_gate_prefill.py": {"test_generate_with_gate_prefill_and_gate_decode"},  # 6.5-6.6 s
    "test_service.py": {"test_sigterm_under_load_completes_or_refuses_calls_and_exits_0",  # 2.1-2.5 s
                        "test_sixteen_concurrent_clients_keep_their_own_kv",  # 1.6-2.5 s
                        "test_serve_refuses_cpus_it_cannot_have",  # 1.5-2.1 s
                        "test_serve_puts_every_thread_on_one_malloc_arena"},  # 1.2-2.1 s
    # The only users of the module's four servers (4-9 s to start, in whichever of them runs first).
    "test_sharded.py": {"test_dense_over_n_servers_equals_single_server_dense",
                        "test_a_killed_server_fails_the_step_naming_it_and_the_other_shards_stay_usable"},
    "test_sparq_edge_cases.py": {"test_components_beyond_index_255_can_be_chosen_by_the_kernel"},  # 2.3-2.9 s
    "test_star.py": {"test_torchrun_ranks_write_the_anchored_blocks_to_their_own_servers"},  # 8.2-8.8 s
    "test_star_eval.py": {"test_the_shards_can_be_kvcache_serve_processes"},  # 2.5-3.5 s
    "test_star_phase1.py": {"test_parallel_mode_under_torchrun_times_both_ranks_and_the_baseline"},  # 5.5-6.6 s
    "test_step_plan.py": {"test_a_planned_step_equals_per_call_steps_for_every_method[lengths0-triton]",  # 6.5 s
                          "test_a_planned_step_equals_per_call_steps_for_every_method[lengths1-triton]"},  # 16 s
    "test_transformers_integration.py": {
        "test_greedy_tokens_over_a_kvcache_serve_process_equal_those_of_transformers_own_cache",  # 2.2-2.5 s
        # SmolLM2-135M loaded by transformers from its GGUF file (11-15 s), then 32 tokens through the store and
        # through transformers' own cache, and 8 through the trained gate.
        "test_smollm2_from_its_gguf_file_decodes_as_with_transformers_own_cache"},  # 19 s
    "test_tiers.py": {"test_attention_equals_plain_store[host-only-triton]",  # 6.0-6.4 s
                      "test_attention_equals_plain_store[host+disk-triton]",  # 2.9-4.3 s
                      "test_attention_equals_plain_store[disk-only-triton]"},  # 2.8-2.9 s
}


def _named(item: pytest.Item, names: dict[str, set[str]]) -> bool:
    """item's function (every case of it) or this one case is listed under its module."""
    listed = names.get(item.path.name, ())
    return item.name in listed or getattr(item, "originalname", item.name) in listed


def _in(item: pytest.Item, modules: tuple[str, ...]) -> bool:
    return any(item.path.match(pattern) for pattern in modules)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        params = item.callspec.params if hasattr(item, "callspec") else {}
        if (_in(item, KERNEL_MODULES) or _named(item, KERNEL_TESTS) or params.get("backend") == "triton"
                or KERNEL_FIXTURES.intersection(item.fixturenames)):
            item.add_marker(pytest.mark.kernel)
        shares_a_server = (SERVER_FIXTURES.intersection(item.fixturenames)
                           or {"remote", "shared", "pool"} & {params.get("client"), params.get("small_client")})
        if shares_a_server or _in(item, SERVICE_MODULES) or _named(item, SERVICE_TESTS):
            item.add_marker(pytest.mark.service)
        if _named(item, GPU_TESTS):
            item.add_marker(pytest.mark.gpu)
            item.add_marker(pytest.mark.kernel)  # a CUDA store appends and reads through its Triton kernels
        if _in(item, SLOW_MODULES) or _named(item, SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
        if not torch.cuda.is_available():  # here every CUDA-only test skips: GPU_TESTS must name exactly those
            cuda_skip = any(m.args and m.args[0] is True and ("CUDA" in m.kwargs.get("reason", "")
                                                               or "GPU" in m.kwargs.get("reason", ""))
                            for m in item.iter_markers("skipif"))
            if cuda_skip != (item.get_closest_marker("gpu") is not None):
                state = "skips without CUDA but is not" if cuda_skip else "runs without CUDA but is"
                warnings.warn(pytest.PytestWarning(f"{item.nodeid} {state} in tests/conftest.py's GPU_TESTS"),
                              stacklevel=1)


# What each test (its setup included) starts, launches or takes, checked against its markers when it is done.
_SEEN = pytest.StashKey[set]()
_running: list[pytest.Item] = []
_WHAT = {"kernel": "launched a Triton kernel", "service": "started a server or a Python subprocess",
         "slow": "took over 5 s"}


def _python(popen, args=(), *rest, **kwargs) -> bool:
    """A subprocess that is a Python interpreter or torchrun (not `uname -p` under platform.processor())."""
    try:
        program = os.path.basename(str(args if isinstance(args, (str, os.PathLike)) else args[0]).split()[0])
    except (IndexError, TypeError):
        return False
    return program.startswith(("python", "torchrun")) or program == os.path.basename(sys.executable)


def _wrap(owner, name: str, marker: str, counts=lambda *args, **kwargs: True) -> None:
    real = getattr(owner, name)
    if getattr(real, "_kvcache_marker", None):
        return

    def wrapper(*args, **kwargs):
        if _running and counts(*args, **kwargs):
            _running[-1].stash.setdefault(_SEEN, set()).add(marker)
        return real(*args, **kwargs)

    wrapper._kvcache_marker = marker
    setattr(owner, name, wrapper)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import subprocess

    import triton.runtime.interpreter
    import triton.runtime.jit

    _wrap(subprocess.Popen, "__init__", "service", _python)
    _wrap(triton.runtime.interpreter.InterpretedFunction, "run", "kernel")
    _wrap(triton.runtime.jit.JITFunction, "run", "kernel")
    if "grpc" in sys.modules:  # not imported here: kvcache sets grpc's core options before its first import
        _wrap(sys.modules["grpc"], "server", "service")
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()
        missing = sorted(m for m in item.stash.get(_SEEN, ()) if item.get_closest_marker(m) is None)
        if missing:
            item.warn(pytest.PytestWarning(f"it {' and '.join(_WHAT[m] for m in missing)} but is not marked "
                                           f"{' or '.join(missing)}: add it to the rules in tests/conftest.py"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    # Over 5 s (2.5x the ~2 s bound, for slack on a loaded machine) in the test's own call is surely slow.
    start = time.monotonic()
    try:
        return (yield)
    finally:
        if time.monotonic() - start > 5.0:
            item.stash.setdefault(_SEEN, set()).add("slow")
