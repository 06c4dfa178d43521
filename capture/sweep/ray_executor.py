"""The Ray executor: one actor per worker, each holding its own loaded pipeline; runs are tasks.

* ``address=None`` starts a local cluster for the sweep and stops it afterwards (unless this process had
  already called ``ray.init``: then that cluster is used and left running); ``"auto"`` or ``host:port``
  joins an existing one, whose nodes need diffviz installed and OUT on a filesystem they share.
* Each actor takes one GPU when the cluster has any, else ``threads`` CPUs, and fixes torch's thread count.
* A worker that dies is restarted by Ray (``max_restarts``); its run goes back in the queue, up to
  :data:`MAX_ATTEMPTS` tries. What the dead worker half-wrote sits in a temp folder beside the run (never
  under the run's name) and is tidied by the next writer of that run, and at the end of the sweep.
* Nothing reaches the network: usage stats are off before ``ray`` is imported, and the dashboard is not started.
"""
from __future__ import annotations

import os
from collections import deque
from typing import Any, Callable, Sequence

from capture.sweep.grid import RunSpec

#: tries of one run before it is recorded as failed because its workers kept dying
MAX_ATTEMPTS = 3
#: a local cluster's object store: runs go to disk, only small results travel through it
OBJECT_STORE_BYTES = 100 * 2**20
POLL_SECONDS = 0.5
#: environment that keeps Ray from phoning home, set before it is imported
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_USAGE_STATS_PROMPT_ENABLED": "0"}


class RayUnavailable(RuntimeError):
    """Ray is missing or its cluster cannot be reached; ``str()`` is one line."""


def import_ray():
    os.environ.update(QUIET_ENV)
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--executor ray needs Ray: pip install 'diffviz[scale]'") from None
    return ray


class Cluster:
    """``with Cluster(address) as ray:`` — joined or started, and stopped again only if started here."""

    def __init__(self, address: str | None, num_cpus: int | None = None):
        self.address, self.num_cpus = address, num_cpus
        self.started = False

    def __enter__(self):
        ray = import_ray()
        if ray.is_initialized():
            return ray
        # the local cluster's processes inherit this process's environment, QUIET_ENV included
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
        if self.address:
            kwargs["address"] = self.address
        else:
            kwargs.update(num_cpus=self.num_cpus or os.cpu_count() or 1, object_store_memory=OBJECT_STORE_BYTES)
        try:
            ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 - a cluster that cannot be reached is one line
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray cluster"
            raise RayUnavailable(f"could not start or join {where}: {' '.join(str(exc).split())[:300]}") from None
        self.started = True
        return ray

    def __exit__(self, *exc) -> None:
        if self.started:
            import ray

            ray.shutdown()


def run_ray(specs: Sequence[RunSpec], *, workers: int | None, threads: int | None,
            on_result: Callable[[dict[str, Any]], None], bar=None, address: str | None = None) -> None:
    """Record ``specs`` on Ray actors, handing each result to ``on_result`` as it lands.

    ``workers`` defaults to the cluster's GPUs, else 2; ``threads`` to the cluster's CPUs over ``workers``."""
    if not specs:
        return
    cpus = os.cpu_count() or 1
    with Cluster(address, num_cpus=max(cpus, (workers or 2) * (threads or 1))) as ray:
        resources = ray.cluster_resources()
        workers = workers or int(resources.get("GPU", 0)) or 2
        threads = threads or max(1, int(resources.get("CPU", cpus)) // workers)
        _schedule(ray, specs, workers=workers, threads=threads, on_result=on_result, bar=bar)


def _actor_class(ray, threads: int):
    from capture.sweep.runner import Worker

    gpus = ray.cluster_resources().get("GPU", 0)
    resources = {"num_gpus": 1, "num_cpus": 1} if gpus >= 1 else {"num_cpus": threads}
    # max_concurrency=2: status() answers while run() works; run() itself is one at a time per actor
    return ray.remote(max_restarts=-1, max_task_retries=0, max_concurrency=2, **resources)(Worker)


def _schedule(ray, specs, *, workers, threads, on_result, bar) -> None:
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        from ray.exceptions import ActorUnavailableError
    except ImportError:  # older Ray
        ActorUnavailableError = RayActorError  # noqa: N806
    lost = (RayActorError, ActorUnavailableError)

    actor_cls = _actor_class(ray, threads)
    actors = [actor_cls.remote(threads) for _ in range(max(1, min(workers, len(specs))))]
    try:
        ray.get([a.ready.remote() for a in actors])
    except lost as exc:
        raise RayUnavailable(f"a Ray worker could not start: {' '.join(str(exc).split())[:300]}") from None

    queue = deque(specs)
    attempts = {s.name: 0 for s in specs}
    idle = list(actors)
    running: dict[Any, tuple[Any, RunSpec]] = {}   # run ref -> (actor, spec)
    restarting: dict[Any, Any] = {}                 # ready ref -> actor, after a worker died
    while queue or running:
        while idle and queue:
            actor, spec = idle.pop(), queue.popleft()
            attempts[spec.name] += 1
            running[actor.run.remote(spec.name, spec.config.to_dict())] = (actor, spec)
        if not running and not restarting:  # every worker is gone for good
            for spec in queue:
                on_result({"name": spec.name, "status": "failed", "warnings": [], "headline": None,
                           "error": "no Ray worker is left to run it"})
            queue.clear()
            break
        done, _ = ray.wait(list(running) + list(restarting), num_returns=1, timeout=POLL_SECONDS)
        for ref in done:
            if ref in restarting:
                actor = restarting.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(actor)
                except lost:
                    pass  # gone for good: the others carry on
                continue
            actor, spec = running.pop(ref)
            try:
                result = ray.get(ref)
            except lost as exc:
                restarting[actor.ready.remote()] = actor  # idle again once Ray has restarted it
                if attempts[spec.name] < MAX_ATTEMPTS:
                    queue.appendleft(spec)
                    if bar is not None:
                        bar.write(f"{spec.name}: its worker died; run again (try {attempts[spec.name] + 1})")
                    continue
                result = {"name": spec.name, "status": "failed", "warnings": [], "headline": None,
                          "error": f"its worker died {MAX_ATTEMPTS} times: {' '.join(str(exc).split())[:200]}"}
            else:
                idle.append(actor)
            on_result(result)
        if bar is not None and running:
            _show_stages(ray, bar, [a for a, _ in running.values()], GetTimeoutError, lost)
    for actor in actors:
        ray.kill(actor, no_restart=True)


def _show_stages(ray, bar, actors, timeout_error, lost) -> None:
    try:
        states = ray.get([a.status.remote() for a in actors], timeout=2)
    except (timeout_error, *lost):
        return
    names = set()
    for state in states:
        if state:
            names.add(state["name"])
            bar.stage(state["name"], state)
    bar.clear(names)
