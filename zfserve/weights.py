"""Model directories: ``weights.safetensors`` + ``config.json`` (+ ``model.onnx``, written by the exporter).

No pickle anywhere. Every failure names the file (and the tensor) that is wrong. torch is imported where it is
used, so that resolving a model name (``zfserve --help``) does not pay for it.

Model names resolve to the embedded models under ``zfserve/models/<name>/``; ``zfnet-paper`` is built in: the
untrained paper configuration (1000 classes, paper init with a fixed seed), never stored on disk.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import capabilities as caps
from .config import ModelConfig
from .errors import ModelLoadError, NotFoundError

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
MEAN_IMAGE_TENSOR = "mean_image"
PAPER_MODEL = "zfnet-paper"
DEMO_MODEL = "zfnet-demo"
PAPER_SEED = 0
VERSION_HASH_CHARS = 12   # of the weights' SHA-256 in a served version, "<config version>+<hash prefix>"
EMBEDDED_DIR = Path(__file__).resolve().parent / "models"


def embedded_models() -> list[str]:
    """Names of the models shipped inside the package, plus the built-in paper configuration."""
    names = sorted(p.name for p in EMBEDDED_DIR.iterdir() if (p / CONFIG_FILE).is_file()) \
        if EMBEDDED_DIR.is_dir() else []
    return names + [PAPER_MODEL]


def default_model_name() -> str:
    """``zfnet-demo`` when it is embedded, else the untrained paper configuration."""
    return DEMO_MODEL if (EMBEDDED_DIR / DEMO_MODEL / CONFIG_FILE).is_file() else PAPER_MODEL


def resolve_model_dir(name_or_dir: str | Path) -> Path | None:
    """A model directory for a name or path; ``None`` for the built-in ``zfnet-paper``."""
    text = str(name_or_dir)
    if text == PAPER_MODEL:
        return None
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if (EMBEDDED_DIR / text / CONFIG_FILE).is_file():
        return EMBEDDED_DIR / text
    raise NotFoundError(f"model {text!r} is neither a directory nor an embedded model; "
                        f"embedded: {embedded_models()}", field="model")


def paper_model():
    """The untrained paper configuration, initialized deterministically."""
    import torch
    from .model import ZFNet
    with torch.random.fork_rng(devices=[]):  # seed locally: loading a model must not reset the caller's RNG
        torch.manual_seed(PAPER_SEED)
        model = ZFNet()
    model.config.name = PAPER_MODEL
    model.config.provenance = {"source": "built-in: paper init N(0, 0.01^2), zero biases",
                               "seed": PAPER_SEED}
    return model


def read_config(directory: Path) -> ModelConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing (a model directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    return ModelConfig.from_json(data, source=str(path))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a missing, truncated or corrupt file is a ModelLoadError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


def weights_hash(directory: str | Path) -> str:
    """SHA-256 of the weights file: identifies the exact weights an exported ONNX file came from."""
    digest = hashlib.sha256()
    with open(Path(directory) / WEIGHTS_FILE, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_hash(model) -> str:
    """SHA-256 over the model's tensors (for models that do not come from a file, such as zfnet-paper)."""
    import torch
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()


def _check_mean_image(mean, config: ModelConfig, path: Path) -> np.ndarray:
    """The per-pixel mean image a config with ``preprocess.mean == "image"`` needs, as float32 (3, R, R)."""
    expected = (3, config.preprocess.resize, config.preprocess.resize)
    if mean is None or tuple(mean.shape) != expected:
        got = None if mean is None else tuple(mean.shape)
        raise ModelLoadError(f"{path}: tensor {MEAN_IMAGE_TENSOR!r} must have shape {expected} "
                             f"(config preprocess.mean is 'image'), got {got}")
    return np.asarray(mean, dtype=np.float32)


@dataclass
class Snapshot:
    """A model as read once from its directory (or built in): the config and the weights from one read of
    each file, and the SHA-256 of the weights file's bytes. Every runtime of a served model (the ONNX export
    and session, the PyTorch model behind deconv and occlusion) is built from one snapshot, so they agree,
    whatever happens to the files afterwards.

    ``version`` is what a server reports: the config's version and a prefix of the weights hash, so it
    changes with the weights.

    An ONNX model (``config.kind == "onnx"``) has no tensors: ``onnx_bytes`` holds its ``model.onnx`` as read, and
    ``sha256`` is theirs."""

    source: str                       # the directory it was read from, or the built-in name
    directory: Path | None            # None for the built-in zfnet-paper
    config: ModelConfig
    tensors: dict                     # name -> CPU tensor as stored (the mean image is in ``config``)
    sha256: str
    onnx_bytes: bytes | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def version(self) -> str:
        return f"{self.config.version}+{self.sha256[:VERSION_HASH_CHARS]}"

    def model(self, device: str | torch.device = "cpu"):
        """A fresh ZFNet (float32, eval mode, on ``device``) with these weights; ``model.model_dir`` is the
        directory. Tensors that do not fit the config are a ModelLoadError naming the file; an ONNX model has no
        such model (a ModelKindError naming its kind)."""
        caps.require(self.config, "layers", "the network's layers (a PyTorch model of them)")
        import torch
        from .model import build
        config = copy.deepcopy(self.config)
        with torch.random.fork_rng(devices=[]):   # building initializes weights: leave the caller's RNG alone
            model = build(config)
        if self.directory is None:
            model.load_state_dict(self.tensors)
        else:
            path = self.directory / WEIGHTS_FILE
            expected = model.state_dict()
            missing = sorted(set(expected) - set(self.tensors))
            extra = sorted(set(self.tensors) - set(expected))
            if missing or extra:
                raise ModelLoadError(f"{path}: missing tensors {missing}, unexpected tensors {extra}")
            for key in expected:   # in layer order: the first misfit named is the lowest layer's
                tensor = self.tensors[key]
                if tuple(tensor.shape) != tuple(expected[key].shape):
                    raise ModelLoadError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                         f"expected {tuple(expected[key].shape)} for the config in {CONFIG_FILE}")
                if not torch.isfinite(tensor).all():
                    raise ModelLoadError(f"{path}: tensor {key!r} holds non-finite values")
            model.load_state_dict({k: v.to(torch.float32) for k, v in self.tensors.items()})
            model.config.provenance.setdefault("directory", str(self.directory))
        model.model_dir = self.directory
        return model.eval().to(device)


def read_snapshot(name_or_dir: str | Path | None = None) -> Snapshot:
    """Read a model directory (or embedded name) once into a :class:`Snapshot`; ``zfnet-paper`` is built."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors
    source = str(name_or_dir or default_model_name())
    directory = resolve_model_dir(source)
    if directory is None:
        model = paper_model()
        tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return Snapshot(source, None, model.config, tensors, state_dict_hash(model))
    config = read_config(directory)
    if config.kind == caps.ONNX:
        return _read_onnx(directory, config)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing")
    try:
        data = path.read_bytes()
        tensors = load_safetensors(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    if isinstance(config.preprocess.mean, str):
        mean = tensors.pop(MEAN_IMAGE_TENSOR, None)
        config.preprocess.mean_image = _check_mean_image(None if mean is None else mean.to(torch.float32).numpy(),
                                                         config, path)
    return Snapshot(str(directory), directory, config, tensors, hashlib.sha256(data).hexdigest())


def _read_onnx(directory: Path, config: ModelConfig) -> Snapshot:
    path = directory / ONNX_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot be read ({exc.strerror or exc}); an ONNX model directory holds "
                             f"{ONNX_FILE} and {CONFIG_FILE}") from None
    return Snapshot(str(directory), directory, config, {}, hashlib.sha256(data).hexdigest(), data)


def load_model(name_or_dir: str | Path | None = None, *, device: str | torch.device = "cpu"):
    """Load a model by embedded name (``zfnet-demo``, the built-in ``zfnet-paper``) or directory into a ZFNet in
    eval mode; ``model.config`` holds its config and ``model.model_dir`` its directory (None if built in)."""
    return read_snapshot(name_or_dir).model(device)


def save_model(model, directory: str | Path, *, dtype: torch.dtype | None = None, **config_updates) -> Path:
    """Write ``model`` as a model directory (``weights.safetensors`` + ``config.json``); ``config_updates`` set
    config fields first (``name=...``, ``class_names=...``). ``dtype`` (default float32) float16 halves the file
    (recorded in config.json)."""
    import torch
    dtype = dtype or torch.float32
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    for key, value in config_updates.items():
        if not hasattr(config, key):
            raise ModelLoadError(f"save: unknown config key {key!r}")
        setattr(config, key, value)
    config.weights_dtype = str(dtype).replace("torch.", "")
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    if isinstance(config.preprocess.mean, str):
        tensors[MEAN_IMAGE_TENSOR] = torch.from_numpy(np.ascontiguousarray(config.preprocess.mean_image,
                                                                           dtype=np.float32))
    save_file(tensors, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    return directory
