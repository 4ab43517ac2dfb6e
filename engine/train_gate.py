"""`kvcache train-gate`: distil a page gate (docs/sparse-attention.md §3, kvcache/methods/gate.py) from a model's
own attention on real text; the model stays frozen.

1. Capture. The model runs over windows of the text with exact causal attention; a hook at every
   layer takes the post-RoPE q and k (what the store holds), rotates them back to position 0 for a
   pre-RoPE gate (the default, `--inputs pre-rope`; kvcache.methods.gate), pools k per page
   ([min, max, mean] of every page of P positions, as the store keeps them) and, for a fixed
   sample of query positions t, two ground truths per page i:
       mass[h, t, i] = mean over the G query heads of group h of sum_{j in page i} softmax_j(q.k_j / sqrt(d))
       max[h, t, i]  = max over the G query heads of group h of max_{j in page i} softmax_j(q.k_j / sqrt(d))
   `--target mass` (the default) fits the attention mass: what a choice of pages keeps, the share of
   the output it keeps, and what recall is measured on. `--target max` fits §3's block max-pool,
   which ranks a page holding one sharp key (an induction head's copy source) above a page of many
   moderate keys. On SmolLM2 neither won outright (8 windows of 2K each, eval at 2K and 4K): max
   was better at a quarter of the pages, mass at an eighth. More text mattered more: going from 3
   to 8 windows halved the perplexity gap of either, and 12 windows of 4K instead of 8 of 2K (the
   gate's RoPE then sees the page distances of a 4K eval) took the 4K gap at an eighth of the bytes
   from +49% to +19% (64 scored tokens). The defaults (24 windows of 4K) take about 8 minutes here.
2. Fit. Decode reads the first page and the query's own (last, partial) page regardless, so the
   loss is over the pages strictly between them: both the ground truth and the gate's softmax are
   restricted to pages 1 .. page(t)-1 and renormalised there; loss KL(gt || gate), averaged over
   rows, summed over layers (the layers' gates are independent). Adam on all layers at once.
3. Held out. Windows of the text the gate never trains on give the held-out KL, logged with the
   training loss; they follow the training ones. The text is the calibration text
   (engine/eval_data.py calibration_text: the Python docs' topic pages); `kvcache eval` scores another,
   the stdlib's docstrings, so its rows are held out from any gate trained here. The training windows
   still start after the text's first 8192 tokens (`--skip`), which the eval harness scored when it read
   this text too: the default keeps the gates trained before reproducible.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass

import torch

from kvcache.engine.model import Llama
from kvcache.engine.prefill import causal_attention
from kvcache.methods.gate_model import GATE_DIM, GateShape, PageGate, gate_rope, unrotate

EVAL_TOKENS = 8192  # the calibration text's first tokens, which kvcache eval scored when it read that text


@dataclass
class Capture:
    """What the gate learns from, for every layer of one window: q [L, Tq, Hkv, G*d] at positions [Tq],
    pooled keys [L, n, Hkv, 3d] ([max, min, mean] of each page), and two ground truths [L, Hkv, Tq, n]: the
    attention mass per page (what a choice keeps; recall is measured on it) and the page max (§3's target)."""

    q: torch.Tensor
    positions: torch.Tensor
    pooled: torch.Tensor
    gt: torch.Tensor
    window: int = 0  # tokens of the window
    gt_max: torch.Tensor | None = None
    rotated: tuple[torch.Tensor, torch.Tensor] | None = None  # (q, pooled) as stored, when q and pooled are not

    def target(self, kind: str) -> torch.Tensor:
        """The ground truth training fits: "mass" (summed over the page) or "max" (§3's block max)."""
        if kind == "mass":
            return self.gt
        if kind == "max" and self.gt_max is not None:
            return self.gt_max
        raise ValueError(f"no {kind!r} ground truth in this capture (have: mass" + (", max)" if self.gt_max is not None
                                                                                  else ")"))


def query_positions(T: int, page_size: int, queries: int, seed: int) -> torch.Tensor:
    """`queries` positions in [3P, T), sorted, drawn without replacement (all of them if fewer)."""
    lo = 3 * page_size  # at least two whole pages lie between page 0 and the query's page
    pool = torch.arange(lo, T)
    if queries >= len(pool):
        return pool
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:queries]
    return pool[pick].sort().values


@torch.inference_mode()
def capture(model: Llama, ids: list[int], page_size: int, queries: int, seed: int = 0,
            model_rope_base: float = 0.0) -> Capture:
    """Run the frozen model over `ids` (a multiple of page_size long) and keep what training needs: q and pooled keys
    rotated back to position 0 when model_rope_base > 0 (a pre-RoPE gate), else as stored."""
    c = model.config
    T = len(ids)
    assert T % page_size == 0, "windows are whole pages"
    n, G, Hkv, d = T // page_size, c.num_heads // c.num_kv_heads, c.num_kv_heads, c.head_dim
    pos = query_positions(T, page_size, queries, seed)
    qs, pooled, gts, gmax, rotated = [], [], [], [], ([], [])
    causal = torch.arange(T)[None, :] <= pos[:, None]  # [Tq, T]

    def keep(q0: torch.Tensor, k0: torch.Tensor, into: tuple[list, list]) -> None:
        pages = k0.view(n, page_size, Hkv, d)
        into[1].append(torch.cat((pages.amax(1), pages.amin(1), pages.mean(1)), dim=-1))  # [n, Hkv, 3d]
        into[0].append(q0[pos].reshape(len(pos), Hkv, G * d))

    def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q0, k0 = q[0].float(), k[0].float()  # [T, Hq, d], [T, Hkv, d]
        if model_rope_base:
            at = torch.arange(T)[:, None]
            keep(unrotate(q0, at, model_rope_base), unrotate(k0, at, model_rope_base), (qs, pooled))
            keep(q0, k0, rotated)  # Quest's bound is on the vectors as stored
        else:
            keep(q0, k0, (qs, pooled))
        qsel = q0[pos]  # [Tq, Hq, d]
        kk = k0.repeat_interleave(G, dim=1)  # [T, Hq, d]
        logits = torch.einsum("thd,shd->hts", qsel, kk) / math.sqrt(d)  # [Hq, Tq, T]
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        per_page = probs.view(c.num_heads, len(pos), n, page_size)
        gts.append(per_page.sum(-1).view(Hkv, G, len(pos), n).mean(1))  # [Hkv, Tq, n]
        # §3's 2D max-pool, also over the group: a page matters if any head of the group has a sharp key there.
        gmax.append(per_page.amax(-1).view(Hkv, G, len(pos), n).amax(1))
        return causal_attention(q[0], k[0], v[0])[None]

    model(torch.tensor([ids]), torch.arange(T)[None], attend, last_only=True)
    as_stored = (torch.stack(rotated[0]), torch.stack(rotated[1])) if model_rope_base else None
    return Capture(torch.stack(qs), pos, torch.stack(pooled), torch.stack(gts), T, torch.stack(gmax), as_stored)


GROUND_TRUTHS = {
    "mass": "attention mass per page (row-softmaxed attention summed over the page), mean over the group's "
            "query heads; pages between the first and the query's own, renormalised there",
    "max": "page max of the row-softmaxed attention (§3's block max-pool), max over the group's query heads; "
           "pages between the first and the query's own, renormalised there",
}


def page_mask(positions: torch.Tensor, n: int, page_size: int) -> torch.Tensor:
    """[Tq, n]: the pages strictly between page 0 and each query's own page."""
    own = positions // page_size
    i = torch.arange(n)
    return (i[None, :] >= 1) & (i[None, :] < own[:, None])


def gate_log_probs(gate: PageGate, cap: Capture, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate log-probabilities [L, Hkv, R, n] over the masked pages of query rows `rows`, and the mask [R, n]."""
    s = gate.shape
    n = cap.pooled.shape[1]
    positions = cap.positions[rows]
    qg = torch.einsum("lrhi,lhio->lrho", cap.q[:, rows], gate.q_weight) + gate.q_bias[:, None]  # [L, R, Hkv, dg]
    qg = gate_rope(qg, (positions // s.page_size)[None, :, None], s.rope_base)
    kg = torch.einsum("lnhi,lhio->lnho", cap.pooled, gate.k_weight)  # [L, n, Hkv, dg]
    kg = gate_rope(kg, torch.arange(n)[None, :, None], s.rope_base)
    logits = torch.einsum("lrho,lnho->lhrn", qg, kg) / math.sqrt(s.gate_dim)
    mask = page_mask(positions, n, s.page_size)
    return torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1), mask


def kl_loss(gate: PageGate, cap: Capture, rows: torch.Tensor | None = None, target: str = "mass") -> torch.Tensor:
    """Mean over layers, kv heads and rows of KL(gt || gate) on the pages between the first and the query's own,
    gt the `target` ground truth renormalised there."""
    rows = torch.arange(len(cap.positions)) if rows is None else rows
    logq, mask = gate_log_probs(gate, cap, rows)
    gt = cap.target(target)[:, :, rows] * mask
    gt = gt / gt.sum(-1, keepdim=True).clamp_min(1e-12)
    logq = logq.masked_fill(~mask, 0.0)
    kl = (gt * (torch.log(gt.clamp_min(1e-12)) - logq)).sum(-1)  # [L, Hkv, R]
    return kl.mean()


def mass_recall(scores: torch.Tensor, cap: Capture, fraction: float) -> float:
    """Share of the attention mass on the pages between the first and the query's own that the best
    `fraction` of them by `scores` [L, Hkv, Tq, n] hold (at least one page), averaged over rows."""
    n = cap.pooled.shape[1]
    mask = page_mask(cap.positions, n, _page_size(cap))
    gt = cap.gt * mask
    gt = gt / gt.sum(-1, keepdim=True).clamp_min(1e-12)
    take = (mask.sum(-1).float() * fraction).ceil().clamp_min(1).long()  # [Tq]
    order = scores.masked_fill(~mask, float("-inf")).argsort(-1, descending=True)
    ranked = gt.gather(-1, order)  # mass of the pages, best first
    keep = torch.arange(n)[None, :] < take[:, None]  # [Tq, n]
    return float((ranked * keep).sum(-1).mean())


def _page_size(cap: Capture) -> int:
    # A window is n whole pages.
    return cap.window // cap.gt.shape[-1]


def gate_scores(gate: PageGate, cap: Capture) -> torch.Tensor:
    """The gate's log-probabilities [L, Hkv, Tq, n] of every captured query (masked pages -inf)."""
    with torch.no_grad():
        return gate_log_probs(gate, cap, torch.arange(len(cap.positions)))[0]


def quest_scores(cap: Capture, head_dim: int) -> torch.Tensor:
    """Quest's group scores [L, Hkv, Tq, n] (kvcache.methods.quest: each head's bound softmaxed over the
    pages, summed over the group) of every captured query; mass_recall ranks only the pages between."""
    q, pooled = cap.rotated or (cap.q, cap.pooled)
    L, Tq, Hkv, Gd = q.shape
    d = head_dim
    q = q.view(L, Tq, Hkv, Gd // d, d)
    kmax, kmin = pooled[..., :d], pooled[..., d : 2 * d]  # [L, n, Hkv, d]
    bound = (torch.einsum("lthgd,lnhd->lhgtn", q.clamp_min(0), kmax)
             + torch.einsum("lthgd,lnhd->lhgtn", q.clamp_max(0), kmin))
    # Softmaxed over the pages up to the query's own (whole here; partial at decode), as decode does.
    seen = torch.arange(cap.pooled.shape[1])[None, :] <= (cap.positions // _page_size(cap))[:, None]
    return torch.softmax((bound / math.sqrt(d)).masked_fill(~seen, float("-inf")), -1).sum(2)


def recall_report(gate: PageGate, caps: list[Capture], head_dim: int, fractions=(1 / 4, 1 / 8, 1 / 16)) -> list[dict]:
    """Attention-mass recall of the gate's and Quest's choices at each fraction of the pages, over `caps`."""
    rows = []
    for f in fractions:
        g = sum(mass_recall(gate_scores(gate, c), c, f) for c in caps) / len(caps)
        qu = sum(mass_recall(quest_scores(c, head_dim), c, f) for c in caps) / len(caps)
        best = sum(mass_recall(c.gt, c, f) for c in caps) / len(caps)
        rows.append({"fraction_of_pages": f, "gate": g, "quest": qu, "oracle": best})
    return rows


def train(gate: PageGate, train_caps: list[Capture], held_caps: list[Capture], steps: int, lr: float = 2e-3,
          batch: int = 256, eval_every: int = 10, seed: int = 0, log=print, target: str = "mass") -> dict:
    """Adam on KL(gt || gate); returns the loss curve {step, train, held_out} (held-out every `eval_every`)."""
    opt = torch.optim.Adam(gate.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    curve: dict = {"step": [], "train": [], "held_out_step": [], "held_out": []}

    def held_out() -> float:
        with torch.no_grad():
            return sum(float(kl_loss(gate, c, target=target)) for c in held_caps) / max(1, len(held_caps))

    curve["held_out_step"].append(0)
    curve["held_out"].append(held_out())
    log(f"step 0: held-out KL {curve['held_out'][-1]:.4f}")
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        cap = train_caps[(step - 1) % len(train_caps)]
        rows = torch.randperm(len(cap.positions), generator=gen)[:batch]
        loss = kl_loss(gate, cap, rows, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        curve["step"].append(step)
        curve["train"].append(float(loss.detach()))
        if step % eval_every == 0 or step == steps:
            curve["held_out_step"].append(step)
            curve["held_out"].append(held_out())
            log(f"step {step}: train KL {curve['train'][-1]:.4f}  held-out KL {curve['held_out'][-1]:.4f}  "
                f"({time.perf_counter() - t0:.0f} s)")
    return curve


def windows(ids: list[int], context: int, count: int, start: int) -> list[list[int]]:
    """`count` consecutive windows of `context` tokens from ids[start:]."""
    out = [ids[start + i * context : start + (i + 1) * context] for i in range(count)]
    if any(len(w) < context for w in out):
        raise ValueError(f"the text has {len(ids)} tokens; {count} windows of {context} from {start} do not fit")
    return out


def gate_for(config, page_size: int, gate_dim: int = GATE_DIM, seed: int = 0, pre_rope: bool = True) -> PageGate:
    """A fresh gate shaped for a model config (kvcache.engine.config.ModelConfig): pre-RoPE (q and keys rotated back
    with the model's RoPE base) unless pre_rope is False."""
    return PageGate(GateShape(config.num_layers, config.num_kv_heads, config.num_heads // config.num_kv_heads,
                              config.head_dim, page_size, gate_dim, rope_base=10000.0,
                              model_rope_base=config.rope_theta if pre_rope else 0.0), seed=seed)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `kvcache train-gate`."""
    p.add_argument("--model", help="a .gguf file or a Hugging Face checkpoint directory (default: SmolLM2-135M)")
    p.add_argument("--name", default="smollm2-135m", help="gate name: writes kvcache/methods/gates/NAME.safetensors")
    p.add_argument("--context", type=int, default=4096, help="tokens per window (a multiple of --page-size)")
    p.add_argument("--windows", type=int, default=24, help="training windows (after the first --skip tokens)")
    p.add_argument("--held-out", type=int, default=1, help="held-out windows (after the training ones)")
    p.add_argument("--skip", type=int, default=EVAL_TOKENS,
                   help="first tokens of the calibration text left out (kvcache eval scored them before it read "
                        "a text of its own; the default reproduces the gates trained then)")
    p.add_argument("--queries", type=int, default=512, help="query positions sampled per window")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=256, help="query rows per step (all layers)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--gate-dim", type=int, default=GATE_DIM)
    p.add_argument("--target", choices=("mass", "max"), default="mass",
                   help="ground truth: mass = attention summed over the page (default), max = §3's page max of "
                        "the attention (ranks a page with one sharp key higher)")
    p.add_argument("--inputs", choices=("pre-rope", "rotated"), default="pre-rope",
                   help="pre-rope (default): q and keys rotated back to position 0 before the gate, as SeerAttention "
                        "takes them; rotated: as the store holds them (the gates before this option)")
    p.add_argument("--json", default="bench/results/train_gate_smollm2.json")
    p.add_argument("--plot", default="bench/results/train_gate_smollm2.png", help="PNG of the loss curve ('' none)")


def main(args: argparse.Namespace) -> int:
    """Capture, train, save the gate, write the curve."""
    import platform
    import sys

    from kvcache.engine.eval_data import calibration_text
    from kvcache.engine.load import load_model
    from kvcache.methods.gate_store import save_gate

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    ids = tok.encode(calibration_text())
    start = args.skip
    texts = windows(ids, args.context, args.windows + args.held_out, start)
    print(f"text: {len(ids)} tokens; {args.windows} training + {args.held_out} held-out windows of {args.context} "
          f"from token {start}", flush=True)
    gate = gate_for(model.config, args.page_size, args.gate_dim, pre_rope=args.inputs == "pre-rope")
    caps = []
    for i, w in enumerate(texts):
        caps.append(capture(model, w, args.page_size, args.queries, seed=i,
                            model_rope_base=gate.shape.model_rope_base))
        print(f"captured window {i} ({time.perf_counter() - t0:.0f} s)", flush=True)
    train_caps, held_caps = caps[: args.windows], caps[args.windows :]
    t1 = time.perf_counter()
    curve = train(gate, train_caps, held_caps, args.steps, args.lr, args.batch, target=args.target)
    t2 = time.perf_counter()
    recall = recall_report(gate, held_caps, model.config.head_dim)
    for r in recall:
        print(f"held-out attention mass kept by the best {r['fraction_of_pages']:.4g} of the pages between the "
              f"first and last: gate {r['gate']:.3f}  quest {r['quest']:.3f}  oracle {r['oracle']:.3f}")
    path = save_gate(gate, args.name, model=args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF)",
                     extra={"context": args.context, "steps": args.steps, "target": args.target, "inputs": args.inputs,
                            "held_out_kl": curve["held_out"][-1]})
    report = {"command": " ".join(sys.argv), "python": platform.python_version(), "torch": torch.__version__,
              "model": args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF)", "gate": str(path),
              "ground_truth": GROUND_TRUTHS[args.target], "target": args.target, "inputs": args.inputs,
              "context": args.context, "windows": args.windows, "held_out_windows": args.held_out,
              "queries_per_window": args.queries, "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "capture_seconds": round(t1 - t0, 1), "train_seconds": round(t2 - t1, 1),
              "held_out_mass_recall": recall, **curve}
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"held-out KL {curve['held_out'][0]:.4f} -> {curve['held_out'][-1]:.4f}; wrote {path} and {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def plot(report: dict, path: str) -> None:
    """Training and held-out KL against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(report["step"], report["train"], lw=0.8, alpha=0.7, label="train (batch)")
    ax.plot(report["held_out_step"], report["held_out"], marker="o", ms=3, label="held-out windows")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(attention mass per page || gate)")
    ax.set_title(f"page gate distillation, {report['context']} tokens per window")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
