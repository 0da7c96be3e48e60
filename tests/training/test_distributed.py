"""Distributed helpers on a real 2-process gloo group: broadcasts, reductions, gathers,
sharded evaluation, and DDP + synchronised BatchNorm against one process with the
global batch (equal to rounding)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from qtemperate.data.loaders import EpochSeededSampler
from qtemperate.data.sharding import DistributedEpochSampler, ShardSampler, shard_range
from qtemperate.models import build_model
from qtemperate.training import distributed
from qtemperate.training.evaluate import evaluate
from tests.dist_helpers import run_group

CPU = torch.device("cpu")
STEPS, BATCH, N = 4, 64, 256


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 1, 8, 8, generator=g), torch.randint(0, 10, (N,), generator=g)


def _train(model: torch.nn.Module, batches: list[list[int]]) -> None:
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for idx in batches:
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=10, in_channels=1, width=8)


def _group_checks(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {"is_main": distributed.is_main(), "world": distributed.world_size()}
    out["broadcast"] = distributed.broadcast_object({"rank": rank})
    calls = []
    out["from_main"] = distributed.from_main(lambda: calls.append(rank) or f"made by {rank}")
    out["calls"] = calls
    # Models that differ per rank become rank 0's; a second sync finds them equal.
    torch.manual_seed(rank)
    m = build_model("small_cnn", num_classes=10, in_channels=1, width=4)
    out["agreed_before"] = distributed.sync_module_(m)
    out["agreed_after"] = distributed.sync_module_(m)
    out["digest"] = distributed.state_digest(m)
    out["mean"] = distributed.mean_over_ranks({"a": torch.tensor(float(rank)), "b": 2.0 * rank})
    out["sum"] = distributed.sum_over_ranks([1.0, float(rank)])
    n = 7  # uneven shards: 4 + 3 rows
    rows = torch.tensor([[float(i), 10.0 * i] for i in shard_range(n, rank, world)]).reshape(-1, 2)
    out["gathered"] = distributed.gather_shards(rows, n).tolist()
    # Evaluation over contiguous shards returns the figures of the whole split.
    x, y = _data()
    ds = TensorDataset(x[:101], y[:101])
    model = _model().eval()
    out["eval"] = evaluate(model, DataLoader(ds, batch_size=16, sampler=ShardSampler(101, rank, world)), CPU)
    distributed.barrier()
    # DDP with synchronised BatchNorm, each rank B/W of every global batch.
    dp = _model()
    sampler = DistributedEpochSampler(N, BATCH, rank, world, seed=0)
    idx, per = list(sampler), sampler.local_batch
    _train(distributed.wrap(dp, CPU, sync_batchnorm=True), [idx[i : i + per] for i in range(0, len(idx), per)][:STEPS])
    dp = distributed.unwrap(dp)
    out["bn_classes"] = sorted({type(mod).__name__ for mod in dp.modules() if "Norm" in type(mod).__name__})
    out["ddp_state"] = {k: v.tolist() for k, v in dp.state_dict().items()}
    # A QAT student whose activation ranges freeze mid-training: DDP is rebuilt (it expects
    # a gradient for every parameter that required one when it was built) and goes on.
    from qtemperate.quantization import freeze_activation_ranges, quantize

    torch.manual_seed(0)
    q = quantize(_model(), 8, 8, calibration_loader=[x[:32]], calibration_batches=1)
    ranges = [p for n, p in q.named_parameters() if n.endswith("scaling_impl.value") and "weight_quant" not in n]
    batches = [idx[i : i + per] for i in range(0, len(idx), per)]
    wrapped = distributed.wrap(q, CPU, sync_batchnorm=False)
    _train(wrapped, batches[:2])
    before = [p.detach().clone() for p in ranges]
    out["frozen_count"] = freeze_activation_ranges(wrapped)
    wrapped = distributed.rewrap(wrapped, CPU)
    out["rewrapped_is_ddp"] = type(wrapped).__name__
    _train(wrapped, batches[2:4])
    out["ranges_kept"] = all(torch.equal(a, b) for a, b in zip(before, ranges))
    out["n_ranges"] = len(ranges)
    out["qat_digest"] = distributed.state_digest(q)
    return out


@pytest.fixture(scope="module")
def group() -> list[dict[str, Any]]:
    return run_group(_group_checks, world=2)


def test_rank_queries_and_broadcasts(group: list[dict[str, Any]]) -> None:
    assert [g["is_main"] for g in group] == [True, False] and {g["world"] for g in group} == {2}
    assert all(g["broadcast"] == {"rank": 0} for g in group)
    assert all(g["from_main"] == "made by 0" for g in group)
    assert group[0]["calls"] == [0] and group[1]["calls"] == []  # only rank 0 ran it


def test_sync_module_makes_ranks_equal_and_says_whether_they_were(group: list[dict[str, Any]]) -> None:
    assert [g["agreed_before"] for g in group] == [False, False]
    assert [g["agreed_after"] for g in group] == [True, True]
    assert group[0]["digest"] == group[1]["digest"]
    torch.manual_seed(0)
    rank0 = build_model("small_cnn", num_classes=10, in_channels=1, width=4)
    assert group[1]["digest"] == distributed.state_digest(rank0)


def test_reductions_and_gathers(group: list[dict[str, Any]]) -> None:
    for g in group:
        assert g["mean"] == {"a": 0.5, "b": 1.0}
        assert g["sum"] == [2.0, 1.0]
        assert g["gathered"] == [[float(i), 10.0 * i] for i in range(7)]


def test_sharded_evaluation_equals_the_whole_split(group: list[dict[str, Any]]) -> None:
    x, y = _data()
    whole = evaluate(_model().eval(), DataLoader(TensorDataset(x[:101], y[:101]), batch_size=101), CPU)
    for g in group:
        assert g["eval"][0] == whole[0]  # a count over the same samples: exact
        assert g["eval"][1] == pytest.approx(whole[1], rel=1e-6)


def test_ddp_with_sync_batchnorm_equals_one_process_with_the_global_batch(group: list[dict[str, Any]]) -> None:
    single = _model()
    order = list(EpochSeededSampler(N, 0))
    _train(single, [order[i : i + BATCH] for i in range(0, N, BATCH)][:STEPS])
    ref = single.state_dict()
    for g in group:
        assert g["bn_classes"] == ["BatchNorm2d"]  # plain BatchNorm back after unwrap
        for k, v in ref.items():
            got = torch.tensor(g["ddp_state"][k], dtype=v.dtype)
            assert torch.allclose(got.double(), v.double(), atol=1e-6, rtol=0), k
    assert group[0]["ddp_state"] == group[1]["ddp_state"]


def test_a_freeze_under_ddp_rebuilds_the_wrapper_and_keeps_ranks_equal(group: list[dict[str, Any]]) -> None:
    for out in group:
        assert out["n_ranges"] > 0 and out["frozen_count"] == out["n_ranges"]
        assert out["rewrapped_is_ddp"] == "DistributedDataParallel" and out["ranges_kept"]
    assert group[0]["qat_digest"] == group[1]["qat_digest"]


def test_single_process_helpers_are_the_identity() -> None:
    m = _model()
    assert not distributed.is_distributed() and distributed.is_main()
    assert distributed.wrap(m, CPU) is m and distributed.unwrap(m) is m and distributed.rewrap(m, CPU) is m
    assert distributed.from_main(lambda: 3) == 3 and distributed.sync_module_(m)
    t = torch.arange(6.0).reshape(3, 2)
    assert distributed.gather_shards(t, 3) is t
    assert distributed.mean_over_ranks({"x": torch.tensor(0.25)}) == {"x": 0.25}


def test_backend_checks_name_the_field() -> None:
    assert distributed.resolve_backend("auto", CPU) == "gloo"
    if not torch.distributed.is_nccl_available():
        with pytest.raises(ValueError, match=r"distributed\.backend: nccl is not available"):
            distributed.resolve_backend("nccl", CPU)
    with pytest.raises(ValueError, match=r"distributed\.backend: nccl (needs CUDA|is not available)"):
        distributed.resolve_backend("nccl", CPU)
