"""The detection daemon: model, source and outputs wired into the pipeline, supervised until a
signal, the end of a file or ``max_frames``.

The main thread owns signals, the systemd notifications and the periodic summary; the work
happens in the pipeline's threads.  Every resource is closed on every exit path, in reverse
order of opening: pipeline, source (the camera is released), outputs (MQTT says 'offline',
files are flushed).
"""

from __future__ import annotations

import difflib
import logging
import signal
import threading
import time
from contextlib import ExitStack

from device.config import DaemonConfig
from device.errors import ConfigError, ToolkitError
from device.health import Health
from device.infer import Detector, SessionConfig
from device.pipeline import Pipeline
from device.postprocess import PostprocessConfig
from device.publish.base import Sink
from device.sdnotify import Notifier
from device.sources import create_source
from device.sources.config import ImageFolderConfig, VideoFileConfig
from device.stats import RuntimeStats

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
_TICK = 1.0  # seconds between the supervisor's looks at the pipeline
# 'timeout' and some supervisors signal the process and then its whole group, so one stop can
# arrive twice within microseconds; only a signal after this long is a human's second request.
_SAME_STOP_WINDOW = 1.0


class Daemon:
    """One run of the detection service."""

    def __init__(self, config: DaemonConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.stats = RuntimeStats()
        self.health = Health(config.pipeline.health_max_frame_age_s)
        self.pipeline: Pipeline | None = None
        self.sinks: list[Sink] = []
        self.left_behind: list[str] = []  # stage threads that did not finish by the exit
        self._stop_requested = threading.Event()
        self._wake = threading.Event()  # set by a stop request or by the pipeline finishing
        self._stop_reason = ""
        self._first_signal_at: float | None = None

    # The run, as a short list of stages

    def run(self) -> int:
        """Run until done; return the process exit code.  Raises ToolkitError for setup
        problems (model, source, outputs) before any frame is processed."""
        with ExitStack() as resources:
            self._install_signal_handlers(resources)
            resources.callback(self._announce_stop)
            detector = resources.enter_context(self._load_detector())
            sinks = self._start_sinks(resources)
            source = self._open_source(resources)
            self.pipeline = self._start_pipeline(source, detector, sinks)
            resources.callback(self._stop_pipeline)
            self._announce_ready()
            self._supervise()
        return self._exit_code()

    def stop(self, reason: str) -> None:
        """Ask the daemon to shut down cleanly (from a signal handler or another thread)."""
        if not self._stop_requested.is_set():
            self._stop_reason = reason
            self._stop_requested.set()
            self._wake.set()

    # Setup

    def _load_detector(self) -> Detector:
        model = self.config.model
        session = SessionConfig(
            intra_op_threads=model.intra_op_threads,
            inter_op_threads=model.inter_op_threads,
            allow_spinning=model.allow_spinning,
        )
        detector = Detector(model.path, session_config=session)
        detector.postprocess_config = postprocess_config(self.config, detector.names)
        return detector

    def _open_source(self, resources: ExitStack):
        source = create_source(self.config.source)
        # Registered first: a signal during open() must still release the camera.
        resources.callback(self._close_source, source)
        source.open()
        log.info("Source %s opened", source.name)
        return source

    def _start_sinks(self, resources: ExitStack) -> list[Sink]:
        sinks = build_sinks(self.config, self.stats, self.health)
        for sink in list(sinks):
            sink.stop_daemon = self.stop
            resources.callback(self._close_sink, sink)
            try:
                sink.start()
            except ToolkitError as exc:
                if sink.name != "http" or http_chosen(self.config):
                    raise
                # HTTP is on by default; a port someone else holds should not stop detection
                # unless the user asked for HTTP.
                log.warning("%s; running without HTTP (or set --http-port / --no-http)", exc)
                sinks.remove(sink)
        self.sinks = sinks
        if not sinks:
            log.warning("No output is enabled: detections are counted but not sent anywhere")
        return sinks

    def _start_pipeline(self, source, detector: Detector, sinks: list[Sink]) -> Pipeline:
        pipeline = Pipeline(
            source,
            detector,
            sinks,
            stats=self.stats,
            health=self.health,
            newest_frame=newest_frame(self.config),
            max_frames=self.config.pipeline.max_frames,
            read_timeout=self.config.pipeline.read_timeout_s,
            max_fps=self.config.pipeline.max_fps,
            on_done=self._wake.set,
        )
        pipeline.start()
        return pipeline

    def _announce_ready(self) -> None:
        self.health.set_state("running")
        self.notifier.ready(status=f"detecting on {self.pipeline.source.name}")
        if self.notifier.watchdog_interval:
            log.info("systemd watchdog: pinging every %.1f s", self.notifier.watchdog_interval)

    # Supervision

    def _supervise(self) -> None:
        pipeline = self.pipeline
        tick = min(_TICK, self.notifier.watchdog_interval or _TICK)
        stall_limit = self.config.pipeline.stall_timeout_s
        log_interval = self.config.pipeline.stats_log_interval_s
        next_log = time.monotonic() + log_interval if log_interval else float("inf")
        stalled_before = False

        while not pipeline.done.is_set() and not self._stop_requested.is_set():
            self._wake.wait(tick)
            pipeline.record_source_status()

            stalled = pipeline.stalled(stall_limit)
            if stalled and not stalled_before:
                stages = ", ".join(f"{name} for {seconds:.0f} s" for name, seconds in stalled)
                log.error("Pipeline stuck: %s; no longer feeding the systemd watchdog", stages)
                self.health.set_problem(f"stuck: {stages}")
            elif stalled_before and not stalled:
                log.info("Pipeline moving again")
                self.health.set_problem("")
            stalled_before = bool(stalled)
            if not stalled and pipeline.alive():
                self.notifier.watchdog()

            if time.monotonic() >= next_log:
                next_log += log_interval
                self._log_summary()

    def _log_summary(self) -> None:
        summary = self.summary()
        log.info("%s", summary)
        self.notifier.status(summary)

    def summary(self) -> str:
        snapshot = self.stats.snapshot()
        stages = snapshot["stage_ms_last"]
        found = ", ".join(f"{k} {v}" for k, v in sorted(snapshot["detections"].items())) or "none"
        return (
            f"{snapshot['frames_processed']} frames, {snapshot['fps']:.1f} fps, "
            f"inference {stages.get('inference', 0):.1f} ms, "
            f"{snapshot['frames_dropped']} dropped to stay current, detections: {found}"
        )

    # Shutdown

    def _announce_stop(self) -> None:
        self.health.set_state("stopped", self._stop_reason)
        self.notifier.close()

    def _stop_pipeline(self) -> None:
        pipeline = self.pipeline
        if self._stop_requested.is_set():
            log.info("Stopping: %s", self._stop_reason)
            pipeline.stop("stopped")
        self.health.set_state("stopping", self._stop_reason or pipeline.outcome)
        self.notifier.stopping(status=f"stopping: {self._stop_reason or pipeline.outcome}")
        # One inference can take seconds on a slow board: let it finish rather than tear the
        # session down under it.
        self.left_behind = pipeline.join(timeout=max(10.0, self.config.pipeline.stall_timeout_s))
        if self.left_behind:
            log.warning("Stages still running at exit: %s", ", ".join(self.left_behind))

        elapsed = time.monotonic() - pipeline.started_at
        log.info(
            "Processed %d frames in %.1f s (%.1f fps overall, %d skipped for newer ones); %s",
            pipeline.frames_published,
            elapsed,
            pipeline.frames_published / elapsed if elapsed > 0 else 0.0,
            pipeline.frames_skipped,
            describe_outcome(pipeline),
        )

    def _close_source(self, source) -> None:
        try:
            source.close()
            log.info("Source %s closed", source.name)
        except Exception as exc:  # closing must go on to the outputs
            log.warning("Closing source %s failed: %s", source.name, exc)

    def _close_sink(self, sink: Sink) -> None:
        try:
            sink.close()
        except Exception as exc:  # one output failing to close must not skip the others
            log.warning("Closing output %s failed: %s", sink.name, exc)

    def _exit_code(self) -> int:
        pipeline = self.pipeline
        if self._stop_requested.is_set() and pipeline.outcome in ("stopped", "max_frames"):
            return EXIT_OK
        if pipeline.outcome in ("ended", "max_frames", "stopped"):
            return EXIT_OK
        if pipeline.outcome == "error" and pipeline.error is not None:
            if isinstance(pipeline.error, ToolkitError):
                raise pipeline.error
            raise ToolkitError(
                f"The detection pipeline failed: {type(pipeline.error).__name__}: "
                f"{pipeline.error}. Run with --verbose for the traceback."
            ) from pipeline.error
        if pipeline.outcome == "source_failed":
            reason = (pipeline.source.last_error or "no reason given").rstrip(".")
            raise ToolkitError(f"The source {pipeline.source.name} failed: {reason}.")
        return EXIT_FAILED

    # Signals

    def _install_signal_handlers(self, resources: ExitStack) -> None:
        """Handle SIGTERM and SIGINT for this run; the previous handlers come back after it."""
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; the caller stops us instead
        for signum in (signal.SIGTERM, signal.SIGINT):
            resources.callback(signal.signal, signum, signal.signal(signum, self._on_signal))

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self._first_signal_at is not None and now - self._first_signal_at < _SAME_STOP_WINDOW:
            log.debug("%s again at once (sent to the process group too); already stopping", name)
            return
        if self._stop_requested.is_set():
            # A second signal means the user will not wait for a clean shutdown.
            log.warning("Second %s: exiting without finishing the shutdown", name)
            raise SystemExit(EXIT_FAILED)
        self._first_signal_at = now
        self.stop(f"received {name}")
        if self.pipeline is None:
            # Still setting up (loading the model, opening the camera): stop right there.
            raise KeyboardInterrupt


def http_chosen(config: DaemonConfig) -> bool:
    """Whether the HTTP settings were given (file or flags) rather than left to the default."""
    return "outputs" in config.model_fields_set and "http" in config.outputs.model_fields_set


def describe_outcome(pipeline: Pipeline) -> str:
    return {
        "ended": "the source ended",
        "max_frames": f"reached --max-frames {pipeline.max_frames}",
        "stopped": "stopped on request",
        "source_failed": "the source failed",
        "error": f"a stage failed: {pipeline.error}",
    }.get(pipeline.outcome, pipeline.outcome or "not started")


def newest_frame(config: DaemonConfig) -> bool:
    """Whether to skip to the newest frame: live sources yes, files and folders no."""
    policy = config.pipeline.frame_policy
    if policy != "auto":
        return policy == "newest"
    source = config.source
    if isinstance(source, VideoFileConfig):
        return source.realtime
    if isinstance(source, ImageFolderConfig):
        return source.fps > 0
    return True


def postprocess_config(config: DaemonConfig, names: list[str]) -> PostprocessConfig:
    """Detection settings with class names resolved against the model's names."""
    detect = config.detect
    classes = None
    if detect.classes is not None:
        classes = frozenset(resolve_class(c, names, "detect.classes") for c in detect.classes)
    thresholds = {
        resolve_class(c, names, "detect.class_conf"): v for c, v in detect.class_conf.items()
    }
    return PostprocessConfig(
        conf_threshold=detect.conf,
        iou_threshold=detect.iou,
        max_detections=detect.max_detections,
        class_agnostic=detect.class_agnostic,
        class_thresholds=thresholds,
        classes=classes,
        multi_label=detect.multi_label,
    )


def resolve_class(ref: str, names: list[str], key: str) -> int:
    """A class name or id (as text) to the model's class id."""
    if ref in names:
        return names.index(ref)
    if ref.isdigit() and int(ref) < len(names):
        return int(ref)
    close = difflib.get_close_matches(ref, names, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    raise ConfigError(
        f"{key}: '{ref}' is not a class of this model, which has {len(names)} classes "
        f"(ids 0..{len(names) - 1}: {shown}).{hint} Use one of those names or ids."
    )


def build_sinks(config: DaemonConfig, stats: RuntimeStats, health: Health) -> list[Sink]:
    """The enabled outputs, not yet started.  Each output's module is imported only when it is
    enabled, so a board without an output's library can still run the others."""
    outputs = config.outputs
    sinks: list[Sink] = []
    if outputs.jsonl.enabled:
        from device.publish.jsonl import JsonlSink

        sinks.append(JsonlSink(outputs.jsonl, stats))
    if outputs.mqtt.enabled:
        from device.publish.mqtt import MqttSink

        sinks.append(MqttSink(outputs.mqtt, stats, health=health.status))
    if outputs.http.enabled:
        from device.publish.http import HttpSink

        sinks.append(HttpSink(outputs.http, stats, health=health.status))
    if outputs.snapshots.enabled:
        from device.publish.snapshots import SnapshotSink

        sinks.append(SnapshotSink(outputs.snapshots, stats))
    return sinks
