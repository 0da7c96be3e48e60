"""The schedule figure: drawn from a plan, with a run's measurements over it."""

from __future__ import annotations

from pathlib import Path

import pytest

from qtemperate.joint_scheduler import BitStage, JointScheduler
from qtemperate.plots import schedule_figure
from qtemperate.schedule_switches import no_feedback_path


def _plan() -> list[dict]:
    sched = JointScheduler([BitStage("float", 2), BitStage("w8a8", 2, 8, 8), BitStage("w4a4", 3, 4, 4, schedule="gradient_norm")],
                           temperatures=(6.0, 3.0, 1.0))
    return no_feedback_path(sched)


def test_plan_and_run_figures_are_pngs(tmp_path: Path) -> None:
    plan = _plan()
    assert [r["moves_per_update"] for r in plan] == [False] * 4 + [True] * 3
    png = schedule_figure(plan, tmp_path / "a" / "plan.png", title="t", reference_temperatures=(6.0, 3.0, 1.0))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    measured = [{**r, "test_acc": 0.5 + 0.05 * i} for i, r in enumerate(plan)]
    run_png = schedule_figure(plan, tmp_path / "run.png", title="t", measured=measured)
    assert run_png.stat().st_size > png.stat().st_size * 0.5


def test_an_empty_plan_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no epochs"):
        schedule_figure([], tmp_path / "x.png")
