"""A running service follows the registry: it notices that an alias (`champion`) moved, loads that version and
the feature build it was trained with in the background, and swaps them in at once; a version that fails to load
leaves the one serving in place and says why (log and /readyz). Rolling back is moving the alias back.

`/reload` reaches every worker of a service: the worker that answers checks at once and touches a marker file in
the model cache that all of them share; each follower watches that marker every `RELOAD_WATCH_S` and checks when it
changes. Replicas with a cache of their own follow within their poll interval."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from m2rec.data.errors import DataError
from m2rec.events.log import EventLog, EventParams
from m2rec.serving.core import Ranker
from m2rec.serving.state_store import StatePrecision

log = logging.getLogger(__name__)
FEATURE_BUILD_TAG = "feature_build"  # on a registered version: the key of the feature build it was trained with
RELOAD_MARKER = "reload-requested"  # in the model cache: touched by /reload, watched by every worker's follower
RELOAD_WATCH_S = 1.0


@dataclass
class ServingParams:
    """How a running service finds its models and features (params.yaml section `serving`; each value can be
    overridden by an environment variable, named in `ServiceSources.resolve`)."""

    follow_alias: str = "champion"  # the alias to follow; "" serves the packaged version only
    poll_interval_s: float = 30.0  # how often the registry is asked where the alias points
    model_cache: str | None = None  # where downloaded versions go; None: BENTOML_HOME/m2rec-versions
    recurrent: bool = True  # rank users from recurrent states advanced by each event (M2Rec, Mamba4Rec); off: re-encode
    state_precision: StatePrecision = "float32"  # stored states; float16 halves them, not exact


@dataclass
class ServiceSources:
    """Everything a service reads, resolved from the environment over what `m2rec package` recorded."""

    tracking_uri: str | None
    model_name: str
    feature_root: str | None
    feature_build: str | None
    feature_repo: str | None  # an explicit repository for the packaged version (M2REC_FEATURE_REPO)
    events_url: str | None
    follow_alias: str
    poll_interval_s: float
    model_cache: Path
    event_params: EventParams
    recurrent: bool = True
    state_precision: str = "float32"

    @classmethod
    def resolve(cls, metadata: Mapping, environ: Mapping[str, str], bentoml_home: Path) -> ServiceSources:
        def pick(variable: str, key: str, default=None):
            value = environ.get(variable)
            return value if value not in (None, "") else metadata.get(key, default)

        serving = metadata.get("serving") or {}
        events = metadata.get("events") or {}
        return cls(
            tracking_uri=environ.get("M2REC_TRACKING_URI") or environ.get("MLFLOW_TRACKING_URI")
            or metadata.get("tracking_uri"),
            model_name=str(metadata.get("model_name", "m2rec")),
            feature_root=pick("M2REC_FEATURE_ROOT", "feature_root"),
            feature_build=metadata.get("feature_build"),
            feature_repo=pick("M2REC_FEATURE_REPO", "feature_repo"),
            events_url=pick("M2REC_EVENTS_URL", "events_url"),
            follow_alias=str(environ.get("M2REC_FOLLOW_ALIAS", serving.get("follow_alias", "champion"))),
            poll_interval_s=float(environ.get("M2REC_POLL_SECONDS", serving.get("poll_interval_s", 30.0))),
            model_cache=Path(environ.get("M2REC_MODEL_CACHE") or serving.get("model_cache")
                             or bentoml_home / "m2rec-versions"),
            event_params=EventParams(**{k: v for k, v in events.items() if k != "url"}),
            recurrent=environ.get("M2REC_RECURRENT", str(serving.get("recurrent", True))).lower() in ("1", "true"),
            state_precision=str(environ.get("M2REC_STATE_PRECISION") or serving.get("state_precision", "float32")),
        )

    def repo_for(self, build_key: str | None) -> Path | None:
        """The feature repository of `build_key` under the feature root (None where either is unknown)."""
        from m2rec.features.store import build_dir

        if not build_key or not self.feature_root:
            return None
        return build_dir(self.feature_root, build_key)


def fetch_version(client, name: str, version: str, cache: Path) -> tuple[Path, str | None]:
    """The model folder of `name` v`version` (downloaded once into `cache`) and its feature build key."""
    from m2rec.registry.versions import download_model_folder

    registered = client.get_model_version(name, version)
    folder = cache / f"{name}-v{version}"
    if not folder.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as scratch:
            downloaded = download_model_folder(name, version, scratch, client.tracking_uri)
            try:
                downloaded.rename(folder)  # atomic: a folder in the cache is always complete
            except OSError:  # another worker was faster
                if not folder.is_dir():
                    raise
    return folder, (registered.tags or {}).get(FEATURE_BUILD_TAG)


class ChampionFollower:
    """Holds the Ranker that serves (`current`) and replaces it when the followed alias moves."""

    def __init__(self, initial: Ranker, registry_version: str | None, sources: ServiceSources,
                 events: EventLog | None):
        self.current, self.registry_version = initial, registry_version
        self.sources, self.events = sources, events
        self.last_check: float | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()  # one check at a time (poll thread and /reload)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._marker = sources.model_cache / RELOAD_MARKER
        self._marker_seen = self._marker_time()  # a request made before this follower started is not replayed

    @property
    def follows(self) -> bool:
        return bool(self.sources.follow_alias and self.sources.tracking_uri)

    def start(self) -> None:
        """Poll in a daemon thread every poll_interval_s, and whenever another worker asks for a reload (when there
        is an alias and a registry to follow)."""
        if not self.follows or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._poll, name="m2rec-follower", daemon=True)
        self._thread.start()
        log.info("following %s@%s at %s every %.0f s", self.sources.model_name, self.sources.follow_alias,
                 self.sources.tracking_uri, self.sources.poll_interval_s)

    def stop(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(min(RELOAD_WATCH_S, self.sources.poll_interval_s)):
            marker = self._marker_time()
            if marker != self._marker_seen or time.monotonic() - last >= self.sources.poll_interval_s:
                self._marker_seen, last = marker, time.monotonic()
                self.check()

    def _marker_time(self) -> int | None:
        try:
            return self._marker.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def request_reload(self) -> dict:
        """Check now (see `check`) and have every other worker sharing the model cache check within
        RELOAD_WATCH_S: what `/reload` does."""
        self._marker.parent.mkdir(parents=True, exist_ok=True)
        self._marker.write_text(f"{time.time_ns()}\n")  # a new mtime even within one clock tick of the last
        self._marker_seen = self._marker_time()
        return self.check()

    def check(self) -> dict:
        """Ask the registry where the alias points; load and swap in that version if it is not the one serving.
        Never raises: a failure is logged, kept in `status()` and leaves the current version serving."""
        with self._lock:
            try:
                self._follow()
                self.last_error = None
            except Exception as err:  # whatever broke, the version serving stays
                self.last_error = f"{type(err).__name__}: {err}"
                log.error("could not move to %s@%s; %s keeps serving: %s", self.sources.model_name,
                          self.sources.follow_alias, self.current.model_version, self.last_error)
            self.last_check = time.time()
            return self.status()

    def _follow(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.sources.tracking_uri)
        target = str(client.get_model_version_by_alias(self.sources.model_name, self.sources.follow_alias).version)
        if target == self.registry_version:
            return
        started = time.perf_counter()
        log.info("%s@%s moved to v%s (serving %s): loading it", self.sources.model_name, self.sources.follow_alias,
                 target, self.current.model_version)
        folder, build = fetch_version(client, self.sources.model_name, target, self.sources.model_cache)
        if build is None:
            raise DataError(f"{self.sources.model_name} v{target} names no feature build (tag {FEATURE_BUILD_TAG})",
                            "register versions with the pipeline or `m2rec register --feature-build KEY`")
        ranker = Ranker(folder, self.sources.repo_for(build), f"{self.sources.model_name} v{target}", self.events,
                        self.sources.event_params, self.sources.recurrent, self.sources.state_precision)
        if ranker.sequences is None:
            raise DataError(f"v{target}'s user features are unavailable: {ranker.features_problem}",
                            "build its features under the feature root the service reads (M2REC_FEATURE_ROOT)")
        previous, self.current, self.registry_version = self.current, ranker, target  # the swap: one reference
        if ranker.states is not None:  # states of versions before the previous one are only rebuilt if ever read
            dropped = ranker.states.store.retain([ranker.states.scope, *([previous.states.scope]
                                                                       if previous.states is not None else [])])
            log.info("dropped %d recurrent states of retired versions", dropped)
        carried = ranker.sequences.catch_up()  # events the new build did not see, into its online rows
        log.info("now serving %s (loaded in %.1f s; %d users' events carried over)", ranker.model_version,
                 time.perf_counter() - started, carried)

    def status(self) -> dict:
        """What /readyz tells: the version serving and the follower's last check and error."""
        return {"ready": True, "model_version": self.current.model_version,
                "registry_version": self.registry_version,
                "follows": f"{self.sources.model_name}@{self.sources.follow_alias}" if self.follows else None,
                "user_features": self.current.features_problem or "available",
                "last_check": self.last_check, "last_error": self.last_error}
