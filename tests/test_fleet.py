"""Fleets of adapters: the batched trainer against solo runs, the local and Ray executors, the CLI.

Ray runs for real: a local Ray (``ray.init(num_cpus=2)``) whose workers are separate processes;
one of them is killed mid-job to show the retry, another job fails every time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import load_file

from mnist_peft.errors import FleetError, InvalidArgumentError, InvalidNameError
from mnist_peft.fleet.jobs import fleet_jobs, parse_digits
from mnist_peft.fleet.run import run_fleet
from mnist_peft.io.adapters import read_adapter
from mnist_peft.model.mlp import load_base
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.training.batched import AdapterJob, train_batched
from mnist_peft.training.recipes import train_adapter

BASE = REPO / "adapters" / "base" / "v1"


def _tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batched_training_equals_training_each_adapter_alone(data_root: Path) -> None:
    """Three adapters with different digits, seeds, ranks, learning rates, augmentation, early
    stopping and recipes train together; each equals its solo ``train_adapter`` run bit for bit.

    The seed recipe runs at 64 rows a batch (its default is 10): the equality contract needs every
    job's rows to be at least the 38 for which the BLAS's row invariance holds (the test below);
    at 10 rows this machine's kernels round differently, and after 60 Adam steps (whose
    normalised updates grow any rounding difference) the adapters differ by up to ~6e-7, a
    difference no derivation bounds tightly, so no test claims a tolerance there."""
    base = load_base(BASE)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    flags = [p.requires_grad for p in base.parameters()]
    jobs = [
        AdapterJob(1, "replay", (("eval_every", 10), ("patience", 1), ("seed", 0), ("steps", 60))),
        AdapterJob(6, "replay", (("augment", True), ("eval_every", 20), ("lr", 3e-3), ("r", 2), ("seed", 1), ("steps", 60))),
        AdapterJob(9, "seed", (("batch_size", 64), ("steps", 60)), name="seed-9"),
    ]
    batched = train_batched(base, jobs, data_dir=str(data_root))
    assert any(r.stopped_early for _, r in batched) and not all(r.stopped_early for _, r in batched)  # the fleet shrinks mid-run
    for job, (model, result) in zip(jobs, batched, strict=True):
        solo_model, solo = train_adapter(base, job.digit, job.recipe, data_dir=str(data_root), **dict(job.overrides))
        ours, theirs = model.lora_state_dict("default"), solo_model.lora_state_dict("default")
        assert (result.steps, result.stopped_early) == (solo.steps, solo.stopped_early), job.name
        assert result.after.wrong_per_digit == solo.after.wrong_per_digit, job.name
        assert result.before.wrong_per_digit == solo.before.wrong_per_digit
        assert any(bool(v.any()) for k, v in ours.items() if "lora_B" in k), job.name  # trained: B left zero
        assert _tensors_equal(ours, theirs), job.name  # 128 and 64 rows per job: every GEMM row has the solo run's bits
    assert _tensors_equal(base.state_dict(), original) and [p.requires_grad for p in base.parameters()] == flags  # base untouched


@pytest.mark.parametrize("rows", [38, 64, 128])
def test_a_gemm_row_has_the_same_bits_whatever_rows_surround_it(rows: int) -> None:
    """The row invariance the batched trainer's equality contract rests on (training/batched.py):
    for every product the stacked forward and backward compute (each base layer forward, and the
    input gradient through it), a job's ``rows`` rows get the same bits stacked between other
    jobs' rows as alone."""
    torch.manual_seed(rows)
    base = load_base(BASE)
    for layer in (base.linear1, base.linear2, base.linear3):
        w = layer.weight.detach()  # (out, in)
        x = torch.randn(rows, w.shape[1])
        stacked = torch.cat([torch.randn(128, w.shape[1]), x, torch.randn(rows + 7, w.shape[1])])
        assert torch.equal(
            torch.nn.functional.linear(stacked, w, layer.bias)[128 : 128 + rows], torch.nn.functional.linear(x, w, layer.bias)
        )
        g = torch.randn(rows, w.shape[0])  # dL/d(output) -> dL/d(input) = g @ W
        g_stacked = torch.cat([torch.randn(128, w.shape[0]), g, torch.randn(rows + 7, w.shape[0])])
        assert torch.equal((g_stacked @ w)[128 : 128 + rows], g @ w)


def test_the_base_tables_give_the_bits_of_the_per_step_base(data_root: Path) -> None:
    """The first layer and the teacher computed once per image for the fleet, or per step: each
    adapter equals its solo run either way."""
    base = load_base(BASE)
    jobs = [AdapterJob(d, "replay", (("eval_every", 10), ("seed", d), ("steps", 20))) for d in (0, 4)]
    solo = [train_adapter(base, j.digit, j.recipe, data_dir=str(data_root), **dict(j.overrides)) for j in jobs]
    for tables in (True, False):
        for job, (model, result), (solo_model, alone) in zip(
            jobs, train_batched(base, jobs, data_dir=str(data_root), tables=tables), solo, strict=True
        ):
            assert _tensors_equal(model.lora_state_dict("default"), solo_model.lora_state_dict("default")), (job.name, tables)
            assert result.after.wrong_per_digit == alone.after.wrong_per_digit


def test_fleet_names_and_digit_lists() -> None:
    assert parse_digits("0-9") == list(range(10))
    assert parse_digits("7") == [7]
    assert parse_digits("1,4,7") == [1, 4, 7]
    assert parse_digits("0-2, 9,1") == [0, 1, 2, 9]
    for bad in ("", "a", "3-1", "10", "1,,2", "-3", "0-9-1"):
        with pytest.raises(InvalidArgumentError, match="digits"):
            parse_digits(bad)
    assert [j.name for j in fleet_jobs([2, 5])] == ["digit-2", "digit-5"]
    many = fleet_jobs([2], [0, 3], prefix="fleet", steps=10)
    assert [j.name for j in many] == ["fleet-2-s0", "fleet-2-s3"]
    assert [j.seed for j in many] == [0, 3] and all(dict(j.overrides)["steps"] == 10 for j in many)
    with pytest.raises(InvalidArgumentError):
        AdapterJob(10)


def test_local_fleet_refuses_bad_requests_before_training(tmp_path: Path) -> None:
    for bad in ("../x", "/abs", "Upper", "a b"):
        with pytest.raises(InvalidNameError):
            AdapterJob(1, name=bad)
    with pytest.raises(InvalidArgumentError):
        AdapterJob(True)  # a bool is not a digit
    with pytest.raises(InvalidArgumentError, match="seeds"):
        fleet_jobs([1], [-1])
    for bad, match in (
        ({"lr": -1.0}, "lr"),
        ({"r": 0}, "r must"),
        ({"lora_alpha": float("nan")}, "lora_alpha"),
        ({"val_size": 60000}, "val_size"),
    ):
        with pytest.raises(ValueError, match=match):  # refused on the driver, before Ray starts
            run_fleet(str(BASE), fleet_jobs([1], **bad), root=str(tmp_path / "reg"), register=True, executor="ray")
    jobs = fleet_jobs([1])
    with pytest.raises(InvalidArgumentError, match="register"):
        run_fleet(str(BASE), jobs, root=str(tmp_path / "reg"))
    with pytest.raises(InvalidArgumentError, match="executor"):
        run_fleet(str(BASE), jobs, root=str(tmp_path / "reg"), register=True, executor="dask")
    with pytest.raises(InvalidArgumentError, match="distinct"):
        run_fleet(str(BASE), [*jobs, *jobs], root=str(tmp_path / "reg"), register=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(InvalidArgumentError, match="empty"):
        run_fleet(str(BASE), jobs, root=str(tmp_path / "reg"), out=str(tmp_path / "full"))
    assert not (tmp_path / "reg").exists() and (tmp_path / "full" / "x").read_text() == "keep me"


# ----------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_local(data_root: Path):
    """A real local Ray with two CPUs (its workers are processes of their own)."""
    if os.environ.get("CI"):
        import ray  # in CI a missing Ray is a failure, not a skip
    else:
        ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture()
def registry_with_base(tmp_path: Path) -> AdapterRegistry:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("base", BASE)
    return reg


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and ".staging" not in p.parts}


def test_ray_fleet_matches_the_local_executor_and_registers_in_one_write(
    ray_local, registry_with_base: AdapterRegistry, tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = fleet_jobs(parse_digits("0-3"), steps=20, eval_every=10)
    calls: list[int] = []
    add_many = AdapterRegistry.add_many

    def counting(self, items):
        calls.append(len(items))
        return add_many(self, items)

    monkeypatch.setattr(AdapterRegistry, "add_many", counting)
    local = run_fleet("base", jobs, root=str(registry_with_base.root), out=str(tmp_path / "local"), data_dir=str(data_root), quiet=True)
    ours = run_fleet("base", jobs, root=str(registry_with_base.root), executor="ray", register=True, data_dir=str(data_root), quiet=True)
    assert calls == [4]  # the whole fleet in one registry write
    assert ours.failed == {} and [e["name"] for e in ours.registered] == ["digit-0", "digit-1", "digit-2", "digit-3"]
    for a, b in zip(ours.trained, local.trained, strict=True):
        folder = registry_with_base.path(a.name)
        assert _tensors_equal(load_file(folder / "adapter_model.safetensors"), load_file(Path(b.folder) / "adapter_model.safetensors"))
        for fname in ("adapter_config.json", "README.md"):  # the driver writes both alike
            assert (folder / fname).read_bytes() == (Path(b.folder) / fname).read_bytes(), (a.name, fname)
        assert read_adapter(folder).metadata == read_adapter(b.folder).metadata  # (safetensors orders it at random)
        assert a.metrics == b.metrics and a.steps == b.steps
        assert registry_with_base.get(a.name).metrics == a.metrics
    assert registry_with_base.verify() == []


def test_a_worker_reads_the_bases_folder_only_never_the_registry(
    registry_with_base: AdapterRegistry, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a Ray worker runs (``_train_one``) is handed the base's own folder: with the registry's
    index gone and any registry use an error, it still trains and returns the adapter's files."""
    from mnist_peft.fleet.executors import ray as fleet
    from mnist_peft.registry import adapter_registry as registry

    folder = registry_with_base.path("base")
    for p in registry_with_base.root.glob("index.*"):
        p.unlink()

    def no_registry(*args, **kwargs):
        raise AssertionError("a worker opened the registry")

    monkeypatch.setattr(registry.AdapterRegistry, "__init__", no_registry)
    job = AdapterJob(3, overrides=(("steps", 4), ("eval_every", 2)))
    got = fleet._train_one(job, "base", str(folder.absolute()), str(data_root), None)
    assert set(got) == {"name", "files", "base_revision"} and got["base_revision"] is None and set(got["files"]) == set(fleet.ADAPTER_FILES)
    assert b"linear2.lora_B.weight" in got["files"]["adapter_model.safetensors"]


def test_ray_fleet_survives_a_worker_killed_mid_job(
    ray_local, registry_with_base: AdapterRegistry, tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = fleet_jobs([4, 7], steps=10)
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.chdir(tmp_path)  # a relative registry root: the workers, elsewhere, still find it
    res = run_fleet(
        "base", jobs, root="reg", executor="ray", register=True, data_dir=str(data_root), quiet=True,
        _fault=("kill-once", "digit-7", str(marks)),
    )  # fmt: skip
    assert (marks / "killed-digit-7").exists()  # the worker did die once
    assert res.failed == {} and sorted(e["name"] for e in res.registered) == ["digit-4", "digit-7"]


def test_ray_fleet_with_a_job_that_always_fails(ray_local, registry_with_base: AdapterRegistry, data_root: Path) -> None:
    root = Path(registry_with_base.root)
    before = _snapshot(root)
    jobs = fleet_jobs([2, 5], steps=10)
    kwargs = {"root": str(root), "executor": "ray", "register": True, "data_dir": str(data_root), "quiet": True, "retries": 1}
    with pytest.raises(FleetError, match="digit-5") as err:
        run_fleet("base", jobs, _fault=("fail", "digit-5"), **kwargs)
    assert list(err.value.failed) == ["digit-5"] and "injected failure" in err.value.failed["digit-5"]
    assert _snapshot(root) == before  # nothing registered, nothing written
    with pytest.raises(FleetError, match="no job of the fleet succeeded"):  # partial, but nothing to keep
        run_fleet("base", jobs[1:], _fault=("fail", "digit-5"), allow_partial=True, **kwargs)
    assert _snapshot(root) == before
    res = run_fleet("base", jobs, _fault=("fail", "digit-5"), allow_partial=True, **kwargs)
    assert list(res.failed) == ["digit-5"] and [e["name"] for e in res.registered] == ["digit-2"]
    assert [e.name for e in registry_with_base.list()] == ["base", "digit-2"]


def test_a_job_with_bad_input_fails_at_once_without_retries(
    ray_local, registry_with_base: AdapterRegistry, tmp_path: Path, data_root: Path
) -> None:
    """An error of the job's own input (a recipe error raised in the worker) is the same every time:
    it comes back as the job's error after one attempt, and the others are kept."""
    log = tmp_path / "attempts"
    log.mkdir()
    res = run_fleet(
        "base", fleet_jobs([3, 6], steps=5), root=str(registry_with_base.root), executor="ray", register=True,
        data_dir=str(data_root), quiet=True, allow_partial=True, retries=2, _fault=("bad-input", "digit-3", str(log)),
    )  # fmt: skip
    assert list(res.failed) == ["digit-3"] and "injected input error" in res.failed["digit-3"]
    assert (log / "attempts-digit-3").read_text().count("attempt") == 1  # not retried
    assert [a.name for a in res.trained] == ["digit-6"]


# ----------------------------------------------------------------------------- what comes back from workers
def _returned(tmp_path: Path, name: str, *, digit: str = "3", steps: str = "200", config: dict | None = None, nan: bool = False,
              card: str | None = None, null_metadata: bool = False):  # fmt: skip
    """A copy of the reference digit-3 adapter as a worker would hand it back, with forged parts."""
    import dataclasses
    import json

    from mnist_peft.fleet.executors.base import FleetAdapter
    from mnist_peft.io.adapters import read_adapter, write_adapter

    files = read_adapter(REPO / "adapters" / "digit-3" / "v1")
    files.metadata.update({"digit": digit, "steps": steps})
    if config:
        files.config = dataclasses.replace(files.config, **config)
    folder = write_adapter(files, tmp_path / name, model_card=card)
    if nan:  # forged on disk: write_adapter refuses NaN
        from safetensors.torch import load_file, save_file

        tensors = load_file(folder / "adapter_model.safetensors")
        tensors["base_model.model.linear2.lora_B.weight"][0, 0] = float("nan")
        save_file(tensors, folder / "adapter_model.safetensors", metadata=files.metadata)
    if null_metadata:  # safetensors itself allows "__metadata__": null
        weights = folder / "adapter_model.safetensors"
        raw = weights.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = {**json.loads(raw[8 : 8 + n]), "__metadata__": None}
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        weights.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    return FleetAdapter(name, 3, 0, 0, str(folder), {})


def test_returned_adapters_are_checked_rewritten_and_scored_by_the_driver(tmp_path: Path, data_root: Path) -> None:
    from mnist_peft.fleet.accept import accept_returned as _accept
    from mnist_peft.io.adapters import load_stack
    from mnist_peft.model.mlp import base_fingerprint
    from mnist_peft.training.loop import evaluate

    base = load_base(BASE)
    forged = {
        "d3": {"card": "totally 100% accurate, visit evil.example"},
        "wrong-digit": {"digit": "5"},
        "wrong-r": {"config": {"r": 8}},
        "rslora": {"config": {"use_rslora": True}},
        "dropout": {"config": {"lora_dropout": 0.9}},
        "wrong-steps": {"steps": "401"},
        "arabic-steps": {"steps": "١٢"},
        "nan": {"nan": True},
        "null-metadata": {"null_metadata": True},
    }
    jobs = [AdapterJob(3, name=n) for n in forged]
    returned = [_returned(tmp_path / "t", n, **kw) for n, kw in forged.items()]  # handed back into the staging folder, as Ray's are
    failed: dict[str, str] = {}
    accepted = _accept(returned, jobs, base, "base", base_fingerprint(base), failed, data_dir=str(data_root), tmp=str(tmp_path / "t"))
    assert [a.name for a in accepted] == ["d3"]
    assert sorted(failed) == sorted(n for n in forged if n != "d3")
    assert "NaN" in failed["nan"] and "'digit': '5'" in failed["wrong-digit"] and "use_rslora" in failed["rslora"]
    expected = evaluate(load_stack(load_base(BASE), [REPO / "adapters" / "digit-3" / "v1"]))
    d3 = accepted[0]
    assert d3.metrics["wrong_per_digit"] == expected.wrong_per_digit and d3.steps == 200
    card = (Path(d3.folder) / "README.md").read_text()  # the driver's card, with the driver's numbers
    assert "evil.example" not in card and f"wrong_per_digit_after: {expected.wrong_per_digit}" in card
    failed = {}
    other = load_base(BASE)
    with torch.no_grad():
        other.linear1.weight.add_(1e-3)
    got = _accept([_returned(tmp_path / "t2", "other")], [AdapterJob(3, name="other")], other, "base", base_fingerprint(other), failed,
                  data_dir=str(data_root), tmp=str(tmp_path / "t2"))  # fmt: skip
    assert got == [] and "another base" in failed["other"]


@pytest.mark.parametrize(
    "got",
    [
        "not a dict",
        {"name": "someone-else", "files": {}},
        {"name": "d3", "files": {"adapter_config.json": b"{}"}},
        {"name": "d3", "files": {"adapter_config.json": b"{}", "adapter_model.safetensors": b"", "README.md": "text, not bytes"}},
        {"name": "d3", "files": {f: b"" for f in ("adapter_config.json", "adapter_model.safetensors", "README.md", "../evil")}},
        {"name": "d3", "error": "ValueError: the job's own input"},
        {
            "name": "d3",
            "files": {f: b"" for f in ("adapter_config.json", "adapter_model.safetensors", "README.md")},
            "base_revision": "b" * 40,
        },
        {"name": "d3", "files": {f: b"" for f in ("adapter_config.json", "adapter_model.safetensors", "README.md")}},  # read main
    ],
)
def test_malformed_worker_results_are_refused(tmp_path: Path, got: object) -> None:
    from mnist_peft.fleet.executors.ray import _receive

    with pytest.raises(FleetError):
        _receive(got, AdapterJob(3, name="d3"), tmp_path, revision="a" * 40)  # a fleet whose base was pinned to commit aaa...
    assert list(tmp_path.iterdir()) == []  # nothing written for a refused result


@pytest.mark.parametrize("ref", ["./no/base", "/no/such/base", "no/such/base"])
def test_a_missing_base_folder_is_named_as_a_folder_with_the_ray_executor_too(tmp_path: Path, ref: str) -> None:
    from mnist_peft.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match=r"base model folder .* does not exist"):
        run_fleet(ref, fleet_jobs([3], steps=2), root=str(tmp_path / "reg"), executor="ray", out=str(tmp_path / "out"), quiet=True)


def test_a_failure_while_registering_leaves_no_output_folder(
    registry_with_base: AdapterRegistry, tmp_path: Path, data_root: Path, monkeypatch
) -> None:
    def broken(self, items):
        raise OSError("disk full")

    monkeypatch.setattr(AdapterRegistry, "add_many", broken)
    before = _snapshot(Path(registry_with_base.root))
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="disk full"):  # an empty --out that existed is left empty
        run_fleet("base", fleet_jobs([1], steps=5), root=str(registry_with_base.root), register=True, out=str(tmp_path / "empty"),
                  data_dir=str(data_root), quiet=True)  # fmt: skip
    assert list((tmp_path / "empty").iterdir()) == []
    with pytest.raises(OSError, match="disk full"):
        run_fleet("base", fleet_jobs([1], steps=5), root=str(registry_with_base.root), register=True, out=str(tmp_path / "out"),
                  data_dir=str(data_root), quiet=True)  # fmt: skip
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert _snapshot(Path(registry_with_base.root)) == before


def test_partial_fleet_exit_status_is_3(monkeypatch, capsys) -> None:
    """With --allow-partial the kept adapters are registered and the exit status says some failed."""
    import mnist_peft.fleet.run as fleet
    from mnist_peft.cli.main import main
    from mnist_peft.fleet.run import FleetResult

    def fake(base_ref, jobs, **kwargs):
        assert kwargs["allow_partial"] and kwargs["executor"] == "ray"
        return FleetResult("ray", [], {"digit-5": "RuntimeError: boom"}, [{"name": "digit-2", "version": 1}])

    monkeypatch.setattr(fleet, "run_fleet", fake)
    code = main(["train-adapters", "--base", "base", "--digits", "2,5", "--register", "digit", "--executor", "ray", "--allow-partial"])
    assert code == 3 and "digit-5: RuntimeError: boom" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the command
def test_train_adapters_cli_registers_and_writes_the_fleet(tmp_path: Path, data_root: Path) -> None:
    root = tmp_path / "reg"
    AdapterRegistry(root).add("base", BASE)
    proc = run_cli(
        "train-adapters", "--base", "base", "--digits", "2,7", "--steps", "15", "--register", "fleet", "--out", str(tmp_path / "out"),
        "--root", str(root), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [a["name"] for a in out["trained"]] == ["fleet-2", "fleet-7"] and out["failed"] == {}
    assert out["registered"] == [{"name": "fleet-2", "version": 1}, {"name": "fleet-7", "version": 1}]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fleet-2", "fleet-7"]
    assert "fleet:" in proc.stderr  # progress lines even when the output is not a terminal
    reg = AdapterRegistry(root)
    assert reg.get("fleet-7").digit == 7 and reg.verify() == []


def test_train_adapters_cli_usage_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mnist_peft.cli.main import main

    for args, code, needle in [
        (["--base", "base"], 2, "--register PREFIX, --out DIR"),
        (["--base", "base", "--out", str(tmp_path / "o"), "--push", "me/x"], 2, "--push needs --register"),
        (["--base", "base", "--register", "f", "--digits", "3-1"], 2, "digits '3-1'"),
        (["--base", "base", "--register", "f", "--digits", "²"], 2, "digits '²'"),
        (["--base", "base", "--register", "f", "--seeds", "a"], 2, "--seeds"),
        (["--base", "base", "--register", "f", "--seeds", "0,-1"], 2, "seeds must be integers from 0"),
        (["--base", "base", "--register", "../x"], 2, "name"),
        (["--base", "base", "--register", "f", "--retries", "1"], 2, "--executor ray only"),
        (["--base", "base", "--register", "f", "--executor", "dask"], 2, "invalid choice"),
    ]:
        try:
            got = main(["train-adapters", *args, "--root", str(tmp_path / "reg")])
        except SystemExit as exc:  # argparse's own errors
            got = exc.code
        lines = capsys.readouterr().err.strip().splitlines()
        assert got == code, (args, lines)
        assert len(lines) == 1 and lines[0].startswith(("error:", "mnist-peft")) and needle in lines[0], (args, lines)
    assert not (tmp_path / "reg").exists()
    proc = run_cli("train-adapters", "--base", "base", "--register", "f", "--digits", "3-1", "--root", str(tmp_path / "reg"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1  # the real command, the same one line


def test_ray_workers_read_the_base_from_the_hub_and_the_fleet_is_pushed_in_one_commit(tmp_path: Path, data_root: Path) -> None:
    """The real CLI with the Ray executor (a Ray of its own): the base lives only on a (local, real)
    Hub and the workers download it themselves; the driver registers the fleet and pushes it to
    another repo in one commit."""
    from hub_server import HubServer

    hub = HubServer.start(tmp_path / "hub")
    try:
        env = hub.env(tmp_path / "hf-home")
        source = AdapterRegistry(tmp_path / "source")
        source.add("base", BASE)
        assert run_cli("push", "--repo-id", "team/mnist-base", "--root", str(source.root), env=env).returncode == 0
        root = tmp_path / "reg"
        proc = run_cli(
            "train-adapters", "--base", "team/mnist-base", "--digits", "3,8", "--steps", "10", "--executor", "ray",
            "--register", "digit", "--push", "team/fleet", "--root", str(root), "--json", env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["failed"] == {} and sorted(out["pushed"]["pushed"]) == ["digit-3@1", "digit-8@1"]
        repo = hub.repo_path("team/fleet")
        log = subprocess.run(
            ["git", "-C", str(repo), "log", "-1", "--format=%H", "--name-only"], capture_output=True, text=True, check=True
        )
        head, *files = log.stdout.split()
        assert head == out["pushed"]["commit"]
        assert {f.split("/")[0] for f in files if "/" in f} == {"digit-3", "digit-8"}  # both adapters in the push's one commit
        assert AdapterRegistry(root).verify() == []

        # The base was read at one commit, by the driver and every worker: a newer base pushed later
        # does not reach a worker that is handed that commit.
        base_head = subprocess.run(
            ["git", "-C", str(hub.repo_path("team/mnist-base")), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        assert out["base_revision"] == base_head.stdout.strip()
        newer = load_base(BASE)
        with torch.no_grad():
            newer.linear2.weight.mul_(1.01)
        newer.save_pretrained(tmp_path / "newer-base")
        source.add("base", tmp_path / "newer-base")
        assert run_cli("push", "--repo-id", "team/mnist-base", "--root", str(source.root), env=env).returncode == 0
        worker = subprocess.run(
            [sys.executable, "-c", _WORKER_AT_REVISION, out["base_revision"], str(data_root)],
            env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert worker.returncode == 0, worker.stderr[-2000:]
        from mnist_peft.model.mlp import base_fingerprint

        assert worker.stdout.split() == [base_fingerprint(load_base(BASE))] != [base_fingerprint(newer)]
    finally:
        hub.stop()


_WORKER_AT_REVISION = """
import sys
from mnist_peft.fleet.executors import ray as fleet
from mnist_peft.io.adapters import adapter_from_bytes
from mnist_peft.training.batched import AdapterJob
job = AdapterJob(3, overrides=(("steps", 2), ("eval_every", 1)))
got = fleet._train_one(job, "team/mnist-base", "team/mnist-base", sys.argv[2], None, sys.argv[1])
files = adapter_from_bytes(got["files"]["adapter_config.json"], got["files"]["adapter_model.safetensors"])
print(files.metadata["base_fingerprint"])
"""
