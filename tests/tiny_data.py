"""Tiny labelled image folders for tests: the class is a bright square in a class-specific corner."""
import os

import numpy as np
from PIL import Image


def write_tiny_dataset(folder, n=36, size=40, classes=3, seed=0, splits=None):
    """`n` grayscale PNGs plus labels.csv; `splits=(n_train, n_val)` adds a split column (rest is test)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    corners = [(4, 4), (size - 16, size - 16), (4, size - 16), (size - 16, 4)]
    rows = ["filename,label" + (",split" if splits else "")]
    for i in range(n):
        c = i % classes
        img = rng.integers(0, 80, (size, size)).astype(np.uint8)
        r, col = corners[c]
        img[r:r + 12, col:col + 12] = 220
        name = f"img{i:03d}.png"
        Image.fromarray(img).save(os.path.join(folder, name))
        split = "" if not splits else ",train" if i < splits[0] else ",val" if i < splits[0] + splits[1] else ",test"
        rows.append(f"{name},{c}{split}")
    with open(os.path.join(folder, "labels.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return str(folder)
