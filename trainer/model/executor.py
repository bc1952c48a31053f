"""Where ensemble members are trained: in this process (``local``) or as Ray tasks (``ray``).

Members are independent (own seed, own data order), so training an ensemble is a map over member
ids. ``run_members(task, ids, shared, spec)`` calls ``task(member_id, shared)`` for every id and
yields ``(member_id, output)`` as members finish, in finishing order, with a progress bar of
member ids on the driver. A member that raises is tried once more; if it fails again it is
reported by id in ``MemberFailures``, raised only after every other member has been yielded, so
no finished member is lost (the caller saves each as it arrives).

With Ray, ``shared`` (the training data, the starting weights) is put into the object store once
and every task reads it from there; each task declares ``cpus_per_member`` CPUs (and
``gpus_per_member`` GPUs: 0 by default, since members train on the CPU today; set 1 once
training runs on a device). ``task`` must be a module-level function (workers import it by name), and
the workers need this package installed. The Ray runtime is imported only here and only when
``kind == "ray"``: local training needs no Ray (``pip install 'elit-stream[cluster]'`` adds it).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

EXECUTORS = ("local", "ray")


class MemberFailures(RuntimeError):
    """Members that failed twice; ``failures`` maps member id -> the last error, as text."""

    def __init__(self, failures: dict[int, str]):
        self.failures = dict(sorted(failures.items()))
        lines = "; ".join(f"member {i}: {err}" for i, err in self.failures.items())
        super().__init__(f"{len(self.failures)} member(s) failed after a retry ({lines}); the "
                         "other members are saved; re-run the same command to train the missing ones")


@dataclass(frozen=True)
class ExecutorSpec:
    """``kind``: local | ray; ``address``: a Ray cluster (``auto``, ``ray://head:10001``); None
    starts a private local Ray. ``gpus_per_member``: GPUs a member's task reserves (None = 1
    when the cluster has GPUs, else 0)."""
    kind: str = "local"
    address: str | None = None
    cpus_per_member: float = 1
    gpus_per_member: float | None = 0
    retries: int = 1

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {self.kind!r}")
        if self.kind == "local" and self.address:
            raise ValueError("--address needs --executor ray")


def run_members(task: Callable[[int, Any], Any], member_ids: Sequence[int], shared: Any,
                spec: ExecutorSpec | None = None, log: Callable[[str], None] = print,
                show_progress: bool = True) -> Iterator[tuple[int, Any]]:
    """Yield ``(member_id, task(member_id, shared))`` as members finish; see the module docstring."""
    if not member_ids:
        return
    spec = spec or ExecutorSpec()
    run = _run_local if spec.kind == "local" else _run_ray
    failures: dict[int, str] = {}
    bar = _MemberBar(list(member_ids), spec.kind, show_progress)
    try:
        for member_id, ok, value in run(task, list(member_ids), shared, spec, log):
            bar.finished(member_id, ok)
            if ok:
                yield member_id, value
            else:
                failures[member_id] = value
                log(f"member {member_id}: FAILED after {spec.retries + 1} tries: {value}")
    finally:
        bar.close()
    if failures:
        raise MemberFailures(failures)


# ----------------------------------------------------------------------------- local


def _run_local(task, member_ids, shared, spec, log):
    for member_id in member_ids:
        for attempt in range(spec.retries + 1):
            try:
                value = task(member_id, shared)
            except Exception as exc:  # noqa: BLE001 - a member's failure must not cost the others
                error = f"{type(exc).__name__}: {exc}"
                if attempt < spec.retries:
                    log(f"member {member_id}: {error}; retrying")
                continue
            yield member_id, True, value
            break
        else:
            yield member_id, False, error


# ----------------------------------------------------------------------------- Ray


def _run_ray(task, member_ids, shared, spec, log):
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=spec.address, include_dashboard=False, log_to_driver=True)
    try:
        gpus = spec.gpus_per_member
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        remote = ray.remote(_call)
        opts = {"num_cpus": spec.cpus_per_member, "num_gpus": gpus, "max_retries": spec.retries,
                "retry_exceptions": True}
        t0 = time.perf_counter()
        shared_ref = ray.put(shared)
        log(f"ray: data in the object store in {time.perf_counter() - t0:.1f} s; {len(member_ids)} "
            f"member task(s), {spec.cpus_per_member} CPU + {gpus} GPU each, cluster "
            f"{_resources(ray)}")
        pending = {remote.options(**opts, name=f"member-{member_id}").remote(task, member_id,
                                                                             shared_ref): member_id
                   for member_id in member_ids}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            member_id = pending.pop(done[0])
            try:
                value = ray.get(done[0])
            except Exception as exc:  # noqa: BLE001 - RayTaskError wraps the member's own error
                cause = getattr(exc, "cause", None) or exc
                yield member_id, False, f"{type(cause).__name__}: {cause}"
                continue
            yield member_id, True, value
    finally:
        if started_here:
            ray.shutdown()


def _call(task, member_id, shared):
    """The Ray task: one member (``shared`` arrives already fetched from the object store)."""
    return task(member_id, shared)


def _resources(ray) -> str:
    r = ray.cluster_resources()
    return ", ".join(f"{k} {r[k]:g}" for k in ("CPU", "GPU") if k in r)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray: pip install 'elit-stream[cluster]' "
                         "(or pip install ray)") from None
    return ray


# ----------------------------------------------------------------------------- progress


class _MemberBar:
    """One bar over the members; its text names the members done, failed and still running."""

    def __init__(self, member_ids: list[int], kind: str, enabled: bool):
        self.waiting, self.done, self.failed = list(member_ids), [], []
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=len(member_ids), desc=f"members ({kind})", unit="member",
                            position=0, dynamic_ncols=True)
            self._text()

    def finished(self, member_id: int, ok: bool) -> None:
        self.waiting.remove(member_id)
        (self.done if ok else self.failed).append(member_id)
        if self.bar is not None:
            self.bar.update(1)
            self._text()

    def _text(self) -> None:
        parts = [f"done {self.done}"] + ([f"FAILED {self.failed}"] if self.failed else [])
        parts += [f"waiting {self.waiting}"] if self.waiting else []
        self.bar.set_postfix_str("  ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
