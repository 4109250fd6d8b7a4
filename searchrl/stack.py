"""``searchrl up | down | status``: the whole stack on one machine as supervised local processes.

``up`` starts a private Redis (the ``redis-server`` binary), then the reward, retriever, simulator and policy services
on loopback, waits for every health check, prints the endpoints, restarts a crashed child with exponential backoff
(and says so), and on Ctrl-C / SIGTERM stops everything: services first (SIGTERM -> graceful drain), Redis last.
MLflow uses a local SQLite tracking store in the state folder (``sqlite:///<state>/mlflow.db``), which any
``mlflow ui --backend-store-uri`` can open.

The state folder (default ``.searchrl/stack``) holds ``stack.json`` (endpoints and pids) and one log per child.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from searchrl.serving.config import DEFAULT_PORTS
from searchrl.serving.process import (
    free_port,
    poll_until,
    redis_command,
    serve_command,
    stop_process_group,
    wait_for_health,
    wait_for_redis,
)

log = logging.getLogger("searchrl.stack")

SERVICE_ORDER = ("reward", "retriever", "simulator", "policy")


@dataclass
class ChildSpec:
    """One supervised process: its command, where it logs, and the gRPC target to health-check (empty: none)."""

    name: str
    cmd: list[str]
    target: str = ""
    metrics_port: int = -1
    health_timeout_s: float = 300.0
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class StackConfig:
    """What ``searchrl up`` starts.

    Attributes:
        state_dir: folder for stack.json, logs, Redis and the MLflow store.
        services: which services to start (subset of reward, retriever, simulator, policy).
        index_dir: retriever index folder (built with ``searchrl index build``; required for the retriever).
        policy_model: policy model name/path (default: the embedded SmolLM2-135M-Instruct).
        simulator_model: simulation LLM name/path (default: the same embedded model).
        redis: start a private redis-server (True) or use ``redis_url`` as given (False).
        redis_url: Redis URL when ``redis`` is False.
        fixed_ports: use the services' default ports (``DEFAULT_PORTS``: reward 50051, ...) instead of free ones.
        threads_per_service: torch/OpenMP threads of each model-serving child (1 suits a laptop running everything).
        rollout_workers: ``searchrl rollout-worker`` processes to start (for a trainer in ``rollout.mode=async``).
        worker_config: the training YAML the workers read (``rollout``, ``reward``); the stack points it at its own
            PolicyService, search services and Redis.
        weights_roots: directories the PolicyService's ``LoadWeights`` may load checkpoints from (the trainers'
            output folders); empty: the working directory.
    """

    state_dir: str = ".searchrl/stack"
    services: tuple[str, ...] = SERVICE_ORDER
    index_dir: str = ""
    policy_model: str = "smollm2-135m-instruct"
    simulator_model: str = "smollm2-135m-instruct"
    redis: bool = True
    redis_url: str = ""
    fixed_ports: bool = False
    threads_per_service: int = 1
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    rollout_workers: int = 0
    worker_config: str = ""
    weights_roots: tuple[str, ...] = ()


class Supervisor:
    """Starts children, waits for their health, restarts crashed ones with backoff, stops them in reverse order."""

    def __init__(self, state_dir: Path, max_backoff_s: float = 30.0) -> None:
        self.state_dir = state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.max_backoff_s = max_backoff_s
        self.specs: list[ChildSpec] = []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts: dict[str, int] = {}
        self.endpoints: dict[str, str] = {}
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._lock = threading.Lock()

    def log_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.log"

    def _spawn(self, spec: ChildSpec) -> subprocess.Popen[bytes]:
        logf = open(self.log_path(spec.name), "ab")  # noqa: SIM115 - owned by the child
        return subprocess.Popen(
            spec.cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env={**os.environ, **spec.env},
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )

    def start(self, spec: ChildSpec, on_progress: object = None) -> None:
        """Starts ``spec`` and blocks until it is healthy.

        Raises:
            RuntimeError: the child exited or did not become healthy; the message ends with its log tail.
        """
        proc = self._spawn(spec)
        with self._lock:
            self.specs.append(spec)
            self.procs[spec.name] = proc
            self.restarts[spec.name] = 0
        try:
            if spec.target:
                wait_for_health(spec.target, timeout_s=spec.health_timeout_s, proc=proc)
                self.endpoints[spec.name] = spec.target
        except Exception as exc:
            tail = self.log_path(spec.name).read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"{spec.name} failed to start: {exc}\n--- {self.log_path(spec.name)} (tail) ---\n{tail}"
            ) from exc
        self.write_state()

    def stop_child(self, name: str, grace_s: float = 15.0) -> None:
        """Stops one child for good (it is not restarted)."""
        with self._lock:
            self.specs = [sp for sp in self.specs if sp.name != name]
            proc = self.procs.pop(name, None)
        if proc is not None:
            stop_process_group(proc, grace_s)
        self.write_state()

    def watch(self) -> None:
        """Starts the monitor thread that restarts crashed children with exponential backoff."""
        self._monitor = threading.Thread(target=self._watch, name="searchrl-supervisor", daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        next_try: dict[str, float] = {}
        while not self._stop.wait(0.5):
            for spec in list(self.specs):
                proc = self.procs.get(spec.name)
                if proc is None or proc.poll() is None:  # stopped for good (stop_child), or running
                    continue
                now = time.monotonic()
                if spec.name not in next_try:
                    n = self.restarts[spec.name]
                    delay = min(self.max_backoff_s, 2.0**n)
                    next_try[spec.name] = now + delay
                    msg = (
                        f"{spec.name} exited with code {proc.returncode}; restarting in {delay:.0f}s (restart #{n + 1})"
                    )
                    log.warning(msg)
                    print(f"[searchrl up] {msg}", flush=True)
                elif now >= next_try[spec.name] and not self._stop.is_set():
                    del next_try[spec.name]
                    with self._lock:
                        self.restarts[spec.name] += 1
                        self.procs[spec.name] = self._spawn(spec)
                    self.write_state()

    def stop(self, grace_s: float = 15.0) -> None:
        """Stops every child in reverse start order: SIGTERM, then SIGKILL after ``grace_s``."""
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(5)
        for spec in reversed(self.specs):
            proc = self.procs.get(spec.name)
            if proc is not None:
                stop_process_group(proc, grace_s)
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "stack.json").unlink()

    def write_state(self, extra: dict[str, object] | None = None) -> None:
        state = {
            "supervisor_pid": os.getpid(),
            "endpoints": self.endpoints,
            "pids": {n: p.pid for n, p in self.procs.items()},
            "restarts": self.restarts,
            "children": [asdict(s) for s in self.specs],
            **(extra or {}),
        }
        tmp = self.state_dir / "stack.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_dir / "stack.json")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the supervisor dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``),
    so a killed ``searchrl up`` or demo leaves no orphaned servers holding ports and memory."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _ports(cfg: StackConfig, name: str) -> tuple[int, int]:
    return DEFAULT_PORTS[name] if cfg.fixed_ports else (free_port(), free_port())


def start_stack(cfg: StackConfig, progress: object = None) -> tuple[Supervisor, dict[str, str]]:
    """Starts Redis and the configured services; returns the supervisor and the endpoints.

    Endpoints: ``redis`` (URL), ``mlflow`` (tracking URI), and one ``host:port`` per gRPC service (plus
    ``retriever_http``).

    Raises:
        FileNotFoundError: redis-server is missing (the message says how to install it).
        RuntimeError: a service did not become healthy (with its log tail).
        TimeoutError: the private Redis did not answer within 20 s.
    """
    state = Path(cfg.state_dir).resolve()
    sup = Supervisor(state)
    endpoints: dict[str, str] = {}
    say = progress if callable(progress) else (lambda msg: print(f"[searchrl up] {msg}", flush=True))
    try:
        if cfg.redis:
            rport = 6390 if cfg.fixed_ports else free_port()
            (state / "redis").mkdir(exist_ok=True)
            # AOF, fsync every second: tasks and rollout groups survive a restart of the stack's Redis
            sup.start(ChildSpec("redis", redis_command(rport, state / "redis", appendfsync="everysec")))
            endpoints["redis"] = f"redis://127.0.0.1:{rport}/0"
            wait_for_redis(endpoints["redis"], proc=sup.procs["redis"])
        elif cfg.redis_url:
            endpoints["redis"] = cfg.redis_url
        endpoints["mlflow"] = f"sqlite:///{state / 'mlflow.db'}"
        redis_args = ["--redis-url", endpoints["redis"]] if "redis" in endpoints else []
        for name in SERVICE_ORDER:
            if name not in cfg.services:
                continue
            gport, mport = _ports(cfg, name)
            args: list[str] = []
            if name == "retriever":
                if not cfg.index_dir:
                    raise ValueError("the retriever needs an index: searchrl index build ... then --index-dir")
                hport = 8000 if cfg.fixed_ports else free_port()
                args += ["--index-dir", cfg.index_dir, "--http-port", str(hport), *redis_args]
                endpoints["retriever_http"] = f"http://127.0.0.1:{hport}"
            elif name == "simulator":
                args += ["--engine", "transformers", "--model", cfg.simulator_model, *redis_args]
            elif name == "policy":
                roots = [str(Path(r).resolve()) for r in cfg.weights_roots] or [str(Path.cwd())]
                args += ["--model", cfg.policy_model, "--weights-roots", ",".join(roots), *redis_args]
                if "retriever" in endpoints:
                    args += ["--retriever-target", endpoints["retriever"]]
                if "simulator" in endpoints:
                    args += ["--simulator-target", endpoints["simulator"]]
            if name in ("policy", "simulator", "retriever"):
                args += ["--torch-threads", str(cfg.threads_per_service)]
            args = serve_command(name, gport, mport, [*args, *cfg.extra_args.get(name, [])])
            say(f"starting {name} on 127.0.0.1:{gport} ...")
            t0 = time.monotonic()
            # One machine, several model servers: a few OpenMP threads each (spinning OpenMP teams on oversubscribed
            # cores made decode steps 4-10x slower in benchmarks/rollout_bench.py and simulator_bench.py).
            threads = str(cfg.threads_per_service)
            env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
            sup.start(ChildSpec(name, args, target=f"127.0.0.1:{gport}", metrics_port=mport, env=env))
            endpoints[name] = f"127.0.0.1:{gport}"
            endpoints[f"{name}_metrics"] = f"http://127.0.0.1:{mport}/metrics"
            say(f"{name} healthy in {time.monotonic() - t0:.1f}s")
        if cfg.rollout_workers:
            start_rollout_workers(sup, endpoints, cfg.rollout_workers, cfg.worker_config, cfg.threads_per_service)
            say(f"{cfg.rollout_workers} rollout worker(s) started (tasks from {endpoints['redis']})")
        sup.write_state({"endpoints_all": endpoints})
        sup.watch()
    except BaseException:
        sup.stop()
        raise
    return sup, endpoints


def start_rollout_workers(
    sup: Supervisor,
    endpoints: dict[str, str],
    n: int,
    config: str = "",
    threads: int = 1,
    extra: Sequence[str] = (),
) -> list[str]:
    """Starts ``n`` supervised ``searchrl rollout-worker`` processes reading ``config`` (plus
    :func:`worker_overrides` and ``extra``); returns their names. Adds each one's metrics URL to ``endpoints``.

    Raises:
        ValueError: the stack has no policy service or no Redis.
    """
    if "policy" not in endpoints or "redis" not in endpoints:
        raise ValueError("rollout workers need the policy service and Redis")
    names = []
    for i in range(n):
        name, mport = f"rollout-worker-{i}", free_port()
        cmd = [sys.executable, "-m", "searchrl", "rollout-worker", "--name", name, "--metrics-port", str(mport),
               *(["--config", config] if config else []), *worker_overrides(endpoints), *extra]  # fmt: skip
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        sup.start(ChildSpec(name, cmd, metrics_port=mport, env=env))
        endpoints[f"{name}_metrics"] = f"http://127.0.0.1:{mport}/metrics"
        names.append(name)
    return names


def worker_overrides(endpoints: dict[str, str]) -> list[str]:
    """Config overrides that point a rollout worker (and an async trainer) at this stack's services."""
    out = ["rollout.mode=async", "rollout.engine=remote", f"rollout.policy_target={endpoints['policy']}",
           f"rollout.queue.redis_url={endpoints['redis']}"]  # fmt: skip
    if "retriever" in endpoints:
        out.append(f"rollout.search.retriever_target={endpoints['retriever']}")
    if "simulator" in endpoints:
        out.append(f"rollout.search.simulator_target={endpoints['simulator']}")
    return out


def _print_endpoints(endpoints: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="searchrl stack")
    table.add_column("component")
    table.add_column("endpoint")
    for k, v in endpoints.items():
        table.add_row(k, v)
    Console().print(table)


def up_main(argv: Sequence[str] | None = None) -> int:
    """``searchrl up``: start the stack in the foreground until Ctrl-C / SIGTERM."""
    p = argparse.ArgumentParser(
        prog="searchrl up", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--state-dir", default=StackConfig.state_dir)
    p.add_argument(
        "--services", default=",".join(SERVICE_ORDER), help="comma-separated subset of " + ",".join(SERVICE_ORDER)
    )
    p.add_argument("--index-dir", default="", help="retriever index (default: build/reuse the wiki MiniLM flat index)")
    p.add_argument("--policy-model", default=StackConfig.policy_model)
    p.add_argument("--simulator-model", default=StackConfig.simulator_model)
    p.add_argument("--redis-url", default="", help="use this Redis instead of starting a private redis-server")
    p.add_argument(
        "--fixed-ports", action="store_true", help="use the default ports (reward 50051, retriever 50052, ...)"
    )
    p.add_argument("--rollout-workers", type=int, default=0, help="start N rollout workers (rollout.mode=async)")
    p.add_argument("--worker-config", default="", help="training YAML the rollout workers read")
    p.add_argument(
        "--weights-root",
        action="append",
        default=[],
        help="a folder the policy's LoadWeights may load from (repeatable; default: the working directory)",
    )
    a = p.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    services = tuple(s for s in a.services.split(",") if s)
    unknown = set(services) - set(SERVICE_ORDER)
    if unknown:
        p.error(f"unknown services: {sorted(unknown)}")
    index_dir = a.index_dir
    if "retriever" in services and not index_dir:
        from searchrl.retriever.index.wiki import ensure_wiki_index

        index_dir = str(ensure_wiki_index("flat"))
    cfg = StackConfig(
        state_dir=a.state_dir,
        services=services,
        index_dir=index_dir,
        policy_model=a.policy_model,
        simulator_model=a.simulator_model,
        redis=not a.redis_url,
        redis_url=a.redis_url,
        fixed_ports=a.fixed_ports,
        rollout_workers=a.rollout_workers,
        worker_config=a.worker_config,
        weights_roots=tuple(a.weights_root),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        sup, endpoints = start_stack(cfg)
    except (FileNotFoundError, ValueError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_endpoints(endpoints)
    if cfg.rollout_workers:
        print("[searchrl up] train with: searchrl train --config FILE " + " ".join(worker_overrides(endpoints)))
    print("[searchrl up] all services healthy; Ctrl-C stops the stack", flush=True)
    stop.wait()
    print("[searchrl up] stopping ...", flush=True)
    sup.stop()
    return 0


def _load_state(state_dir: str) -> dict[str, object] | None:
    path = Path(state_dir) / "stack.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def down_main(argv: Sequence[str] | None = None) -> int:
    """``searchrl down``: SIGTERM the supervisor of a running ``searchrl up`` and wait for it to exit."""
    p = argparse.ArgumentParser(prog="searchrl down")
    p.add_argument("--state-dir", default=StackConfig.state_dir)
    p.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args(argv)
    state = _load_state(a.state_dir)
    if state is None:
        print("no stack running (no stack.json in state dir)")
        return 0
    pid = int(state["supervisor_pid"])  # type: ignore[call-overload]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print("supervisor already gone; removing stale state")
        (Path(a.state_dir) / "stack.json").unlink(missing_ok=True)
        return 0

    def stopped() -> bool:
        # the supervisor removes stack.json once every child is stopped (it may linger as a zombie of its parent)
        if not (Path(a.state_dir) / "stack.json").exists():
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        poll_until(stopped, a.timeout, f"supervisor {pid} stopped")
    except TimeoutError:
        print(f"supervisor {pid} still running after {a.timeout:.0f}s", file=sys.stderr)
        return 1
    print("stack stopped")
    return 0


def status_main(argv: Sequence[str] | None = None) -> int:
    """``searchrl status``: health of every service of a running stack; exit 1 when any is not SERVING."""
    p = argparse.ArgumentParser(prog="searchrl status")
    p.add_argument("--state-dir", default=StackConfig.state_dir)
    a = p.parse_args(argv)
    state = _load_state(a.state_dir)
    if state is None:
        print("no stack running")
        return 1
    ok = True
    endpoints = state.get("endpoints", {})
    assert isinstance(endpoints, dict)
    for name, target in endpoints.items():
        try:
            wait_for_health(str(target), timeout_s=3)
            status = "SERVING"
        except (TimeoutError, RuntimeError):
            status, ok = "DOWN", False
        print(f"{name:<10} {target:<22} {status}  restarts={state.get('restarts', {}).get(name, 0)}")  # type: ignore[union-attr]
    return 0 if ok else 1
