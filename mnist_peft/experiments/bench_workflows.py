"""Benchmark figures of the workflows around the adapters: a training epoch, the ten digit adapters
trained batched vs one by one, the registry at scale, and the web app's throughput under load.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel

from .bench_measure import Figure, ratio_figure, time_round_robin

__all__ = ["bench_train_epoch", "bench_registry", "bench_train_ten_adapters", "bench_ui_throughput", "UI_SPECS"]


def bench_train_epoch(data_dir: str | None, *, reps: int, fraction: float = 1.0) -> Figure:
    """Our training loop (``fit``) vs a bare loop of the same tensor ops, one epoch at batch 128."""
    import torch.nn.functional as F

    from mnist_peft.model.data import MnistSplit, load_mnist
    from mnist_peft.model.mlp import MnistMLP
    from mnist_peft.training.loop import TrainConfig, fit, make_optimizer, seed_loader_permutation

    full = load_mnist(train=True, data_dir=data_dir)
    n = int(len(full) * fraction)
    data = MnistSplit(full.x[:n], full.y[:n])
    config = TrainConfig(epochs=1, batch_size=128, lr=2e-3, schedule="onecycle")

    def ours() -> None:
        torch.manual_seed(0)
        fit(MnistMLP(), data, config)

    def bare() -> None:
        torch.manual_seed(0)
        model = MnistMLP()
        model.train()
        params = list(model.parameters())
        opt = make_optimizer(params, config)
        steps = -(-n // 128)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
        for idx in seed_loader_permutation(n).split(128):
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    t = time_round_robin({"base": bare, "ours": ours}, reps=reps, warmup=0)
    return ratio_figure(
        "train_epoch",
        ours=t["ours"],
        base=t["base"],
        target=1.15,
        unit="s",
        note=f"one epoch ({n} images) at batch 128 with one-cycle Adam; base = a bare loop of the same ops",
    )


def _registry_of(root, n: int, source, entry_template: dict[str, object]):
    """A registry of ``n`` one-version entries ``tenant-00000``... as a real one looks on disk (a
    folder per entry holding the adapter's files, hard-linked: the index cost is what is measured,
    not ``n`` copies), indexed through the registry's own store in one transaction."""
    from mnist_peft.registry.adapter_registry import AdapterRegistry

    reg = AdapterRegistry(root)
    reg.root.mkdir(parents=True)
    store = reg.writable_store()  # made while the root is empty: an index missing beside entry folders is an error
    rows = []
    for i in range(n):
        name = f"tenant-{i:05d}"
        folder = reg.root / name / "v1"
        folder.mkdir(parents=True)
        for f in source.iterdir():
            os.link(f, folder / f.name)
        rows.append({**entry_template, "name": name, "version": 1, "path": f"{name}/v1"})
    store.write(add=rows, marks={r["name"]: 1 for r in rows})
    return reg


def bench_registry(kind: str, *, reps: int, entries: int) -> Figure:
    """``registry.add`` (a new version of one entry) or ``registry.get`` at ``entries`` entries, as a
    ratio to the same call at 10 entries; both registries measured in this run, interleaved."""
    import tempfile
    from pathlib import Path

    from mnist_peft.io.adapters import save_adapter
    from mnist_peft.model.mlp import MnistMLP
    from mnist_peft.registry.adapter_registry import AdapterRegistry

    torch.manual_seed(0)
    model = LoraModel(MnistMLP(), LoraConfig(r=4, lora_alpha=4, init_lora_weights=False))
    with tempfile.TemporaryDirectory() as tmp:
        source = save_adapter(model, Path(tmp) / "src", metadata={"digit": "7"})
        template = AdapterRegistry(Path(tmp) / "template").add("tenant-00000", source).to_dict()
        small = _registry_of(Path(tmp) / "small", 10, source, template)
        large = _registry_of(Path(tmp) / "large", entries, source, template)
        picks = {
            id(small): [f"tenant-{i:05d}" for i in range(10)],
            id(large): [f"tenant-{i:05d}" for i in range(0, entries, max(1, entries // 10))],
        }
        calls = {id(small): 0, id(large): 0}

        def call(reg: AdapterRegistry) -> None:
            names = picks[id(reg)]
            name = names[calls[id(reg)] % len(names)]
            calls[id(reg)] += 1
            reg.add(name, source) if kind == "add" else reg.get(name)

        t = time_round_robin({"ours": lambda: call(large), "base": lambda: call(small)}, reps=reps * (1 if kind == "add" else 5), warmup=2)
    return ratio_figure(
        f"registry_{kind}",
        ours=t["ours"],
        base=t["base"],
        target=2.0,
        unit="s",
        note=f"registry.{kind} at {entries:,} entries / at 10 entries"
        + (
            " (a new version of an existing entry: copy, fsync, sha256, one index transaction)"
            if kind == "add"
            else " (latest version of a name)"
        ),
    )


def bench_train_ten_adapters(base: nn.Module, data_dir: str | None, *, fraction: float = 1.0) -> Figure:
    """The ten digit adapters with the default recipe: one batched run vs ten ``train_adapter`` runs.

    Each side runs once (a run is tens of seconds), sequential first; both train the same ten
    adapters (the batched ones equal the solo ones, see :mod:`mnist_peft.fleet.run`). Below a full
    ``fraction`` it is a quick check of the machinery, not the figure: three adapters, the recipe's
    steps scaled down alike on both sides.
    """
    from mnist_peft.training.batched import AdapterJob, train_batched
    from mnist_peft.training.recipes import get_recipe, train_adapter

    steps = max(10, round(get_recipe("adapter", "replay").steps * fraction))  # type: ignore[attr-defined]
    overrides = {} if fraction >= 1 else {"steps": steps}
    digits = range(10) if fraction >= 1 else range(3)  # a quick run checks the machinery on three
    jobs = [AdapterJob(d, "replay", tuple(overrides.items())) for d in digits]
    frozen = copy.deepcopy(base).requires_grad_(False)
    from mnist_peft.model.data import load_mnist

    for train in (True, False):  # read (and cached) before either side is timed
        load_mnist(train=train, data_dir=data_dir)

    def sequential() -> None:
        for d in digits:
            train_adapter(frozen, d, "replay", data_dir=data_dir, **overrides)

    def batched() -> None:
        train_batched(frozen, jobs, data_dir=data_dir)

    t = time_round_robin({"base": sequential, "ours": batched}, reps=1, warmup=0)
    return ratio_figure(
        "train_ten_adapters",
        ours=t["ours"],
        base=t["base"],
        target=0.5,
        unit="s",
        note=f"{len(digits)} digit adapters, replay recipe ({steps if overrides else 'its'} steps, early stopping on): one batched run "
        "(base = ten train_adapter runs one after another); ratio = batched / sequential",
    )


UI_SPECS = ("", "digit-9", "digit-9@1:0.5,digit-3@1:1", "digit-7@1:-1", "none", "digit-3@1:0.5,digit-8@1:0.5,digit-1@1:0.25")


def bench_ui_throughput(base: nn.Module, x: torch.Tensor, *, data_dir: str | None, requests: int = 200, clients: int = 20) -> Figure:
    """The web app's ``/predict`` under load: ``requests`` requests (test images, a mix of adapter
    stacks and none) from ``clients`` concurrent ``gradio_client`` clients, against the same requests
    one at a time from one client; ratio = batched throughput / sequential throughput (higher is
    better). The app is ``mnist-peft ui`` in its own process, over a registry of ``base`` and ten
    r=4 adapters; the same 20 clients on an endpoint that does not batch are measured as a control."""
    import tempfile
    from pathlib import Path

    from mnist_peft.app.api import UNBATCHED_API_NAME
    from mnist_peft.app.blocks import require_gradio
    from mnist_peft.app.launch import spawn_app
    from mnist_peft.app.load import run_load
    from mnist_peft.io.adapters import save_adapter
    from mnist_peft.model.data import MNIST_MEAN, MNIST_STD
    from mnist_peft.registry.adapter_registry import AdapterRegistry

    require_gradio()
    with tempfile.TemporaryDirectory(prefix="mnist-peft-bench-ui-") as tmp:
        registry = AdapterRegistry(Path(tmp) / "registry")
        base.save_pretrained(Path(tmp) / "base")
        registry.add("base", Path(tmp) / "base")
        for d in range(10):
            torch.manual_seed(d)
            model = LoraModel(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
            registry.add(f"digit-{d}", save_adapter(model, Path(tmp) / f"digit-{d}", metadata={"digit": str(d)}), digit=d)
        pixels = (x[:requests].reshape(-1, 28, 28) * MNIST_STD + MNIST_MEAN).mul(255).round().clamp(0, 255).div(255)  # the 8-bit images
        load = [(pixels[k].tolist(), UI_SPECS[k % len(UI_SPECS)]) for k in range(len(pixels))]
        args = ["--data-dir", data_dir] if data_dir else []
        with spawn_app(registry.root, args=args) as url:
            run_load(url, load[: len(UI_SPECS)], clients=1)  # every stack loaded once before the clock runs
            batched = run_load(url, load, clients=clients)[1]
            unbatched = run_load(url, load, clients=clients, api_name="/" + UNBATCHED_API_NAME)[1]
            sequential = run_load(url, load, clients=1)[1]
    ratio = batched.throughput / sequential.throughput
    return Figure(
        "ui_throughput",
        ours=batched.throughput,
        peft=None,
        base=sequential.throughput,
        ratio=ratio,
        target=3.0,
        unit="req/s",
        passed=ratio >= 3.0,
        note=f"{len(load)} /predict requests, higher is better (passes at ratio >= 3): {clients} clients batched "
        f"{batched.throughput:.1f} req/s (p50 {batched.percentile(0.5) * 1e3:.0f} ms, p99 {batched.percentile(0.99) * 1e3:.0f} ms); "
        f"the same {clients} clients without batching {unbatched.throughput:.1f} req/s (p50 {unbatched.percentile(0.5) * 1e3:.0f} ms, "
        f"p99 {unbatched.percentile(0.99) * 1e3:.0f} ms; batched / unbatched = {batched.throughput / unbatched.throughput:.2f}, "
        f"what batching itself adds); one client, one request at a time {sequential.throughput:.1f} req/s "
        f"(p50 {sequential.percentile(0.5) * 1e3:.0f} ms, p99 {sequential.percentile(0.99) * 1e3:.0f} ms; gradio_client polls "
        "every 50 ms, which floors one request's latency)",
    )
