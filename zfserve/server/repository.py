"""The models a server holds: ``--model-repository DIR`` (one sub-directory per model, named after it, as in
Triton) or one model (the embedded default when none is named).

Each served model has an ONNX Runtime classifier (behind the dynamic batcher) and, loaded on first use, the
PyTorch model behind the deconv and occlusion engines.
"""

from __future__ import annotations

import threading
from pathlib import Path

from ..errors import InvalidArgumentError, NotFoundError
from ..weights import CONFIG_FILE, default_model_name, read_config, resolve_model_dir


class ServedModel:
    def __init__(self, name: str, source: str, *, device: str = "cpu", max_batch_size: int = 32,
                 threads: int | None = None):
        self.name = name
        self.source = source            # a model directory or an embedded/built-in name
        self.device = device
        self.max_batch_size = max_batch_size
        self.threads = threads
        self.classifier = None
        self.batcher = None
        self.ready = False
        self._lock = threading.Lock()
        self._torch_model = None
        self._deconv = None
        self._occlusion = None

    def load(self) -> None:
        """Load and warm the classifier (blocking: run it in a thread)."""
        from ..engine.classifier import Classifier
        self.classifier = Classifier(self.source, device=self.device, max_batch_size=self.max_batch_size,
                                     threads=self.threads, warmup=True)

    @property
    def config(self):
        return self.classifier.config

    @property
    def version(self) -> str:
        return str(self.config.version)

    @property
    def num_classes(self) -> int:
        return int(self.classifier.num_classes)

    @property
    def input_size(self) -> int:
        return int(self.classifier.input_size)

    def torch_model(self):
        """The PyTorch model (for layer facts, deconv and occlusion), loaded once."""
        with self._lock:
            if self._torch_model is None:
                from ..weights import load_model
                self._torch_model = load_model(self.source, device=self.device)
            return self._torch_model

    def deconv_engine(self):
        model = self.torch_model()
        with self._lock:
            if self._deconv is None:
                from ..engine.deconv import DeconvEngine
                self._deconv = DeconvEngine(model, self.device)
            return self._deconv

    def occlusion_engine(self):
        model = self.torch_model()
        with self._lock:
            if self._occlusion is None:
                from ..engine.occlusion import OcclusionEngine
                self._occlusion = OcclusionEngine(model, device=self.device)
            return self._occlusion


class ModelRepository:
    def __init__(self, models: list[ServedModel], default: str):
        self.models = {m.name: m for m in models}
        self.default = default

    @classmethod
    def open(cls, repository: str | None = None, model: str | None = None, **engine_options) -> "ModelRepository":
        if repository:
            root = Path(repository).expanduser()
            if not root.is_dir():
                raise InvalidArgumentError(f"--model-repository: {root} is not a directory",
                                           field="model_repository")
            dirs = sorted(p for p in root.iterdir() if (p / CONFIG_FILE).is_file())
            if not dirs:
                raise InvalidArgumentError(f"--model-repository: {root} holds no model sub-directory (each "
                                           f"model is a sub-directory with {CONFIG_FILE})",
                                           field="model_repository")
            models = [ServedModel(p.name, str(p), **engine_options) for p in dirs]
            return cls(models, models[0].name)
        source = model or default_model_name()
        directory = resolve_model_dir(source)
        name = source if directory is None else read_config(directory).name
        return cls([ServedModel(name, str(directory) if directory else source, **engine_options)], name)

    def get(self, name: str) -> ServedModel:
        model = self.models.get(name or self.default)
        if model is None:
            raise NotFoundError(f"model: unknown model {name!r}; served: {sorted(self.models)}", field="model")
        return model

    def __iter__(self):
        return iter(self.models.values())
