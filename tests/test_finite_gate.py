"""Issue 22, non-finite values at every door: a base or adapter whose numbers are not usable is refused
where it enters (load, eval, registry add and verify), merges refuse non-finite weights by default and
work inside inference_mode, and user-visible LoRA parameters own their storage."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import load_file, save_file

from mnist_peft.errors import MergeError, NonFiniteError
from mnist_peft.io.adapters import ADAPTER_WEIGHTS_NAME, KEY_PREFIX, load_adapter, read_adapter, save_adapter
from mnist_peft.io.peft_compat import FUSED_TOLERANCE
from mnist_peft.model.mlp import MnistMLP, load_base
from mnist_peft.numerics import MAX_ABS_OUTPUT
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.writes import DigitMismatchWarning
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel, set_forward_mode
from mnist_peft.tuners.lora.targets import lora_layers


def _small_base() -> MnistMLP:
    torch.manual_seed(0)
    return MnistMLP(48, 32, in_features=40).eval()


def _adapter(base: MnistMLP, folder: Path, *, scale: float = 1.0, metadata: dict[str, str] | None = None) -> Path:
    """A saved rank-2 adapter with non-zero A and B, its B multiplied by ``scale`` in the file itself
    (``save_adapter`` refuses to write an adapter whose outputs overflow: a hostile file is forged)."""
    torch.manual_seed(1)
    model = LoraModel(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=2, init_lora_weights=False))
    save_adapter(model, folder, metadata=metadata)
    if scale != 1.0:
        tensors = load_file(folder / ADAPTER_WEIGHTS_NAME)
        for key in tensors:
            if ".lora_B." in key:
                tensors[key] *= scale
        save_file(tensors, folder / ADAPTER_WEIGHTS_NAME, metadata=read_adapter(folder).metadata)
    return folder


def _nan_base(tmp_path: Path) -> Path:
    base = _small_base()
    with torch.no_grad():
        base.linear2.weight[3, 4] = float("nan")
    base.save_pretrained(tmp_path / "nan-base")
    return tmp_path / "nan-base"


# ----------------------------------------------------------------------------- bases
def test_a_base_with_a_nan_weight_is_refused_naming_the_tensor_and_the_file(tmp_path: Path) -> None:
    folder = _nan_base(tmp_path)
    with pytest.raises(NonFiniteError, match=r"'linear2\.weight'.*model\.safetensors.*NaN or Inf") as info:
        load_base(folder)
    assert info.value.key == "linear2.weight"
    with pytest.raises(NonFiniteError, match=r"linear2\.weight"):  # the Hub mixin's own entry point too
        MnistMLP.from_pretrained(str(folder))


def test_eval_and_registry_add_refuse_a_nan_base(tmp_path: Path) -> None:
    folder = _nan_base(tmp_path)
    proc = run_cli("eval", "--base", str(folder))
    assert proc.returncode == 1 and "linear2.weight" in proc.stderr and "NaN or Inf" in proc.stderr, proc.stderr
    assert "a bug" not in proc.stderr and proc.stderr.count("\n") == 1
    with pytest.raises(NonFiniteError, match=r"linear2\.weight"):
        AdapterRegistry(tmp_path / "reg").add("base", folder)
    assert not (tmp_path / "reg" / "base").exists()


# ----------------------------------------------------------------------------- adapters
def test_a_finite_adapter_of_magnitude_1e19_is_refused_by_add_and_load(tmp_path: Path) -> None:
    base = _small_base()
    folder = _adapter(base, tmp_path / "huge", scale=1e19)
    assert all(torch.isfinite(t).all() for t in read_adapter(folder).state_dict.values())  # finite: not a NaN check
    with pytest.raises(NonFiniteError, match=r"layer 'linear\d' .*probe batch"):
        AdapterRegistry(tmp_path / "reg").add("huge", folder)
    model = LoraModel(copy.deepcopy(base))
    with pytest.raises(NonFiniteError, match="probe batch"):
        load_adapter(model, folder, "x")
    assert model.peft_config == {}


def test_verify_reports_an_entry_whose_outputs_overflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry added before the probe existed (simulated: the probe switched off for that add)."""
    import mnist_peft.io.probe as probe

    base = _small_base()
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("good", _adapter(base, tmp_path / "good"))
    with monkeypatch.context() as m:
        m.setattr(probe, "probe_adapter", lambda files: None)
        reg.add("huge", _adapter(base, tmp_path / "huge", scale=1e19))
    problems = dict(reg.verify())
    assert list(problems) == ["huge@1"] and "probe batch" in problems["huge@1"]
    proc = run_cli("registry", "verify", "--root", str(tmp_path / "reg"))
    assert proc.returncode == 1 and "BAD huge@1" in proc.stdout and "good" not in proc.stdout, proc.stdout + proc.stderr


def test_the_probe_bound_sits_far_above_real_adapters_and_below_overflow(tmp_path: Path) -> None:
    base = _small_base()
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("fine", _adapter(base, tmp_path / "fine", scale=1e3))  # outputs ~1e3: a poor adapter, not a broken one
    with pytest.raises(NonFiniteError):
        reg.add("big", _adapter(base, tmp_path / "big", scale=MAX_ABS_OUTPUT * 10))
    assert reg.verify() == []


def test_the_shipped_registry_verifies_and_verify_stays_torch_free() -> None:
    """Every trained adapter of the repo's registry passes the probe; verifying imports no torch."""
    code = (
        "import sys\nfrom mnist_peft.registry.adapter_registry import AdapterRegistry\n"
        "problems = AdapterRegistry(sys.argv[1]).verify()\nprint(problems, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "adapters")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.stdout.strip() == "[] False", proc.stdout + proc.stderr


def test_registry_add_warns_when_a_digit_name_holds_another_digits_adapter(tmp_path: Path) -> None:
    base = _small_base()
    folder = _adapter(base, tmp_path / "five", metadata={"digit": "5"})
    with pytest.warns(DigitMismatchWarning, match=r"'digit-3' is named for digit 3, but the adapter records digit 5"):
        AdapterRegistry(tmp_path / "lib").add("digit-3", folder)
    proc = run_cli("registry", "add", "digit-3", str(folder), "--root", str(tmp_path / "cli"))
    assert proc.returncode == 0, proc.stderr
    assert "digit 3" in proc.stderr and "records digit 5" in proc.stderr
    quiet = run_cli("registry", "add", "digit-5", str(folder), "--root", str(tmp_path / "cli"))
    assert quiet.returncode == 0 and "records digit" not in quiet.stderr


# ----------------------------------------------------------------------------- merge()
def _with_inf(base: MnistMLP) -> LoraModel:
    torch.manual_seed(2)
    model = LoraModel(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=2, init_lora_weights=False))
    with torch.no_grad():
        model.model.linear3.lora_B["default"][0, 0] = float("inf")
    return model


@pytest.mark.parametrize("call", ["merge", "merge_and_unload"])
def test_the_api_merge_refuses_non_finite_weights_by_default_and_leaves_the_model_untouched(call: str) -> None:
    model = _with_inf(_small_base())
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(MergeError, match="linear3"):
        getattr(model, call)()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.merged_adapters == [] and model.peft_config


def test_safe_merge_false_is_the_callers_opt_out() -> None:
    model = _with_inf(_small_base())
    model.merge(safe_merge=False)  # peft's meaning: no check
    assert not torch.isfinite(model.model.linear3.base_layer.weight).all()


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_merging_inside_inference_mode_leaves_a_trainable_model(mode: str) -> None:
    torch.manual_seed(3)
    model = LoraModel(_small_base(), LoraConfig(r=2, lora_alpha=2, init_lora_weights=False))
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with context():
        model(x)  # the fused path
        model.merge()
        model(x)
        model.unmerge()
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)  # the failure was here: "Setting requires_grad=True on inference tensor"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    with context():
        plain = model.merge_and_unload()
    assert not any(p.is_inference() for p in plain.parameters())
    torch.nn.functional.cross_entropy(plain(x), y).backward()
    assert plain.linear1.weight.grad is not None


# ----------------------------------------------------------------------------- storage
def test_lora_a_owns_its_storage_after_an_inference_forward(tmp_path: Path) -> None:
    model = LoraModel(MnistMLP().eval(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    with torch.inference_mode():
        model(torch.randn(2, 784))  # the fused path: builds the layouts
    layers = [layer for _, layer in lora_layers(model.model)]
    for layer in layers:
        a = layer.lora_A["default"]
        assert a.untyped_storage().data_ptr() != layer.base_layer.weight.untyped_storage().data_ptr()
        assert a.untyped_storage().nbytes() == a.numel() * a.element_size()
    torch.save([layer.lora_A["default"] for layer in layers], tmp_path / "a.pt")
    raw = sum(layer.lora_A["default"].numel() * 4 for layer in layers)  # 60,544 bytes at r=4
    assert raw == 60_544 and (tmp_path / "a.pt").stat().st_size < raw + 4096  # was 11,323,169


@pytest.mark.parametrize("edit", ["data", "numpy"])
def test_in_place_edits_of_lora_a_reach_the_fused_path(edit: str) -> None:
    """The A's are copied into the fused buffer on every call, so an edit by any route is seen."""
    torch.manual_seed(4)
    model = LoraModel(_small_base(), LoraConfig(r=2, lora_alpha=2, init_lora_weights=False))
    x = torch.randn(16, 40)
    with torch.no_grad():
        before = model(x)
    a = model.model.linear2.lora_A["default"]
    if edit == "data":
        a.data.mul_(10)
    else:
        a.detach().numpy()[:] *= 10
    with torch.no_grad():
        after = model(x)
        set_forward_mode(model, "exact")
        exact = model(x)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, exact, rtol=0, atol=FUSED_TOLERANCE)


def test_a_nan_adapter_is_refused_through_the_one_gate(tmp_path: Path) -> None:
    base = _small_base()
    folder = _adapter(base, tmp_path / "a")
    tensors = load_file(folder / ADAPTER_WEIGHTS_NAME)
    tensors[KEY_PREFIX + "linear1.lora_A.weight"][0, 0] = float("nan")
    save_file(tensors, folder / ADAPTER_WEIGHTS_NAME, metadata=read_adapter(folder).metadata)
    with pytest.raises(NonFiniteError, match=r"tensor 'linear1\.lora_A\.weight' of adapter .* holds NaN or Inf values: "):
        load_adapter(LoraModel(copy.deepcopy(base)), folder, "x")
    with pytest.raises(NonFiniteError, match=r"linear1\.lora_A\.weight"):
        AdapterRegistry(tmp_path / "reg").add("nan", folder)
