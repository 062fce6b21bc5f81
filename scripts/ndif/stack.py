"""Start and stop a local NDIF stack on 127.0.0.1 (development and the ``remote`` tests).

    python scripts/ndif/stack.py start [--state DIR]    # prints the state file
    python scripts/ndif/stack.py stop  [--state DIR]
    python scripts/ndif/stack.py status [--state DIR]
    python scripts/ndif/stack.py env   [--state DIR]    # NDIF_HOST=... NDIF_API_KEY=...
    python scripts/ndif/stack.py stop-service|restart [api] [--state DIR]   # fault drills

``start.sh`` / ``stop.sh`` wrap this with the interpreter of the stack's virtual
environment (``install.sh`` makes it). The stack:

* redis-server: the request queue and status pub/sub (no persistence);
* moto_server: an S3-compatible object store for result blobs and job statuses;
* PostgreSQL: the API-key table NDIF's API checks keys against (one key is made);
* a Ray head with one *logical* GPU and a ``cuda_memory_bytes`` resource, so NDIF's
  scheduler places models on it; models run on the CPU (``ndif_cpu_actor``);
* NDIF's controller (a detached Ray actor) and its API (gunicorn + uvicorn).

Every server listens on 127.0.0.1 only, on free ports picked at start. Each one is
started in a session of its own; its process id (the id of that session's process
group) goes to ``DIR/state.json`` with the ports, and ``stop`` ends each group by
that id: nothing is stopped by name. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_STATE = Path(os.environ.get("NDIF_STATE_DIR", ROOT / ".ndif-state"))
VENV = Path(os.environ.get("NDIF_VENV", ROOT / ".ndif-venv"))
HOST = "127.0.0.1"
# what start.sh reports when it has to wait for a service
READY_TIMEOUT = float(os.environ.get("NDIF_START_TIMEOUT", "240"))
ORDER = ("redis", "objectstore", "postgres", "ray", "api")  # start order; stop reverses


def log(message: str) -> None:
    print(f"[ndif-stack] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_block(size: int) -> tuple[int, int]:
    """A run of ``size`` ports that are free now (Ray's worker port range)."""
    for _ in range(50):
        start = random.randrange(20000, 40000 - size)
        ok = True
        for port in range(start, start + size):
            with socket.socket() as s:
                try:
                    s.bind((HOST, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return start, start + size - 1
    raise RuntimeError("no free block of ports for Ray workers")


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(1.0)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout:.0f}s")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Stack:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir.resolve()
        self.file = self.dir / "state.json"
        self.logs = self.dir / "logs"

    # -- state ----------------------------------------------------------------------

    def load(self) -> dict:
        try:
            return json.loads(self.file.read_text())
        except FileNotFoundError:
            return {}

    def save(self, state: dict) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.file)

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str], state: dict
    ) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                argv,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
                start_new_session=True,  # its own process group: stopped by that id
            )
        finally:
            out.close()
        state.setdefault("pids", {})[name] = proc.pid
        self.save(state)
        return proc

    # -- services -------------------------------------------------------------------

    def env(self, state: dict) -> dict[str, str]:
        ports = state["ports"]
        bin_dir = str(VENV / "bin")
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("NDIF_", "RAY_", "PYTHON", "VIRTUAL_ENV"))
        }
        env.update(
            {
                "PATH": f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}",
                "VIRTUAL_ENV": str(VENV),
                # the CPU actor module; never this repository's root
                "PYTHONPATH": str(HERE),
                "PYTHONUNBUFFERED": "1",
                "NDIF_REDIS_URL": f"redis://{HOST}:{ports['redis']}",
                "NDIF_OBJECT_STORE_URL": f"http://{HOST}:{ports['objectstore']}",
                "NDIF_OBJECT_STORE_ACCESS_KEY": "ndif-local",
                "NDIF_OBJECT_STORE_SECRET_KEY": "ndif-local-secret",
                "NDIF_OBJECT_STORE_REGION": "us-east-1",
                "NDIF_POSTGRES_URL": (f"postgresql://ndif@{HOST}:{ports['postgres']}/ndif"),
                "NDIF_RAY_ADDRESS": f"ray://{HOST}:{ports['ray_client']}",
                "NDIF_API_PORT": str(ports["api"]),
                "NDIF_API_URL": f"http://{HOST}:{ports['api']}",
                "NDIF_DEFAULT_DTYPE": "float32",
                "NDIF_DEFAULT_MODEL_ACTOR_CLASS": "ndif_cpu_actor.CPUModelActor",
                "NDIF_MINIMUM_DEPLOYMENT_TIME_SECONDS": "0",
                "NDIF_INFLUX_ENABLED": "false",
                "NDIF_ENVIRONMENT": "local",
                "NDIF_SERVICE": "ndif-local",
                # Ray: keep 127.0.0.1 (it would swap in the machine's address), no
                # usage reporting, and no gRPC fork support (see NDIF's ray/start.sh)
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
                "GRPC_ENABLE_FORK_SUPPORT": "0",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
            }
        )
        return env

    def start_redis(self, state: dict, env: dict[str, str]) -> None:
        port = state["ports"]["redis"]
        argv = [
            "redis-server", "--bind", HOST, "--port", str(port), "--save", "",
            "--appendonly", "no", "--protected-mode", "yes", "--daemonize", "no",
            "--dir", str(self.dir),
        ]  # fmt: skip
        wait_port(port, 30, self.spawn("redis", argv, env, state))

    def start_objectstore(self, state: dict, env: dict[str, str]) -> None:
        port = state["ports"]["objectstore"]
        argv = [str(VENV / "bin" / "moto_server"), "-H", HOST, "-p", str(port)]
        wait_port(port, 60, self.spawn("objectstore", argv, env, state))

    def start_postgres(self, state: dict, env: dict[str, str]) -> None:
        port = state["ports"]["postgres"]
        bin_dir = pg_bin()
        run_as: list[str] = []
        data = self.dir / "pg"
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: its own user runs it, in a directory of
            # its own (the state directory may be one it cannot enter)
            run_as = ["runuser", "-u", "postgres", "--"]
            data = Path(f"/tmp/ndif-pg-{port}")
        state["pg_dir"] = str(data)
        shutil.rmtree(data, ignore_errors=True)  # a fresh key table at every start
        data.mkdir(parents=True)
        if run_as:
            shutil.chown(data, "postgres", "postgres")
        subprocess.run(
            [*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", "ndif",
             "--auth=trust", "-E", "UTF8", "--no-instructions"],
            check=True, stdout=subprocess.DEVNULL, timeout=120,
        )  # fmt: skip
        argv = [
            *run_as, str(bin_dir / "postgres"), "-D", str(data), "-h", HOST,
            "-p", str(port), "-k", str(data), "-c", "fsync=off",
            "-c", "full_page_writes=off", "-c", "synchronous_commit=off",
        ]  # fmt: skip
        wait_port(port, 60, self.spawn("postgres", argv, env, state))
        sql = SCHEMA.format(key=state["api_key"])
        psql = bin_dir / "psql"
        for _ in range(50):  # the port opens a moment before connections are accepted
            done = subprocess.run(
                [str(psql), "-h", HOST, "-p", str(port), "-U", "ndif", "-d", "postgres",
                 "-v", "ON_ERROR_STOP=1", "-q", "-c", "SELECT 1"],
                capture_output=True, timeout=30,
            )  # fmt: skip
            if done.returncode == 0:
                break
            time.sleep(0.2)
        subprocess.run(
            [str(psql), "-h", HOST, "-p", str(port), "-U", "ndif", "-d", "postgres",
             "-q", "-c", "CREATE DATABASE ndif"],
            capture_output=True, timeout=30,
        )  # fmt: skip
        subprocess.run(
            [str(psql), "-h", HOST, "-p", str(port), "-U", "ndif", "-d", "ndif",
             "-v", "ON_ERROR_STOP=1", "-q", "-c", sql],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip

    def start_ray(self, state: dict, env: dict[str, str]) -> None:
        ports = state["ports"]
        low, high = port_block(60)
        resources = {
            "head": 10,
            "cuda_memory_bytes": 16 * 1024**3,  # one logical 16 GiB "GPU"; nothing uses it
            "cpu_memory_bytes": 8 * 1024**3,
        }
        temp = Path(os.environ.get("NDIF_RAY_TEMP_DIR", f"/tmp/ndif-ray-{ports['ray_gcs']}"))
        state["ray_temp_dir"] = str(temp)
        argv = [
            str(VENV / "bin" / "ray"), "start", "--head", "--block",
            f"--node-ip-address={HOST}", f"--port={ports['ray_gcs']}",
            "--num-cpus=16", "--num-gpus=1", f"--resources={json.dumps(resources)}",
            "--object-store-memory=200000000",
            "--include-dashboard=true", f"--dashboard-host={HOST}",
            f"--dashboard-port={ports['ray_dashboard']}",
            f"--dashboard-agent-grpc-port={ports['ray_agent_grpc']}",
            f"--dashboard-agent-listen-port={ports['ray_agent_http']}",
            f"--metrics-export-port={ports['ray_metrics']}",
            f"--runtime-env-agent-port={ports['ray_runtime_env']}",
            f"--ray-client-server-port={ports['ray_client']}",
            f"--node-manager-port={ports['ray_node_manager']}",
            f"--object-manager-port={ports['ray_object_manager']}",
            f"--min-worker-port={low}", f"--max-worker-port={high}",
            f"--temp-dir={temp}", "--disable-usage-stats",
        ]  # fmt: skip
        proc = self.spawn("ray", argv, env, state)
        wait_port(ports["ray_gcs"], READY_TIMEOUT, proc)
        wait_port(ports["ray_client"], READY_TIMEOUT, proc)
        wait_port(ports["ray_dashboard"], READY_TIMEOUT, proc)
        launcher = {**env, "RAY_ADDRESS": f"{HOST}:{ports['ray_gcs']}"}
        done = subprocess.run(
            [str(VENV / "bin" / "python"), "-m",
             "ndif.services.ray.deployments.controller.controller"],
            env=launcher, cwd=self.dir, capture_output=True, text=True, timeout=READY_TIMEOUT,
        )  # fmt: skip
        (self.logs / "controller-launch.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"the NDIF controller did not launch:\n{done.stderr[-3000:]}")

    def start_api(self, state: dict, env: dict[str, str]) -> None:
        port = state["ports"]["api"]
        argv = [
            str(VENV / "bin" / "gunicorn"), "--config", "python:ndif.services.api.gunicorn_conf",
            "--bind", f"{HOST}:{port}", "--workers", "1", "ndif.services.api.app:app",
        ]  # fmt: skip
        proc = self.spawn("api", argv, env, state)
        wait_port(port, READY_TIMEOUT, proc)
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:  # the dispatcher sets ray:connected
            if proc.poll() is not None:
                raise RuntimeError(f"the API exited with {proc.returncode}")
            try:
                status, _ = http_get(f"http://{HOST}:{port}/connected")
            except OSError:
                status = 0
            if status == 200:
                return
            time.sleep(0.5)
        raise TimeoutError("the NDIF API never reported its compute backend connected")

    # -- commands -------------------------------------------------------------------

    def start(self) -> dict:
        state = self.load()
        if state.get("pids") and any(alive(p) for p in state["pids"].values()):
            log(f"already running ({self.file}); stop it first")
            return state
        self.dir.mkdir(parents=True, exist_ok=True)
        names = (
            "redis", "objectstore", "postgres", "api", "ray_gcs", "ray_client",
            "ray_dashboard", "ray_agent_grpc", "ray_agent_http", "ray_metrics",
            "ray_runtime_env", "ray_node_manager", "ray_object_manager",
        )  # fmt: skip
        ports: dict[str, int] = {}
        while len(set(ports.values())) < len(names):
            ports = {name: free_port() for name in names}
        state = {"host": HOST, "ports": ports, "pids": {}, "started": time.time()}
        state["api_key"] = str(uuid.uuid4())
        state["url"] = f"http://{HOST}:{ports['api']}"
        self.save(state)
        env = self.env(state)
        t0 = time.monotonic()
        try:
            for name in ORDER:
                getattr(self, f"start_{name}")(state, env)
                log(f"{name} up ({time.monotonic() - t0:.1f}s)")
                self.save(state)
        except BaseException:
            log(f"start failed; logs in {self.logs}")
            self.stop()
            raise
        state["ready"] = time.time()
        self.save(state)
        return state

    def restart(self, name: str) -> None:
        """Stop one service and start it again with the same ports (the ``api`` by default)."""
        state = self.load()
        pid = state.get("pids", {}).get(name)
        if pid is not None and alive(pid):
            stop_group(pid, 15.0, FIRST_SIGNAL.get(name, signal.SIGTERM))
        getattr(self, f"start_{name}")(state, self.env(state))
        self.save(state)

    def stop_one(self, name: str) -> None:
        state = self.load()
        pid = state.get("pids", {}).get(name)
        if pid is not None and alive(pid):
            stop_group(pid, 15.0, FIRST_SIGNAL.get(name, signal.SIGTERM))

    def stop(self, timeout: float = 10.0) -> None:
        state = self.load()
        pids = state.get("pids", {})
        for name in reversed(ORDER):
            pid = pids.get(name)
            if pid is None or not alive(pid):
                continue
            t0 = time.monotonic()
            stop_group(pid, GRACE.get(name, timeout), FIRST_SIGNAL.get(name, signal.SIGTERM))
            log(f"{name} stopped (pid {pid}, {time.monotonic() - t0:.1f}s)")
        state["pids"] = {}
        if state:
            self.save(state)
        for key in ("ray_temp_dir", "pg_dir"):
            temp = state.get(key)
            if temp and Path(temp).is_dir():
                shutil.rmtree(temp, ignore_errors=True)


SCHEMA = """
CREATE TABLE IF NOT EXISTS users (user_id uuid PRIMARY KEY, email text,
    verification_status text);
CREATE TABLE IF NOT EXISTS keys (key_id uuid PRIMARY KEY, user_id uuid REFERENCES users);
CREATE TABLE IF NOT EXISTS user_tags (user_tag_id serial PRIMARY KEY, name text UNIQUE);
CREATE TABLE IF NOT EXISTS key_user_tag_assignments (key_id uuid REFERENCES keys,
    user_tag_id int REFERENCES user_tags);
INSERT INTO users VALUES ('00000000-0000-4000-8000-000000000001', 'dev@localhost', 'verified')
    ON CONFLICT DO NOTHING;
INSERT INTO keys VALUES ('{key}', '00000000-0000-4000-8000-000000000001')
    ON CONFLICT DO NOTHING;
"""


def pg_bin() -> Path:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise RuntimeError("PostgreSQL is not installed; run scripts/ndif/install.sh")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# gunicorn's SIGTERM waits for its workers' graceful timeout and PostgreSQL's for its
# clients to leave; SIGINT is each one's quick stop. What is left after GRACE is killed.
FIRST_SIGNAL = {"api": signal.SIGINT, "postgres": signal.SIGINT}
GRACE = {"ray": 5.0}


def stop_group(pid: int, timeout: float, first: int = signal.SIGTERM) -> None:
    """Signal the process group ``pid`` leads (we started it), then SIGKILL it."""
    for sig, wait in ((first, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            _reap(pid)
            time.sleep(0.1)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "command", choices=("start", "stop", "status", "env", "restart", "stop-service")
    )
    parser.add_argument(
        "service", nargs="?", default="api", choices=("api", "redis", "objectstore")
    )
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE, help="state directory")
    args = parser.parse_args(argv)
    stack = Stack(args.state)
    if args.command == "start":
        stack.start()
        print(stack.file)
    elif args.command == "stop":
        stack.stop()
    elif args.command == "restart":
        stack.restart(args.service)
    elif args.command == "stop-service":
        stack.stop_one(args.service)
    elif args.command == "status":
        state = stack.load()
        pids = state.get("pids", {})
        for name in ORDER:
            pid = pids.get(name)
            print(f"{name:12} {pid or '-':>8} {'up' if pid and alive(pid) else 'down'}")
        return 0 if pids and all(alive(p) for p in pids.values()) else 1
    else:
        state = stack.load()
        if not state:
            print("no stack state; start one first", file=sys.stderr)
            return 1
        print(f"export NDIF_HOST={state['url']}")
        print(f"export NDIF_API_KEY={state['api_key']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
