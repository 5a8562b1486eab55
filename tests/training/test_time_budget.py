"""``--time-budget`` (issue 21): the budget → steps decision on a fake clock; a real run whose
calibration leaves no trace (bit-equal to ``--max-steps N`` with its plan's N); a preempted
budget run resumed on the same plan, exactly; torchrun ranks agreeing; flags refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from simclr_embed.errors import run_main
from simclr_embed.training import budget
from simclr_embed.training.checkpoint import load_checkpoint
from simclr_embed.training.cli import main
from simclr_embed.training.config import parse_config
from tests.conftest import write_image_folder
from tests.training.test_preemption import ENV, REPO, _same_weights, _torchrun


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45m", 2700), ("2h", 7200), ("90s", 90), ("1h30m", 5400), ("1.5h", 5400), ("30", 30)],
)
def test_durations(text: str, seconds: float) -> None:
    assert budget.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0m", "abc", "5x", "m", "-3m", "10m5"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        budget.parse_duration(text)


def test_the_plan_on_a_fake_clock() -> None:
    """Settle steps are not timed; the timed ones give the rate; the plan spends what is left."""
    now = [0.0]
    durations = iter([5.0, 0.5] + [0.5] * 100)  # a slow first step (start-up), then 0.5 s each

    def clock() -> float:
        return now[0]

    def run(tick) -> None:
        for d in durations:
            now[0] += d
            if not tick():
                return

    rate, spent = budget.measure(run, budget_s=600, clock=clock)
    assert rate == pytest.approx(2.0)  # 0.5 s per step, the 5 s start-up excluded
    # Settle: 2 steps and 1 % of 600 s = 6 s → 3 steps (5 + 0.5 + 0.5 s). Timed: max(1.5 % of
    # 600 s = 9 s, min(2 s, 30 s)) = 9 s → 18 steps of 0.5 s.
    assert spent == pytest.approx(5.0 + 0.5 + 0.5 + 18 * 0.5)
    p = budget.plan(600, spent, rate, global_batch=256, warmup_fraction=0.05)
    assert p["total_steps"] == int((600 - spent) * 2.0 * (1 - budget.MARGIN))
    assert p["warmup_steps"] == round(p["total_steps"] * 0.05)
    assert p["images_per_s"] == pytest.approx(512)
    assert budget.describe(p) == (
        f"time budget 10 min → {p['total_steps']} steps at 512 img/s (measured), "
        f"warm-up {p['warmup_steps']}"
    )


def test_exclusive_with_max_steps_and_epochs(tmp_path: Path, capsys) -> None:
    base = ["--data", "d", "--out", "o"]
    for other in (["--max-steps", "10"], ["--epochs", "3"]):
        with pytest.raises(SystemExit) as exit_:
            parse_config([*base, "--time-budget", "5m", *other])
        assert exit_.value.code == 2
        assert "--time-budget: not allowed with" in capsys.readouterr().err
    # A recipe's max_steps is a default: --time-budget on the command line replaces it, and the
    # file's epochs keeps setting the warm-up fraction.
    cfg_file = tmp_path / "r.yaml"
    cfg_file.write_text("max_steps: 700\nepochs: 100\nwarmup_epochs: 5\n")
    cfg = parse_config([*base, "--config", str(cfg_file), "--time-budget", "30m"])
    assert (cfg.time_budget_s, cfg.max_steps, cfg.epochs) == (1800, None, 100)
    cfg_file.write_text("time_budget: 30m\n")
    cfg = parse_config([*base, "--config", str(cfg_file), "--max-steps", "50"])
    assert (cfg.time_budget_s, cfg.max_steps) == (None, 50)
    cfg_file.write_text("time_budget: 30m\nmax_steps: 700\n")
    with pytest.raises(SystemExit) as exit_:
        parse_config([*base, "--config", str(cfg_file)])
    assert exit_.value.code == 2


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("budget") / "data", per_class=8)  # 24


def _argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--out", str(out), "--arch", "resnet18", "--image-size", "32",
        "--stem", "standard", "--proj-dim", "16", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--precision", "fp32", "--no-progress", "--seed", "3", *extra,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_a_budget_run_is_its_plan_exactly_and_resumes_on_it(data: Path, tmp_path: Path) -> None:
    budgeted = tmp_path / "budget"
    assert run_main(main, _argv(data, budgeted, "--time-budget", "8s")) == 0
    plan = json.loads((budgeted / "config.json").read_text())["time_budget"]
    last = load_checkpoint(budgeted / "checkpoints" / "last.pt")
    assert last["config"]["time_budget"] == plan  # the plan travels in every checkpoint
    n, w = plan["total_steps"], plan["warmup_steps"]
    assert last["step"] == n >= 3 and plan["budget_s"] == 8
    # The calibration's steps left no trace: the same weights as a --max-steps run of N steps.
    fixed = tmp_path / "fixed"
    assert run_main(main, _argv(data, fixed, "--max-steps", str(n), "--warmup-steps", str(w))) == 0
    _same_weights(budgeted / "checkpoints" / "last.pt", fixed / "checkpoints" / "last.pt")
    # Preempted after 2 steps, then resumed: the recorded plan, not a new measurement.
    resumed = tmp_path / "resumed"
    assert run_main(main, _argv(data, resumed, "--time-budget", "8s", "--stop-after-steps", "2")) == 0  # fmt: skip
    first_plan = json.loads((resumed / "config.json").read_text())["time_budget"]
    assert run_main(main, _argv(data, resumed, "--time-budget", "8s", "--resume", "auto")) == 0
    assert json.loads((resumed / "config.json").read_text())["time_budget"] == first_plan
    end = load_checkpoint(resumed / "checkpoints" / "last.pt")
    assert end["step"] == first_plan["total_steps"]
    again = tmp_path / "again"
    args = ["--max-steps", str(first_plan["total_steps"]), "--warmup-steps", str(first_plan["warmup_steps"])]  # fmt: skip
    assert run_main(main, _argv(data, again, *args)) == 0
    _same_weights(resumed / "checkpoints" / "last.pt", again / "checkpoints" / "last.pt")


@pytest.mark.slow
@pytest.mark.ddp
def test_torchrun_ranks_agree_on_one_plan(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    args = [a for a in _argv(data, out, "--time-budget", "10s") if a != "--no-progress"]
    run = subprocess.run([*_torchrun(2), *args, "--batch-size", "4", "--no-progress"],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    plan = json.loads((out / "config.json").read_text())["time_budget"]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == plan["total_steps"]
    assert f"→ {plan['total_steps']} steps at" in run.stderr
