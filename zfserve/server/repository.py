"""The models a server holds: ``--model-repository DIR`` (one sub-directory per model, named after it, as in
Triton) or one model (the embedded default when none is named).

One model, one snapshot. Each model's files are read once (:class:`~zfserve.weights.Snapshot`) and every runtime
it serves with comes from that snapshot: the ONNX Runtime classifier behind the dynamic batcher and, built on
first use, the PyTorch model behind deconv and occlusion. The version every response reports is the
snapshot's (config version + a prefix of the weights' SHA-256). Files changed on disk are served only after an
explicit reload (SIGHUP, or :meth:`ServedModel.reload`), which reads a new snapshot, builds and warms its
runtime off the event loop and swaps it in at once; requests already running finish on the old runtime, which
is closed after the last of them.

A model that fails to load is listed as not ready, with a reason that carries no server path; the others
are served (``--strict`` makes any failure stop the server instead). With ``--model-control explicit`` a
client may also unload a model and load it again (the OIP repository extension).

Over the Open Inference Protocol each model NAME is several models, NAME (FP32 tensor input) and NAME-bytes
(encoded images), and its explanations NAME-occlusion[-bytes] and NAME-deconv[-bytes], which share its runtime; a
repository whose names would collide that way is refused.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from pathlib import Path

from ..errors import InvalidArgumentError, NotFoundError
from ..wire import BYTES_INPUT, CLASSIFY, IMAGE_INPUT, TASK_SUFFIXES, oip_model_name, oip_version
from ..weights import CONFIG_FILE, Snapshot, default_model_name, read_config, read_snapshot, resolve_model_dir
from .statistics import InferenceStatistics

log = logging.getLogger("zfserve.server")


def public_reason(exc: BaseException | str, source: str, name: str) -> str:
    """An error's message (or a note) as a client may see it: the model's location on this server replaced by its
    name."""
    message = str(exc)
    for prefix in sorted({source, str(Path(source).resolve())}, key=len, reverse=True):
        message = message.replace(prefix, f"<model {name}>")
    return message


class Runtime:
    """What one snapshot of a model serves with. Handlers take the model's current runtime once per request
    and use only it, so one request never mixes two versions; they hold it (:meth:`acquire`) until they end,
    and a replaced runtime retires (:meth:`retire`) only after its last request (its batcher keeps taking
    their work until then)."""

    def __init__(self, name: str, snapshot: Snapshot, classifier, device: str):
        self.name = name
        self.snapshot = snapshot
        self.version = snapshot.version
        self.oip_version = oip_version(snapshot.version)   # the same version as an integer (OIP clients)
        self.config = snapshot.config
        self.classifier = classifier
        self.precision = classifier.precision     # what classification runs in and on (ListModels says it)
        self.engine = classifier.engine
        self.num_classes = int(classifier.num_classes)
        self.input_size = int(classifier.input_size)
        self.device = device
        # The out-of-distribution score of every answer (None, with the reason in ood_note, without statistics).
        self.ood_detector = classifier.ood_detector
        self.ood_note = public_reason(classifier.ood_note, snapshot.source, name)
        self.batcher = None                   # the dynamic batcher over ``classifier``, started by the app
        # The statistics extension's counters of this version, per OIP model (task and input kind: see stats).
        self.statistics: dict[str, InferenceStatistics] = defaultdict(InferenceStatistics)
        self._lock = threading.Lock()
        self._torch_model = self._deconv = self._occlusion = None
        self.users = 0                        # requests holding this runtime now (on the event loop)
        self._idle: asyncio.Event | None = None

    def stats(self, input_name: str, task: str = CLASSIFY) -> InferenceStatistics:
        """The counters of the OIP model of ``task`` with ``input_name`` (zfserve.v1's RPCs count in them too)."""
        return self.statistics[oip_model_name("", input_name, task)]

    def acquire(self) -> None:
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self._idle is not None:
            self._idle.set()

    async def retire(self) -> None:
        """Wait until no request holds this runtime, then close its batcher (queued work finishes first)."""
        if self.users:
            self._idle = asyncio.Event()
            await self._idle.wait()
        if self.batcher is not None:
            await self.batcher.close()

    def ood_of(self, images):
        """The out-of-distribution verdicts of preprocessed ``images`` (one classification pass, in the calling
        thread: deconv and occlusion workers), or None without statistics."""
        return None if self.ood_detector is None else self.classifier.scored(images).ood

    @property
    def has_layers(self) -> bool:
        """Whether the model's layers are known (a layered CNN: deconv, the unit index, layer facts); False for an
        ONNX model, which runs only what needs forward passes (zfserve.capabilities)."""
        from ..capabilities import supports
        return supports(self.config.kind, "layers")

    def torch_model(self):
        """The PyTorch model (layer facts, deconv, occlusion), built once from the snapshot's weights; an ONNX
        model has none (ModelKindError)."""
        with self._lock:
            if self._torch_model is None:
                self._torch_model = self.snapshot.model(self.device)
            return self._torch_model

    def deconv_engine(self):
        model = self.torch_model()
        with self._lock:
            if self._deconv is None:
                from ..engine.deconv import DeconvEngine
                self._deconv = DeconvEngine(model, self.device)
            return self._deconv

    def occlusion_engines(self):
        """The occlusion engines (:class:`~zfserve.engine.occlusion_modes.OcclusionEngines`): the incremental one
        on the PyTorch model above, batched ones reusing the served classifier for its engine and precision
        and building others with the heavy work's thread count."""
        with self._lock:
            if self._occlusion is None:
                import torch

                from ..engine.occlusion_modes import OcclusionEngines
                served = {(self.classifier.engine, self.classifier.precision): self.classifier} \
                    if self.device == "cpu" else {}
                self._occlusion = OcclusionEngines(self.snapshot, device=self.device, threads=torch.get_num_threads(),
                                                   classifiers=served,
                                                   torch_model=self.torch_model if self.has_layers else None)
            return self._occlusion


class ServedModel:
    """One served name: its source (a directory or an embedded/built-in name), its current runtime (None until
    loaded) and, when loading failed, why."""

    def __init__(self, name: str, source: str, *, device: str = "cpu", max_batch_size: int = 32,
                 threads: int | None = None, precision: str | None = None, engine: str | None = None):
        self.name = name
        self.source = source
        self.device = device
        self.max_batch_size = max_batch_size
        self.threads = threads
        # The server's --precision / --engine: for models whose config.json names none (config.json wins).
        self.precision = precision
        self.engine = engine
        self.runtime: Runtime | None = None
        self.error: str | None = None
        self.unloaded = False                 # unloaded on request (RepositoryModelUnload)

    @property
    def ready(self) -> bool:
        return self.runtime is not None

    @property
    def state(self) -> str:
        """READY, LOADING or UNAVAILABLE (failed or unloaded), as the OIP repository index says it."""
        if self.runtime is not None:
            return "READY"
        return "UNAVAILABLE" if self.error or self.unloaded else "LOADING"

    @property
    def reason(self) -> str:
        """Why the model is not ready ("" when it is)."""
        if self.runtime is not None:
            return ""
        if self.error:
            return self.error
        return "unloaded on request; load it again with RepositoryModelLoad" if self.unloaded else "loading"

    def build(self, snapshot: Snapshot | None = None) -> Runtime:
        """Read the snapshot (unless given) and build its warmed classifier (blocking: run it in a thread); an
        int8 model is quantized here on first use (see zfserve.engine.quantize.ensure_int8)."""
        from ..engine.classifier import Classifier
        snapshot = snapshot or read_snapshot(self.source)
        classifier = Classifier(snapshot, device=self.device, max_batch_size=self.max_batch_size,
                                threads=self.threads, warmup=True,
                                precision=snapshot.config.precision or self.precision,
                                engine=snapshot.config.engine or self.engine)
        return Runtime(self.name, snapshot, classifier, self.device)

    def fail(self, exc: BaseException) -> str:
        """Record a load failure (the runtime, if any, stays) and return its public reason."""
        self.error = public_reason(exc, self.source, self.name)
        log.error("model %s: %s", self.name, exc)
        return self.error

    def changed(self, snapshot: Snapshot) -> bool:
        """Whether ``snapshot`` differs from what is served (weights, config, or its precision and engine)."""
        from ..config import SERVING_KEYS
        from ..export import config_hash
        current = self.runtime.snapshot if self.runtime else None
        return current is None or current.sha256 != snapshot.sha256 or \
            config_hash(current.config) != config_hash(snapshot.config) or \
            any(getattr(current.config, key) != getattr(snapshot.config, key) for key in SERVING_KEYS)


class ModelRepository:
    def __init__(self, models: list[ServedModel], default: str):
        self.models = {m.name: m for m in models}
        self.default = default
        for name in self.models:
            for task in TASK_SUFFIXES:
                for input_name in (IMAGE_INPUT, BYTES_INPUT):
                    derived = oip_model_name(name, input_name, task)
                    if derived != name and derived in self.models:
                        raise InvalidArgumentError(
                            f"--model-repository: models {name!r} and {derived!r} collide: {derived!r} is the Open "
                            f"Inference Protocol name of {name!r}'s {task} with input {input_name!r}; rename one "
                            f"of them", field="model_repository")

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


__all__ = ["ModelRepository", "Runtime", "ServedModel", "public_reason"]
