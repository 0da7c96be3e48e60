"""The README's examples run as written (docs that match the code), one test per workflow."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

README = Path(__file__).resolve().parent.parent / "README.md"
ROOT = README.parent


def section(title: str) -> str:
    """The README text under the ``## title`` heading (up to the next ``## ``)."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def blocks(title: str, lang: str) -> list[str]:
    """The ``lang`` code blocks of a README section, in order."""
    found = re.findall(rf"```{lang}\n(.*?)```", section(title), flags=re.S)
    assert found, f"README section {title!r} has no {lang} block"
    return found


def _digits(n: int, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (torch.tensor(data.images[:n], dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3) / 0.37
    y = torch.tensor(data.target[:n], dtype=torch.long)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def test_readme_library_example_runs() -> None:
    code = blocks("The library in your own QAT loop", "python")[0]
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 1, 28, 28, generator=gen), torch.randint(0, 10, (4,), generator=gen)) for _ in range(2)]

    def evaluate(model: torch.nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            loss = sum(float(F.cross_entropy(model(x), y)) for x, y in batches) / len(batches)
        model.train()
        return loss

    ns: dict = {"calib": batches, "train_loader": batches, "evaluate": evaluate}
    exec(compile(code, str(README), "exec"), ns)
    sched, qstudent, teacher = ns["sched"], ns["qstudent"], ns["teacher"]
    from qtemperate import get_bit_widths

    # After the loop the student is in the last stage's precision.
    inner = [v["weight"] for k, v in get_bit_widths(qstudent).items() if v["weight"] is not None]
    assert min(inner) == 4 and sched.state.weight_bits == 4
    assert 0 < ns["model_size"](qstudent).compression_ratio < 0.5
    # The teacher was distilled from in eval mode: its BatchNorm statistics never moved.
    bns = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert not teacher.training and all(int(m.num_batches_tracked) == 0 for m in bns)


def test_readme_lightning_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lightning")
    import functools

    import lightning.pytorch.loggers as pl_loggers

    from qtemperate import build_model
    from tests import wandb_reader

    monkeypatch.chdir(tmp_path)  # Lightning writes here
    # W&B (offline in tests) keeps the folder of the process's first run: point this one here.
    monkeypatch.setattr(pl_loggers, "WandbLogger", functools.partial(pl_loggers.WandbLogger, save_dir=str(tmp_path)))
    code = blocks("Lightning", "python")[0]
    teacher = build_model("small_cnn", num_classes=10, in_channels=1, width=8)
    student = build_model("small_cnn", num_classes=10, in_channels=1, width=4)
    from torch.utils.data import DataLoader, TensorDataset

    def loader(n: int, batch: int) -> DataLoader:
        x, y = (torch.cat(t) for t in zip(*_digits(n, n)))
        return DataLoader(TensorDataset(x, y), batch_size=batch)

    ns: dict = {"teacher": teacher, "student": student, "train_loader": loader(96, 32), "val_loader": loader(64, 64)}
    import warnings

    from qtemperate.errors import QtemperateWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", QtemperateWarning)
        exec(compile(code, str(README), "exec"), ns)
    # The example clips gradients as the recipe trainer does, so the callback has nothing to warn
    # about; every update's loss was finite (a NaN/Inf one stops the fit with TrainingDiverged).
    assert ns["trainer"].gradient_clip_val == 5.0  # clip_algorithm None: Lightning clips the norm
    assert not [w for w in caught if issubclass(w.category, QtemperateWarning)]
    experiment = ns["trainer"].logger.experiment
    run_folder = Path(experiment.dir).parent
    experiment.finish()
    kd, module = ns["kd"], ns["trainer"].lightning_module
    from qtemperate import get_bit_widths

    assert kd.state.weight_bits == 4 and min(
        v["weight"] for v in get_bit_widths(module.net).values() if v["weight"] is not None) == 4
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # One record per epoch reached W&B (per-update records follow Lightning's log_every_n_steps):
    # float at T0 = 6, W8A8 at 6 + 2 halvings, W4A4 starting at 6 + 3.
    history = wandb_reader.read_offline_run(run_folder)["history"]
    epochs = [h for h in history if "temperate/epoch_T" in h]
    assert [h["temperate/epoch_weight_bits"] for h in epochs] == [32, 8, 4, 4]
    assert [h["temperate/epoch_T"] for h in epochs[:3]] == pytest.approx([6.0, 8.0, 9.0])


def test_readme_your_model_in_a_recipe_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from qtemperate.cli import main

    nets, = blocks("Your model in a recipe", "python")
    recipe_text, = blocks("Your model in a recipe", "yaml")
    commands, = blocks("Your model in a recipe", "bash")
    project = tmp_path / "project"
    # A package name of its own, so the test never meets a cached `mypkg` module.
    (project / "mypkg_readme").mkdir(parents=True)
    (project / "mypkg_readme" / "__init__.py").write_text("")
    (project / "mypkg_readme" / "nets.py").write_text(nets)
    raw = yaml.safe_load(recipe_text.replace("mypkg.", "mypkg_readme."))
    raw["output_dir"] = str(tmp_path / "runs")
    (project / "my_recipe.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # elsewhere: the recipe's folder is what finds the package
    validate, run = (line.split()[1:] for line in commands.strip().splitlines())
    assert validate == ["validate", "--check-files", "my_recipe.yaml"] and run == ["run", "my_recipe.yaml"]
    recipe = str(project / "my_recipe.yaml")
    assert main(["validate", "--check-files", recipe]) == 0
    small = ["teacher.train.epochs=1", "data.limit_train=256", "data.limit_test=128", "tracking.loggers=[jsonl]",
             "export.onnx=false", "student.iterative_steps=2"]
    assert main(["run", recipe, "--no-progress", *(x for s in small for x in ("--set", s))]) == 0
    assert (tmp_path / "runs" / "my_net" / "summary.json").is_file()
    # The failures the section lists: one line naming the field, exit 2, no run folder.
    capsys.readouterr()
    for override, field in [("teacher.model=mypkg_readme.nets:make_nett", "teacher.model"),
                            ("teacher.kwargs.depth=3", "teacher.kwargs.depth")]:
        assert main(["run", recipe, "--set", override, "--set", "name=bad"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"{field}: " in err
        assert not (tmp_path / "runs" / "bad").exists()


def test_readme_multi_output_snippet_is_the_shipped_recipe() -> None:
    snippet = yaml.safe_load(blocks("Multi-output models", "yaml")[0])
    shipped = yaml.safe_load((ROOT / "recipes" / "synthetic_detection.yaml").read_text())
    assert snippet["task"] == shipped["task"]
    assert {k: shipped["distillation"][k] for k in snippet["distillation"]} == snippet["distillation"]
