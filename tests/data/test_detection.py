"""The synthetic detection data: class and box known exactly, named targets through splits and loaders."""

from __future__ import annotations

import torch

from qtemperate.data import NamedTargetsDataset, build_datasets, build_run_loaders, dataset_info
from qtemperate.data.detection import draw_shape


def test_every_image_holds_its_shape_inside_its_box() -> None:
    bundle = build_datasets("synthetic_detection", seed=3, n_train=90, n_test=30, num_classes=3, noise=0.0)
    assert bundle.info == dataset_info("synthetic_detection", {"num_classes": 3})
    assert bundle.targets == ("labels", "boxes") and bundle.class_counts == [30, 30, 30]
    for i in range(len(bundle.train)):
        x, t = bundle.train[i]
        cx, cy, w, h = (float(v) * 24 for v in t["boxes"])
        left, top, bw, bh = round(cx - w / 2), round(cy - h / 2), round(w), round(h)
        inside = x[0, top:top + bh, left:left + bw]
        # Without noise the box crops exactly the drawn shape; nothing is drawn outside it.
        assert torch.equal(inside, draw_shape(int(t["labels"]), bh, bw))
        assert float(x[0].sum()) == float(inside.sum())
        eps = 1e-4  # float32 boxes
        assert -eps <= cx - w / 2 and cx + w / 2 <= 24 + eps and -eps <= cy - h / 2 and cy + h / 2 <= 24 + eps


def test_named_targets_survive_limits_splits_and_loaders() -> None:
    bundle = build_datasets("synthetic_detection", seed=0, limit_train=120, val_fraction=0.25)
    assert isinstance(bundle.train, NamedTargetsDataset) and isinstance(bundle.val, NamedTargetsDataset)
    assert len(bundle.train) == 90 and len(bundle.val) == 30
    loaders = build_run_loaders(bundle, batch_size=16, eval_batch_size=64)
    x, y, idx = next(iter(loaders.train))
    assert x.shape == (16, 1, 24, 24) and y["boxes"].shape == (16, 4) and y["labels"].dtype == torch.long
    # Row i of a batch is training sample idx[i], targets included.
    x0, t0 = bundle.train[int(idx[0])]
    assert torch.equal(x[0], x0) and torch.equal(y["boxes"][0], t0["boxes"])
