"""What every engine shares: the result row, metric accumulation, the Pareto front and the output files.

Metrics are kvtuner's own (``kvtuner.evaluate.metrics``) on next-token log-probs, summed per
window and averaged once: KL(P_fp || P_q) and top-1 agreement over every position of every
window, perplexity over the ``T - 1`` positions that have a next token. "fp" is always the
engine's *own* full-precision KV on the same token ids, so engines with different kernels
(llama.cpp runs the GGUF's Q4_1 weights, transformers the dequantized fp32 weights) are each
scored only on what their KV quantization changes.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvtuner.config import write_atomic
from kvtuner.evaluate.metrics import kl_sum, nll_sum, top1_matches

TABLE_FIELDS = ("engine", "config", "nominal_bits", "effective_bits", "ppl", "kl", "top1", "tokens")


class PeerUnavailable(RuntimeError):
    """A peer cannot run here (package missing, model format unsupported); the message says why."""


@dataclass
class Row:
    engine: str
    config: str
    nominal_bits: float  # bits per element the format names (K and V averaged)
    effective_bits: float  # 16 * stored bytes / fp16 bytes of the same K/V elements
    ppl: float
    kl: float
    top1: float
    tokens: int
    note: str = ""

    def table_dict(self) -> dict:
        return {k: getattr(self, k) for k in TABLE_FIELDS}


@dataclass
class Scores:
    """Running sums of the three metrics over windows; ``add`` takes one window's log-probs."""

    kl: float = 0.0
    nll: float = 0.0
    top1: int = 0
    positions: int = 0
    targets: int = 0

    def add(self, ref_logprobs: torch.Tensor, logprobs: torch.Tensor, ids: torch.Tensor) -> None:
        """ref_logprobs, logprobs: [T, V] for the token ids [T] of one window (position t predicts t+1)."""
        self.kl += kl_sum(ref_logprobs, logprobs)
        self.top1 += top1_matches(ref_logprobs, logprobs)
        self.nll += nll_sum(logprobs[:-1], ids[1:])
        self.positions += ids.numel()
        self.targets += ids.numel() - 1

    def row(self, engine: str, config: str, nominal_bits: float, effective_bits: float, note: str = "") -> Row:
        return Row(
            engine=engine,
            config=config,
            nominal_bits=round(nominal_bits, 4),
            effective_bits=round(effective_bits, 4),
            ppl=math.exp(self.nll / self.targets),
            kl=self.kl / self.positions,
            top1=self.top1 / self.positions,
            tokens=self.positions,
            note=note,
        )


def log_softmax(logits) -> torch.Tensor:
    """Float32 log-probs of logits given as a tensor or a NumPy array."""
    if not isinstance(logits, torch.Tensor):
        logits = torch.from_numpy(logits)
    return torch.log_softmax(logits.float(), dim=-1)


# --- the front ------------------------------------------------------------------------------
def pareto_front(rows: list[Row]) -> list[Row]:
    """Rows no other row beats on both effective bits and KL (lower is better), sorted by bits."""
    front: list[Row] = []
    for r in sorted(rows, key=lambda r: (r.effective_bits, r.kl)):
        if not front or r.kl < front[-1].kl:
            front.append(r)
    return front


def front_kl_at(front: list[Row], bits: float) -> float:
    """Lowest KL the front reaches with at most ``bits`` effective bits (inf if none)."""
    return min((r.kl for r in front if r.effective_bits <= bits + 1e-9), default=math.inf)


def verdict(rows: list[Row], ours: str = "kvtuner") -> list[str]:
    """Plain-language lines: which peer points our front dominates, and our best KL at <= 4 bits vs q8_0."""
    front = pareto_front([r for r in rows if r.engine == ours])
    if not front:
        return [f"no {ours} rows: nothing to compare"]
    lines = []
    for r in rows:
        if r.engine == ours:
            continue
        if r.nominal_bits >= 16:
            lines.append(f"{r.engine} {r.config} is unquantized (KL {r.kl:.2e} vs its own reference): not a quantizer point")
            continue
        best = front_kl_at(front, r.effective_bits)
        mark = "dominated" if best <= r.kl else "NOT dominated"
        lines.append(
            f"{r.engine} {r.config} ({r.effective_bits:.2f} b, KL {r.kl:.2e}): {mark} "
            f"(our best KL at <= {r.effective_bits:.2f} b: {best:.2e})"
        )
    q8 = [r for r in rows if r.engine == "llama.cpp" and r.config == "q8_0"]
    low = [r for r in rows if r.engine == ours and r.nominal_bits <= 4.0]
    if q8 and low:
        best = min(low, key=lambda r: r.kl)
        ok = "at or below" if best.kl <= q8[0].kl else "ABOVE"
        lines.append(
            f"best {ours} at <= 4.0 nominal bits: {best.config} KL {best.kl:.2e}, {ok} llama.cpp q8_0 KL {q8[0].kl:.2e}"
        )
    return lines


# --- output files ----------------------------------------------------------------------------
def markdown_table(rows: list[Row], reference_ppl: dict[str, float]) -> str:
    head = "| engine | config | nominal bits | effective bits | ppl | KL | top-1 | tokens |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r.engine} | {r.config} | {r.nominal_bits:.2f} | {r.effective_bits:.2f} | {r.ppl:.3f} "
            f"| {r.kl:.3e} | {r.top1:.4f} | {r.tokens} |"
        )
    refs = ", ".join(f"{k} {v:.3f}" for k, v in reference_ppl.items())
    return "\n".join(lines) + f"\n\nReference (own full-precision KV) perplexity: {refs}\n"


def plot_pareto(rows: list[Row], path: Path, title: str, ours: str = "kvtuner", floors: dict[str, float] | None = None) -> None:
    """Effective bits vs KL (log): one marker per engine, our Pareto front as a line, and dashed lines
    for engines' numeric noise floors (KL between two unquantized runs). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"kvtuner": "o", "llama.cpp": "s", "quanto": "^", "hqq": "D", "transformers-fp8": "v"}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for engine in dict.fromkeys(r.engine for r in rows):
        pts = [r for r in rows if r.engine == engine and r.kl > 0]
        if not pts:
            continue
        ax.scatter([r.effective_bits for r in pts], [r.kl for r in pts], marker=markers.get(engine, "x"),
                   label=engine, s=42, zorder=3)
        for r in pts:
            ax.annotate(r.config, (r.effective_bits, r.kl), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = [r for r in pareto_front([r for r in rows if r.engine == ours]) if r.kl > 0]
    if front:
        ax.plot([r.effective_bits for r in front], [r.kl for r in front], "-", lw=1.2, label=f"{ours} front", zorder=2)
    for name, kl in (floors or {}).items():
        ax.axhline(kl, ls="--", lw=0.8, color="gray")
        ax.annotate(f"{name} noise floor", (ax.get_xlim()[0], kl), fontsize=6, color="gray",
                    xytext=(2, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("effective bits per K/V element (real bytes)")
    ax.set_ylabel("KL(P_fp || P_q) per token, vs own fp KV")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=130)
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    reference_ppl: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    speed: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def write(self, out: Path, plot_title: str) -> list[Path]:
        """table.json, table.md, pareto.png and run.json under ``out``, each written atomically at the end."""
        out.mkdir(parents=True, exist_ok=True)
        md = [markdown_table(self.rows, self.reference_ppl)]
        md += ["", "## Verdict", "", *[f"- {line}" for line in verdict(self.rows)]]
        if self.speed:
            md += ["", "## Generation speed (CPU)", "", "| engine | cache | threads | prompt | new | prefill s | decode tok/s |",
                   "|---|---|---|---|---|---|---|"]
            md += [f"| {s['engine']} | {s['cache']} | {s['threads']} | {s['prompt_tokens']} | {s['new_tokens']} | "
                   f"{s['prefill_s']:.2f} | {s['decode_tok_s']:.2f} |" for s in self.speed]
        if self.notes:
            md += ["", "## Notes", "", *[f"- {n}" for n in self.notes]]
        written = [out / "table.json", out / "table.md", out / "run.json", out / "pareto.png"]
        write_atomic(written[0], json.dumps([r.table_dict() for r in self.rows], indent=1) + "\n")
        write_atomic(written[1], "\n".join(md) + "\n")
        run = {**self.meta, "reference_ppl": self.reference_ppl, "notes": self.notes, "speed": self.speed,
               "rows": [asdict(r) for r in self.rows]}
        write_atomic(written[2], json.dumps(run, indent=1) + "\n")
        floor = self.meta.get("llama.cpp", {}).get("noise_floor_kl")
        plot_pareto(self.rows, written[3], plot_title, floors={"llama.cpp": floor} if floor else None)
        return written
