"""save_packed / load_packed / pack: the file round trip, interop with plain safetensors, and clear errors."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrizations

import ternq
from ternq import ArchitectureMismatchError, ChecksumError, FormatError, KBitConfig, Rule, TernaryConfig
from ternq.cli import inspect_file, verify_file
from ternq.numpy_format import KEY_MANIFEST, build_metadata, crc32_hex, load_numpy
from ternq.runtime import is_packed

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm. is deprecated:FutureWarning")

ROOT = Path(__file__).resolve().parents[1]


def mlp() -> nn.Module:
    return nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(4)))


class Mixed(nn.Module):
    """Every layer kind the format stores: plain, weight-normed (both APIs), transposed and grouped convs, an
    embedding, BatchNorm buffers (with an int64 counter), a functional call and a float head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.conv = parametrizations.weight_norm(nn.Conv1d(8, 12, 3, padding=1))
        self.legacy = torch.nn.utils.weight_norm(nn.Conv1d(12, 12, 5, padding=2, groups=3))
        self.up = nn.ConvTranspose1d(12, 6, 4, stride=2, padding=1)
        self.norm = nn.BatchNorm1d(6)
        self.proj = nn.Parameter(torch.randn(9, 6) / 3)
        self.head = nn.Linear(9, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens).transpose(1, 2)
        h = torch.relu(self.legacy(torch.relu(self.conv(h))))
        h = self.norm(self.up(h)).transpose(1, 2)
        return self.head(torch.tanh(F.linear(h, self.proj)))


RULES = [
    Rule("emb", KBitConfig(bits=4, granularity="channel")),
    Rule("conv", TernaryConfig(granularity="group", group_size=7)),
    Rule("legacy", KBitConfig(bits=2)),
    Rule("up", KBitConfig(bits=8, granularity="channel", act_bits=None, input_norm=None)),
    Rule("proj", TernaryConfig(input_norm="rmsnorm")),
]


def mixed_qat(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ternq.quantize(Mixed(), include=[*RULES, nn.Embedding], exclude=["head"])
    model.train()
    with torch.no_grad():  # move the BatchNorm statistics away from their initial values
        model(torch.randint(0, 11, (4, 10)))
    return model.eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 11, (3, 10), generator=torch.Generator().manual_seed(1))


def assert_close_to_qat(y: torch.Tensor, y_qat: torch.Tensor) -> None:
    # the runtime computes the QAT forward from the same integer codes; only float rounding differs
    torch.testing.assert_close(y, y_qat, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory):
    torch.manual_seed(0)
    model = ternq.quantize(mlp()).eval()
    path = tmp_path_factory.mktemp("mlp") / "mlp.safetensors"
    ternq.save_packed(model, path)
    return model, path


# --- the done criterion: a 4 x Linear(1024) MLP ------------------------------------------------------------------


def test_mlp_bits_per_weight_and_plain_safetensors(mlp_file):
    model, path = mlp_file
    info = inspect_file(str(path))
    packed = [r for r in info["tensors"] if r["kind"] == "packed"]
    assert len(packed) == 4 and all(r["encoding"] == "trit5" for r in packed)
    assert all(r["codes_bits_per_weight"] <= 1.61 and r["bits_per_weight"] <= 1.61 for r in packed)
    assert info["totals"]["fp32_ratio"] < 1 / 19  # 16 MiB of fp32 -> ~0.82 MiB
    with safe_open(str(path), framework="numpy") as f:
        assert f.get_tensor("0.weight.codes").dtype == np.uint8
        assert f.get_tensor("0.weight.codes").shape == (1024 * 1024 // 5 + 1,)
        assert f.get_tensor("2.bias").dtype == np.float32
        manifest = json.loads(f.metadata()[KEY_MANIFEST])
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(manifest["tensors"])
        torch.testing.assert_close(f.get_tensor("3.bias"), model[3].bias.detach(), rtol=0, atol=0)
    assert manifest["layers"]["1.weight"]["config"] == TernaryConfig().to_dict()
    assert verify_file(str(path))["ok"]


def test_mlp_reloads_into_a_fresh_skeleton(mlp_file):
    model, path = mlp_file
    first = ternq.load_packed(path, mlp()).eval()
    second = ternq.load_packed(path, mlp()).eval()
    assert all(is_packed(m) for m in first)
    x = torch.randn(5, 1024)
    with torch.no_grad():
        y_qat, y1, y2 = model(x), first(x), second(x)
    assert torch.equal(y1, y2)
    assert_close_to_qat(y1, y_qat)
    for i in range(4):
        codes, scale = model[i].weight_codes()
        assert torch.equal(first[i].codes, codes) and torch.equal(first[i].scale, scale)
    # a loaded model packs to the very same file content
    assert ternq.pack(first).metadata == ternq.pack(model).metadata


# --- every layer kind, configs and options -----------------------------------------------------------------------


def test_mixed_model_round_trip(tmp_path):
    model = mixed_qat()
    path = tmp_path / "mixed.safetensors"
    ternq.save_packed(model, path)
    manifest = ternq.pack(model).manifest
    encodings = {k: v["encoding"] for k, v in manifest["layers"].items()}
    assert encodings == {"emb.weight": "int4", "conv.weight": "trit5", "legacy.weight": "int2",
                         "up.weight": "int8", "proj": "trit5"}
    assert manifest["layers"]["proj"]["type"] == "F.linear"
    assert manifest["selection"]["kept_float"] == {"head": 'exclude[0] "head"'}
    floats = {k for k, v in manifest["tensors"].items() if v["role"] == "float"}
    assert "norm.num_batches_tracked" in floats and "head.weight" in floats
    assert not any(k.startswith(("conv.parametrizations", "legacy.weight_")) for k in floats)

    loaded = ternq.load_packed(path, Mixed()).eval()
    x = tokens()
    with torch.no_grad():
        assert_close_to_qat(loaded(x), model(x))
    for key in ("norm.running_mean", "norm.running_var", "norm.num_batches_tracked", "head.weight", "up.bias"):
        assert torch.equal(loaded.state_dict()[key], model.state_dict()[key]), key
    repacked, original = ternq.pack(loaded).manifest, ternq.pack(model).manifest
    assert repacked["selection"]["kept_float"] == {"head": 'exclude[0] "head"'}  # the loaded model carries it
    assert {**repacked, "selection": None} == {**original, "selection": None}
    assert repacked["selection"]["quantized"] == original["selection"]["quantized"]


class TiedHead(nn.Module):
    """A language-model head tied to the input embedding by a functional call: ``F.linear(h, emb.weight)``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)

    def forward(self, ids):
        return F.linear(self.mid(self.emb(ids)), self.emb.weight)


@pytest.mark.parametrize("meta", [False, True])
def test_functional_call_on_a_weight_another_module_uses(meta: bool):
    """The Embedding (kept float) still reads its float weight after loading; F.linear reads the codes."""
    torch.manual_seed(0)
    model = ternq.quantize(TiedHead()).eval()
    ids = torch.tensor([[1, 2, 3]])
    with torch.device("meta" if meta else "cpu"):
        skeleton = TiedHead()
    loaded = ternq.load_packed(ternq.pack(model), skeleton).eval()
    with torch.no_grad():
        assert_close_to_qat(loaded(ids), model(ids))
        torch.testing.assert_close(loaded.emb(ids), model.emb(ids))
    again = ternq.load_packed(ternq.pack(loaded), TiedHead()).eval()  # a loaded model packs the same way
    with torch.no_grad():
        assert_close_to_qat(again(ids), model(ids))


def test_functional_linear_runs_on_runtime_kernels():
    """A loaded F.linear call computes on a packed runtime Linear that shares the call's codes (no copy),
    matches the QAT call within the runtime tolerance, and still gives the input a gradient (weight_only)."""
    model = mixed_qat()
    loaded = ternq.load_packed(ternq.pack(model), Mixed()).eval()
    fq = loaded.ternq_fq_0
    x = tokens()
    with torch.no_grad():
        assert_close_to_qat(loaded(x), model(x))
    runtime = fq.__dict__["_runtime"][1]
    assert is_packed(runtime) and runtime.ternq_codes.data_ptr() == fq.codes.data_ptr()
    assert runtime.kernel in ("int8_gemm", "int8_gemm_t", "int8_tiled", "weight_only")
    assert not any(m is runtime for m in loaded.modules())  # not a site of its own when re-packing
    h = torch.randn(2, 6, requires_grad=True)
    fq(h, loaded.proj).sum().backward()
    assert h.grad is not None and runtime.kernel == "weight_only"


def test_a_quantized_skeleton_works_too():
    model = mixed_qat()
    skeleton = ternq.quantize(Mixed(), include=[*RULES, nn.Embedding], exclude=["head"])
    loaded = ternq.load_packed(ternq.pack(model), skeleton).eval()
    assert [n for n, m in loaded.named_modules() if "ternq_fq" in n] == ["ternq_fq_0"]  # replaced, not doubled
    x = tokens()
    with torch.no_grad():
        assert_close_to_qat(loaded(x), model(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float_dtype_option(tmp_path, dtype):
    model = mixed_qat()
    path = tmp_path / "half.safetensors"
    ternq.save_packed(model, path, float_dtype=dtype)
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("head.weight").dtype == dtype
        assert f.get_tensor("emb.weight.scale").dtype == torch.float32  # scales stay float32
        assert f.get_tensor("norm.num_batches_tracked").dtype == torch.int64
    loaded = ternq.load_packed(path, Mixed())
    assert loaded.head.weight.dtype == torch.float32
    assert torch.equal(loaded.head.weight, model.head.weight.detach().to(dtype).float())
    assert os.path.getsize(path) < os.path.getsize(ternq.pack(model).save(tmp_path / "f32") or tmp_path / "f32")


def test_meta_skeleton_allocates_nothing_for_packed_weights(mlp_file):
    model, path = mlp_file
    with torch.device("meta"):
        skeleton = mlp()
    loaded = ternq.load_packed(path, skeleton).eval()
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    x = torch.randn(2, 1024)
    with torch.no_grad():
        assert_close_to_qat(loaded(x), model(x))


def test_skeleton_builds_without_initializing(tmp_path):
    """`ternq.skeleton()`: the mixed model (every layer kind, BatchNorm buffers, weight norm) builds on meta with no
    initialization run, loads like any skeleton, and in a fresh process does not import torch._dynamo (which
    initializing meta tensors does: 1-3 s of a one-shot load)."""
    model = mixed_qat()
    path = tmp_path / "mixed.safetensors"
    ternq.save_packed(model, path)
    with ternq.skeleton():
        skeleton = Mixed()
    assert all(t.is_meta for t in [*skeleton.parameters(), *skeleton.buffers()])
    loaded = ternq.load_packed(path, skeleton).eval()
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    with torch.no_grad():
        assert_close_to_qat(loaded(tokens()), model(tokens()))
    assert torch.ones(2).device.type == "cpu"  # the context is gone
    code = ("import sys, torch, ternq\nfrom torch import nn\nwith ternq.skeleton():\n"
            "    m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3), nn.Conv1d(3, 3, 5), nn.LayerNorm(3))\n"
            "print('torch._dynamo' in sys.modules, all(p.is_meta for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.split() == ["False", "True"]


def test_dequantize_option_gives_float_layers_with_hard_weights(tmp_path):
    torch.manual_seed(0)
    model = ternq.quantize(nn.Sequential(nn.Linear(6, 5), nn.Conv1d(5, 4, 3)),
                           include=[Rule("1", KBitConfig(bits=4, granularity="group", group_size=4)), "0"]).eval()
    path = tmp_path / "d.safetensors"
    ternq.save_packed(model, path)
    loaded = ternq.load_packed(path, nn.Sequential(nn.Linear(6, 5), nn.Conv1d(5, 4, 3)), dequantize=True)
    assert type(loaded[0]) is nn.Linear and type(loaded[1]) is nn.Conv1d
    for i in range(2):
        assert torch.equal(loaded[i].weight, model[i].hard_weight())
    numpy_state = load_numpy(path, dequantize=True)
    for i in range(2):
        np.testing.assert_array_equal(numpy_state[f"{i}.weight"], model[i].hard_weight().detach().numpy())
    with pytest.raises(ArchitectureMismatchError, match="weight_norm"):
        ternq.load_packed(ternq.pack(mixed_qat()), Mixed(), dequantize=True)


def tied_pair() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    model[1].weight = model[0].weight
    return model


@pytest.mark.parametrize("meta", [False, True])
def test_dequantize_option_keeps_tied_weights_tied(meta: bool):
    torch.manual_seed(0)
    model = ternq.quantize(tied_pair()).eval()
    with torch.device("meta" if meta else "cpu"):
        skeleton = tied_pair()
    loaded = ternq.load_packed(ternq.pack(model), skeleton, dequantize=True)
    assert loaded[0].weight is loaded[1].weight  # resumed training keeps updating one weight
    assert torch.equal(loaded[0].weight, model[0].hard_weight())
    two = ternq.quantize(tied_pair(), include=[Rule("0", KBitConfig(bits=4)), "1"]).eval()
    loaded = ternq.load_packed(ternq.pack(two), tied_pair(), dequantize=True)  # two configs: two hard weights
    for i in range(2):
        assert torch.equal(loaded[i].weight, two[i].hard_weight())
    # an Embedding kept float, tied to a quantized output Linear: the Embedding keeps its float weight
    lm = nn.Sequential(nn.Embedding(6, 6), nn.Linear(6, 6, bias=False))
    lm[1].weight = lm[0].weight
    skeleton = copy.deepcopy(lm)
    ternq.quantize(lm)
    loaded = ternq.load_packed(ternq.pack(lm), skeleton, dequantize=True)
    assert torch.equal(loaded[0].weight, lm[0].weight) and torch.equal(loaded[1].weight, lm[1].hard_weight())


def test_repacking_a_loaded_half_model_keeps_its_weight_dtype(tmp_path):
    model = ternq.quantize(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).to(torch.bfloat16))
    loaded = ternq.load_packed(ternq.pack(model), nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).bfloat16())
    for source in (model, loaded):
        ternq.save_packed(source, tmp_path / "m.safetensors")
        with safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as f:
            manifest = json.loads(f.metadata()[KEY_MANIFEST])
        assert {layer["dtype"] for layer in manifest["layers"].values()} == {"BF16"}


def test_in_memory_pack_is_the_file(tmp_path, mlp_file):
    model, path = mlp_file
    packed = ternq.pack(model)
    assert packed.to_bytes() == path.read_bytes()
    # any safetensors writer makes a valid ternq file from the same content
    other = tmp_path / "by_safetensors.safetensors"
    save_file(packed.tensors, str(other), metadata=packed.metadata)
    assert verify_file(str(other))["ok"]
    loaded = ternq.load_packed(other, mlp())
    assert torch.equal(loaded[0].codes, model[0].weight_codes()[0])


def test_numpy_reader_without_torch(tmp_path):
    """A device without torch decodes the file with ternq/format/reader.py alone."""
    model = mixed_qat()
    path = tmp_path / "m.safetensors"
    ternq.save_packed(model, path)
    expected = load_numpy(path, dequantize=True)
    np.savez(tmp_path / "expected.npz", **expected)
    script = textwrap.dedent(f"""
        import importlib.util, sys
        sys.modules["torch"] = None  # any import of torch now fails
        spec = importlib.util.spec_from_file_location("nf", {str(ROOT / "ternq" / "format" / "reader.py")!r})
        nf = sys.modules["nf"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(nf)
        import numpy as np
        state = nf.load_numpy({str(path)!r}, dequantize=True)
        expected = np.load({str(tmp_path / "expected.npz")!r})
        assert sorted(state) == sorted(expected.files), (sorted(state), expected.files)
        assert all(np.array_equal(state[k], expected[k]) for k in state)
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
        print("decoded", len(state))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"decoded {len(expected)}"
    hard = {"emb.weight": model.emb, "conv.weight": model.conv, "up.weight": model.up}
    for key, layer in hard.items():
        np.testing.assert_allclose(expected[key], layer.hard_weight().detach().numpy(), rtol=1e-6, atol=1e-7)


def test_atomic_write_keeps_the_old_file(tmp_path, mlp_file, monkeypatch):
    model, saved = mlp_file
    mask = os.umask(0)
    os.umask(mask)
    assert saved.stat().st_mode & 0o777 == 0o666 & ~mask  # a normal file's mode, not the temp file's 0600
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"previous content")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        ternq.save_packed(model, path)
    assert path.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_peak_memory_of_loading_stays_below_the_fp32_model(tmp_path):
    """Loading into a float skeleton allocates far less than the fp32 model (the float weights are dropped as
    each layer is packed); measured as the growth of the process's peak RSS in a fresh interpreter."""
    script = textwrap.dedent(f"""
        import torch, ternq
        from torch import nn
        def build():
            return nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(6)))
        torch.manual_seed(0)
        ternq.save_packed(ternq.quantize(build()), {str(tmp_path / "big.safetensors")!r})
        skeleton = build()
        fp32 = sum(p.numel() * 4 for p in skeleton.parameters())
        def rss(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
        before = rss("VmRSS:")
        ternq.load_packed({str(tmp_path / "big.safetensors")!r}, skeleton)
        print(fp32, rss("VmHWM:") - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    if out.returncode != 0 and "clear_refs" in out.stderr:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    assert out.returncode == 0, out.stderr
    fp32, growth = map(int, out.stdout.split())
    assert growth < 0.5 * fp32, (growth, fp32)


# --- bad input: clear errors ---------------------------------------------------------------------------------------


def test_skeleton_of_another_architecture(mlp_file):
    _, path = mlp_file
    with pytest.raises(ArchitectureMismatchError, match=r"'0.weight'.*shape \[1024, 1024\].*\[512, 1024\]"):
        ternq.load_packed(path, nn.Sequential(nn.Linear(1024, 512), *(nn.Linear(1024, 1024) for _ in range(3))))
    with pytest.raises(ArchitectureMismatchError, match="no module '3'"):
        ternq.load_packed(path, nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(3))))
    with pytest.raises(ArchitectureMismatchError, match="'2' is a Conv1d"):
        ternq.load_packed(path, nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024),
                                              nn.Conv1d(1024, 1024, 1), nn.Linear(1024, 1024)))
    extra = mlp()
    extra.register_buffer("step", torch.zeros(()))
    with pytest.raises(ArchitectureMismatchError, match="skeleton's tensor 'step' is not in the file"):
        ternq.load_packed(path, extra)
    no_bias = nn.Sequential(*(nn.Linear(1024, 1024, bias=i != 1) for i in range(4)))
    with pytest.raises(ArchitectureMismatchError, match="file's tensor '1.bias' has no place"):
        ternq.load_packed(path, no_bias)


def test_skeleton_is_untouched_when_validation_fails(mlp_file):
    _, path = mlp_file
    skeleton = nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(3)), nn.Linear(1024, 8))
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(ArchitectureMismatchError):
        ternq.load_packed(path, skeleton)
    assert all(torch.equal(before[k], v) for k, v in skeleton.state_dict().items())
    assert not any(is_packed(m) for m in skeleton)


def rewrite(packed: ternq.PackedModel, edit) -> bytes:
    """The file with its manifest edited by `edit(manifest)`, CRC recomputed: metadata that lies consistently."""
    manifest = packed.manifest
    edit(manifest)
    return ternq.PackedModel(packed.tensors, build_metadata(manifest)).to_bytes()


def small_packed() -> ternq.PackedModel:
    torch.manual_seed(0)
    return ternq.pack(ternq.quantize(nn.Sequential(nn.Linear(7, 6), nn.Linear(6, 4))))


def small_skeleton() -> nn.Module:
    return nn.Sequential(nn.Linear(7, 6), nn.Linear(6, 4))


def set_layer(key: str, field: str, value):
    def edit(manifest):
        manifest["layers"]["0.weight"][field] = value if key == "" else {**manifest["layers"]["0.weight"][field],
                                                                          key: value}
    return edit


LIES = {
    "shape": (set_layer("", "shape", [6, 8]), r"count 42 is not the element count 48"),
    "count": (set_layer("", "count", 40), r"count 40 is not the element count 42"),
    "encoding": (set_layer("", "encoding", "int4"), r"encoding 'int4' does not match its config"),
    "unknown encoding": (set_layer("", "encoding", "trit6"), r"unknown encoding 'trit6'"),
    "config kind": (set_layer("kind", "config", "float"), r"kind 'float'"),
    "config bits": (set_layer("bits", "config", 4), r"config has unknown fields \['bits'\]"),
    "granularity": (set_layer("granularity", "config", "channel"), r"scale tensor '0.weight.scale' is F32 \[1\]"),
    "codes name": (set_layer("", "codes", "1.bias"), r"tensor '1.bias' has role 'float', expected 'codes'"),
    "out_dim": (set_layer("", "out_dim", 2), r"out_dim 2 is not a dimension"),
    "type": (set_layer("", "type", "torch.nn.modules.conv.Conv1d"), r"packs layer '0.weight' \(.*Conv1d\).*Linear"),
    "tensor dtype": (lambda m: m["tensors"]["0.bias"].update(dtype="F16"), r"header says F32 \[6\]"),
    "tensor shape": (lambda m: m["tensors"]["0.bias"].update(shape=[3, 2]), r"header says F32 \[6\]"),
    "missing tensor": (lambda m: m["tensors"].pop("1.bias"), r"'1.bias' is in the file but not in the manifest"),
    "extra tensor": (lambda m: m["tensors"].update(ghost=m["tensors"]["1.bias"]), r"'ghost' is listed"),
    "unused codes": (lambda m: m["layers"].pop("1.weight"), r"'1.weight.codes' has role 'codes' but no layer"),
    "crc format": (lambda m: m["tensors"]["0.bias"].update(crc32="XYZ"), r"crc32 'XYZ'"),
    "crc value": (lambda m: m["tensors"]["0.bias"].update(crc32="00000000"), r"'0.bias'.*CRC32 00000000"),
    "format_version": (lambda m: m.update(format_version=2), r"format_version 2 contradicts"),
    "layers type": (lambda m: m.update(layers=[]), r"field 'layers'"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_metadata_that_lies(lie):
    edit, message = LIES[lie]
    data = rewrite(small_packed(), edit)
    with pytest.raises(FormatError, match=message) as info:
        ternq.load_packed(data, small_skeleton())
    if lie == "crc value":
        assert isinstance(info.value, ChecksumError)


def test_non_finite_numbers_in_a_hostile_manifest():
    packed = small_packed()
    text = packed.metadata[KEY_MANIFEST].replace('"act_bits":8', '"act_bits":Infinity', 1)
    metadata = {**packed.metadata, KEY_MANIFEST: text, "ternq.manifest_crc32": crc32_hex(text.encode())}
    with pytest.raises(FormatError, match="Infinity is not a JSON number"):
        ternq.load_packed(ternq.PackedModel(packed.tensors, metadata).to_bytes(), small_skeleton())


def test_unknown_version_and_foreign_files(tmp_path):
    packed = small_packed()
    newer = {**packed.metadata, "ternq.version": "2"}
    with pytest.raises(FormatError, match="version 2 is newer than this reader supports"):
        ternq.load_packed(ternq.PackedModel(packed.tensors, newer).to_bytes(), small_skeleton())
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    with pytest.raises(FormatError, match="not a ternq file"):
        ternq.load_packed(plain, small_skeleton())
    with pytest.raises(FormatError, match="too short"):
        ternq.load_packed(b"abc", small_skeleton())
    with pytest.raises(FileNotFoundError):
        ternq.load_packed(tmp_path / "missing.safetensors", small_skeleton())


def test_hostile_headers_fail_fast():
    huge_len = (10**12).to_bytes(8, "little") + b"{}"
    with pytest.raises(FormatError, match="exceeds the 16777216-byte limit"):
        ternq.load_packed(huge_len, small_skeleton())
    past_end = (1000).to_bytes(8, "little") + b"{}"
    with pytest.raises(FormatError, match="runs past the end"):
        ternq.load_packed(past_end, small_skeleton())
    deep = b"[" * 200_000 + b"]" * 200_000 + b" " * 3_000_000  # padded below the containers-per-byte bound
    with pytest.raises(FormatError, match="nested too deeply"):
        ternq.load_packed(len(deep).to_bytes(8, "little") + deep, small_skeleton())

    def header(obj) -> bytes:
        raw = json.dumps(obj).replace(" ", "").encode()
        return len(raw).to_bytes(8, "little") + raw

    giant = {"t": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 4 * 10**18]}}
    with pytest.raises(FormatError, match=r"need more than 2\*\*64 bits"):  # safetensors' overflow check
        ternq.load_packed(header(giant), small_skeleton())
    lying = {"t": {"dtype": "F32", "shape": [10**6], "data_offsets": [0, 8]}}
    with pytest.raises(FormatError, match="needs 4000000"):
        ternq.load_packed(header(lying) + bytes(8), small_skeleton())
    # a repeated tensor name is its last entry, as safetensors reads it; a repeated field or __metadata__ is refused
    duplicate = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],' \
                b'"data_offsets":[0,1]}}'
    with pytest.raises(FormatError, match="not a ternq file"):
        ternq.load_packed(len(duplicate).to_bytes(8, "little") + duplicate + b"\0", small_skeleton())
    for twice, error in ((b'{"a":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}', "duplicate field"),
                         (b'{"__metadata__":{},"__metadata__":{}}', "__metadata__ appears twice")):
        with pytest.raises(FormatError, match=error):
            ternq.load_packed(len(twice).to_bytes(8, "little") + twice, small_skeleton())


def test_corrupted_payload_names_the_tensor(mlp_file):
    _, path = mlp_file
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x40  # in the last tensor's bytes (the u8 codes of the last layer come last)
    with pytest.raises(ChecksumError, match="tensor '3.weight.codes'"):
        ternq.load_packed(bytes(data), mlp())


@pytest.mark.parametrize("offset", [-10, "first"])
def test_corrupted_payload_leaves_the_skeleton_unchanged(mlp_file, offset):
    """Every CRC is checked before the skeleton changes: the last layer's codes (read last) or the first tensor."""
    _, path = mlp_file
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[header_end + 3 if offset == "first" else offset] ^= 0x40
    torch.manual_seed(3)
    skeleton = mlp()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    modules = list(skeleton)
    with pytest.raises(ChecksumError):
        ternq.load_packed(bytes(data), skeleton)
    assert list(skeleton) == modules and not any(is_packed(m) for m in skeleton)
    after = skeleton.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_load_frees_each_float_weight_before_decoding(mlp_file, monkeypatch):
    """While a layer's codes are decoded, its float weight is already gone (peak <= the float skeleton)."""
    from ternq.format import torch as fileformat

    _, path = mlp_file
    skeleton = mlp()
    seen = []
    decode = fileformat.decode_weight

    def spy(source, manifest, record):
        layer = skeleton[int(record.module)]
        seen.append(layer.weight.is_meta)
        return decode(source, manifest, record)

    monkeypatch.setattr(fileformat, "decode_weight", spy)
    ternq.load_packed(path, skeleton)
    assert seen == [True] * 4


def test_pack_errors():
    with pytest.raises(ValueError, match="no quantized layer"):
        ternq.pack(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="float_dtype"):
        ternq.pack(ternq.quantize(nn.Linear(3, 3)), float_dtype=torch.int8)


def test_a_single_layer_model(tmp_path):
    torch.manual_seed(0)
    layer = ternq.quantize(nn.Linear(5, 3)).eval()
    path = tmp_path / "one.safetensors"
    ternq.save_packed(layer, path)
    loaded = ternq.load_packed(path, nn.Linear(5, 3))
    assert is_packed(loaded)
    x = torch.randn(2, 5)
    with torch.no_grad():
        assert_close_to_qat(loaded(x), layer(x))


# --- user metadata and float-only files --------------------------------------------------------------------------

METADATA = {"myapp.config": json.dumps({"width": 8, "name": "tiny"}), "myapp.note": "grüße, 1.58 bits"}


def _small_qat() -> nn.Module:
    torch.manual_seed(0)
    return ternq.quantize(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))).eval()


def test_metadata_round_trip_and_interop(tmp_path, capsys):
    model = _small_qat()
    path = tmp_path / "meta.safetensors"
    ternq.save_packed(model, path, metadata=METADATA)
    assert ternq.read_metadata(path) == METADATA
    assert ternq.read_metadata(path.read_bytes()) == METADATA
    with safe_open(path, framework="pt") as f:  # plain safetensors readers see the keys verbatim
        assert {k: f.metadata()[k] for k in METADATA} == METADATA
    assert ternq.pack(model).manifest.get("metadata") is None and ternq.read_metadata(ternq.pack(model)
                                                                                      .to_bytes()) == {}
    loaded = ternq.load_packed(path, nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)))
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert_close_to_qat(loaded(x), model(x))
    assert inspect_file(path)["metadata"] == METADATA
    assert verify_file(path)["ok"]
    from ternq.cli import main

    assert main(["inspect", str(path), "--no-progress"]) == 0
    assert "metadata myapp.note: grüße, 1.58 bits" in capsys.readouterr().out


def test_metadata_is_covered_by_checksums(tmp_path):
    data = ternq.pack(_small_qat(), metadata={"myapp.value": "abcdefgh"}).to_bytes()
    pos = data.index(b'"myapp.value":"abcdefgh"') + len(b'"myapp.value":"a')
    edited = data[:pos] + b"B" + data[pos + 1:]
    for reader in (ternq.read_metadata, verify_file, lambda b: ternq.load_packed(b, _small_qat())):
        with pytest.raises(ChecksumError, match="metadata 'myapp.value'"):
            reader(edited)
    renamed = data.replace(b'"myapp.value":', b'"myapp.valuE":')  # same length: the key disappears
    with pytest.raises(FormatError, match="missing from __metadata__"):
        ternq.read_metadata(renamed)


def test_metadata_errors():
    model = _small_qat()
    for key in ("ternq.config", ""):
        with pytest.raises(ValueError, match="must not start with 'ternq.'"):
            ternq.pack(model, metadata={key: "x"})
    with pytest.raises(TypeError, match="str to str"):
        ternq.pack(model, metadata={"myapp.n": 3})  # type: ignore[dict-item]
    packed = ternq.pack(model)
    manifest = packed.manifest
    manifest["metadata"] = {"ternq.version": crc32_hex(b"1")}  # a forged manifest claiming a format key
    with pytest.raises(FormatError, match="must be non-empty and not start with 'ternq.'"):
        ternq.read_metadata(ternq.PackedModel(packed.tensors, build_metadata(manifest)).to_bytes())


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda k: not k.startswith("ternq.")),
                       st.text(max_size=40), max_size=4))
def test_any_string_metadata_round_trips(meta):
    packed = ternq.pack(nn.Linear(2, 2), metadata=meta, allow_float=True)
    assert ternq.read_metadata(packed.to_bytes()) == meta


def test_float_model_with_allow_float(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    path = tmp_path / "float.safetensors"
    ternq.save_packed(model, path, allow_float=True, metadata={"myapp.kind": "float baseline"})
    assert ternq.pack(model, allow_float=True).manifest["layers"] == {}
    assert verify_file(path)["packed_layers"] == 0
    skeleton = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    loaded = ternq.load_packed(path, skeleton).eval()
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert ternq.read_metadata(path) == {"myapp.kind": "float baseline"}


def test_ternq_open_reads_what_load_packed_restores(tmp_path):
    """ternq.open: the torch-free view of a file (metadata, shapes, one tensor) agrees with load_packed."""
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.body = nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight  # tied: stored once

        def forward(self, ids):
            return self.head(self.body(self.emb(ids)))

    model = ternq.quantize(Tied(), exclude=["head"])
    path = tmp_path / "m.safetensors"
    ternq.save_packed(model, path, metadata={"app.note": "hi"})
    loaded = ternq.load_packed(path, Tied(), dequantize=True)
    with ternq.open(path) as f:
        assert f.metadata == {"app.note": "hi"} and set(f.layers) == {"body.weight"}
        assert f.shapes() == {k: tuple(v.shape) for k, v in loaded.state_dict().items()}
        assert "head.weight" not in f.tensor_bytes()  # the tied copy is not stored again
        for key, value in loaded.state_dict().items():
            np.testing.assert_allclose(f.read(key), value.numpy(), rtol=0, atol=1e-7)
        with pytest.raises(KeyError, match="shapes"):
            f.read("body.weight.codes")
        f.verify()


class _Tie(nn.Module):
    """``b.w = a.w``: a weight read through einsum by one module and by matmul through another name."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Module(), nn.Module(), nn.Module()
        self.a.w = nn.Parameter(torch.randn(6, 6) / 3)
        self.b.w = self.a.w
        self.c.w = nn.Parameter(torch.randn(6, 6) / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,oi->bo", x, self.a.w) + torch.tanh(x @ self.b.w.T) @ self.c.w


def test_a_tie_is_stored_once_and_read_quantized_through_every_name():
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    model = ternq.quantize(_Tie(), example_inputs=x).eval()
    packed = ternq.pack(model)
    assert packed.manifest["layers"]["a.w"]["aliases"] == ["b.w"]
    assert "b.w" not in packed.manifest["tensors"] and "b.w" not in packed.manifest.get("tied", {})
    loaded = ternq.load_packed(packed.to_bytes(), _Tie()).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        assert torch.equal(loaded.b.w, loaded.a.w) and loaded.b.w.unique().numel() <= 3
    again = ternq.pack(loaded)  # a loaded model packs to the same file
    assert again.manifest["layers"]["a.w"]["aliases"] == ["b.w"]


@pytest.mark.parametrize("aliases, match", [
    (["c.w"], "alias 'c.w', which is also a packed weight"),
    (["a.nothing"], "tied to 'a.nothing' .* missing or another tensor"),  # no such tensor in the skeleton
    (["a.w"], "aliases"),  # its own key
    (["b.w", "b.w"], "aliases"),
    (["c.w.codes"], "alias 'c.w.codes', which is also a tensor of the file"),
], ids=["another-packed-weight", "missing", "own-key", "twice", "a-tensor-name"])
def test_forged_aliases_are_refused(aliases, match):
    torch.manual_seed(0)
    model = ternq.quantize(_Tie(), example_inputs=torch.randn(3, 6))

    def edit(manifest):
        manifest["layers"]["a.w"]["aliases"] = aliases

    skeleton = _Tie()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(ternq.TernqError, match=match):
        ternq.load_packed(rewrite(ternq.pack(model), edit), skeleton)
    assert all(torch.equal(v, before[k]) for k, v in skeleton.state_dict().items())  # left untouched


def test_an_alias_of_two_weights_is_refused():
    torch.manual_seed(0)
    model = ternq.quantize(_Tie(), example_inputs=torch.randn(3, 6))

    def edit(manifest):
        manifest["layers"]["c.w"]["aliases"] = ["b.w"]

    with pytest.raises(ternq.FormatError, match="also an alias of 'a.w'"):
        ternq.load_packed(rewrite(ternq.pack(model), edit), _Tie())
