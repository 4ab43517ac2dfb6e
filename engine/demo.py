"""`make demo`: SmolLM2-135M answers a question about a long passage, decoding through a `kvcache serve`
process over gRPC, once with dense attention and once with SparQ; prints each answer, its speed, the attention
bytes it read per token, and the speed those bytes predict against dense (a decode step reads the weights and the
attention's K/V once: bandwidth-bound, its time follows those bytes)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from kvcache.engine.decode import AttentionSpec
from kvcache.engine.eval_data import calibration_text

QUESTION = "In one sentence: what does the passage above explain?"
# About 8K tokens of the Python docs: there the cache is 40% of the bytes a dense step reads (the rest is the
# weights), so reading an eighth of it shows. The second method finds the prompt in the server's prefix cache.
PASSAGE_CHARS = 34000


@contextmanager
def running_server(layers: int, kv_heads: int, head_dim: int, pages: int) -> Iterator[str]:
    """Start `kvcache serve` on a free loopback port; yields "127.0.0.1:PORT"; stops it (SIGTERM) on exit."""
    cmd = [sys.executable, "-m", "kvcache.cli", "serve", "--port", "0", "--layers", str(layers),
           "--kv-heads", str(kv_heads), "--head-dim", str(head_dim), "--pages", str(pages), "--dtype", "float32",
           "--torch-threads", "1"]
    # The server's JSON log goes to a file, read back for the port: a pipe nobody drains would fill.
    with tempfile.TemporaryFile("w+", prefix="kvcache-serve-", suffix=".log") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            port = None
            while port is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"kvcache serve did not start:\n{log.read()}")
                time.sleep(0.2)
                log.seek(0)
                for line in log:
                    if '"listening"' in line:
                        port = json.loads(line)["port"]
            yield f"127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    """Run the demo; returns the exit code."""
    from kvcache.clients.remote import RemoteClient
    from kvcache.engine.generate import generate_text
    from kvcache.engine.load import load_model

    print("loading SmolLM2-135M-Instruct from its GGUF file ...", flush=True)
    model, tok = load_model()
    model.for_decoding()
    c = model.config
    passage = calibration_text()[:PASSAGE_CHARS]
    prompt = [{"role": "user", "content": f"{passage}\n\n{QUESTION}"}]
    n_prompt = len(tok.prompt_ids(prompt, chat=True))
    k = max(64, n_prompt // 8)
    specs = [AttentionSpec("dense", {}), AttentionSpec("sparq", {"r": 16, "k": k, "local_window": k // 4})]
    print(f"prompt: {n_prompt} tokens (a page of the Python docs, then: {QUESTION!r})", flush=True)
    with running_server(c.num_layers, c.num_kv_heads, c.head_dim, pages=2048) as target:
        print(f"kvcache serve listening on {target}; decoding through it over gRPC\n", flush=True)
        with RemoteClient(target) as client:
            rows = []
            for spec in specs:
                label = " ".join([spec.method, *(f"{a}={b}" for a, b in spec.params.items())])
                print(f"--- {label}", flush=True)
                result = generate_text(model, tok, client, prompt, chat=True, max_new_tokens=48, spec=spec,
                                       on_text=lambda piece: print(piece, end="", flush=True))
                print(flush=True)
                rows.append((label, result))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"\n{'method':<34} {'tokens':>6} {'tokens/s':>9} {'attention bytes/token':>22} {'of dense':>9} "
          f"{'speed vs dense':>15} {'bytes predict':>14}")
    dense = rows[0][1]
    for label, r in rows:
        predicted = (weights + dense.attention_bytes_per_token) / (weights + r.attention_bytes_per_token)
        print(f"{label:<34} {r.decode_tokens:>6} {r.tokens_per_second:>9.2f} {r.attention_bytes_per_token:>22,.0f} "
              f"{r.attention_bytes_per_token / (dense.attention_bytes_per_token or 1):>9.3f} "
              f"{r.tokens_per_second / (dense.tokens_per_second or 1):>14.2f}x {predicted:>13.2f}x")
        other = {m: n for m, n in r.steps_by_method.items() if m != label.split()[0]}
        if other:
            print(f"    (not every step could run {label.split()[0]}: {other})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
