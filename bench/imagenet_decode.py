"""ImageNet-style JPEG decoding in DataLoader workers: images/s per worker.

The ``imagenet`` dataset reads ``root/train/<class>/*.JPEG`` with torchvision's
``ImageFolder`` (PIL decode) and ``RandomResizedCrop(224) + RandomHorizontalFlip +
ToTensor + Normalize`` for training, ``Resize(256) + CenterCrop(224)`` for evaluation.
torchvision cannot be installed beside this CPU torch from PyPI, so this benchmark runs
the same steps with PIL and torch directly (the cost is PIL's JPEG decode and resize in
both cases) on synthetic JPEGs written here: ImageNet's typical 500x375 at quality 90,
smooth content plus noise (about 64 KB each; ImageNet's average ~110 KB carries more
detail, so real files decode somewhat slower).

    python bench/imagenet_decode.py [--images 256] [--workers 1 2] [--out bench/results/imagenet_decode.json]

Prints and writes images/s for 0 (main process), 1 and 2 workers and per worker.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def write_jpegs(folder: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> list[Path]:
    """``n`` synthetic RGB JPEGs: smooth gradients and blobs plus noise, quality 90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n):
        img = np.zeros((h, w, 3), np.float32)
        for c in range(3):
            cx, cy, s = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(40, 200)
            img[..., c] = 128 + 100 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s)) + 0.2 * xx - 0.1 * yy
        img += rng.normal(0, 12, img.shape)
        path = folder / f"{i:05d}.JPEG"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _to_tensor(img: Any) -> torch.Tensor:
    arr = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.size[1], img.size[0], 3)
    return (arr.permute(2, 0, 1).float() / 255.0 - MEAN) / STD


class JpegFolder(Dataset):
    """PIL decode + the train (random resized crop, flip) or eval (resize, centre crop) path."""

    def __init__(self, paths: list[Path], train: bool, size: int = 224, resize: int = 256) -> None:
        self.paths, self.train, self.size, self.resize = paths, train, size, resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(self.paths[i]) as f:
            img = f.convert("RGB")
        w, h = img.size
        if self.train:  # torchvision RandomResizedCrop: scale (0.08, 1), ratio (3/4, 4/3)
            rnd = random.Random(i)
            for _ in range(10):
                area = w * h * rnd.uniform(0.08, 1.0)
                ratio = math.exp(rnd.uniform(math.log(3 / 4), math.log(4 / 3)))
                cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
                if 0 < cw <= w and 0 < ch <= h:
                    break
            else:
                cw, ch = min(w, h), min(w, h)
            x0, y0 = rnd.randint(0, w - cw), rnd.randint(0, h - ch)
            img = img.resize((self.size, self.size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
            if rnd.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            s = self.resize / min(w, h)
            img = img.resize((round(w * s), round(h * s)), Image.BILINEAR)
            w, h = img.size
            x0, y0 = (w - self.size) // 2, (h - self.size) // 2
            img = img.crop((x0, y0, x0 + self.size, y0 + self.size))
        return _to_tensor(img), 0


def images_per_second(ds: Dataset, workers: int, batch: int = 32, repeats: int = 3) -> float:
    """Median images/s of a full pass over ``ds`` (worker start-up included, as per epoch)."""
    rates = []
    for _ in range(repeats):
        loader = DataLoader(ds, batch_size=batch, num_workers=workers)
        t0 = time.perf_counter()
        n = sum(len(x) for x, _ in loader)
        rates.append(n / (time.perf_counter() - t0))
    return float(np.median(rates))


def run(images: int = 256, workers: tuple[int, ...] = (0, 1, 2), folder: Path | None = None) -> dict[str, Any]:
    """Write JPEGs, time the train and eval pipelines at each worker count."""
    torch.set_num_threads(1)  # workers are processes; each decodes on one core
    with tempfile.TemporaryDirectory() as tmp:
        root = folder or Path(tmp)
        paths = write_jpegs(root, images)
        kb = float(np.mean([p.stat().st_size for p in paths]) / 1024)
        result: dict[str, Any] = {"images": images, "mean_jpeg_kb": round(kb, 1), "train": {}, "eval": {}}
        for split in ("train", "eval"):
            ds = JpegFolder(paths, train=split == "train")
            for w in workers:
                rate = images_per_second(ds, w)
                result[split][str(w)] = {"images_per_s": round(rate, 1),
                                         "per_worker": round(rate / max(w, 1), 1)}
    result["environment"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                             "torch": torch.__version__, "load": os.getloadavg()}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    result = run(args.images, tuple(args.workers))
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
