"""A fleet of adapters, end to end: :func:`run_fleet` validates, pins the base, executes, publishes.

- **validate**: every job, recipe value and option is checked before any work (nothing is written
  for a refused request);
- **pin**: the base is resolved and checked once on the driver; a remote executor's workers are
  handed its own folder (by absolute path) or its Hub repo at one commit;
- **execute**: the jobs go to an executor (:mod:`mnist_peft.fleet.executors`: ``local`` trains them
  all in one batched loop here, ``ray`` one Ray task per job, or any other :class:`Executor`);
- **publish**: what a remote executor returned is checked and re-scored on the driver
  (:mod:`mnist_peft.fleet.accept`), every result passes the quality gate (accuracy, its own digit),
  then the fleet is written to ``out``, registered in one registry write
  (:meth:`AdapterRegistry.add_many`) and, if asked, pushed in one Hub commit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mnist_peft.errors import FleetError, HubError, InvalidArgumentError, MnistPeftError
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.training.batched import AdapterJob, check_base

from .accept import DEFAULT_MAX_ACCURACY_DROP, accept_returned, quality_gate
from .executors.base import Executor, ExecutorResult, FleetAdapter, FleetWork
from .executors.table import get_executor
from .jobs import check_job

if TYPE_CHECKING:
    from mnist_peft.registry.adapter_registry import AdapterRegistry

__all__ = ["run_fleet", "FleetResult", "validate", "pin", "execute", "publish"]


@dataclass
class FleetResult:
    """What :func:`run_fleet` did: the adapters trained, the jobs that failed, what was registered."""

    executor: str
    trained: list[FleetAdapter]
    failed: dict[str, str]
    registered: list[dict[str, object]] = field(default_factory=list)
    pushed: dict[str, object] | None = None
    seconds: float = 0.0
    base_revision: str | None = None
    """The Hub commit of a Hub base that the driver and every Ray worker read (None otherwise)."""


def run_fleet(
    base_ref: str,
    jobs: Sequence[AdapterJob],
    *,
    root: str | None = None,
    executor: str | Executor = "local",
    ray_address: str | None = None,
    retries: int = 2,
    out: str | None = None,
    register: bool = False,
    allow_partial: bool = False,
    push_repo: str | None = None,
    token: str | None = None,
    data_dir: str | None = None,
    quiet: bool = False,
    tty: bool | None = None,
    timeout: float | None = None,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
    _fault: tuple[str, ...] | None = None,
) -> FleetResult:
    """Train ``jobs`` on the base ``base_ref`` and keep the results: folders under ``out``, one
    registry batch (``register``), one Hub commit (``push_repo``, with ``register``).

    Every recipe is checked before any work starts; fleets run with denormals flushed (as the
    ``mnist-peft`` command and the Ray workers do), so both executors compute the same floats. A
    Python caller should call ``torch.set_flush_denormal(True)`` before any torch work: the flag set
    here does not reach threads torch has already started.
    Adapters that come back from Ray workers are read as untrusted files: the folder must load onto
    the driver's base (keys, shapes, finite values, its fingerprint), hold the job's digit, rank and
    alpha, and its metrics are computed here, on the driver's test set.

    Args:
        executor: ``local`` (all jobs in one batched loop here) or ``ray`` (one Ray task per job,
            on the cluster at ``ray_address``, else ``$RAY_ADDRESS``, else a new local Ray); a name
            of :data:`~mnist_peft.fleet.executors.table.EXECUTORS`, or an :class:`~mnist_peft.fleet.executors.base.Executor` itself.
        retries: how many times Ray re-runs a job whose worker died or which raised unexpectedly.
        allow_partial: with failed jobs, keep (and register) the others instead of failing all.
        timeout: seconds the jobs may take in all (None: no limit); a job not ended by then fails
            by name (its Ray task is cancelled; the local batched run stops), as does every job of
            an executor that does not return by then.
        max_accuracy_drop: the quality gate's bound: a result whose test accuracy is more than this
            many points below the base's fails its job (as does one that makes its own digit worse,
            or whose update is zero).

    Raises:
        FleetError: a job failed for good and ``allow_partial`` is off, or no job succeeded;
            nothing was registered or written.
        HubError: the push failed; the fleet is registered, and the message says how to push it.
    """
    import sys
    import tempfile

    from mnist_peft.registry.adapter_registry import AdapterRegistry

    chosen = validate(jobs, executor, out=out, register=register, push_repo=push_repo, retries=retries)
    timeout, max_accuracy_drop = check_limits(timeout, max_accuracy_drop)
    torch.set_flush_denormal(True)  # before any torch work starts its threads: they keep what they start with
    registry = AdapterRegistry(root)
    base, revision, source = pin(base_ref, registry, remote=chosen.remote)
    tty = (sys.stderr.isatty() and sys.stdout.isatty()) if tty is None else tty
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mnist-peft-fleet-") as tmp:
        work = FleetWork(
            base, base_ref, source, revision, tmp, data_dir, quiet=quiet, tty=tty, retries=retries, address=ray_address, fault=_fault,
            timeout=timeout, deadline=None if timeout is None else time.monotonic() + timeout,
        )  # fmt: skip
        returned = execute(chosen, jobs, work)
        result = publish(
            chosen,
            returned,
            jobs,
            work,
            registry,
            out=out,
            register=register,
            allow_partial=allow_partial,
            push_repo=push_repo,
            token=token,
            max_accuracy_drop=max_accuracy_drop,
        )
    result.seconds = time.perf_counter() - start
    return result


def validate(
    jobs: Sequence[AdapterJob], executor: str | Executor, *, out: str | None, register: bool, push_repo: str | None, retries: int
) -> Executor:
    """Refuse a bad request before any work (nothing is created): returns the executor to run.

    Raises:
        InvalidArgumentError: an unknown executor, no jobs, names twice, nowhere to keep the
            results, an ``out`` that is not a new or empty folder, negative ``retries``.
        TrainConfigError: a recipe value a worker would trip over.
    """
    chosen = get_executor(executor)
    if not jobs:
        raise InvalidArgumentError("no jobs: give at least one digit")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"job names must be distinct, got {names}")
    if push_repo and not register:
        raise InvalidArgumentError("pushing a fleet needs it registered first: add --register")
    if not out and not register:
        raise InvalidArgumentError("give an output folder, ask to register the fleet, or both")
    if out and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise InvalidArgumentError(f"output folder {out!r} exists and is not an empty folder; pick a new one")
    if retries < 0:
        raise InvalidArgumentError(f"retries must be >= 0, got {retries}")
    for j in jobs:
        check_job(j)  # a bad recipe value is refused here, not in every worker
    return chosen


def check_limits(timeout: float | None, max_accuracy_drop: float) -> tuple[float | None, float]:
    """``timeout`` and ``max_accuracy_drop`` checked before any work: a positive number of seconds
    (or None), and a number of points from 0 to 100.

    Raises:
        InvalidArgumentError: anything else (NaN, Inf, a negative number, not a number).
    """
    from mnist_peft.numerics import require_finite_number

    if timeout is not None:
        timeout = require_finite_number(timeout, name="timeout", fix="give the seconds the fleet may take, e.g. --timeout 3600")
        if timeout <= 0:
            raise InvalidArgumentError(f"timeout must be a positive number of seconds, got {timeout:g}")
    drop = require_finite_number(
        max_accuracy_drop, name="max_accuracy_drop", fix="give points of test accuracy, e.g. --max-accuracy-drop 0.5"
    )
    if not 0 <= drop <= 100:
        raise InvalidArgumentError(f"max_accuracy_drop must be from 0 to 100 points of test accuracy, got {drop:g}")
    return timeout, drop


def pin(base_ref: str, registry: AdapterRegistry, *, remote: bool) -> tuple[MnistMLP, str | None, str]:
    """``(base, revision, source)``: the base the driver checked before any job starts, the Hub
    commit every worker reads (a remote executor's Hub base; else None), and where a worker loads
    the base from (its own folder by absolute path, never the registry's index; or the repo id)."""
    import os

    from mnist_peft.model.mlp import looks_like_path
    from mnist_peft.registry.refs import registry_folder, resolve_base

    revision = None
    if remote and "/" in base_ref and not Path(base_ref).exists() and not looks_like_path(base_ref):
        # A Hub repo id (registry names hold no '/'): the driver and every worker read one commit.
        # Offline, or with the Hub out of reach, each process reads its own cache instead, as
        # before; a worker whose base differs is refused by the fingerprint check.
        from huggingface_hub import constants

        from mnist_peft.hub.common import head_commit

        if not constants.HF_HUB_OFFLINE:
            try:
                revision = head_commit(base_ref)
            except HubError:
                revision = None  # loading the base below reports what is wrong, or uses the cache
    base = check_base(resolve_base(base_ref, registry, revision=revision))
    source = base_ref
    if remote:
        folder = Path(base_ref) if Path(base_ref).exists() else registry_folder(base_ref, registry, "base")
        source = os.path.abspath(folder) if folder is not None else base_ref
    return base, revision, source


EXECUTOR_GRACE_S = 10.0
"""How long past the deadline the driver waits for an executor to hand back what it has."""


def execute(executor: Executor, jobs: Sequence[AdapterJob], work: FleetWork) -> ExecutorResult:
    """Hand the jobs to ``executor``: what it returns is checked by :func:`publish`.

    With a deadline (``work.deadline``), an executor that says it stops there itself
    (``stops_at_deadline``, as the built-in ones do) runs here; any other runs in a thread of its
    own, and if it has not returned :data:`EXECUTOR_GRACE_S` after the deadline (a hung worker it
    keeps waiting for), it is left behind and every job fails by name.
    """
    if work.deadline is None or getattr(executor, "stops_at_deadline", False):
        trained, failed = executor.run(jobs, work)
        return ExecutorResult(list(trained), dict(failed))
    import threading

    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = executor.run(jobs, work)
        except BaseException as exc:  # handed to the driver's thread below
            box["error"] = exc

    thread = threading.Thread(target=run, name=f"fleet-{executor.name}", daemon=True)
    thread.start()
    thread.join((work.remaining() or 0.0) + EXECUTOR_GRACE_S)
    if thread.is_alive():  # daemon: it ends with the process; its staging folder is removed below it
        what = f"executor {executor.name!r} had not handed it back {EXECUTOR_GRACE_S:g} s after the deadline"
        return ExecutorResult([], {j.name: work.timed_out(what) for j in jobs})
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    trained, failed = box["result"]  # type: ignore[misc]
    return ExecutorResult(list(trained), dict(failed))


def publish(
    executor: Executor,
    returned: ExecutorResult,
    jobs: Sequence[AdapterJob],
    work: FleetWork,
    registry: AdapterRegistry,
    *,
    out: str | None,
    register: bool,
    allow_partial: bool,
    push_repo: str | None = None,
    token: str | None = None,
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
) -> FleetResult:
    """Keep the fleet: accept what came back and pass it through the quality gate
    (:func:`~mnist_peft.fleet.accept.quality_gate`: a result that fails it is a failed job), refuse
    the fleet if jobs failed (unless ``allow_partial`` and some succeeded), write ``out``, register
    it in one write, push it in one commit. A failure before the push leaves neither ``out`` nor a
    registry change."""
    import shutil

    trained, failed = _accepted(executor, returned, jobs, work)
    kept = []
    for a in trained:  # every executor's results, the local one's too: numbers decide, not where they ran
        reason = quality_gate(a, max_accuracy_drop=max_accuracy_drop, base=work.base)
        if reason is None:
            kept.append(a)
        else:
            failed[a.name] = reason
    order = {j.name: i for i, j in enumerate(jobs)}
    trained, failed = kept, dict(sorted(failed.items(), key=lambda kv: order[kv[0]]))
    if failed and (not allow_partial or not trained):
        what = "no job of the fleet succeeded" if not trained else f"{len(failed)} of {len(jobs)} fleet jobs failed"
        raise FleetError(
            f"{what}: " + "; ".join(f"{n}: {e[:300]}" for n, e in failed.items())
            + ". Nothing was registered or written; fix the cause and rerun"
            + ("" if not trained else ", or pass --allow-partial to keep the others"),
            failed=failed,
        )  # fmt: skip
    result = FleetResult(executor.name, trained, failed, base_revision=work.revision)
    placed = _place(trained, Path(out)) if out else None
    try:
        if register:
            added = registry.add_many([(a.name, a.folder, {"metrics": a.metrics, "digit": a.digit}) for a in trained])
            result.registered = [{"name": e.name, "version": e.version} for e in added]
    except BaseException:
        if placed is not None:  # ours: made just now (an existing ``out`` was checked empty)
            shutil.rmtree(placed[0], ignore_errors=True)
            if placed[1]:
                placed[0].mkdir()
        raise
    for a in trained:
        a.folder = str(Path(out) / a.name) if out else None
    if push_repo and result.registered:
        _push(result, registry, push_repo, token=token)
    return result


def _accepted(executor: Executor, returned: ExecutorResult, jobs: Sequence[AdapterJob], work: FleetWork) -> ExecutorResult:
    """A remote executor's folders checked and rewritten here (a refused one fails its job, see
    :func:`~mnist_peft.fleet.accept.accept_returned`); the failures in job order."""
    trained, failed = returned.trained, dict(returned.failed)
    handed = [a.name for a in trained] + list(failed)
    names = {j.name for j in jobs}
    strays = {n: "not a job of this fleet" for n in handed if n not in names}
    strays |= {n: "handed back twice" for n in handed if handed.count(n) > 1}
    if strays:
        raise FleetError(
            f"executor {executor.name!r} handed back {sorted(strays)[:20]}, which is not one result for each of the jobs "
            f"{sorted(names)[:20]} (a bug in the executor); nothing was registered or written",
            failed=strays,
        )
    for j in jobs:  # a job the executor lost fails, named, instead of vanishing from the fleet
        if j.name not in handed:
            failed[j.name] = f"executor {executor.name!r} handed back neither an adapter nor an error for it"
    if executor.remote:
        from mnist_peft.model.mlp import base_fingerprint

        fingerprint = base_fingerprint(work.base)
        trained = accept_returned(trained, jobs, work.base, work.base_ref, fingerprint, failed, data_dir=work.data_dir, tmp=work.staging)
    order = {j.name: i for i, j in enumerate(jobs)}
    return ExecutorResult(trained, dict(sorted(failed.items(), key=lambda kv: order[kv[0]])))


def _place(trained: list[FleetAdapter], dest: Path) -> tuple[Path, bool]:
    """Copy the adapters to ``dest``: built next to it and renamed into place, so that a failure
    leaves nothing. Returns ``(dest, whether it existed before)`` (it was then empty)."""
    import os
    import shutil
    import tempfile

    existed = dest.is_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for a in trained:
            shutil.copytree(a.folder, staging / a.name)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest, existed


def _push(result: FleetResult, registry: AdapterRegistry, push_repo: str, *, token: str | None) -> None:
    """Push the versions just registered (not a later one) to ``push_repo`` in one commit."""
    import shlex

    from mnist_peft.hub.push import push_to_hub

    refs = [f"{e['name']}@{e['version']}" for e in result.registered]
    try:
        pushed = push_to_hub(push_repo, registry=registry, names=refs, token=token)
    except MnistPeftError as exc:
        names_args = " ".join(f"--name {r}" for r in refs)
        raise HubError(
            f"the fleet is registered ({', '.join(refs)}) but pushing it to {push_repo} failed: {exc}. Push it with: "
            f"mnist-peft push --repo-id {push_repo} {names_args} --root {shlex.quote(str(registry.root))}",
            repo_id=push_repo,
        ) from exc
    result.pushed = {"repo_id": pushed.repo_id, "commit": pushed.commit, "pushed": pushed.pushed}
