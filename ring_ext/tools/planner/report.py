"""The plan as text and as a picture: one row per scheme, best first."""

from __future__ import annotations

from .model import Prediction, Scheme


def describe(scheme: Scheme) -> str:
    """The scheme's name in the plan: "ring overlap", "hybrid u=2 ring=4 window=2 no overlap"..."""
    if scheme.algo == "ulysses":
        return f"ulysses u={scheme.ulysses_degree}"
    parts = [scheme.algo]
    if scheme.algo == "hybrid":
        parts.append(f"u={scheme.ulysses_degree} ring={scheme.ring}")
    if scheme.window > 1:
        parts.append(f"window={scheme.window}")
    if scheme.placement != "zigzag":
        parts.append(scheme.placement)
    if scheme.algo != "ulysses" and scheme.ring > 1:
        parts.append("overlap" if scheme.overlap else "no overlap")
    return " ".join(parts)


def table(preds: list[Prediction]) -> str:
    """A Markdown table of the predictions, in their order (rank_schemes': best first)."""
    best = preds[0].seconds
    lines = [
        "| scheme | fwd+bwd ms | vs best | compute ms | exposed comm ms | MB sent/rank | peak MiB/rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in preds:
        lines.append(
            f"| {describe(p.scheme)} | {p.seconds * 1e3:.2f} | {p.seconds / best:.2f}x | "
            f"{p.compute_s * 1e3:.2f} | {p.exposed_comm_s * 1e3:.2f} | {p.bytes_sent / 1e6:.1f} | "
            f"{p.peak_bytes / 2**20:.1f} |"
        )
    return "\n".join(lines)


def plot(preds: list[Prediction], path: str) -> None:
    """Predicted compute and exposed communication per scheme, as horizontal bars, to `path`
    (matplotlib: the optional `plot` extra, imported here only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [describe(p.scheme) for p in preds][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(preds) + 1.2))
    compute = [p.compute_s * 1e3 for p in preds][::-1]
    comm = [(p.seconds - p.compute_s) * 1e3 for p in preds][::-1]
    ax.barh(names, compute, label="compute")
    ax.barh(names, comm, left=compute, label="exposed communication")
    ax.set_xlabel("predicted forward+backward ms per layer")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
