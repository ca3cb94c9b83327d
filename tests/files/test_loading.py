"""The one loader's contract: formats, the widening rule, checksums, the byte budget and the projection cache."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

import vera_core as vc
from vera_cli.main import main
from vera_core.adapter_file import AdapterConfig, LayerSpec, projection_checksum, save_adapter_file
from vera_core.errors import (
    AdapterFileError,
    AdapterTooLargeError,
    NotAnAdapterError,
    PayloadMismatchError,
    ProjectionMismatchError,
    UnknownGeneratorError,
)
from vera_core.loading import DEFAULT_MAX_BYTES, MAX_BYTES_ENV, ProjectionCache, byte_budget, read_adapter
from vera_core.peft_format import write_peft_folder

from . import craft


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_reads_our_file_with_every_part_checked(tmp_path: Path) -> None:
    adapter = read_adapter(write(tmp_path / "a.safetensors", craft.ours()))
    assert adapter.format == "vera-core" and adapter.stored is None
    assert adapter.config.projections_sha256 == craft.projection_sha256()
    entries = {name: craft.entry(v) for name, v in craft.vectors().items()}
    assert adapter.payload_sha256 == craft.payload_sha256(json.dumps(craft.config(), sort_keys=True), entries)
    for name, value in craft.vectors().items():
        np.testing.assert_array_equal(adapter.vectors[name], value)
        assert not adapter.vectors[name].flags.writeable
    A, B = adapter.projections()
    expected = vc.generate_projections(craft.SEED, craft.R, craft.MAX_IN, craft.MAX_OUT, xp=np)
    np.testing.assert_array_equal(A, expected[0])
    np.testing.assert_array_equal(B, expected[1])
    assert adapter.trainable_parameters == sum(v.size for v in craft.vectors().values())
    assert adapter.file_bytes == len(craft.ours())


@pytest.mark.parametrize("code", ["F16", "BF16"])
def test_16_bit_vectors_widen_exactly_to_float32(tmp_path: Path, code: str) -> None:
    rng = np.random.default_rng(0)
    values = {name: rng.standard_normal(v.shape).astype(np.float32) for name, v in craft.vectors().items()}
    if code == "F16":
        stored = {name: v.astype(np.float16) for name, v in values.items()}
        entries = {name: craft.entry(v) for name, v in stored.items()}
        expected = {name: v.astype(np.float64) for name, v in stored.items()}
    else:  # bfloat16: the top half of the float32 bits; the value is those bits followed by zeros
        entries = {name: craft.bf16_entry(v) for name, v in values.items()}
        truncated = {name: (v.view("<u4") & 0xFFFF0000).view("<f4") for name, v in values.items()}
        expected = {name: v.astype(np.float64) for name, v in truncated.items()}
    adapter = read_adapter(write(tmp_path / "a.safetensors", craft.ours(tensors=entries)))
    for name, value in adapter.vectors.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value.astype(np.float64), expected[name])


def test_float64_vectors_are_kept(tmp_path: Path) -> None:
    entries = {name: craft.entry(v.astype(np.float64) / 3) for name, v in craft.vectors().items()}
    adapter = read_adapter(write(tmp_path / "a.safetensors", craft.ours(tensors=entries)))
    assert {v.dtype for v in adapter.vectors.values()} == {np.dtype(np.float64)}


def test_payload_checksum_covers_vectors_and_config(tmp_path: Path) -> None:
    data = craft.ours()
    path = write(tmp_path / "a.safetensors", data)
    read_adapter(path)
    last = bytearray(data)
    last[-1] ^= 0x01  # the lowest bit of the last vector element
    with pytest.raises(PayloadMismatchError, match="payload_sha256"):
        read_adapter(write(path, bytes(last)))
    original = craft.payload_sha256(
        json.dumps(craft.config(), sort_keys=True), {n: craft.entry(v) for n, v in craft.vectors().items()}
    )
    edited = craft.ours(craft.config(d_initial=0.5), metadata={"payload_sha256": original})  # config edited later
    with pytest.raises(PayloadMismatchError):
        read_adapter(write(path, edited))
    read_adapter(write(path, craft.ours(digest=False)))  # files from before the digest still load


def test_saved_files_record_the_digest_the_specification_gives(tmp_path: Path) -> None:
    cfg = AdapterConfig.from_json(json.dumps(craft.config()))
    save_adapter_file(tmp_path / "a.safetensors", cfg, craft.vectors())
    assert read_adapter(tmp_path / "a.safetensors").payload_sha256 == craft.payload_sha256(
        cfg.to_json(), {name: craft.entry(v) for name, v in craft.vectors().items()}
    )


def test_stored_projections_are_checked_against_the_checksum(tmp_path: Path) -> None:
    A, B = vc.generate_projections(craft.SEED, craft.R, craft.MAX_IN, craft.MAX_OUT, xp=np)
    entries = {n: craft.entry(v) for n, v in craft.vectors().items()}
    stored = entries | {"projections.A": craft.entry(A), "projections.B": craft.entry(B)}
    good = read_adapter(write(tmp_path / "a.safetensors", craft.ours(tensors=stored)))
    assert good.stored is not None and good.projections() is good.stored
    bad = entries | {"projections.A": craft.entry(A + 1), "projections.B": craft.entry(B)}
    with pytest.raises(ProjectionMismatchError):
        read_adapter(write(tmp_path / "a.safetensors", craft.ours(tensors=bad)))


def test_unknown_generators_are_refused_unless_the_projections_are_stored(tmp_path: Path) -> None:
    with pytest.raises(UnknownGeneratorError, match="'my-rng' version 1"):
        read_adapter(write(tmp_path / "a.safetensors", craft.ours(craft.config(prng_id="my-rng"))))
    A, B = np.ones((craft.R, craft.MAX_IN), "f4"), np.ones((craft.MAX_OUT, craft.R), "f4")
    entries = {n: craft.entry(v) for n, v in craft.vectors().items()}
    entries |= {"projections.A": craft.entry(A), "projections.B": craft.entry(B)}
    cfg = craft.config(prng_id="my-rng", projections_sha256=projection_checksum(A, B))
    adapter = read_adapter(write(tmp_path / "b.safetensors", craft.ours(cfg, entries)))
    np.testing.assert_array_equal(adapter.projections()[0], A)


def test_errors_name_the_path_and_the_field(tmp_path: Path) -> None:
    cfg = craft.config()
    cfg["layers"]["fc2"]["rank"] = 2.0
    path = write(tmp_path / "a.safetensors", craft.ours(cfg))
    with pytest.raises(AdapterFileError) as caught:
        read_adapter(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and "'fc2'.rank" in message and "2.0" in message and "\n" not in message


# ---------------------------------------------------------------- PEFT folders


def test_reads_a_peft_folder(tmp_path: Path) -> None:
    adapter = read_adapter(craft.peft_folder(tmp_path / "peft"))
    assert adapter.format == "peft" and adapter.config.prng_id == "torch-mt19937-peft"
    assert adapter.config.max_in == craft.MAX_IN and adapter.stored is not None
    assert adapter.config.projections_sha256 == craft.projection_sha256()
    assert {spec.rank for spec in adapter.config.layers.values()} == {craft.R}
    np.testing.assert_array_equal(adapter.vectors["fc2.lambda_d"][:2], craft.vectors()["fc2.lambda_d"])


@pytest.mark.requires("torch")
def test_peft_folder_without_projections_needs_max_in(tmp_path: Path) -> None:
    folder = craft.peft_folder(
        tmp_path / "peft", craft.peft_config(save_projection=False), craft.peft_tensors(stored=False)
    )
    adapter = read_adapter(folder)
    with pytest.raises(AdapterFileError, match="max_in"):
        adapter.projections()
    A, B = adapter.projections(max_in=craft.MAX_IN)
    from vera_torch import peft_projections

    expected = peft_projections(craft.SEED, craft.R, craft.MAX_IN, craft.MAX_OUT)
    np.testing.assert_array_equal(A, expected[0].numpy())
    np.testing.assert_array_equal(B, expected[1].numpy())


def test_written_peft_folder_is_verified_and_keeps_other_files(tmp_path: Path) -> None:
    adapter = read_adapter(write(tmp_path / "a.safetensors", craft.ours()))
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "README.md").write_text("# my adapter\n")
    write_peft_folder(folder, adapter.config, adapter.vectors, *adapter.projections())
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (folder / "README.md").read_text() == "# my adapter\n"
    back = read_adapter(folder)
    assert back.payload_sha256 is not None
    data = bytearray((folder / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0x80
    (folder / "adapter_model.safetensors").write_bytes(data)
    with pytest.raises(PayloadMismatchError):
        read_adapter(folder)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_peft_writer_refuses_folders_it_would_damage(tmp_path: Path) -> None:
    adapter = read_adapter(write(tmp_path / "a.safetensors", craft.ours()))
    busy = tmp_path / "busy"
    (busy / "sub").mkdir(parents=True)
    (busy / "notes.txt").write_text("mine")
    for target in (busy, tmp_path / "a.safetensors"):
        before = sorted(str(p) for p in target.rglob("*")) if target.is_dir() else target.read_bytes()
        with pytest.raises(AdapterFileError):
            write_peft_folder(target, adapter.config, adapter.vectors, *adapter.projections())
        assert (sorted(str(p) for p in target.rglob("*")) if target.is_dir() else target.read_bytes()) == before


# ---------------------------------------------------------------- the byte budget


def test_budget_default_argument_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(MAX_BYTES_ENV, raising=False)
    assert byte_budget() == DEFAULT_MAX_BYTES == 2**30
    monkeypatch.setenv(MAX_BYTES_ENV, "2GiB")
    assert byte_budget() == 2**31 and byte_budget(4096) == 4096
    monkeypatch.setenv(MAX_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match=MAX_BYTES_ENV):
        byte_budget()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_bytes"):
            byte_budget(bad)  # type: ignore[arg-type]


def test_budget_counts_file_vectors_and_projections(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MAX_BYTES_ENV, raising=False)
    path = write(tmp_path / "a.safetensors", craft.ours())
    size = len(craft.ours())
    vectors = sum(v.size for v in craft.vectors().values())
    needed = size + 4 * vectors + 4 * (craft.R * craft.MAX_IN + craft.MAX_OUT * craft.R)
    read_adapter(path, max_bytes=needed)
    with pytest.raises(AdapterTooLargeError, match=f"needs about {needed:,} bytes"):
        read_adapter(path, max_bytes=needed - 1)
    with pytest.raises(AdapterTooLargeError, match=f"is {size:,} bytes, over the byte budget"):
        read_adapter(path, max_bytes=size - 1)
    monkeypatch.setenv(MAX_BYTES_ENV, str(needed - 1))
    with pytest.raises(AdapterTooLargeError):
        read_adapter(path)


def test_cli_max_bytes_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MAX_BYTES_ENV, raising=False)
    path = write(tmp_path / "a.safetensors", craft.ours())
    assert main(["inspect", str(path), "--max-bytes", "1K"]) == 1
    err = capsys.readouterr().err
    assert "over the byte budget of 1,024" in err and err.count("\n") == 1
    assert main(["inspect", str(path), "--max-bytes", "64K"]) == 0
    monkeypatch.setenv(MAX_BYTES_ENV, "1K")
    assert main(["inspect", str(path)]) == 1
    assert "budget" in capsys.readouterr().err
    assert main(["inspect", str(path), "--max-bytes", "64K"]) == 0  # the flag wins over the environment


def test_budget_is_checked_for_max_in_given_later(tmp_path: Path) -> None:
    folder = craft.peft_folder(
        tmp_path / "peft", craft.peft_config(save_projection=False), craft.peft_tensors(stored=False)
    )
    adapter = read_adapter(folder, max_bytes=10**6)
    with pytest.raises(AdapterTooLargeError):
        adapter.projections(max_in=2**30)


# ---------------------------------------------------------------- the projection cache


def test_cache_generates_and_hashes_each_key_once(tmp_path: Path) -> None:
    cache = ProjectionCache(max_entries=2)
    paths = []
    for index in range(5):
        paths.append(write(tmp_path / f"{index}.safetensors", craft.ours()))
    pairs = [read_adapter(p).projections(cache=cache) for p in paths]
    assert cache.misses == 1 and cache.hits == 4 and all(p[0] is pairs[0][0] for p in pairs)
    assert not pairs[0][0].flags.writeable
    for name, changes in {"seed": {"seed": 9}, "r": {"r": 5}}.items():
        checksum = craft.projection_sha256(**changes)
        other = write(
            tmp_path / f"{name}.safetensors", craft.ours(craft.config(**changes, projections_sha256=checksum))
        )
        read_adapter(other).projections(cache=cache)
    assert cache.misses == 3 and len(cache) == 2  # the least recently used key was dropped
    read_adapter(paths[0]).projections(cache=cache)
    assert cache.misses == 4


def test_cache_does_not_excuse_a_checksum(tmp_path: Path) -> None:
    cache = ProjectionCache()
    read_adapter(write(tmp_path / "a.safetensors", craft.ours())).projections(cache=cache)
    bad = write(tmp_path / "b.safetensors", craft.ours(craft.config(projections_sha256="1" * 64)))
    with pytest.raises(ProjectionMismatchError):
        read_adapter(bad).projections(cache=cache)
    assert cache.hits == 1


# ---------------------------------------------------------------- writes


def test_files_honour_the_umask_and_keep_an_existing_mode(tmp_path: Path) -> None:
    cfg = AdapterConfig.from_json(json.dumps(craft.config()))
    old = os.umask(0o022)
    try:
        save_adapter_file(tmp_path / "a.safetensors", cfg, craft.vectors())
        assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o644
        os.chmod(tmp_path / "a.safetensors", 0o640)
        save_adapter_file(tmp_path / "a.safetensors", cfg, craft.vectors())
        assert stat.S_IMODE((tmp_path / "a.safetensors").stat().st_mode) == 0o640
        os.umask(0o077)
        save_adapter_file(tmp_path / "b.safetensors", cfg, craft.vectors())
        assert stat.S_IMODE((tmp_path / "b.safetensors").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_writer_checks_before_writing(tmp_path: Path) -> None:
    cfg = AdapterConfig.from_json(json.dumps(craft.config()))
    path = write(tmp_path / "a.safetensors", b"previous")
    bad = [
        {**craft.vectors(), "fc1.lambda_b": np.zeros(7, np.float32)},
        {**craft.vectors(), "fc1.lambda_b": np.zeros(6, np.int32)},
        {**craft.vectors(), "fc1.lambda_b": np.full(6, np.inf, np.float32)},
    ]
    for tensors in bad:
        with pytest.raises(AdapterFileError):
            save_adapter_file(path, cfg, tensors)
    import dataclasses

    with pytest.raises(AdapterFileError, match="projections_sha256"):
        save_adapter_file(path, dataclasses.replace(cfg, projections_sha256=None), craft.vectors())
    assert path.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_config_checks_types_on_construction() -> None:
    layers = {"fc": LayerSpec(4, 2, 3)}
    for field, value in (("r", 4.0), ("seed", -1), ("d_initial", float("nan")), ("method", "lora"), ("dropout", 1.0)):
        with pytest.raises(AdapterFileError, match=field):
            AdapterConfig(**{"r": 2, "seed": 0, "max_in": 3, "max_out": 4, "layers": layers, field: value})
    with pytest.raises(AdapterFileError, match="fan_in_fan_out"):
        LayerSpec(4, 2, 3, fan_in_fan_out="false")  # type: ignore[arg-type]
    with pytest.raises(AdapterFileError, match="extra"):
        AdapterConfig(r=2, seed=0, max_in=3, max_out=4, layers=layers, extra={"note": "hi"})


def test_not_an_adapter_messages(tmp_path: Path) -> None:
    cases = {
        write(tmp_path / "notes.txt", b"hello, these are notes"): "starts with text",
        write(tmp_path / "m.pt", b"\x80\x04\x95" + b"\0" * 20): "pickle",
        write(tmp_path / "z.pt", b"PK\x03\x04" + b"\0" * 20): "zip archive",
        tmp_path: "not a PEFT adapter folder",
        tmp_path / "missing": "no such file",
    }
    for path, words in cases.items():
        with pytest.raises(NotAnAdapterError, match=words):
            read_adapter(path)


def test_the_loading_page_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/loading.md's examples, in order, print what the page says they do."""
    import re

    page = Path(__file__).resolve().parents[2] / "docs" / "loading.md"
    script = "\n".join(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL))
    exec(compile(script, str(page), "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "vera-core 4 ['fc1.lambda_b', 'fc1.lambda_d', 'fc2.lambda_b', 'fc2.lambda_d']"
    assert lines[1].startswith("(4, 8) (8, 4) ")
    assert lines[2] == "PayloadMismatchError"
    assert lines[3] == "1 2"
