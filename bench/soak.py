"""`kvcache bench soak`: many clients against one `kvcache serve` for a bounded time, with faults injected, checking
that nothing wrong is ever served and that the server gives back what dead clients held.

The server runs with a persistent disk tier (so its page file can be corrupted from outside) and a small device
pool (so pages go down to it). Client processes each run several threads; every thread is a client of its own
(a RemoteClient, one connection) that loops: create a leased sequence, prefill it (unary, or streamed and
sometimes stalled halfway), decode a few steps with new rows, check dense attention against its own reference,
read back every row and compare it with what it wrote, sometimes fork, then free or keep. One thread per process
sends bad input and checks the answer's class. Meanwhile the orchestrator kills client processes with SIGKILL
(starting others), flips bytes in the disk tier's file, and polls Health. A DATA_LOSS answer is right for a
sequence whose page was hit; a wrong answer never is. At the end every surviving sequence is read back whole, the
leases of the killed clients run out, and the server's memory and free pages are compared with the start.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import torch

from kvcache.bench.server_process import ServerProcess
from kvcache.bench.timing import run_header

L, HKV, D, P, HQ = 2, 2, 16, 4, 4
LEASE_SECONDS = 3.0
NOT_A_VERDICT = ("StoreFull", "QuotaExceeded", "PageCorrupted")
STORE_FLAGS = ("--layers", str(L), "--kv-heads", str(HKV), "--head-dim", str(D), "--page-size", str(P),
               "--dtype", "float32", "--pages", "192", "--disk-pages", "2048", "--pinned-tail-pages", "1",
               "--max-query-heads", "64", "--max-call-memory", "1MiB", "--max-sequences-per-client", "8")


# ---- a client process ----------------------------------------------------------------------------------------


class _Tally:
    """Counts shared by a process's threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def problem(self, text: str) -> None:
        with self.lock:
            self.counts["problems"] += 1
            if len(self.problems) < 20:
                self.problems.append(text[:300])


class _Chunks:
    """A prefill's (k, v) chunks of 8 positions; a stalling one stops for 2 s (under the lease) before its second
    chunk. Each iteration starts over, as the client's unary fallback needs when a stream is refused."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, stall: bool, tally: _Tally) -> None:
        self.k, self.v, self.stall, self.tally = k, v, stall, tally

    def __len__(self) -> int:
        return -(-self.k.shape[1] // 8)

    def __iter__(self):
        for s0 in range(0, self.k.shape[1], 8):
            if self.stall and s0 == 8:
                self.tally.add("stalls")
                time.sleep(2.0)
            yield self.k[:, s0 : s0 + 8], self.v[:, s0 : s0 + 8]


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense attention out [Hq, d] of q [Hq, d] over k, v [T, Hkv, d] (float64, for the comparison)."""
    G = HQ // HKV
    qg = q.double().view(HKV, G, D)
    scores = torch.einsum("hgd,thd->hgt", qg, k.double()) / D**0.5
    return torch.einsum("hgt,thd->hgd", torch.softmax(scores, -1), v.double()).reshape(HQ, D)


def _check_rows(client, sid: str, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether every row of `sid` reads back as written (k, v [L, T, Hkv, d])."""
    T = k.shape[1]
    index = torch.arange(T).expand(HKV, T)
    for layer in range(L):
        got_k, got_v = client.fetch(sid, layer, "rows", index).tensors[:2]
        if not (torch.equal(got_k, k[layer].transpose(0, 1)) and torch.equal(got_v, v[layer].transpose(0, 1))):
            return False
    return True


def _client_thread(target: str, seed: int, until: float, tally: _Tally, kept: list) -> None:
    from kvcache import RemoteClient
    from kvcache.errors import (
        KVCacheError,
        PageCorrupted,
        QuotaExceeded,
        SequenceNotFound,
        StoreFull,
        Unavailable,
    )

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    client = RemoteClient(target, timeout=20, retries=2)
    mine: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    while time.monotonic() < until:
        sid = None
        time.sleep(rng.uniform(0.0, 0.2))  # an engine computes between its calls: 32 of them must not saturate 2 cores
        try:
            sid = client.create(lease_seconds=LEASE_SECONDS).seq_id
            tally.add("creates")
            T = rng.randint(3, 40)
            k, v = torch.randn((L, T, HKV, D), generator=gen), torch.randn((L, T, HKV, D), generator=gen)
            if rng.random() < 0.5:
                client.append(sid, k, v)
            else:
                client.append_chunks(sid, _Chunks(k, v, rng.random() < 0.1, tally))
            tally.add("appends")
            ks, vs = list(k), list(v)  # per layer [T, Hkv, d]: a decode step appends layer by layer
            for _ in range(rng.randint(1, 4)):
                q = torch.randn((1, HQ, D), generator=gen)
                time.sleep(rng.uniform(0.0, 0.05))  # the model's own work in a decode step
                for layer in range(L):
                    row_k, row_v = torch.randn((2, 1, HKV, D), generator=gen)
                    out = client.attend([sid], layer, q, new_k=row_k, new_v=row_v).out
                    tally.add("attends")
                    ks[layer], vs[layer] = torch.cat((ks[layer], row_k)), torch.cat((vs[layer], row_v))
                    want = _reference(q[0], ks[layer], vs[layer])
                    if not torch.allclose(out[0].double(), want, atol=1e-4, rtol=1e-4):
                        tally.problem(f"attention of {sid} differs from its reference by "
                                      f"{(out[0].double() - want).abs().max():.3g}")
            k, v = torch.stack(ks), torch.stack(vs)
            if _check_rows(client, sid, k, v):
                tally.add("sequences_verified")
            else:
                tally.problem(f"rows of {sid} differ from what was written")
            if rng.random() < 0.2:
                child = client.fork(sid).seq_id
                tally.add("forks")
                if _check_rows(client, child, k, v):
                    tally.add("sequences_verified")
                else:
                    tally.problem(f"rows of fork {child} differ from its parent's")
                client.free(child)
            if rng.random() < 0.3 and len(mine) < 2:
                mine.append((sid, k, v))  # kept to the end, read back whole then
                with tally.lock:
                    kept.append((client, sid, k, v))
            else:
                client.free(sid)
            sid = None
        except PageCorrupted:
            tally.add("data_loss_answers")
        except (StoreFull, QuotaExceeded):
            tally.add("refused_full")
            time.sleep(0.2)
        except SequenceNotFound:
            tally.add("expired_during_call")
        except Unavailable as exc:
            tally.add("unavailable")
            tally.problem(f"unavailable: {exc}")
        except KVCacheError as exc:
            tally.problem(f"{type(exc).__name__}: {exc}")
        if sid is not None:
            try:
                client.free(sid)
            except KVCacheError:
                pass


def _keep_alive(kept: list, tally: _Tally, stop: threading.Event) -> None:
    """Renew the leases of the kept sequences every second, as a live engine's calls would."""
    from kvcache.errors import KVCacheError

    while not stop.wait(1.0):
        with tally.lock:
            entries = list(kept)
        for client, sid, *_ in entries:
            try:
                client.describe(sid)
            except KVCacheError:
                pass  # a sequence that lost a page is reported when it is read back


def _bad_inputs_thread(target: str, seed: int, until: float, tally: _Tally) -> None:
    """Bad requests of every kind, each checked to get its documented class; other calls go on meanwhile."""
    import grpc

    from kvcache import RemoteClient
    from kvcache.errors import CallTooLarge, InvalidParameter, KVCacheError, SequenceNotFound, ShapeMismatch
    from kvcache.wire import kvcache_pb2 as pb
    from kvcache.wire import kvcache_pb2_grpc as pb_grpc

    rng = random.Random(seed)
    client = RemoteClient(target, timeout=20, retries=0)
    stub = pb_grpc.KVCacheStub(grpc.insecure_channel(target))
    sid = client.create().seq_id  # no lease: refused calls need not touch it (its process is never killed)
    client.append(sid, torch.randn((L, 9, HKV, D)), torch.randn((L, 9, HKV, D)))
    nan = torch.randn((3, HKV, D))
    nan[1, 0, 0] = float("nan")

    def oversized():
        # Query heads within --max-query-heads, but Quest's bound per head and page passes --max-call-memory here.
        long = client.create(lease_seconds=LEASE_SECONDS).seq_id
        try:
            client.append(long, torch.randn((L, 300, HKV, D)), torch.randn((L, 300, HKV, D)))
            client.attend([long], 0, torch.randn((1, 64, D)), "quest", {"top_pages": 2})
        finally:
            client.free(long)

    cases = [
        ("nan_append", InvalidParameter, lambda: client.append(sid, nan, torch.randn((3, HKV, D)), layer=0)),
        ("wrong_shape", ShapeMismatch, lambda: client.append(sid, torch.randn((3, HKV, D + 1)),
                                                             torch.randn((3, HKV, D + 1)), layer=0)),
        ("unknown_sequence", SequenceNotFound, lambda: client.describe("f" * 32)),
        ("bad_method", InvalidParameter, lambda: client.attend([sid], 0, torch.randn((1, HQ, D)), "nope")),
        ("huge_scale", InvalidParameter, lambda: client.attend([sid], 0, torch.randn((1, HQ, D)), "dense",
                                                               {"scale": 1e300})),
        ("oversized_attend", CallTooLarge, oversized),
    ]

    try:
        while time.monotonic() < until:
            name, expected, call = rng.choice(cases)
            try:
                call()
                tally.problem(f"bad input {name} was accepted")
            except expected:
                tally.add("bad_inputs_refused")
            except KVCacheError as exc:
                # No room for the long sequence, or a flipped byte in it, is not a verdict on the input.
                excused = name == "oversized_attend" and type(exc).__name__ in NOT_A_VERDICT
                if not excused:
                    tally.problem(f"bad input {name}: {type(exc).__name__}: {exc}")
            try:  # a shape with a zero and a huge dimension, sent raw: the codec must refuse it
                huge = pb.Tensor(dtype="float32", shape=[0, 2**62, HKV, D], data=b"")
                stub.Append(pb.AppendRequest(seq_id=sid, k=huge, v=huge, layer=0), timeout=20)
                tally.problem("a zero-size tensor with a huge dimension was accepted")
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    tally.add("bad_inputs_refused")
                else:
                    tally.problem(f"huge shape: {exc.code()}")
            time.sleep(0.05)
    except Exception as exc:  # noqa: BLE001 - reported, not raised in a thread
        tally.problem(f"bad-input thread: {type(exc).__name__}: {exc}")
    finally:
        client.free(sid)


def client_main(target: str, threads: int, seconds: float, seed: int, bad_inputs: bool) -> int:
    """A client process: `threads` clients for `seconds`, then its kept sequences read back and freed; prints its
    counts as one JSON line."""
    torch.set_num_threads(1)
    tally, kept = _Tally(), []
    until = time.monotonic() + seconds
    workers = [threading.Thread(target=_client_thread, args=(target, seed * 100 + i, until, tally, kept))
               for i in range(threads)]
    if bad_inputs:
        workers.append(threading.Thread(target=_bad_inputs_thread, args=(target, seed * 100 + 99, until, tally)))
    stop = threading.Event()
    keeper = threading.Thread(target=_keep_alive, args=(kept, tally, stop), daemon=True)
    keeper.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    keeper.join()
    from kvcache.errors import KVCacheError, PageCorrupted

    for client, sid, k, v in kept:
        try:
            ok = _check_rows(client, sid, k, v)
            tally.add("sequences_verified" if ok else "problems")
            tally.add("kept_verified_at_end")
            if not ok:
                tally.problem(f"kept sequence {sid} differs from what was written")
            client.free(sid)
        except PageCorrupted:
            tally.add("data_loss_answers")
        except KVCacheError as exc:
            tally.problem(f"kept sequence {sid}: {type(exc).__name__}: {exc}")
    print(json.dumps({"counts": dict(tally.counts), "problems": tally.problems}), flush=True)
    return 0


# ---- the orchestrator ------------------------------------------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _spawn_client(target: str, threads: int, seconds: float, seed: int, bad_inputs: bool) -> subprocess.Popen:
    args = [sys.executable, "-m", "kvcache.bench.soak", "--client", target, "--threads", str(threads),
            "--seconds", str(seconds), "--seed", str(seed)] + (["--bad-inputs"] if bad_inputs else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _flip_a_byte(disk_dir: str, rng: random.Random, slots: int = 96) -> None:
    """Flip one bit of one K/V value in the first `slots` slots of the disk tier's file (slots are handed out from
    the lowest, so these mostly hold live pages)."""
    slot_bytes = 2 * HKV * P * D * 4  # one layer's K and V of one slot, float32
    with open(os.path.join(disk_dir, "pages.bin"), "r+b") as f:
        offset = rng.randrange(L) * 2048 * slot_bytes + rng.randrange(slots) * slot_bytes + rng.randrange(slot_bytes)
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ (1 << rng.randrange(8))]))


def run(clients: int = 32, seconds: float = 60.0, processes: int = 4, seed: int = 0, kill_every: float = 6.0,
        corrupt_every: float = 5.0) -> dict:
    """The soak; returns its report (counts, faults by kind, memory and pages before and after)."""
    from kvcache import RemoteClient

    rng = random.Random(seed)
    threads = max(1, clients // processes)
    work = tempfile.mkdtemp(prefix="kvcache-soak-")
    server = ServerProcess([*STORE_FLAGS, "--disk-dir", work, "--grace-seconds", "5"], os.path.join(work, "serve.log"))
    report: dict = {**run_header(torch.device("cpu")), "clients": threads * processes, "processes": processes,
                    "seconds": seconds, "lease_seconds": LEASE_SECONDS, "store_flags": list(STORE_FLAGS)}
    try:
        control = RemoteClient(server.target, timeout=10, retries=0)
        warm = _spawn_client(server.target, 2, 3.0, seed + 1000, True)  # touches every path once before measuring
        warm.communicate(timeout=120)
        time.sleep(LEASE_SECONDS + 1)
        pool0 = control.stats()["pool"]
        rss0 = _rss_bytes(server.process.pid)
        faults: Counter[str] = Counter()
        totals: Counter[str] = Counter()
        problems: list[str] = []
        health_failures, health_ms = 0, []
        until = time.monotonic() + seconds
        live = [_spawn_client(server.target, threads, seconds, seed + i, i == 0) for i in range(processes)]
        next_kill, next_corrupt, spawned = time.monotonic() + kill_every, time.monotonic() + corrupt_every, processes
        while time.monotonic() < until:
            t0 = time.perf_counter()
            try:
                if control.health() != "SERVING":
                    health_failures += 1
            except Exception:  # noqa: BLE001 - any failure of Health is what is counted
                health_failures += 1
            health_ms.append((time.perf_counter() - t0) * 1e3)
            now = time.monotonic()
            if now >= next_kill and until - now > 8:
                victim = rng.choice([p for p in live[1:] if p.poll() is None] or [None])
                if victim is not None:
                    victim.kill()  # SIGKILL, mid-call: its sequences are reclaimed by their leases
                    victim.wait()
                    faults["client_kills"] += 1
                    live.append(_spawn_client(server.target, threads, until - time.monotonic(), seed + spawned,
                                              False))
                    spawned += 1
                next_kill = now + kill_every
            if now >= next_corrupt:
                _flip_a_byte(work, rng)
                faults["disk_bytes_flipped"] += 1
                next_corrupt = now + corrupt_every
            time.sleep(0.5)
        for p in live:
            try:
                out, err = p.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
                problems.append("a client process did not finish")
            if p.returncode == -signal.SIGKILL:
                continue
            lines = [line for line in out.splitlines() if line.startswith("{")]
            if p.returncode != 0 or not lines:
                problems.append(f"client exited {p.returncode}: {err[-500:]}")
                continue
            result = json.loads(lines[-1])
            totals.update(result["counts"])
            problems.extend(result["problems"])
        faults["stalled_append_streams"] = totals.pop("stalls", 0)
        faults["bad_inputs"] = totals.get("bad_inputs_refused", 0)
        time.sleep(LEASE_SECONDS + 1.5)  # the killed clients' leases run out, and the reaper frees them
        stats1 = control.stats()
        pool1 = stats1["pool"]
        rss1 = _rss_bytes(server.process.pid)
        verify = control.verify()
        control.close()
        report.update(
            calls=dict(totals), faults=dict(faults), problems=problems, health_failures=health_failures,
            health_ms_max=max(health_ms, default=0.0), health_polls=len(health_ms),
            sequences_verified=totals.get("sequences_verified", 0),
            memory_before_bytes=rss0, memory_after_bytes=rss1,
            pool_before={k: pool0[k] for k in ("pages_free", "sequences", "pages_total")},
            pool_after={k: pool1[k] for k in ("pages_free", "sequences", "pages_total", "sequences_expired",
                                               "pages_quarantined")},
            scrub={"pages_checked": verify["pages_checked"], "corrupted_pages": len(verify["corrupted_pages"])},
            # where the attends went: the clients' default data plane is the local socket on this host
            attends_by_transport={rpc: int(stats1["rpcs"].get(rpc, {}).get("calls", 0))
                                  for rpc in ("AttendLocal", "AttendStream", "Attend")},
        )
    finally:
        report["server_exit_code"] = server.stop()
    return report


def main(args) -> int:
    """Entry of `kvcache bench soak` (and of its client processes)."""
    if args.client:
        return client_main(args.client, args.threads, args.seconds, args.seed, args.bad_inputs)
    report = run(args.clients, args.seconds, args.processes, args.seed)
    summary = {k: report[k] for k in ("clients", "seconds", "faults", "sequences_verified", "health_failures",
                                      "memory_before_bytes", "memory_after_bytes", "pool_before", "pool_after")}
    print(json.dumps(summary, indent=1))
    print(f"problems: {len(report['problems'])}")
    for p in report["problems"][:20]:
        print("  " + p)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if not report["problems"] else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `kvcache bench soak`."""
    p.add_argument("--clients", type=int, default=32, help="client connections (default 32)")
    p.add_argument("--processes", type=int, default=4, help="client processes they run in (default 4)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the clients run (default 60)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    p.add_argument("--client", help=argparse.SUPPRESS)  # host:port: run as one client process
    p.add_argument("--threads", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--bad-inputs", action="store_true", help=argparse.SUPPRESS)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
