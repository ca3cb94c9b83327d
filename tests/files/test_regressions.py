"""One test per loader defect of issues 11 and 12; each fails on the code before the one-loader rewrite.

Only entry points that existed before are used (the CLI's ``main``, ``vera_numpy``,
``vera_torch``, ``vera_core``), and the files are built by :mod:`.craft`, so the same
tests can be run against the old code.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import vera_core as vc
from vera_cli.main import main
from vera_core.adapter_file import AdapterFileError

from . import craft

SRC = os.pathsep.join(p for p in sys.path if p)


def cli(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, command: str) -> bool:
    return err.count("\n") == 1 and err.startswith(f"vera {command}: error: ") and "Traceback" not in err


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return write(tmp_path / "base.safetensors", craft.base_file())


def run_isolated(code: str, *, timeout: float = 60, memory: int = 3 << 30) -> subprocess.CompletedProcess[str]:
    """Python ``code`` in a subprocess under an address-space limit (bytes) and a timeout (seconds)."""
    prelude = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))\n"
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


# ------------------------------------------------------------ defect 1: merge/convert check projections_sha256


@pytest.mark.parametrize(
    "change",
    [
        {"seed": craft.SEED + 1},
        {"r": craft.R + 1},
        {"projections_sha256": "0" * 64},
    ],
    ids=["seed", "r", "checksum"],
)
def test_merge_and_convert_verify_the_projections(
    tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str], change: dict[str, Any]
) -> None:
    adapter = write(tmp_path / "a.safetensors", craft.ours(craft.config(**change)))
    for argv, output in (
        (("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m.safetensors"), tmp_path / "m.safetensors"),
        (("convert", adapter, tmp_path / "peft"), tmp_path / "peft"),
        (("inspect", adapter), None),
    ):
        code, _, err = cli(capsys, *argv)
        assert code == 1 and one_line_error(err, argv[0]), (argv[0], err)
        assert output is None or not output.exists()


def test_merge_verifies_stored_projections(tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    A, B = vc.generate_projections(craft.SEED, craft.R, craft.MAX_IN, craft.MAX_OUT, xp=np)
    tensors = {name: craft.entry(value) for name, value in craft.vectors().items()}
    tensors["projections.A"], tensors["projections.B"] = craft.entry(A * 1.25), craft.entry(B)
    adapter = write(tmp_path / "a.safetensors", craft.ours(tensors=tensors))
    code, _, err = cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m.safetensors")
    assert code == 1 and one_line_error(err, "merge") and not (tmp_path / "m.safetensors").exists()


# ------------------------------------------------------------ defect 2 (by strict parsing): torch load changes nothing


@pytest.mark.requires("torch")
@pytest.mark.parametrize("field", ["rank", "d_initial"])
def test_torch_load_of_a_bad_type_changes_nothing(tmp_path: Path, field: str) -> None:
    import torch

    import vera_torch as vt

    cfg = craft.config()
    if field == "rank":
        cfg["layers"]["fc2"]["rank"] = 2.0
    else:
        cfg["d_initial"] = "abc"
    bad = write(tmp_path / "bad.safetensors", craft.ours(cfg))
    good = write(tmp_path / "good.safetensors", craft.ours())
    model = craft.torch_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=field):
        vt.load_adapter(model, bad)
    assert not vt.vera_layers(model) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    vt.load_adapter(model, good)  # the name "default" is still free
    assert sorted(vt.vera_layers(model)) == ["fc1", "fc2"]


# ------------------------------------------------------------ defect 4: the byte budget


@pytest.mark.parametrize(
    ("command", "change"),
    [("merge", {"r": 2**31}), ("inspect", {"max_out": 2**30}), ("inspect", {"max_in": 2**31})],
    ids=["merge-r", "inspect-max_out", "inspect-max_in"],
)
def test_huge_config_is_refused_before_allocating(tmp_path: Path, base: Path, command: str, change: dict) -> None:
    cfg = craft.config(**change)
    for spec in cfg["layers"].values():
        spec["out_features"] = min(spec["out_features"], cfg["max_out"])
    adapter = write(tmp_path / "huge.safetensors", craft.ours(cfg))
    assert adapter.stat().st_size < 2000
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "-o", str(tmp_path / "m.safetensors")]
    argv = argv if command == "merge" else ["inspect", str(adapter)]
    start = time.perf_counter()
    result = run_isolated(f"import sys; from vera_cli.main import main; sys.exit(main({argv!r}))", timeout=120)
    assert time.perf_counter() - start < 60
    assert result.returncode == 1 and one_line_error(result.stderr, command), result.stderr[-2000:]
    assert "budget" in result.stderr


# ------------------------------------------------------------ defect 5: one line, never a traceback


def _peft_without_r(folder: Path) -> Path:
    cfg = craft.peft_config()
    del cfg["r"]
    return craft.peft_folder(folder, cfg)


def _peft_a_without_b(folder: Path) -> Path:
    tensors = craft.peft_tensors()
    del tensors["base_model.vera_B"]
    return craft.peft_folder(folder, tensors=tensors)


def _peft_flat_a(folder: Path) -> Path:
    tensors = craft.peft_tensors()
    A = np.zeros(craft.R * craft.MAX_IN, np.float32)
    tensors["base_model.vera_A"] = craft.entry(A)
    return craft.peft_folder(folder, tensors=tensors)


CLI_TRACEBACK_CASES = {
    "format_version": lambda d: write(d / "a.safetensors", craft.ours(metadata={"format_version": "abc"})),
    "r=10**12": lambda d: write(d / "a.safetensors", craft.ours(craft.config(r=10**12))),
    "layers=[]": lambda d: write(d / "a.safetensors", craft.ours(craft.config(layers=[]))),
    "peft-without-r": lambda d: _peft_without_r(d / "peft"),
    "vera_A-without-vera_B": lambda d: _peft_a_without_b(d / "peft"),
    "1-D vera_A": lambda d: _peft_flat_a(d / "peft"),
}


@pytest.mark.parametrize("case", list(CLI_TRACEBACK_CASES))
def test_cli_answers_bad_files_in_one_line(
    tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    adapter = CLI_TRACEBACK_CASES[case](tmp_path)
    for argv in (
        ("inspect", adapter),
        ("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m.safetensors"),
        ("convert", adapter, tmp_path / ("out.safetensors" if adapter.is_dir() else "out")),
    ):
        code, _, err = cli(capsys, *argv)
        assert code == 1 and one_line_error(err, argv[0]), (argv[0], err)


@pytest.mark.parametrize("case", ["format_version", "r=10**12", "layers=[]"])
def test_python_api_raises_adapter_file_errors(tmp_path: Path, case: str) -> None:
    import vera_numpy as vn

    adapter = CLI_TRACEBACK_CASES[case](tmp_path)
    with pytest.raises(AdapterFileError):
        vn.AdaptedModel.load(adapter, craft.base_weights())


def test_full_disk_is_one_line(tmp_path: Path, base: Path) -> None:
    adapter = write(tmp_path / "a.safetensors", craft.ours())
    out = tmp_path / "m.safetensors"
    argv = ["merge", "--base", str(base), "--adapter", str(adapter), "-o", str(out)]
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))  # writes beyond 100 bytes fail: EFBIG\n"
        f"from vera_cli.main import main; sys.exit(main({argv!r}))"
    )
    result = run_isolated(code)
    assert result.returncode == 1 and one_line_error(result.stderr, "merge"), result.stderr[-2000:]
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("kind", ["text", "fifo", "dev-zero", "folder"])
def test_non_adapters_get_our_own_message_and_never_hang(tmp_path: Path, kind: str) -> None:
    if kind == "text":
        path = tmp_path / "notes.txt"
        path.write_text("these are my notes, not an adapter\n" * 3)
    elif kind == "fifo":
        path = tmp_path / "pipe"
        os.mkfifo(path)
    elif kind == "dev-zero":
        path = Path("/dev/zero")
    else:
        path = tmp_path / "adapter.safetensors"
        path.mkdir()
    result = run_isolated(f"import sys; from vera_cli.main import main; sys.exit(main(['inspect', {str(path)!r}]))")
    assert result.returncode == 1 and one_line_error(result.stderr, "inspect"), result.stderr[-2000:]
    assert "header too large" not in result.stderr and "Error while deserializing" not in result.stderr


# ------------------------------------------------------------ defect 6: types are checked


def test_fan_in_fan_out_string_is_refused(tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = craft.config()
    cfg["layers"]["fc1"]["fan_in_fan_out"] = "false"
    adapter = write(tmp_path / "a.safetensors", craft.ours(cfg))
    code, _, err = cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m.safetensors")
    assert code == 1 and "fan_in_fan_out" in err and not (tmp_path / "m.safetensors").exists()


def test_detach_norm_string_is_refused(tmp_path: Path) -> None:
    import vera_numpy as vn

    adapter = write(tmp_path / "a.safetensors", craft.ours(craft.config(extra={"detach_norm": "false"})))
    with pytest.raises(AdapterFileError, match="detach_norm"):
        vn.AdaptedModel.load(adapter, craft.base_weights())


@pytest.mark.parametrize(("field", "value"), [("r", 4.7), ("projection_prng_key", 0.5), ("fan_in_fan_out", "false")])
@pytest.mark.requires("torch")
def test_peft_config_types_are_checked(tmp_path: Path, field: str, value: Any) -> None:
    import vera_torch as vt

    folder = craft.peft_folder(tmp_path / "peft", craft.peft_config(**{field: value}))
    model = craft.torch_model()
    with pytest.raises(AdapterFileError, match=field):
        vt.load_peft_adapter(model, folder)
    assert not vt.vera_layers(model)


@pytest.mark.parametrize("dtype", ["int32", "bool"])
def test_non_float_vectors_are_refused(tmp_path: Path, dtype: str) -> None:
    import vera_numpy as vn

    tensors = {name: craft.entry(value.astype(dtype)) for name, value in craft.vectors().items()}
    adapter = write(tmp_path / "a.safetensors", craft.ours(tensors=tensors))
    with pytest.raises(AdapterFileError, match="dtype"):
        vn.AdaptedModel.load(adapter, craft.base_weights())


# ------------------------------------------------------------ defect 7: PEFT folders replaced as a unit

KILL_WRITER = """
import os, sys, numpy as np
os.umask(0o022)
sys.path.insert(0, {tests!r})
from files import craft
import vera_core as vc
from vera_core.adapter_file import AdapterConfig, LayerSpec, projection_checksum
from vera_core.peft_format import write_peft_folder
A, B = vc.generate_projections(craft.SEED, craft.R, craft.MAX_IN, craft.MAX_OUT, xp=np)
layers = {{n: LayerSpec(o, k, i) for n, (o, i, k) in craft.LAYERS.items()}}
versions = []
for value in (1.0, 2.0):
    config = AdapterConfig(r=craft.R, seed=int(value), max_in=craft.MAX_IN, max_out=craft.MAX_OUT, layers=layers,
                           projections_sha256=projection_checksum(A, B))
    tensors = {{k: np.full_like(v, value) for k, v in craft.vectors().items()}}
    versions.append((config, tensors))
write_peft_folder(sys.argv[1], *versions[0], A, B)
print("ready", flush=True)
index = 0
while True:
    index += 1
    write_peft_folder(sys.argv[1], *versions[index % 2], A, B)
"""


def _folder_version(folder: Path) -> int:
    """1 or 2 when the folder is wholly that version; raises AssertionError for a mix."""
    from safetensors.numpy import load_file

    seed = json.loads((folder / "adapter_config.json").read_text())["projection_prng_key"]
    values = {float(v[0]) for k, v in load_file(str(folder / "adapter_model.safetensors")).items() if "lambda_b" in k}
    assert values == {float(seed)}, f"config of version {seed}, weights of version {values}"
    return int(seed)


def test_peft_folder_survives_sigkill_at_any_point(tmp_path: Path) -> None:
    import random
    import signal

    folder = tmp_path / "peft"
    script = tmp_path / "writer.py"
    script.write_text(KILL_WRITER.format(tests=str(Path(__file__).resolve().parents[1])))
    env = {**os.environ, "PYTHONPATH": SRC}
    rng = random.Random(0)
    seen = set()
    for _ in range(30):
        process = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, env=env)
        assert process.stdout is not None and process.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        seen.add(_folder_version(folder))
    assert seen == {1, 2}  # the kills landed at different points of the loop


def test_written_files_and_folders_honour_the_umask(tmp_path: Path) -> None:
    script = (
        "import os, sys, numpy as np\n"
        "os.umask(0o022)\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from files import craft\n"
        "import vera_numpy as vn\n"
        "model = vn.add_vera(craft.base_weights(), ['fc1', 'fc2'], r=4)\n"
        f"model.save({str(tmp_path / 'a.safetensors')!r})\n"
        f"model.save({str(tmp_path / 'a.safetensors')!r})\n"
        "from vera_cli.main import main\n"
        f"sys.exit(main(['convert', {str(tmp_path / 'a.safetensors')!r}, {str(tmp_path / 'peft')!r}]))\n"
    )
    result = run_isolated(script)
    assert result.returncode == 0, result.stderr[-2000:]
    assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "peft").stat().st_mode) == 0o755
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert stat.S_IMODE((tmp_path / "peft" / name).stat().st_mode) == 0o644


# ------------------------------------------------------------ defect 9: unknown generator versions


@pytest.mark.parametrize("checksum", [None, craft.projection_sha256()], ids=["no-checksum", "checksum"])
@pytest.mark.requires("torch")
def test_torch_refuses_an_unknown_generator_version(tmp_path: Path, checksum: str | None) -> None:
    import vera_torch as vt

    adapter = write(tmp_path / "a.safetensors", craft.ours(craft.config(prng_version=2, projections_sha256=checksum)))
    model = craft.torch_model()
    with pytest.raises(AdapterFileError):
        vt.load_adapter(model, adapter)
    assert not vt.vera_layers(model)


# ------------------------------------------------------------ defect 10: the core


def test_linear_refuses_integer_inputs() -> None:
    with pytest.raises(TypeError, match="real floating"):
        vc.linear(np.ones((2, 3), np.int32), np.ones((4, 3), np.float32))


def test_vera_delta_rows_on_an_empty_batch() -> None:
    A, B = vc.generate_projections(0, 4, 8, 6, xp=np)
    delta = vc.vera_delta_rows(
        np.ones((0, 3, 8), np.float32), A, B, np.ones((0, 4), np.float32), np.ones((0, 6), np.float32)
    )
    assert delta.shape == (0, 3, 6)


def test_numpy_add_vera_refuses_a_nan_d_initial() -> None:
    import vera_numpy as vn

    with pytest.raises(ValueError, match="d_initial"):
        vn.add_vera(craft.base_weights(), ["fc1"], r=4, d_initial=float("nan"))


def test_numpy_load_parameters_checks_every_entry_first() -> None:
    import vera_numpy as vn

    model = vn.add_vera(craft.base_weights(), ["fc1", "fc2"], r=4)
    before = {name: np.array(value, copy=True) for name, value in model.parameters().items()}
    values = {"fc1.lambda_b": np.ones(6, np.float32), "fc2.lambda_b": np.ones(7, np.float32)}
    with pytest.raises(ValueError, match=r"fc2\.lambda_b"):
        model.load_parameters(values)
    assert all(np.array_equal(before[name], value) for name, value in model.parameters().items())


# ------------------------------------------------------------ issue 11: CLI habits


def test_convert_output_form_follows_its_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = write(tmp_path / "a.safetensors", craft.ours())
    code, _, err = cli(capsys, "convert", adapter, tmp_path / "out.safetensors")
    assert code == 1 and one_line_error(err, "convert") and not (tmp_path / "out.safetensors").exists()


def test_merge_does_not_overwrite_its_base_without_force(
    tmp_path: Path, base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = write(tmp_path / "a.safetensors", craft.ours())
    before = base.read_bytes()
    code, _, err = cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", base)
    assert code == 1 and one_line_error(err, "merge") and "--force" in err and base.read_bytes() == before
    assert cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", base, "--force")[0] == 0
    assert base.read_bytes() != before
