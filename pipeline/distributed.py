"""Stage 1 on a Ray cluster (`refcache precompute ... --ray [ADDRESS]`): the same cache, its parts spread over
Ray actors.

The driver (this process) plans, locks, resumes and reads the input exactly as a single-process run
(pipeline/precompute.py: one reader sees every row in order, so duplicates are decided as always); `RayWriter`
takes PartWriter's place: each part not already done goes to an actor, which holds one scorer (loaded once, in
its constructor) and runs the same `build_part` (tokenize, score, write the part). The driver counts the parts'
records, then writes the shard record and merges as a single process does. So the parts, their sha256s and the
manifest are a single-process run's (identical bytes on CPUs with the hf backend).

Actors (`actor_plan`): on a cluster with GPUs, one per GPU, or per `tensor_parallel_size` GPUs (vLLM); on CPUs,
`ray_actors` of them (default 1), each reserving its share of a node's CPUs and running that many torch threads.
Each actor has at most IN_FLIGHT parts queued, so its next part is there when one ends; parts go only to actors
that have started, so an actor the cluster has no room for yet (an autoscaling cluster) joins when it starts.

Faults are Ray's to handle: an actor whose process dies (a killed worker, a lost node) is restarted by Ray
(MAX_RESTARTS) and the parts it held are run again on the new one (MAX_TASK_RETRIES). A part is written
atomically and its bytes depend only on its rows, so a part cut short is simply written again. A part still
failing after that stops the run with one line; the parts written are kept and a re-run resumes. Each actor
process logs its parts' sums to its own write log (cache.ray_written_log), so no two processes on any nodes
append to one file.

The input, the model and --out must be at the same path on every node (shared storage).
"""

import contextlib
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline import cache
from pipeline.precompute import Job, LazyScorer, Stage1Stats, advance, build_part, progress_bar
from refcache_base import UserError

MAX_RESTARTS = 3  # per actor: a process that dies is started again this many times
MAX_TASK_RETRIES = 3  # per part: run again on the restarted actor this many times
IN_FLIGHT = 2  # parts queued per actor
PING_S = 1.0  # how often the driver asks each actor whether it is alive (for the progress bar)
ALIVE_S = 5.0  # an actor that has not answered for this long is not counted as alive
ACTOR_PREFIX = "refcache-precompute-"  # actor names: ACTOR_PREFIX + run id + "-" + index


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray, which is not installed: pip install 'refcache[ray]'") from None
    return ray


class Cluster:
    """The Ray connection for one run: `with Cluster("auto" | ADDRESS) as cluster`. "auto": the Ray this process
    is already connected to, else the cluster in RAY_ADDRESS, else a new local one (shut down at the end)."""

    def __init__(self, address="auto"):
        self.ray = import_ray()
        self.address = "auto" if address in (True, None, "") else str(address)
        self.connected_here = False  # we called ray.init: ray.shutdown at the end

    def __enter__(self):
        ray = self.ray
        if self.address == "auto" and ray.is_initialized():
            return self
        target = self.address if self.address != "auto" else os.environ.get("RAY_ADDRESS") or "local"
        what = f"--ray {self.address}" if self.address != "auto" else f"--ray (RAY_ADDRESS={target})"
        if target not in ("local", "auto"):  # auto in RAY_ADDRESS: Ray's own search for a cluster on this host
            _check_reachable(what, target)
        with _keep_sigterm_handler():  # ray.init replaces it with one that exits; ours stops cleanly
            try:
                local = {"include_dashboard": False} if target == "local" else {}
                ray.init(address=target, logging_level="ERROR", **local)
            except Exception as e:  # noqa: BLE001 - one line: which address, and why
                raise UserError(f"{what}: cannot connect to a Ray cluster "
                                f"({type(e).__name__}: {_first_line(e)})") from None
        self.connected_here = True
        return self

    def __exit__(self, *exc):
        if self.connected_here:
            self.ray.shutdown()
        return False

    def gpus(self) -> float:
        return self.ray.cluster_resources().get("GPU", 0)

    def node_resources(self) -> list[dict]:
        return [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]

    def writer(self, job: Job, out: Path, progress: bool, ray_actors: int | None) -> "RayWriter":
        return RayWriter(job, out, progress, self, ray_actors)

    def resolve_backend(self, backend: str) -> str:
        """--backend auto by the cluster's GPUs, not the driver's: vllm where the cluster has GPUs, hf otherwise."""
        if backend != "auto":
            return backend
        return "vllm" if self.gpus() else "hf"


def _check_reachable(what: str, address: str, timeout: float = 5.0):
    """One line at once for an address no Ray cluster answers at (ray.init would retry for minutes)."""
    import socket

    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{what}: {address} is not HOST:PORT or ray://HOST:PORT (or auto)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"{what}: nothing answers at {address} ({e.strerror or type(e).__name__}); is the "
                        "Ray cluster up (ray start --head) and the address right?") from None


@contextlib.contextmanager
def _keep_sigterm_handler():
    """Put back the SIGTERM handler (refcache_base.preempt's) that ray.init replaces with one that exits."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and old is not None:
            signal.signal(signal.SIGTERM, old)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


@dataclass(frozen=True)
class ActorPlan:
    """How many actors and what each reserves: Ray resources (num_cpus, num_gpus) and torch threads (None:
    the library's default, on GPUs)."""

    count: int
    fit: int  # how many fit on the cluster now
    options: dict
    threads: int | None


def actor_plan(nodes: list[dict], backend: str, scorer_settings: dict, ray_actors: int | None) -> ActorPlan:
    """The actors for a cluster whose live nodes have these resources ({"CPU": .., "GPU": ..} each)."""
    gpus = [n.get("GPU", 0) for n in nodes]
    if any(gpus):
        per = int(scorer_settings.get("tensor_parallel_size") or 1) if backend == "vllm" else 1
        fit = sum(int(g // per) for g in gpus)
        if fit == 0:
            raise UserError(f"--tensor-parallel-size {per}: no node of the Ray cluster has {per} GPUs "
                            f"(it has {', '.join(f'{g:g}' for g in gpus if g)})")
        return ActorPlan(ray_actors or fit, fit, {"num_gpus": per, "num_cpus": 1}, None)
    if backend == "vllm":
        raise UserError("--backend vllm: the Ray cluster has no GPUs; use --backend hf on CPUs")
    count = ray_actors or 1
    cpus, fit = cpus_per_actor([n.get("CPU", 0) for n in nodes], count)
    return ActorPlan(count, fit, {"num_cpus": cpus}, max(1, int(cpus)))


def cpus_per_actor(node_cpus: list, count: int) -> tuple:
    """(CPUs each of `count` actors reserves, how many such actors fit now): the most whole CPUs for which all
    `count` fit on these nodes (an actor lives on one node), or a fraction when there are more actors than CPUs."""
    whole = [int(c) for c in node_cpus if c >= 1]
    if not whole:
        raise UserError("the Ray cluster has no CPUs to run an actor on")
    for per in range(max(whole), 0, -1):
        fit = sum(c // per for c in whole)
        if fit >= count:
            return per, fit
    per = round(sum(whole) / count, 4)  # more actors than CPUs: they share them
    return per, count


class PartActor:
    """One scorer on one GPU (or a share of a node's CPUs): started once, then writes the parts it is given.
    Wrapped by `ray.remote` in `_actor_class` (Ray is imported only when --ray is used)."""

    def __init__(self, job: Job, tok_options: dict, out: str, threads: int | None):
        self.out, self.threads = Path(out), threads
        self._set_threads()
        self.log = cache.ray_written_log(f"{os.getpid()}-{uuid.uuid4().hex[:8]}")  # this process's own
        self.error = None  # raised by `write`: a scorer that cannot start is the run's error, not a restart
        self.scorers = LazyScorer(job)
        try:
            self.job = self.scorers.job = _on_this_node(job, tok_options, self.out)
            self.scorers.get()
        except Exception as e:  # noqa: BLE001 - handed to the driver, which raises it as it is
            self.error = e

    def _set_threads(self):
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)

    def hello(self) -> dict:
        """Alive: this process's id, how long the scorer took to start, and the error it stopped with, if any."""
        return {"pid": os.getpid(), "load_seconds": self.scorers.load_seconds, "error": self.error}

    def write(self, k: int, items: list) -> dict:
        if self.error is not None:
            raise self.error
        self._set_threads()  # tasks run on the actor's worker threads
        return {**build_part(self.job, self.out, k, items, self.scorers, self.log), "pid": os.getpid()}


def _for_actors(job: Job) -> tuple:
    """(job, tokenizer options): what the actors get. Absolute paths (a worker's current directory is not the
    driver's), no input reader, and no tokenizer: each actor loads it from the model directory (`_on_this_node`),
    so what Ray ships is small."""
    return (replace(job, src=None, pair_tok=None, model_dir=Path(job.model_dir).absolute()),
            job.pair_tok.options())


def _on_this_node(job: Job, options: dict, out: Path) -> Job:
    """The job with this node's tokenizer, after checking that this node sees the driver's files: --out, and the
    model's tokenizer with the same sha256 (the input is read by the driver only)."""
    import socket

    from pipeline.fingerprint import tokenizer_identity
    from pipeline.precompute import load_tokenizer
    from pipeline.tokenize import PairTokenizer

    host = socket.gethostname()
    if not out.is_dir():
        raise UserError(f"--out {out} is not there on Ray node {host}; put it on storage every node sees")
    if not (job.model_dir / "config.json").is_file() or \
            tokenizer_identity(job.model_dir)["sha256"] != job.identity["tokenizer"]["sha256"]:
        raise UserError(f"--model {job.model_dir} is missing or another model on Ray node {host}; put it on "
                        "storage every node sees")
    return replace(job, pair_tok=PairTokenizer(load_tokenizer(job.model_dir), **options))


def _actor_class(ray):
    """PartActor as a Ray actor that Ray restarts, whose `hello` answers while a part is being written."""

    class RayPartActor(PartActor):
        @ray.method(concurrency_group="info")
        def hello(self) -> dict:
            return super().hello()

    return ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES,
                      concurrency_groups={"info": 1})(RayPartActor)


@dataclass
class Slot:
    """The driver's view of one actor."""

    handle: object
    name: str
    queued: int = 0  # parts sent, not yet returned
    pid: int | None = None  # its process, once it answered
    last_seen: float = 0.0
    ping: object = None  # the outstanding `hello` call
    asked: float = 0.0  # when it was last sent
    dead: bool = False  # Ray gave up on it (its restarts used up): no more parts for it
    pids: set = field(default_factory=set)  # every process it has run in (restarts = len - 1)


class RayWriter:
    """PartWriter's interface (reuse, write, finish, close, stats, score_seconds, extra_summary) with the parts
    written by Ray actors. The actors start at the first part to write."""

    def __init__(self, job: Job, out: Path, progress: bool, cluster: Cluster, ray_actors: int | None):
        self.job, self.out, self.cluster, self.ray = job, Path(out), cluster, cluster.ray
        self.ray_actors = ray_actors
        self.stats = Stage1Stats(scan_seconds=round(job.scan_seconds, 3), extra_columns=job.extras.columns,
                                 skipped_columns=job.extras.skipped)
        self.score_seconds = 0.0  # wall clock from the first actor ready to the last part back
        self.slots: list[Slot] = []
        self.parts = {}  # ObjectRef -> (slot, k, rows read)
        self.plan = None
        self.t0 = None  # when the first actor was ready
        self.bar = progress_bar(job.src, job.limit, 1, progress)

    # ------------------------------------------------------------ PartWriter's interface

    def reuse(self, items: list, part: dict):
        self.stats.add_reused(len(items), part)
        advance(self.bar, len(items))

    def write(self, k: int, items: list):
        """Send chunk k to the started actor with the fewest parts queued, once one has room."""
        if not self.slots:
            self._start()
        while True:
            ready = [s for s in self.slots if s.pid is not None and not s.dead and s.queued < IN_FLIGHT]
            if ready:
                break
            if all(s.dead for s in self.slots):
                raise UserError(f"every Ray actor died {MAX_RESTARTS + 1} times; the parts written are kept: "
                                "re-run the same command to resume")
            self._poll(timeout=PING_S)
        slot = min(ready, key=lambda s: s.queued)
        self.parts[slot.handle.write.remote(k, items)] = (slot, k, len(items))
        slot.queued += 1

    def finish(self):
        """Wait for every part sent."""
        while self.parts:
            self._poll(timeout=PING_S)
        if self.t0 is not None:
            self.score_seconds = time.time() - self.t0

    def close(self):
        """Stop the actors (a part cut short is redone by the next run) and the progress bar."""
        if self.bar is not None:
            self.bar.close()
        for s in self.slots:
            with contextlib.suppress(Exception):  # already gone
                self.ray.kill(s.handle, no_restart=True)

    def extra_summary(self) -> dict:
        if not self.slots:
            return {"ray": {"actors": 0, "restarts": 0}}
        return {"ray": {"actors": len(self.slots), "restarts": sum(max(len(s.pids) - 1, 0) for s in self.slots),
                        "cpus_per_actor": self.plan.options.get("num_cpus"),
                        "gpus_per_actor": self.plan.options.get("num_gpus", 0)}}

    # ------------------------------------------------------------ actors

    def _start(self):
        job = self.job
        self.plan = plan = actor_plan(self.cluster.node_resources(), job.backend, job.scorer_settings,
                                      self.ray_actors)
        if plan.count > plan.fit:
            print(f"note: the Ray cluster has room for {plan.fit} of {plan.count} actors now; the others start "
                  "when it has room", file=sys.stderr)
        remote_job, tok_options = _for_actors(job)
        options = dict(plan.options)
        if plan.threads:
            options["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(plan.threads)}}
        cls, run = _actor_class(self.ray), uuid.uuid4().hex[:8]
        for i in range(plan.count):
            name = f"{ACTOR_PREFIX}{run}-{i}"
            handle = cls.options(name=name, **options).remote(remote_job, tok_options, str(self.out.absolute()),
                                                             plan.threads)
            self.slots.append(Slot(handle, name))
        self._ping()

    def _ping(self):
        """Ask each actor that has no question pending and was not heard from lately whether it is alive."""
        now = time.time()
        for s in self.slots:
            if s.ping is None and not s.dead and now - max(s.last_seen, s.asked) >= PING_S:
                s.ping, s.asked = s.handle.hello.remote(), now

    def _poll(self, timeout: float):
        """Take in what has come back (parts, answers), waiting up to `timeout` seconds for the first."""
        pings = {s.ping: s for s in self.slots if s.ping is not None}
        refs = [*self.parts, *pings]
        if not refs:
            time.sleep(timeout)
            return self._ping()
        done, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        if done:
            done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            if ref in self.parts:
                self._part_done(ref)
            else:
                self._answered(pings[ref], ref)
        self._ping()
        self._show()

    def _answered(self, slot: Slot, ref):
        slot.ping = None
        try:
            hello = self.ray.get(ref)
        except self.ray.exceptions.ActorDiedError:  # for good: Ray retries a call while it restarts an actor
            slot.dead = True
            return
        except self.ray.exceptions.RayActorError:  # unavailable for now: the next question tells
            return
        if hello["error"] is not None:
            raise hello["error"]
        self._seen(slot, hello["pid"])
        self.t0 = self.t0 or time.time()
        self.stats.load_seconds = max(self.stats.load_seconds, hello["load_seconds"])

    def _seen(self, slot: Slot, pid: int):
        slot.pid, slot.last_seen = pid, time.time()
        slot.pids.add(pid)

    def _part_done(self, ref):
        slot, k, rows = self.parts.pop(ref)
        slot.queued -= 1
        result = self._result(ref, k, slot)
        self._seen(slot, result["pid"])
        self.stats.add_written(rows, result)
        advance(self.bar, rows)

    def _result(self, ref, k: int, slot: Slot) -> dict:
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the part's own error (a full disk, ...): raised as it is
            raise e.cause from None
        except ray.exceptions.RayActorError as e:
            raise UserError(f"{cache.part_name(k)}: its Ray actor {slot.name} died and the part failed "
                            f"{MAX_TASK_RETRIES + 1} times ({_first_line(e)}); the parts written are kept: re-run "
                            "the same command to resume") from None

    def _show(self):
        if self.bar is None or self.t0 is None:
            return
        now = time.time()
        alive = sum(1 for s in self.slots if s.pid is not None and now - s.last_seen < ALIVE_S)
        advance(self.bar, 0, tokens=self.stats.tokens, seconds=now - self.t0, actors=f"{alive}/{len(self.slots)}")
