"""``curves.png`` of a run: reward, loss, KL, entropy, loss-step peak memory and one algorithm panel."""

from __future__ import annotations

from pathlib import Path


def _rolling(values: list, width: int = 10) -> list:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def plot_curves(rows: list, path: Path, title: str = "") -> None:
    """Six panels over the step: reward (and its 10-step mean), loss, KL to the reference, entropy,
    loss-step peak memory in MiB, and DPO accuracy + margin / PPO value loss / the clip fraction (or, when
    nothing was clipped, the response length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    panels = [
        ("reward", "reward (sampled, mean)"),
        ("loss", "loss"),
        ("kl", "KL to reference (k3, token mean)"),
        ("entropy", "entropy (token mean, nats)"),
    ]
    for ax, (key, label) in zip(axes.flat, panels):
        values = [r[key] for r in rows]
        ax.plot(steps, values, lw=1, alpha=0.6 if key == "reward" else 1.0)
        if key == "reward" and values:
            ax.plot(steps, _rolling(values), lw=2, label="10-step mean")
            ax.legend(loc="lower right")
        ax.set_title(label)
    ax = axes.flat[4]
    ax.plot(steps, [r["loss_peak_bytes"] / 2**20 for r in rows], lw=1.5, color="tab:red")
    ax.set_title("loss-step peak memory (MiB)")
    ax.set_ylim(bottom=0)
    ax = axes.flat[5]
    if rows and "accuracy" in rows[0]:
        ax.plot(steps, [r["accuracy"] for r in rows], label="preference accuracy")
        ax.plot(steps, [r["margin"] for r in rows], label="reward margin")
        ax.legend()
        ax.set_title("DPO accuracy / margin")
    elif rows and "value_loss" in rows[0]:
        ax.plot(steps, [r["value_loss"] for r in rows])
        ax.set_title("value loss")
    elif any(r.get("clip_frac", 0.0) > 0 for r in rows):
        ax.plot(steps, [r["clip_frac"] for r in rows])
        ax.set_title("clip fraction")
    else:  # one epoch per rollout: the ratio is 1, nothing is clipped; show what the policy writes instead
        ax.plot(steps, [r.get("response_len", 0.0) for r in rows])
        ax.set_title("response length (tokens, end token included)")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=90)
    plt.close(fig)
