"""Figures of a run's schedule: temperatures and bit widths per epoch.

``qtemperate plan RECIPE --plot schedule.png`` draws the plan before training;
``qtemperate run`` draws the same figure after training with what was measured
over it (the temperatures used, the test accuracy per epoch) and logs it to W&B.

The plan is the schedule's no-feedback path
(:func:`~qtemperate.schedule_switches.no_feedback_path`): before training there is
no validation loss, so the adaptive phase is drawn with ``val_loss = 0`` and the
plateau trigger off; the figure says so. matplotlib (the ``plot`` extra) is
imported only when a figure is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["NO_FEEDBACK_NOTE", "schedule_figure"]

NO_FEEDBACK_NOTE = (
    "plan without validation feedback: val loss taken as 0 and the plateau trigger off "
    "(in a run the adaptive phase lowers T by beta*val_loss per epoch and a plateau can start the decay early)"
)
_BITS_TICKS = (2, 4, 8, 16, 32)


def _steps(values: Sequence[float]) -> tuple[list[int], list[float]]:
    """``x, y`` of a step line that holds ``values[e]`` over ``[e, e + 1)``."""
    return list(range(len(values) + 1)), [*values, values[-1]]


def schedule_figure(
    planned: Sequence[dict[str, Any]],
    out: str | Path,
    title: str = "",
    measured: Sequence[dict[str, Any]] | None = None,
    reference_temperatures: Sequence[float] | None = None,
) -> Path:
    """Draw temperatures (top) and weight/activation bits (bottom) per epoch; write a PNG.

    Args:
        planned: Rows of :func:`~qtemperate.schedule_switches.no_feedback_path`
            (``epoch``, ``stage``, ``weight_bits``, ``act_bits``, ``temperatures``,
            ``weights``, ``moves_per_update``).
        out: The PNG to write (folders are created).
        title: The figure's title (e.g. the recipe name).
        measured: A run's epoch history (``temperatures``, ``test_acc``; one row per
            epoch, in order): drawn solid over the dashed plan, with the test
            accuracy on a second axis.
        reference_temperatures: The recipe's multi-scale set (legend labels).

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: for an empty plan.
    """
    if not planned:
        raise ValueError("nothing to plot: the plan has no epochs")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out = Path(out)
    n_scales = len(planned[0]["temperatures"])
    fig, (ax_t, ax_b) = plt.subplots(
        2, 1, figsize=(8.0, 5.6), dpi=120, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]}
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ref = list(reference_temperatures) if reference_temperatures else None
    for i in range(n_scales):
        c = colors[i % len(colors)]
        label = f"T{i + 1}" + (f" (ref {ref[i]:g})" if ref else "")
        xs, ys = _steps([r["temperatures"][i] for r in planned])
        if measured:
            ax_t.step(xs, ys, where="post", color=c, ls="--", lw=1.0, alpha=0.7, label=f"{label} plan")
            mx, my = _steps([r["temperatures"][i] for r in measured])
            ax_t.step(mx, my, where="post", color=c, lw=2.0, label=f"{label} run")
        else:
            ax_t.step(xs, ys, where="post", color=c, lw=2.0, label=label)
    ax_t.set_ylabel("distillation temperature")
    ax_t.grid(True, alpha=0.3)

    # Stage boundaries, names, bits and multi-scale weights.
    starts = [r for k, r in enumerate(planned) if k == 0 or r["stage"] != planned[k - 1]["stage"]]
    lo, hi = ax_t.get_ylim()
    top = hi + 0.3 * (hi - lo)  # room for the stage labels above the lines
    ax_t.set_ylim(lo, top)
    for k, r in enumerate(starts):
        e = r["epoch"]
        for ax in (ax_t, ax_b):
            ax.axvline(e, color="0.5", lw=0.8, ls=":")
        weights = "/".join(f"{w:.2f}" for w in r["weights"])
        bits = "float" if r["weight_bits"] >= 32 else f"W{r['weight_bits']}A{r['act_bits']}"
        name = r["stage"] if r["stage"].lower() == bits.lower() else f"{r['stage']} {bits}"
        moves = "\nT moves per update" if r.get("moves_per_update") else ""
        y = top - (k % 2) * 0.11 * (top - lo)  # neighbours staggered: short stages stay legible
        ax_t.text(e, y, f" {name}\n weights {weights}{moves}", va="top", fontsize=6.5, color="0.25")

    if measured and any(r.get("test_acc") is not None for r in measured):
        ax_a = ax_t.twinx()
        xs = [k + 1 for k, r in enumerate(measured) if r.get("test_acc") is not None]
        ys = [100 * r["test_acc"] for r in measured if r.get("test_acc") is not None]
        ax_a.plot(xs, ys, color="black", marker="o", ms=4, lw=1.2, label="test acc (end of epoch)")
        ax_a.set_ylabel("test accuracy (%)")
        lines, labels = ax_t.get_legend_handles_labels()
        l2, lb2 = ax_a.get_legend_handles_labels()
        ax_t.legend(lines + l2, labels + lb2, loc="best", fontsize=7, ncol=2, framealpha=0.8)
    else:
        ax_t.legend(loc="best", fontsize=7, ncol=2, framealpha=0.8)

    for key, style, label in (("weight_bits", "-", "weight bits"), ("act_bits", "--", "activation bits")):
        xs, ys = _steps([r[key] for r in planned])
        ax_b.step(xs, ys, where="post", ls=style, lw=1.8, label=label)
    ax_b.set_yscale("log", base=2)
    ax_b.set_yticks(list(_BITS_TICKS))
    ax_b.set_yticklabels([str(b) if b < 32 else "32 (float)" for b in _BITS_TICKS])
    ax_b.set_ylim(1.6, 40)
    ax_b.set_ylabel("bits")
    ax_b.set_xlabel("epoch")
    ax_b.legend(loc="upper right", fontsize=7)
    ax_b.grid(True, alpha=0.3)
    ax_b.xaxis.set_major_locator(MaxNLocator(integer=True))

    head = title or "schedule"
    what = "run (solid) over its plan (dashed)" if measured else "plan"
    fig.suptitle(f"{head}: temperatures and bit widths per epoch — {what}", fontsize=10)
    fig.text(0.01, 0.005, NO_FEEDBACK_NOTE, fontsize=6.5, color="0.3", wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
