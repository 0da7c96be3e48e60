"""TemperateDistillation in a real Lightning ``Trainer.fit`` on tiny digits data (CPU, seconds)."""

from __future__ import annotations

import copy
import csv
import math
import re
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


# -- resuming from any checkpoint --------------------------------------------------------------
# float 1, W8A8 1, W4A4 3 epochs: global epochs 2 and 3 adaptive (T <- max(min_T, a.T - b.val_loss),
# the second also counting toward a plateau), epoch 4 the convergence phase; 4 updates an epoch;
# activation ranges frozen from a quarter of each quantized stage's updates (W8A8 from epoch 1
# batch 1, W4A4 from epoch 2 batch 3, i.e. update 11).
RESUME_STAGES = [BitStage("float", 1), BitStage("w8a8", 1, 8, 8),
                 BitStage("w4a4", 3, 4, 4, schedule_kwargs={"warmup": 0.0, "adapt_until": 0.5})]
RESUME_EPOCHS = 5


class _ResumableBatches:
    """Fixed-order batches a Lightning fit can resume mid-epoch (its ``state_dict`` protocol).

    The state is how many batches of the epoch were handed out: Lightning takes no batch
    ahead of the update it trains when the loader has a length, so a checkpoint written after
    update ``k`` of an epoch resumes at batch ``k + 1`` (the next epoch's first after the
    last). The tests check it: the resumed fit trains on the same batches as the uninterrupted one.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int) -> None:
        self.batches = [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(x), batch)]
        self.handed, self.start = 0, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        start, self.start = self.start, 0
        for i in range(start, len(self.batches)):
            self.handed = i + 1
            yield self.batches[i]

    def state_dict(self) -> dict[str, int]:
        return {"handed": self.handed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.start = state["handed"] % len(self.batches)


class _Record(L.Callback):
    """Per update: the batch, loss and schedule; per epoch end: the student, schedule and bits."""

    def __init__(self, kd: TemperateDistillation) -> None:
        self.kd, self.steps, self.epochs = kd, {}, {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        st = self.kd.state
        self.steps[trainer.global_step] = (trainer.current_epoch, batch_idx, batch[0].sum().item(),
                                           float(outputs["loss"]), st.temperature, st.temperatures,
                                           st.weight_bits, st.act_bits)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        net = pl_module.net
        self.epochs[trainer.current_epoch] = {
            "student": {k: v.detach().clone() for k, v in net.state_dict().items()},
            "trainable": {k: p.requires_grad for k, p in net.named_parameters()},
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
            "kd": self.kd.state_dict(),
            "bits": {k: (v["weight"], v["act"]) for k, v in get_bit_widths(net).items()},
        }


def _resume_fit(tmp_path: Path, teacher: torch.nn.Module, digits: tuple[torch.Tensor, ...],
                ckpt_path: Path | None = None, save: bool = False) -> tuple[_Record, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    x, y, xt, yt = digits
    train = _ResumableBatches(x[: 32 * BATCHES], y[: 32 * BATCHES], 32)
    val = DataLoader(TensorDataset(xt[:64], yt[:64]), batch_size=64)
    kd = TemperateDistillation(teacher, RESUME_STAGES, temperatures=(6.0, 3.0, 1.0), student_attr="net",
                               calibration=[x[:32]], freeze_act_ranges_at=0.25)
    record = _Record(kd)
    callbacks: list[Any] = [kd, record]
    if save:  # after every update, and at every epoch end (after validation)
        callbacks += [ModelCheckpoint(dirpath=tmp_path / "steps", filename="{step}", save_top_k=-1,
                                      every_n_train_steps=1),
                      ModelCheckpoint(dirpath=tmp_path / "epochs", filename="{epoch}", save_top_k=-1)]
    torch.manual_seed(1 if ckpt_path else 0)  # the resumed student starts from other weights
    module = LitStudent(build_model("small_cnn", num_classes=10, in_channels=1, width=8), kd)
    trainer = L.Trainer(max_epochs=RESUME_EPOCHS, callbacks=callbacks, logger=False, accelerator="cpu",
                        devices=1, gradient_clip_val=5.0, enable_checkpointing=save, enable_progress_bar=False,
                        enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return record, trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, digits: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """One uninterrupted fit with a checkpoint after every update and at every epoch end."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    torch.manual_seed(0)
    teacher = _teacher()
    record, _ = _resume_fit(tmp, teacher, digits, save=True)
    return {"record": record, "teacher": teacher, "dir": tmp}



def _same(a: Any, b: Any) -> bool:
    """Exactly equal: tensors bit for bit (same dtype and shape), containers element-wise."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _assert_continues_exactly(ref: _Record, resumed: _Record, after_step: int, first_epoch: int) -> None:
    """The resumed fit is the uninterrupted one from update ``after_step + 1`` on.

    Per update: the batch (its sum), the loss, T, the multi-scale temperatures and the bits.
    At every epoch end from ``first_epoch`` on (the first is the next epoch boundary): the
    student's parameters and buffers (activation ranges and bit-width buffers included), which
    ranges train, the optimizer state (momentum buffers) and the callback's whole state
    (schedules, plateau counter, last validation loss, stage, freeze), bit for bit: both fits
    run the same float operations in the same order on the same CPU, so no tolerance is needed.
    """
    assert sorted(resumed.steps) == [s for s in sorted(ref.steps) if s > after_step]
    for step, got in resumed.steps.items():
        assert got == ref.steps[step], f"update {step}"
    assert sorted(resumed.epochs) == list(range(first_epoch, RESUME_EPOCHS))
    for epoch, got in resumed.epochs.items():
        want = ref.epochs[epoch]
        for part in want:
            assert _same(got[part], want[part]), f"epoch {epoch}: {part}"


@pytest.mark.parametrize(("ckpt", "after_step", "first_epoch"), [
    ("steps/step=10.ckpt", 10, 2),   # mid-epoch 2: first adaptive W4A4 epoch, ranges not yet frozen
    ("steps/step=14.ckpt", 14, 3),   # mid-epoch 3: second adaptive epoch, ranges frozen
    ("epochs/epoch=1.ckpt", 8, 2),   # stage boundary W8A8 -> W4A4, after validation
    ("epochs/epoch=2.ckpt", 12, 3),  # between the two adaptive epochs, after validation
], ids=["mid-adaptive-epoch", "mid-adaptive-epoch-frozen", "w8a8-to-w4a4-boundary", "between-adaptive-epochs"])
def test_a_fit_resumed_from_a_checkpoint_continues_as_the_uninterrupted_fit(
    tmp_path: Path, uninterrupted: dict[str, Any], digits: Any, ckpt: str, after_step: int, first_epoch: int
) -> None:
    path = uninterrupted["dir"] / ckpt
    state = torch.load(path, weights_only=True)["callbacks"]["TemperateDistillation"]
    assert state["stage_index"] >= 1 and state["val_loss"] is not None  # quantized, after a validation
    # No prepare_resume: the callback quantizes the fresh float student before its weights load.
    resumed, trainer = _resume_fit(tmp_path, uninterrupted["teacher"], digits, ckpt_path=path)
    assert trainer.global_step == RESUME_EPOCHS * BATCHES
    _assert_continues_exactly(uninterrupted["record"], resumed, after_step, first_epoch)


def test_a_checkpoint_after_an_epochs_last_update_resumes_with_the_validation_loss_it_holds(
    tmp_path: Path, uninterrupted: dict[str, Any], digits: Any
) -> None:
    """Written after epoch 1's last update (W8A8) and before its validation: Lightning resumes at
    epoch 2 without that validation and without ``on_train_epoch_start``. The callback enters
    W4A4 at the first update, and epoch 2's adaptive step reads the validation loss the
    checkpoint holds (epoch 0's), with a warning saying so."""
    from qtemperate.errors import QtemperateWarning

    ref = uninterrupted["record"]
    with pytest.warns(QtemperateWarning, match=r"resumed at epoch 2 .* before its validation, which Lightning "
                                               r"does not run on resume: .* read epoch 0's 'val_loss'"):
        resumed, _ = _resume_fit(tmp_path, uninterrupted["teacher"], digits,
                                 ckpt_path=uninterrupted["dir"] / "steps" / "step=8.ckpt")
    assert sorted(resumed.steps) == list(range(9, RESUME_EPOCHS * BATCHES + 1))
    for step, got in resumed.steps.items():  # same batches, stages and bits
        want = ref.steps[step]
        assert (got[0], got[1], got[2], got[6], got[7]) == (want[0], want[1], want[2], want[6], want[7])
    # Epoch 2 is W4A4's first adaptive epoch: T = max(min_T, alpha * T0 - beta * v) (clamped to max_T)
    # from the stage's start T0 = 6 + 3 (three bit halvings).
    joint = TemperateDistillation(_teacher(), RESUME_STAGES, temperatures=(6.0, 3.0, 1.0)).scheduler
    sched, t0 = joint.schedule(2), joint.start_temperature(2)
    assert t0 == 9.0

    def adaptive(v: float) -> float:
        return min(max(sched.min_temperature, sched.alpha * t0 - sched.beta * v), sched.max_temperature)

    assert ref.steps[9][4] == pytest.approx(adaptive(ref.epochs[1]["kd"]["val_loss"]), abs=1e-12)
    assert resumed.steps[9][4] == pytest.approx(adaptive(ref.epochs[0]["kd"]["val_loss"]), abs=1e-12)
    assert ref.epochs[0]["kd"]["val_loss"] != ref.epochs[1]["kd"]["val_loss"]


@pytest.mark.parametrize("poisoned", ["loss", "weights", "val_loss"])
def test_a_non_finite_loss_stops_the_fit_naming_step_stage_and_temperature(
    tmp_path: Path, loaders: Any, poisoned: str
) -> None:
    """A NaN at update 9 (epoch 2: W4A4's first, batch 1; T from the closed form) in the loss or
    in a student weight, or in epoch 1's validation loss, stops the fit there with one line."""
    from qtemperate.errors import EXIT_DIVERGED, QtemperateWarning, classify
    from qtemperate.training.guards import TrainingDiverged

    nan_at = 2 * BATCHES + 1

    class Poisoned(LitStudent):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if poisoned == "loss" and self.trainer.global_step == nan_at else loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            if poisoned == "val_loss" and self.current_epoch == 1:
                self.log("val_loss", torch.tensor(float("nan")))
            else:
                super().validation_step(batch, batch_idx)

    class PoisonWeight(L.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if poisoned == "weights" and trainer.global_step == nan_at:
                with torch.no_grad():
                    next(p for p in pl_module.net.parameters() if p.dim() > 1).view(-1)[0] = float("nan")

    kd = TemperateDistillation(_teacher(), _stages(), temperatures=(6.0, 3.0, 1.0), student_attr="net",
                               calibration=[loaders[0].dataset.tensors[0][:32]])
    module = Poisoned(build_model("small_cnn", num_classes=10, in_channels=1, width=8), kd)
    # No gradient_clip_val: the callback says to clip, as the README example does.
    trainer = L.Trainer(max_epochs=kd.total_epochs, callbacks=[kd, PoisonWeight()], logger=False, accelerator="cpu",
                        devices=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    with pytest.warns(QtemperateWarning, match=r"clips no gradients.*Trainer\(gradient_clip_val=5\)"), \
            pytest.raises(TrainingDiverged) as info:
        trainer.fit(module, *loaders)
    if poisoned == "val_loss":
        where = r"'val_loss' of the validation after step 8 \(epoch 1, batch 3\) of stage 'w8a8' \(W8A8\), T=8"
        then = "stopping the fit"
    else:
        t = f"{expected_t(2, 1):.4g}"
        assert t == "7.828"
        where = rf"update at step {nan_at} \(epoch 2, batch 1\) of stage 'w4a4' \(W4A4\), T={t}"
        then = "stopping the fit before its backward pass and optimizer step"
    assert re.fullmatch(rf"{where}: loss is nan \(NaN/Inf\); {then}\. Lower the learning rate, raise the "
                        r"temperature or clip gradients \(Trainer\(gradient_clip_val=5\)\)", str(info.value))
    assert classify(info.value) == (EXIT_DIVERGED, str(info.value), False)  # one line, exit 4
    assert trainer.global_step == (2 * BATCHES if poisoned == "val_loss" else nan_at)
    if poisoned == "loss":  # stopped before the NaN reached the weights
        assert all(torch.isfinite(p).all() for p in module.net.parameters())


class _Opaque:
    """An object a checkpoint may hold (saved hyper-parameters) that weights_only loading refuses."""


def test_prepare_resume_loads_weights_only_unless_told(tmp_path: Path) -> None:
    kd = TemperateDistillation(_teacher(), RESUME_STAGES, student_attr="net")
    path = tmp_path / "foreign.ckpt"
    torch.save({"callbacks": {kd.state_key: {"stage_index": 2, "bits": [4, 4]}},
                "hyper_parameters": {"extra": _Opaque()}}, path)
    module = LitStudent(build_model("small_cnn", num_classes=10, in_channels=1, width=8), kd)
    with pytest.raises(ValueError, match=r"foreign\.ckpt: holds objects torch\.load\(weights_only=True\) refuses; "
                                         r"if you trust the file, call kd\.prepare_resume\(.*weights_only=False\)"):
        kd.prepare_resume(module, path)
    assert not is_quantized(module.net)
    kd.prepare_resume(module, path, weights_only=False)
    assert is_quantized(module.net) and kd.stage_index == 2
    assert min(v["weight"] for v in get_bit_widths(module.net).values() if v["weight"] is not None) == 4
