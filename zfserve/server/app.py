"""The gRPC server: both APIs on one port, health, reflection, auth, TLS, metrics, graceful shutdown.

Life cycle:
1. ``bind()``: the port is open and answers health (NOT_SERVING), liveness, and UNAVAILABLE for work;
2. ``load()``: every model's snapshot is read, its classifier loaded and warmed, its batcher started; health
   turns SERVING. A model that fails is listed as not ready with its reason (``strict``: the start fails);
3. ``reload()`` (SIGHUP under :func:`serve`): every model's files are read again; a changed one is rebuilt and
   swapped in at once (see :mod:`.repository`); a failed reload keeps what was served. With
   ``model_control="explicit"``, ``load_model``/``unload_model`` do the same for one model on a client's
   request (OIP RepositoryModelLoad/Unload). They run one at a time. A request holds the runtime it started
   with until it ends (:meth:`AppState.serving`); a replaced runtime's batcher closes after its last request;
4. ``stop()`` (SIGTERM / SIGINT under :func:`serve`): health NOT_SERVING, no new RPCs are accepted,
   every accepted one finishes (up to ``shutdown_grace_s``), batchers drain, then the process exits 0.
Start-up problems (port in use, bad TLS files, a model that cannot load with ``strict``) are one
:class:`~zfserve.errors.ZFServeError` each, and leave nothing running.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
import ssl
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .._proto import POOL
from .._proto.inference import grpc_service_pb2 as oip_pb
from .._proto.inference import grpc_service_pb2_grpc as oip_grpc
from .._proto.v1 import zfserve_pb2 as v1_pb
from .._proto.v1 import zfserve_pb2_grpc as v1_grpc
from ..engine.results import ScoredBatch
from ..errors import InvalidArgumentError, ModelLoadError, ZFServeError
from .auth import BearerTokenInterceptor, read_token
from .batcher import DynamicBatcher
from .decode import DecodeStage, malloc_trim
from .http_listener import ByteBudget
from .metrics import Metrics
from .oip import InferenceServicer
from .options import ServerOptions
from .pools import BoundedPool
from .repository import ModelRepository, Runtime, ServedModel, public_reason
from .service import ZFServeServicer
from .status import Unavailable

log = logging.getLogger("zfserve.server")

ZFSERVE_SERVICE = v1_pb.DESCRIPTOR.services_by_name["ZFServe"].full_name
OIP_SERVICE = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Shutdown drains before it closes the port: new work is refused with UNAVAILABLE ("shutting down") while
# accepted RPCs finish; the port closes once no RPC has been active for this long. Closing it earlier would
# make gRPC cancel calls that are already in transit (clients would see CANCELLED, not a retryable status).
DRAIN_QUIET_S = 0.2
# REST infer bodies are parsed (JSON, tensor conversion) on a lane of their own, bounded like the decode lanes.
HTTP_PARSE_WORKERS = 1
HTTP_PARSE_QUEUE = 8


class AppState:
    """What the servicers share."""

    def __init__(self, options: ServerOptions, repository: ModelRepository, metrics: Metrics,
                 heavy: BoundedPool, decode: DecodeStage):
        self.options = options
        self.repository = repository
        self.metrics = metrics
        self.heavy = heavy
        self.decode = decode
        self.shutting_down = False
        self.active_rpcs = 0      # RPCs inside a handler now (the drain phase of shutdown waits for them)
        self.controller = None    # the ZFServer: load_model / unload_model (explicit model control)
        self._leases: dict[int, list[Runtime]] = {}   # per call in progress (id of its context): its runtimes

    @property
    def ready(self) -> bool:
        """Every model is ready, except those a client unloaded (at least one must be)."""
        kept = [m for m in self.repository if not m.unloaded]
        return bool(kept) and all(self.model_ready(m) for m in kept)

    def model_ready(self, model: ServedModel) -> bool:
        """Whether ``model`` takes work now: loaded and warm, and the server not shutting down."""
        return model.ready and not self.shutting_down

    def serving(self, model: ServedModel, context=None) -> Runtime:
        """The runtime ``model`` serves with now; UNAVAILABLE (retry) while shutting down, loading, or after its
        load failed (with the reason). With the call's ``context``, the call holds the runtime until it ends
        (:meth:`release`): a reload or unload meanwhile lets it finish on this runtime."""
        if self.shutting_down:
            raise Unavailable("server is shutting down; retry on another replica")
        runtime = model.runtime
        if runtime is None:
            if model.error:
                raise Unavailable(f"model {model.name!r} is not ready: it failed to load ({model.error})")
            if model.unloaded:
                raise Unavailable(f"model {model.name!r} is not ready: {model.reason}")
            raise Unavailable(f"model {model.name!r} is still loading; retry shortly")
        if context is not None:
            runtime.acquire()
            self._leases.setdefault(id(context), []).append(runtime)
        return runtime

    def release(self, context) -> None:
        """The call of ``context`` has ended: the runtimes it held may retire."""
        for runtime in self._leases.pop(id(context), ()):
            runtime.release()


def _release_memory(classifier) -> None:
    """After large batches: the engine's arena shrunk, then the freed heap (the batches' inputs and outputs
    included) returned to the system."""
    classifier.release_memory()
    malloc_trim()


def _register_in_pool(module) -> None:
    """Copy a descriptor from protobuf's default pool into ours, so reflection can describe it too."""
    from google.protobuf import descriptor_pb2
    try:
        POOL.FindFileByName(module.DESCRIPTOR.name)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    POOL.AddSerializedFile(proto.SerializeToString())


class ZFServer:
    def __init__(self, options: ServerOptions | None = None):
        self.options = options or ServerOptions()
        self.options.validate()
        self.metrics = Metrics()
        engine_options = dict(device=self.options.device, max_batch_size=self.options.batching.max_batch_size,
                              threads=self.options.threads, precision=self.options.precision,
                              engine=self.options.engine)
        self.repository = ModelRepository.open(self.options.model_repository, self.options.model,
                                               **engine_options)
        self.heavy = BoundedPool(self.options.heavy_workers, self.options.heavy_queue_size,
                                 on_admitted=self.metrics.heavy_in_flight.set)
        self.decode = DecodeStage(max_request_pixels=self.options.max_request_pixels,
                                  workers=self.options.decode_workers, queue_size=self.options.decode_queue_size)
        self.state = AppState(self.options, self.repository, self.metrics, self.heavy, self.decode)
        self.state.controller = self
        # The HTTP side's body budget (shared by --http-port and --metrics-port) and its body parsing lane.
        self.http_budget = ByteBudget(self.options.http.max_buffered_bytes)
        self.http_parse = BoundedPool(HTTP_PARSE_WORKERS, HTTP_PARSE_QUEUE, name="http-parse",
                                      what="REST request bodies being parsed", flags=("parse threads", "waiting"),
                                      background=True)
        self.metrics_listener = None
        self._models_lock = asyncio.Lock()   # reloads, loads and unloads, one at a time
        self._retiring: dict[asyncio.Task, Runtime] = {}   # replaced runtimes waiting for their last request
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http, self.http_port = None, None   # the HTTP side (zfserve.server.http_server), when --http-port
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Task | None = None
        self._torch_threads: int | None = None
        self._failed_start = False

    # ------------------------------------------------------------------------------------------ start
    async def _set_health(self, status) -> None:
        for name in ("", ZFSERVE_SERVICE, OIP_SERVICE):
            await self.health.set(name, status)

    def _credentials(self):
        """Server credentials, the files checked first: gRPC itself would only say 'failed to bind'."""
        o = self.options
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(o.tls_cert, o.tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise InvalidArgumentError(f"--tls-cert/--tls-key: {o.tls_cert} and {o.tls_key} are not a PEM "
                                       f"certificate chain and its private key ({exc.__class__.__name__}: "
                                       f"{getattr(exc, 'reason', None) or exc}); are they swapped?",
                                       field="tls_cert") from None
        if o.tls_client_ca:
            try:
                context.load_verify_locations(o.tls_client_ca)
            except (ssl.SSLError, OSError) as exc:
                raise InvalidArgumentError(f"--tls-client-ca: {o.tls_client_ca} is not a PEM CA bundle ({exc})",
                                           field="tls_client_ca") from None
        key, cert = Path(o.tls_key).read_bytes(), Path(o.tls_cert).read_bytes()
        ca = Path(o.tls_client_ca).read_bytes() if o.tls_client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    async def bind(self) -> int:
        """Open the port; health says NOT_SERVING until :meth:`load` has finished."""
        o = self.options
        interceptors = []
        token = read_token(o.auth_token_file) if o.auth_token_file else None
        if token is not None:
            interceptors.append(BearerTokenInterceptor(token))
        self._server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", o.max_message_bytes),
            ("grpc.max_send_message_length", o.max_message_bytes),
            ("grpc.so_reuseport", 0),   # a second server on the same port is an error, not a silent split
        ])
        # The HTTP side calls the same servicers (zfserve.server.http).
        self.zfserve_servicer, self.oip_servicer = ZFServeServicer(self.state), InferenceServicer(self.state)
        v1_grpc.add_ZFServeServicer_to_server(self.zfserve_servicer, self._server)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(self.oip_servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        from grpc_reflection.v1alpha import reflection_pb2
        for module in (health_pb2, reflection_pb2):
            _register_in_pool(module)
        reflection.enable_server_reflection(
            [ZFSERVE_SERVICE, OIP_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME], self._server, pool=POOL)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        from google.protobuf.internal import api_implementation
        if api_implementation.Type() != "upb":  # the pure-Python protobuf is several times slower per message
            log.warning("protobuf runs its %s implementation, not upb: expect slower requests",
                        api_implementation.Type())
        address = f"{o.host}:{o.port}"
        try:
            _check_port_free(o.host, o.port)
            credentials = self._credentials() if o.tls_cert else None
            try:
                self.port = self._server.add_secure_port(address, credentials) if credentials else \
                    self._server.add_insecure_port(address)
            except RuntimeError:   # grpcio: "Failed to bind to address ..."
                self.port = 0
            if not self.port:
                raise InvalidArgumentError(f"--host/--port: cannot listen on {address}: the port is in use (another "
                                           f"server?) or the address is not this machine's; choose another --port",
                                           field="port")
        except BaseException:
            await self._server.stop(None)   # a server that never started, closed on this loop
            self._server = None
            raise
        await self._server.start()
        if o.metrics_port is not None or o.http_port is not None:
            from .http_server import start_http, start_metrics
            if o.metrics_port is not None:
                self.metrics_listener, self.metrics_port = await start_metrics(self, token)
            if o.http_port is not None:
                self.http, self.http_port = await start_http(self, token)
        log.debug("listening on %s:%d (tls=%s, auth=%s)", o.host, self.port, bool(o.tls_cert),
                  bool(o.auth_token_file))
        return self.port

    async def load(self) -> None:
        """Load and warm every model, start its batcher, then report SERVING. A model that fails is kept as
        not ready with its reason (with ``strict``, the failure is raised)."""
        if self.options.heavy_threads is not None:
            import torch
            self._torch_threads = torch.get_num_threads()   # restored on stop (matters when embedded)
            torch.set_num_threads(self.options.heavy_threads)
        failed = []
        for model in self.repository:
            try:
                self._activate(model, await asyncio.to_thread(model.build), announce=False)
            except ZFServeError as exc:
                if self.options.strict:
                    self._failed_start = True
                    raise
                failed.append((model, exc))
        if len(failed) == len(self.repository.models):   # nothing to serve: the start fails, in one line
            self._failed_start = True
            if len(failed) == 1:
                raise failed[0][1]
            raise ModelLoadError("no model could be loaded: " + "; ".join(f"{m.name}: {exc}" for m, exc in failed))
        for model in self.repository:   # said once the start has succeeded, so a failed one says one line
            if model.ready:
                log.info("model %s (version %s, %d classes, %s on %s) ready", model.name, model.runtime.version,
                         model.runtime.num_classes, model.runtime.precision, model.runtime.engine)
        for model, exc in failed:
            model.fail(exc)
        if not self.state.shutting_down:
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def _activate(self, model: ServedModel, runtime: Runtime, announce: bool = True) -> Runtime | None:
        """Start ``runtime``'s batcher and make it the model's; returns the runtime it replaces."""
        # Inputs are checked before they are queued (the OIP tensor input takes non-finite values, as Triton
        # does), so one request's values can never fail the batch it shares with others.
        # Each batch gives the probabilities and the out-of-distribution scores of one pass (a ScoredBatch).
        classify = functools.partial(runtime.classifier.scored, finite=False)
        runtime.batcher = DynamicBatcher(
            classify, self.options.batching, name=model.name,
            on_batch=self.metrics.batch_size.labels(model=model.name).observe,
            on_queue_depth=self.metrics.queue_depth.labels(model=model.name).set, join=ScoredBatch.concatenate,
            release=functools.partial(_release_memory, runtime.classifier))
        runtime.batcher.start()
        old, model.runtime, model.error = model.runtime, runtime, None
        if announce:
            log.info("model %s (version %s, %d classes) ready", model.name, runtime.version, runtime.num_classes)
        return old

    async def _refresh(self, model: ServedModel) -> str:
        """Read ``model``'s files again and swap in a changed (or not yet loaded) runtime; a failure keeps what
        was served. Returns what happened, in words."""
        from ..weights import read_snapshot
        try:
            snapshot = await asyncio.to_thread(read_snapshot, model.source)
            if not model.changed(snapshot):
                return "unchanged"
            runtime = await asyncio.to_thread(model.build, snapshot)
        except ZFServeError as exc:
            reason = public_reason(exc, model.source, model.name)
            log.error("reload of model %s failed, keeping version %s: %s", model.name,
                      model.runtime.version if model.runtime else None, exc)
            if model.runtime is None:
                model.error = reason
            return f"failed: {reason}"
        old = self._activate(model, runtime)
        self._retire(old)
        return f"{old.version if old else 'none'} -> {runtime.version}"

    def _retire(self, runtime: Runtime | None) -> None:
        """Close ``runtime``'s batcher once no request holds it any more (in the background): every request that
        took it before the swap finishes on it, its queued work included."""
        if runtime is not None:
            task = asyncio.ensure_future(runtime.retire())
            self._retiring[task] = runtime
            task.add_done_callback(self._retired)

    def _retired(self, task: asyncio.Task) -> None:
        """A replaced runtime has closed: with its last reference dropped, its memory (an ONNX Runtime session,
        its arena, the model's weights) goes back to the system."""
        self._retiring.pop(task, None)
        asyncio.get_running_loop().run_in_executor(None, malloc_trim)

    async def reload(self) -> dict[str, str]:
        """Read every model's files again and swap in the changed ones (one at a time, each atomically); a model a
        client unloaded stays unloaded. Returns ``{name: what happened}``; a model that fails to reload keeps
        serving what it served. Reloads (and loads, unloads) run one at a time: a second SIGHUP during a reload
        waits for it, then finds the files unchanged."""
        async with self._models_lock:
            outcome = {}
            for model in self.repository:
                outcome[model.name] = "unloaded" if model.unloaded else await self._refresh(model)
            await self._health_after_change()
            return outcome

    async def load_model(self, model: ServedModel) -> str:
        """Load ``model`` (again, from its files); raises ModelLoadError when that fails."""
        async with self._models_lock:
            was_unloaded, model.unloaded = model.unloaded, False
            outcome = await self._refresh(model)
            if outcome.startswith("failed"):
                model.unloaded = was_unloaded   # still not served; its reason is now the failure
                raise ModelLoadError(f"model {model.name!r}: load {outcome}")
            log.info("model %s loaded on request (%s)", model.name, outcome)
            await self._health_after_change()
            return outcome

    async def unload_model(self, model: ServedModel) -> None:
        """Stop serving ``model``: new requests get UNAVAILABLE at once; those already running finish."""
        async with self._models_lock:
            old, model.runtime, model.error, model.unloaded = model.runtime, None, None, True
            self._retire(old)
            log.info("model %s unloaded on request", model.name)
            await self._health_after_change()

    async def _health_after_change(self) -> None:
        if not self.state.shutting_down and any(m.ready for m in self.repository):
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def start(self) -> int:
        port = await self.bind()
        await self.load()
        return port

    # ------------------------------------------------------------------------------------------ stop
    async def _stop(self, grace: float) -> None:
        self.state.shutting_down = True
        await self.health.enter_graceful_shutdown()   # every service NOT_SERVING; later sets are ignored
        quiet = self._failed_start or self.port is None   # a start that failed says only why (one line)
        if not quiet:
            log.info("shutting down: refusing new work; finishing accepted requests (grace %.0f s)", grace)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + grace
        quiet_since = None
        while loop.time() < give_up:   # drain: accepted RPCs finish (their batches keep running)
            if self.state.active_rpcs:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= DRAIN_QUIET_S:
                break
            await asyncio.sleep(0.01)
        for listener in (self.http, self.metrics_listener):   # drained with the rest: new calls got 503
            if listener is not None:
                await listener.stop()
        # Only streams that never end on their own (health Watch) can remain: a short grace closes them.
        if self._server is not None:
            await self._server.stop(min(1.0, max(0.0, give_up - loop.time())))
        await self._close_batchers(max(0.1, give_up - loop.time()))
        for pool in (self.heavy, self.decode, self.http_parse):
            await asyncio.to_thread(pool.shutdown)
        if self._torch_threads is not None:
            import torch
            torch.set_num_threads(self._torch_threads)
        if not quiet:
            log.info("stopped")
        self._stopped.set()

    async def _close_batchers(self, wait_s: float) -> None:
        """Close every batcher: the served runtimes' and those of replaced runtimes still retiring (their last
        requests have ended with the drain, or had ``wait_s`` more seconds)."""
        if self._retiring:
            await asyncio.wait(list(self._retiring), timeout=wait_s)
        for task, runtime in list(self._retiring.items()):
            task.cancel()
            if runtime.batcher is not None:
                await runtime.batcher.close()
        for model in self.repository:
            if model.runtime is not None and model.runtime.batcher is not None:
                await model.runtime.batcher.close()

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown; calling it again waits for the first call."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(
                self._stop(self.options.shutdown_grace_s if grace is None else grace))
        await asyncio.shield(self._stopping)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on before gRPC tries it (gRPC would log its own lines first)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidArgumentError(f"--host: cannot resolve {host!r} ({exc.strerror}); give an address of this "
                                   f"machine, e.g. 127.0.0.1 or 0.0.0.0", field="host") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as gRPC binds
            try:
                probe.bind(address)
            except OSError as exc:
                raise InvalidArgumentError(f"--host/--port: cannot listen on {host}:{port}: {exc.strerror} "
                                           f"(another server on that port?); choose another --port",
                                           field="port") from None


async def serve(options: ServerOptions, *, ready_line: bool = True) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully; SIGHUP reloads the models. Returns the exit status
    (0). A start-up failure stops what was started and raises its ZFServeError (the CLI prints one line)."""
    server = ZFServer(options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload(server, ready_line)))
    try:
        port = await server.bind()
        if ready_line:  # scripts and tests read the bound port from here (use --port 0 for a free one)
            print(f"zfserve: listening on {options.host}:{port}", flush=True)
            if server.http_port is not None:
                print(f"zfserve: http on {options.host}:{server.http_port}", flush=True)
                print(f"zfserve: explorer page at {page_url(options, server.http_port)}", flush=True)
        await server.load()
    except BaseException:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await server.stop(0)
        raise
    if ready_line:
        served = ", ".join(m.name if m.ready else f"{m.name} (not ready: {m.error})" for m in server.repository)
        print(f"zfserve: ready ({served})", flush=True)
    await server.wait_stopped()
    if ready_line:
        for model in server.repository:
            s = model.runtime.batcher.stats if model.runtime and model.runtime.batcher else None
            if s is not None:
                print(f"zfserve: model {model.name}: completed={s.completed} rejected_full={s.rejected_full} "
                      f"shed={s.shed} dropped_timeout={s.dropped_timeout} dropped_deadline={s.dropped_deadline} "
                      f"dropped_cancelled={s.dropped_cancelled} failed={s.failed}", flush=True)
        print("zfserve: stopped", flush=True)
    return 0


def page_url(options: ServerOptions, port: int) -> str:
    """The explorer page's address as a browser on this machine opens it."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(options.host, options.host)
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if options.tls_cert else 'http'}://{host}:{port}/"


async def _reload(server: ZFServer, ready_line: bool) -> None:
    outcome = await server.reload()
    if ready_line:
        print("zfserve: reloaded (" + ", ".join(f"{name}: {what}" for name, what in outcome.items()) + ")",
              flush=True)


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(stream=sys.stderr, level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
