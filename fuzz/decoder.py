"""Coverage-guided fuzzing (atheris) of the image decoder: any bytes through ``read_header`` and ``load_image``.
Anything but a result of the promised shape or a typed :class:`~zfserve.errors.ImageError` is a crash.

    python fuzz/decoder.py fuzz/corpus/decoder -runs=100000      # or: bash fuzz/run.sh 100000
"""

import sys

import atheris

with atheris.instrument_imports(include=["zfserve", "PIL"]):
    import numpy as np

    from zfserve.errors import ImageError
    from zfserve.preprocess import load_image, read_header


def test_one_input(data: bytes) -> None:
    try:
        read_header(data)
    except ImageError:
        pass
    try:
        x = load_image(data)
    except ImageError:
        return
    if x.shape != (3, 224, 224) or not np.isfinite(x).all():
        raise AssertionError(f"load_image returned {x.dtype} {x.shape}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
