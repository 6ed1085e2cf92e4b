"""The ``ray`` executor: one Ray task per job, retried when its worker dies.

Each task loads the base's own folder (by absolute path) or its Hub repo at the pinned commit,
trains its job alone (:func:`~mnist_peft.training.recipes.train_adapter`) and returns the adapter's
files; the driver checks their shape here (:func:`_receive`) and then, as for any ``remote``
executor, their contents (:func:`~mnist_peft.fleet.accept.accept_returned`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mnist_peft.errors import AdapterConfigError, FleetError, InvalidArgumentError, NonFiniteError, TrainConfigError

from .base import ADAPTER_FILES, MAX_RETURNED_BYTES, ExecutorResult, FleetAdapter, FleetWork, save_fleet_adapter

if TYPE_CHECKING:
    from mnist_peft.training.batched import AdapterJob

__all__ = ["RayExecutor"]

_FINAL_ERRORS = (TrainConfigError, AdapterConfigError, InvalidArgumentError, NonFiniteError)
"""Worker errors that come from the job's own input, so a retry would only repeat them."""

_WORKER_ENV = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "MNIST_PEFT_DATA")
"""Environment a Ray worker gets from the driver: which Hub to read the base from, and the data root."""


@dataclass(frozen=True)
class RayExecutor:
    """One Ray task per job, on the cluster at ``work.address``, else ``$RAY_ADDRESS``, else a new local Ray."""

    name: str = "ray"
    remote: bool = True
    stops_at_deadline: bool = True
    """It ends the run at ``work.deadline`` itself (see :class:`~.base.Executor`)."""

    def run(self, jobs: Sequence[AdapterJob], work: FleetWork) -> ExecutorResult:
        """Start (or join) Ray, run the jobs as tasks and gather them; a Ray started here ends here."""
        try:
            import ray
        except ImportError as exc:
            raise InvalidArgumentError("the ray executor needs Ray: pip install -e '.[ray]' (or pip install 'mnist-peft[ray]')") from exc
        started = not ray.is_initialized()
        if started:
            ray.init(address=work.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        elif work.address is not None:
            raise InvalidArgumentError("Ray is already initialised in this process; drop --ray-address or start a fresh process")
        try:
            return _collect(ray, jobs, work)
        finally:
            if started:  # a Ray this call started (not a caller's) ends with it
                ray.shutdown()


def _train_one(
    job: AdapterJob, base_ref: str, source: str, data_dir: str | None, fault: tuple[str, ...] | None, revision: str | None = None
) -> dict:
    """A Ray task: load the base ``source`` (an absolute folder, or a Hub repo id at commit
    ``revision``, the one the driver checked), train one job alone, and return its adapter files
    (``base_ref`` is what the adapter's config and card name as its base, as the local executor
    writes them). The driver checks them and computes the metrics.

    An error of the job's own input (a recipe or adapter config error) comes back as
    ``{"error": ...}``: it would fail the same way again, so it is not retried. Anything else (a
    Hub or network error, a file missing on this node, a dead process) raises, and Ray retries.

    ``fault`` is a test hook: ``("kill-once", NAME, DIR)`` ends the worker process the first time job
    NAME has trained, before it returns (a marker in DIR remembers it); ``("fail", NAME)`` makes job
    NAME raise every time; ``("bad-input", NAME, DIR)`` gives it an input error (each attempt is
    logged in DIR); ``("hang", NAME)`` makes job NAME's worker hang (until the fleet's deadline
    cancels it).
    """
    import os
    import tempfile

    import torch

    from mnist_peft.model.mlp import load_base
    from mnist_peft.training.recipes import train_adapter

    if fault and fault[0] == "fail" and fault[1] == job.name:
        raise RuntimeError(f"injected failure of job {job.name}")
    if fault and fault[0] == "hang" and fault[1] == job.name:
        import time

        time.sleep(10**6)
    torch.set_flush_denormal(True)  # as the driver does: the same floats on both executors
    try:
        if fault and fault[0] == "bad-input" and fault[1] == job.name:
            with open(Path(fault[2]) / f"attempts-{job.name}", "a") as log:
                log.write("attempt\n")
            raise TrainConfigError(f"injected input error of job {job.name}")
        base = load_base(source, revision=revision)
        model, result = train_adapter(base, job.digit, job.recipe, data_dir=data_dir, **dict(job.overrides))
    except _FINAL_ERRORS as exc:  # the job's own input: the same on any machine, every time
        return {"name": job.name, "error": f"{type(exc).__name__}: {exc}"}
    if fault and fault[0] == "kill-once" and fault[1] == job.name:
        marker = Path(fault[2]) / f"killed-{job.name}"
        if not marker.exists():
            marker.touch()
            os._exit(1)  # the worker dies with its work done but not returned, as a preempted machine's would
    with tempfile.TemporaryDirectory(prefix="mnist-peft-fleet-") as tmp:
        save_fleet_adapter(model, result, job, base_ref, tmp)
        return {"name": job.name, "files": {f: (Path(tmp) / f).read_bytes() for f in ADAPTER_FILES}, "base_revision": revision}


def _collect(ray, jobs: Sequence[AdapterJob], work: FleetWork) -> ExecutorResult:
    """Submit one task per job and gather them as they end (the progress bar moves per job)."""
    import os

    from mnist_peft.model.data import resolve_data_root

    # Where workers find the Hub and the data, as the driver sees them (never a token: workers log in themselves).
    env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    if "MNIST_PEFT_DATA" in env:  # workers do not share the driver's working directory
        env["MNIST_PEFT_DATA"] = os.path.abspath(os.path.expanduser(env["MNIST_PEFT_DATA"]))
    data_dir = work.data_dir and str(resolve_data_root(work.data_dir).absolute())
    task = ray.remote(num_cpus=1, max_retries=work.retries, retry_exceptions=True)(_train_one)
    if env:
        task = task.options(runtime_env={"env_vars": env})
    pending = {task.remote(j, work.base_ref, work.source, data_dir, work.fault, work.revision): j for j in jobs}
    status = {j.name: "pending" for j in jobs}
    bar = work.progress(jobs, total=len(jobs), unit="job")
    trained: dict[str, FleetAdapter] = {}
    failed: dict[str, str] = {}
    try:
        while pending:
            left = work.remaining()
            if left == 0:  # the fleet's deadline: the jobs still out fail by name, and are cancelled below
                failed |= {job.name: work.timed_out("its Ray task was cancelled") for job in pending.values()}
                status |= {job.name: "failed" for job in pending.values()}
                bar.update([{"name": n, "state": s} for n, s in status.items()], len(trained) + len(failed))
                break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0 if left is None else min(5.0, left))
            for ref in ready:
                job = pending.pop(ref)
                try:
                    got = ray.get(ref)
                    trained[job.name] = _receive(got, job, Path(work.staging), revision=work.revision)
                    status[job.name] = "done"
                except Exception as exc:  # the job's own error after its retries, or a lost worker
                    failed[job.name] = _task_error(exc)
                    status[job.name] = "failed"
            bar.update([{"name": n, "state": s} for n, s in status.items()], len(trained) + len(failed))
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref, force=True)
    return ExecutorResult([trained[j.name] for j in jobs if j.name in trained], failed)


def _task_error(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:300]


def _receive(got: object, job: AdapterJob, tmp: Path, *, revision: str | None = None) -> FleetAdapter:
    """Write a worker's returned files into the driver's staging folder, checking their shape first
    (the files themselves are checked by :func:`~mnist_peft.fleet.accept.accept_returned`), and that
    it read the base at ``revision``."""
    if isinstance(got, dict) and got.get("name") == job.name and isinstance(got.get("error"), str):
        raise FleetError(got["error"][:1000], failed={job.name: got["error"][:1000]})
    if not isinstance(got, dict) or got.get("name") != job.name or not isinstance(got.get("files"), dict):
        raise FleetError(f"job {job.name} returned something that is not a fleet result", failed={job.name: "bad result"})
    if got.get("base_revision") != revision:
        raise FleetError(
            f"job {job.name} read the base at commit {str(got.get('base_revision'))[:40]!r}, not at {revision!r}",
            failed={job.name: "other base commit"},
        )
    files = got["files"]
    if set(files) != set(ADAPTER_FILES) or not all(isinstance(b, bytes) for b in files.values()):
        raise FleetError(
            f"job {job.name} returned files {sorted(map(str, files))[:10]}; expected exactly {list(ADAPTER_FILES)} as bytes",
            failed={job.name: "bad files"},
        )
    if sum(len(b) for b in files.values()) > MAX_RETURNED_BYTES:
        raise FleetError(f"job {job.name} returned more than {MAX_RETURNED_BYTES >> 20} MB", failed={job.name: "too large"})
    folder = tmp / job.name
    folder.mkdir()
    for fname in ADAPTER_FILES:
        (folder / fname).write_bytes(files[fname])
    return FleetAdapter(job.name, job.digit, job.seed, 0, str(folder), {})
