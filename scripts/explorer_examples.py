"""Render the explorer page's bundled examples (zfserve/server/explorer/examples/*.jpg) from the synthetic set:
images of seed 3 (the held-out set `zfserve index` searches by default), one per chosen class, JPEG quality 90.

    .venv/bin/python scripts/explorer_examples.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from zfserve.data import render

OUT = Path(__file__).resolve().parents[1] / "zfserve" / "server" / "explorer" / "examples"
SEED = 3
# star, crescent, face, ring, arrow: classified correctly by zfnet-demo, and within its data by its
# out-of-distribution score (crescent 9, the first choice, scored above the threshold: one of the 5% it rejects).
INDICES = (3, 20, 10, 16, 19)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for index in INDICES:
        sample = render(SEED, index)
        path = OUT / f"{sample.class_name}.jpg"
        Image.fromarray(sample.image).save(path, format="JPEG", quality=90,
                                           comment=f"zfserve synthetic seed {SEED}, image {index}".encode())
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
