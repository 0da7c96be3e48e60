from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qtemperate.checkpoint import load_checkpoint, save_atomic


def test_save_atomic_round_trip_and_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_atomic({"a": torch.arange(3)}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    save_atomic({"epoch": 1}, path)
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"epoch": 2, "bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_missing_checkpoint_names_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_checkpoint(tmp_path / "nope.pt")


# --------------------------------------------------------------------------- data, never code

import pickle  # noqa: E402

from qtemperate.checkpoint import (  # noqa: E402
    LEGACY_STUDENT_FORMAT,
    check_state_dict,
    load_student,
    save_student,
    state_dict_from,
    upgrade_student,
)
from qtemperate.errors import BadInput, CheckpointError  # noqa: E402
from qtemperate.models import build_model  # noqa: E402
from tests.malicious import Evil, evil_plain_pickle, evil_torch_file  # noqa: E402


def test_payloads_are_armed(tmp_path: Path) -> None:
    """The malicious files of these tests really run code when unpickled normally."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Evil(marker)))
    assert marker.is_file()
    marker.unlink()
    torch.load(evil_torch_file(tmp_path / "e.pt", marker), weights_only=False)
    assert marker.is_file()


@pytest.mark.parametrize("layout", ["state_dict", "top", "checkpoint", "plain"])
def test_code_in_a_checkpoint_is_refused_and_never_runs(tmp_path: Path, layout: str) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    if layout == "plain":
        evil_plain_pickle(path, marker)
    else:
        evil_torch_file(path, marker, layout)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, what="teacher.checkpoint")
    msg = str(info.value)
    assert msg.startswith("teacher.checkpoint: refused to load") and "the Python object exec," in msg and str(path) in msg
    assert not marker.exists()


def test_whole_module_pickle_is_refused_with_state_dict_advice(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(build_model("small_cnn", num_classes=10, in_channels=1, width=4), path)
    from qtemperate.checkpoint import STATE_DICT_HINT

    with pytest.raises(CheckpointError, match=r"pickles the Python object qtemperate\.models\.SmallCNN.*model\.state_dict\(\)"):
        load_checkpoint(path, hint=STATE_DICT_HINT)


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"", "the file is empty"), (b"garbage, not a checkpoint" * 10, "not a PyTorch checkpoint"), (None, "truncated")],
)
def test_damaged_checkpoints_get_one_line(tmp_path: Path, content: bytes | None, why: str) -> None:
    path = tmp_path / "checkpoint.pt"
    if content is None:
        save_atomic({"w": torch.randn(100)}, path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=why) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_state_dict_checks_name_the_first_problem(tmp_path: Path) -> None:
    model = build_model("small_cnn", num_classes=10, in_channels=1, width=8)
    other = build_model("small_cnn", num_classes=10, in_channels=1, width=16).state_dict()
    with pytest.raises(BadInput, match=r"t\.pt does not fit the model: .* is \(16, .*\) in the file but \(8, .*\) in the model"):
        check_state_dict(model, other, "t.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        state_dict_from({"epoch": 3}, "x.pt")
    assert set(state_dict_from({"state_dict": model.state_dict()}, "x.pt")) == set(model.state_dict())


def _pruned_student() -> tuple[torch.nn.Module, dict]:
    from qtemperate.pruning import prune

    kwargs = {"num_classes": 10, "in_channels": 1, "width": 16}
    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    arch, _ = prune(build_model("small_cnn", **kwargs).eval(), x, target_params_ratio=0.5, iterative_steps=1)
    return arch.eval(), kwargs


@pytest.mark.parametrize("bits", [32, 4])
def test_student_file_round_trip_is_data_only(tmp_path: Path, bits: int) -> None:
    from qtemperate.quantization import quantize

    arch, kwargs = _pruned_student()
    model = arch if bits == 32 else quantize(arch, bits, bits, first_last_bits=8)
    with torch.no_grad():  # one training-mode pass initialises the activation ranges, as QAT does
        model.train()(torch.randn(16, 1, 8, 8))
    model.eval()
    path = save_student(tmp_path / "student.pt", arch, model, bits, bits, 8, True, extra={"acc": 0.5},
                        arch_model="small_cnn", arch_kwargs=kwargs)
    torch.load(path, weights_only=True)  # loads as plain data
    loaded, meta = load_student(path)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert (meta["weight_bits"], meta["extra"], meta["arch_model"]) == (bits, {"acc": 0.5}, "small_cnn")


def test_save_student_says_what_to_pass(tmp_path: Path) -> None:
    arch, _ = _pruned_student()
    with pytest.raises(ValueError, match=r"arch_model= and arch_kwargs=.*resnet20"):
        save_student(tmp_path / "s.pt", arch, arch, 32, 32, 8, True)


def test_legacy_student_is_refused_then_upgraded_when_trusted(tmp_path: Path) -> None:
    arch, kwargs = _pruned_student()
    old = tmp_path / "student.pt"
    torch.save({"format": LEGACY_STUDENT_FORMAT, "arch": arch, "state_dict": arch.state_dict(), "weight_bits": 32,
                "act_bits": 32, "first_last_bits": 8, "per_channel": True, "extra": {}}, old)
    with pytest.raises(CheckpointError, match=r"refused to load .*upgrade_student"):
        load_student(old)
    upgrade_student(old, "small_cnn", kwargs)
    loaded, _ = load_student(old)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), arch(x))


# --------------------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path: Path, value: float) -> None:
    state = build_model("small_cnn", num_classes=10, in_channels=1, width=4).state_dict()
    state["conv2.weight"][0, 0, 0, 0] = value
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pt"
    torch.save(state, plain)
    torch.save({"state_dict": state, "epoch": 3}, wrapped)
    with pytest.raises(CheckpointError, match=r"^teacher\.checkpoint: .*plain\.pt: tensor 'conv2\.weight' holds NaN or infinite"):
        load_checkpoint(plain, what="teacher.checkpoint")
    with pytest.raises(CheckpointError, match=r"wrapped\.pt: tensor 'state_dict\.conv2\.weight'") as info:
        load_checkpoint(wrapped)
    assert isinstance(info.value, BadInput) and "\n" not in str(info.value)


def test_finite_and_non_float_tensors_load(tmp_path: Path) -> None:
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(3), "steps": torch.tensor(7), "rng": torch.ByteTensor([255, 0]),
                "nested": [{"b": torch.zeros(2, dtype=torch.float16)}]}, path)
    assert load_checkpoint(path)["steps"] == 7


def test_student_file_with_non_finite_weights_is_refused(tmp_path: Path) -> None:
    arch, kwargs = _pruned_student()
    path = save_student(tmp_path / "student.pt", arch, arch, 32, 32, 8, True, arch_model="small_cnn",
                        arch_kwargs=kwargs)
    payload = torch.load(path, weights_only=True)
    name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][name] = torch.full_like(payload["state_dict"][name], float("nan"))
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=rf"^student file: .*student\.pt: tensor 'state_dict\.{name}' holds NaN"):
        load_student(path)
