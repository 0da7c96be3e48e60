"""TemperateDistillation in a real Lightning ``Trainer.fit`` on tiny digits data (CPU, seconds)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")

from qtemperate import BitStage, build_model, get_bit_widths  # noqa: E402
from qtemperate.integrations.lightning import TemperateDistillation  # noqa: E402
from qtemperate.quantization import is_quantized  # noqa: E402
from tests import wandb_reader  # noqa: E402

BATCHES = 4  # per epoch
T_REF = 6.0


def _stages() -> list[BitStage]:
    # float (1 epoch) -> W8A8 (1) -> W4A4 (2, cosine decay from its start at epoch 0 of the stage)
    return [
        BitStage("float", 1),
        BitStage("w8a8", 1, 8, 8),
        BitStage("w4a4", 2, 4, 4, schedule_kwargs={"warmup": 0.0, "adapt_until": 0.0}),
    ]


def expected_t(epoch: int, batch: int) -> float:
    """Closed form of the schedule the test stages give (bit-drop coupling, T_ref = 6).

    float and W8A8 are one-epoch warm-ups at T0 = 6 + h (h = 0, 2 halvings); W4A4
    (h = 3, T0 = 9) decays T = 1 + 8 · (1 + cos(π k / 1)) / 2 at k = e_local + b / 4,
    reaching 1 at its last epoch.
    """
    if epoch == 0:
        return T_REF
    if epoch == 1:
        return T_REF + 2
    k = (epoch - 2) + batch / BATCHES
    return 1.0 if k >= 1 else 1 + 8 * (1 + math.cos(math.pi * k)) / 2


class LitStudent(L.LightningModule):
    def __init__(self, net: torch.nn.Module, kd: TemperateDistillation) -> None:
        super().__init__()
        self.net = net
        self.kd = kd

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.kd.distill(self.net(x), x, y)["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


@pytest.fixture
def loaders(digits: tuple[torch.Tensor, ...]) -> tuple[DataLoader, DataLoader]:
    x, y, xt, yt = digits
    train = DataLoader(TensorDataset(x[: 32 * BATCHES], y[: 32 * BATCHES]), batch_size=32)
    val = DataLoader(TensorDataset(xt[:64], yt[:64]), batch_size=64)
    return train, val


def _teacher() -> torch.nn.Module:
    teacher = build_model("small_cnn", num_classes=10, in_channels=1, width=8)
    teacher.train()  # as a user hands it over: the callback must put it in eval mode
    return teacher


def _fit(tmp_path: Path, loaders: tuple[DataLoader, DataLoader], logger: Any, **kw: Any) -> tuple[Any, ...]:
    teacher = _teacher()
    bn_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    kd = TemperateDistillation(teacher, _stages(), temperatures=(6.0, 3.0, 1.0), student_attr="net",
                               calibration=[loaders[0].dataset.tensors[0][:32]], **kw)
    module = LitStudent(build_model("small_cnn", num_classes=10, in_channels=1, width=8), kd)
    trainer = L.Trainer(max_epochs=kd.total_epochs, callbacks=[kd], logger=logger, log_every_n_steps=1,
                        accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, *loaders)
    return kd, module, teacher, bn_before


def test_fit_distills_quantizes_in_stages_and_logs_the_schedule(tmp_path: Path, loaders: Any) -> None:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    wandb_logger = WandbLogger(project="qtemperate-test", save_dir=str(tmp_path), offline=True)
    kd, module, teacher, before = _fit(tmp_path, loaders, [CSVLogger(tmp_path, name="csv"), wandb_logger])
    run_folder = Path(wandb_logger.experiment.dir).parent
    wandb_logger.experiment.finish()

    # The teacher was frozen and in eval mode: its weights and BatchNorm statistics never moved.
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # The student went float -> W8A8 -> W4A4.
    assert is_quantized(module.net)
    inner = [v["weight"] for v in get_bit_widths(module.net).values() if v["weight"] is not None]
    assert min(inner) == 4

    want = [expected_t(*divmod(i, BATCHES)) for i in range(kd.total_epochs * BATCHES)]
    with open(next(tmp_path.glob("csv/version_*/metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r.get("temperate/T")]
    assert [float(r["temperate/T"]) for r in steps] == pytest.approx(want, rel=1e-6)  # logged as float32
    for i, r in enumerate(steps):
        epoch = i // BATCHES
        assert int(float(r["temperate/weight_bits"])) == (32, 8, 4, 4)[epoch]
        # The multi-scale set moves with T (affine map fixing 1): T_scale6 = T, T_scale1 = 1.
        assert float(r["temperate/T_scale6"]) == pytest.approx(float(r["temperate/T"]))
        assert float(r["temperate/T_scale1"]) == pytest.approx(1.0)
        assert math.isfinite(float(r["temperate/loss"])) and float(r["temperate/kd_T6"]) >= 0

    # The same temperatures reached W&B through Lightning's WandbLogger (an offline run on disk).
    run = wandb_reader.read_offline_run(run_folder)
    logged = [h["temperate/T"] for h in run["history"] if "temperate/T" in h]
    assert logged == pytest.approx(want, rel=1e-6)


def test_bad_setups_fail_before_training(tmp_path: Path, loaders: Any) -> None:
    kd = TemperateDistillation(_teacher(), _stages(), student_attr="nope")
    module = LitStudent(build_model("small_cnn", num_classes=10, in_channels=1, width=8), kd)
    common = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False,
              "enable_progress_bar": False, "default_root_dir": tmp_path}
    with pytest.raises(ValueError, match=r"no network at \.nope; pass student_attr"):
        L.Trainer(max_epochs=kd.total_epochs, callbacks=[kd], **common).fit(module, loaders[0])
    kd = TemperateDistillation(_teacher(), _stages(), student_attr="net")
    module = LitStudent(build_model("small_cnn", num_classes=10, in_channels=1, width=8), kd)
    with pytest.raises(ValueError, match=r"max_epochs=7\) but the stages last 4 epochs"):
        L.Trainer(max_epochs=7, callbacks=[kd], **common).fit(module, loaders[0])
    # The adaptive phase needs a validation loss: without validation data the error says what to log.
    kd = TemperateDistillation(_teacher(), [BitStage("w8a8", 3, 8, 8, schedule_kwargs={"warmup": 0.0})],
                               student_attr="net")
    module = LitStudent(build_model("small_cnn", num_classes=10, in_channels=1, width=8), kd)
    with pytest.raises(ValueError, match=r"val_loss is required.*log 'val_loss' in validation_step"):
        L.Trainer(max_epochs=3, callbacks=[kd], **common).fit(module, loaders[0])
    with pytest.raises(ValueError, match="exactly one"):
        TemperateDistillation(_teacher())


def test_a_fit_quantized_mid_way_resumes_from_its_checkpoint(tmp_path: Path, loaders: Any) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    teacher = _teacher()
    stages = [BitStage("float", 1), BitStage("w8a8", 1, 8, 8), BitStage("w4a4", 1, 4, 4)]

    def trainer(kd: TemperateDistillation, max_epochs: int) -> Any:
        ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
        return L.Trainer(max_epochs=max_epochs, callbacks=[kd, ckpt], logger=False, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)

    kd = TemperateDistillation(teacher, stages, student_attr="net")
    module = LitStudent(build_model("small_cnn", num_classes=10, in_channels=1, width=8), kd)
    first = trainer(kd, kd.total_epochs)
    first.fit(module, *loaders)
    saved = sorted((tmp_path / "ckpt").glob("epoch=1-*.ckpt"))
    assert len(saved) == 1  # after W8A8: the student was quantized mid-fit

    kd2 = TemperateDistillation(teacher, stages, student_attr="net")
    module2 = LitStudent(build_model("small_cnn", num_classes=10, in_channels=1, width=8), kd2)
    kd2.prepare_resume(module2, saved[0])
    assert is_quantized(module2.net) and kd2.stage_index == 1
    trainer(kd2, kd2.total_epochs).fit(module2, *loaders, ckpt_path=saved[0])
    assert kd2.state.weight_bits == 4 and kd2.scheduler.state.epoch == 2
    inner = [v["weight"] for v in get_bit_widths(module2.net).values() if v["weight"] is not None]
    assert min(inner) == 4


def _ranges(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()
            if k.endswith("scaling_impl.value") and "weight_quant" not in k}


class _Snapshots(L.Callback):
    """The student's activation ranges at the start of chosen (epoch, batch) updates."""

    def __init__(self, at: set[tuple[int, int]]) -> None:
        self.at, self.seen = at, {}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if (trainer.current_epoch, batch_idx) in self.at:
            self.seen[(trainer.current_epoch, batch_idx)] = _ranges(pl_module.net)


def test_activation_ranges_freeze_late_in_each_stage_and_thaw_at_the_next(tmp_path: Path, loaders: Any) -> None:
    """Stages float 1, W8A8 1, W4A4 2 epochs of 4 updates, ``freeze_act_ranges_at=0.5``: W8A8
    freezes at its update 2 (epoch 1, batch 2), W4A4 learns its ranges again and freezes
    at its update 4 (epoch 3, batch 0)."""
    snaps = _Snapshots({(1, 1), (1, 2), (2, 0), (2, 1), (3, 0)})
    kd = TemperateDistillation(_teacher(), _stages(), temperatures=(6.0, 3.0, 1.0), student_attr="net",
                               calibration=[loaders[0].dataset.tensors[0][:32]], freeze_act_ranges_at=0.5)
    module = LitStudent(build_model("small_cnn", num_classes=10, in_channels=1, width=8), kd)
    trainer = L.Trainer(max_epochs=kd.total_epochs, callbacks=[kd, snaps], logger=False, accelerator="cpu",
                        devices=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, *loaders)
    s = snaps.seen

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert s[(1, 1)].keys() and not same(s[(1, 1)], s[(1, 2)])  # W8A8 still learning at its update 1
    assert same(s[(1, 2)], s[(2, 0)])  # frozen from update 2 to the end of W8A8
    assert not same(s[(2, 0)], s[(2, 1)])  # thawed: W4A4's first update moves them
    assert same(s[(3, 0)], _ranges(module.net))  # frozen from W4A4's update 4 to the end
    with pytest.raises(ValueError, match=r"freeze_act_ranges_at must be in \[0, 1\), got 1.0"):
        TemperateDistillation(_teacher(), _stages(), freeze_act_ranges_at=1.0)
