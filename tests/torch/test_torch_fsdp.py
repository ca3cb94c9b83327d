"""FSDP2 (``fully_shard``) on CPU: gloo, 2 processes, a tiny Llama with VeRA or DVoRA on all-linear.

One spawn runs every scenario (:mod:`torch_fsdp_worker`); each test checks one feature
against the same model in this one process.
"""

import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed without gloo"
    ),
    pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous and fork-free spawn tested on POSIX only"),
]

METHODS = ("vera", "dvora")


@pytest.fixture(scope="module")
def worker():
    import torch_fsdp_worker as worker

    return worker


@pytest.fixture(scope="module")
def run(tmp_path_factory, worker):
    """Spawn the two processes once; returns (results of rank 0, the folder with the adapter files)."""
    import vera_torch as vt

    out = tmp_path_factory.mktemp("fsdp")
    for method in METHODS:  # the adapters the processes load: other vectors than they start with
        vt.save_adapter(worker.make_model(method, vectors_seed=7), out / f"{method}-to-load.safetensors")
    mp.spawn(worker.run, args=(2, str(out / "store"), str(out)), nprocs=2, join=True)
    return torch.load(out / "results.pt"), out


def scenario(run, method, name):
    """Rank 0's results for ``method``, after checking that the scenario ran without an error."""
    r = run[0][method]
    assert name not in r["errors"], f"the {name} scenario failed on rank 0:\n{r['errors'][name]}"
    return r


def _assert_vectors_close(actual, expected, **tolerance):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **tolerance, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("method", METHODS)
def test_training_equals_one_process(run, worker, method):
    """Two ranks on half the batch each train the vectors exactly as one process on the whole batch.

    Gradients differ only by the order of float32 sums (each rank sums its tokens, then
    the reduce-scatter averages): checked every step to rtol 1e-5 (atol 1e-6 of the
    largest). AdamW's step is lr * m / (sqrt(v) + eps): a relative gradient error e moves
    it by about lr * e, so the bulk of the elements (e ~ 1e-6) agree to ~1e-8 per step, but
    elements whose gradient nearly cancels carry e up to ~1e-3 (atol 1e-6 of the largest
    gradient): three steps of lr = 1e-2 give atol 3e-5. A real difference in the training
    (an unsynchronised or mis-scaled gradient) moves vectors by ~lr per step.
    """
    r = scenario(run, method, "train")
    assert r["vectors_sharded"], "the vectors should be DTensor shards under fully_shard"
    model = worker.make_model(method)
    reference = worker.train(model, worker.data())
    for step, (got, want) in enumerate(zip(r["grads"], reference["grads"], strict=True)):
        scale = max(g.abs().max() for g in want.values())
        _assert_vectors_close(got, want, rtol=1e-5, atol=1e-6 * scale)
        assert all(g.abs().max() > 0 for g in want.values()), f"step {step}: a vector got no gradient"
    for got, want in zip(r["losses"], reference["losses"], strict=True):  # each rank's loss is over its half
        assert torch.isfinite(got) and abs(float(got) - float(want)) < 0.5
    _assert_vectors_close(r["vectors"], worker.vectors(model), rtol=0, atol=worker.STEPS * worker.LR * 1e-3)
    start = worker.vectors(worker.make_model(method))
    assert all(not torch.allclose(r["vectors"][n], start[n]) for n in start), "training moved no vector"


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_mixed_precision_keeps_float32_vectors_and_loss_falls(run, method):
    """``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` on a bfloat16 base.

    The vectors stay float32 shards with float32 gradients (FSDP2 casts them for the
    compute only); six AdamW steps on a fixed batch lower the loss.
    """
    r = scenario(run, method, "mixed")
    assert r["mixed_dtypes"] == ["torch.float32"]
    assert r["mixed_grad_dtypes"] == ["torch.float32"]
    losses = [float(v) for v in r["mixed"]["losses"]]
    assert all(map(torch.isfinite, r["mixed"]["losses"]))
    assert losses[-1] < losses[0] - 0.01, losses


@pytest.mark.parametrize("method", METHODS)
def test_projections_regenerated_identical_never_sharded_or_broadcast(run, worker, method):
    """Every rank regenerates the same projections (checksums equal to this process's); they are
    no parameter, buffer or state_dict entry (so FSDP neither shards nor broadcasts them), and
    building the adapted model issues no collective."""
    r = scenario(run, method, "train")
    probe = run[0]["probe"]
    assert probe and any("broadcast" in name for name, _ in probe), "the collective probe sees nothing"
    assert r["collectives_building"] == []
    model = worker.make_model(method)
    assert r["checksums"] == vt_checksums(model)
    for facts in (r["projections_before"], r["projections_after"]):
        assert facts == {"dtensor": False, "held_by_module": False, "shapes": [(8, 64), (64, 8)]}


def vt_checksums(model):
    import vera_torch as vt

    store = model.vera_state.projections
    return {name: vt.projections.checksum(*store.get(key)) for name, key in store.keys_by_name.items()}


@pytest.mark.parametrize("method", METHODS)
def test_activation_checkpointing(run, method):
    """Gradient checkpointing under FSDP2 (adapter dropout on): the recomputed forward uses the
    same dropout masks, so training matches the run without it; each layer ran twice."""
    r = scenario(run, method, "checkpointing")
    plain, checkpointed = r["checkpointing_False"], r["checkpointing_True"]
    assert checkpointed["forwards"] == 2 * plain["forwards"] > 0
    _assert_vectors_close(checkpointed["vectors"], plain["vectors"], rtol=1e-6, atol=1e-7)


def _file_parts(path):
    """(metadata, {name: (dtype, shape, bytes)}, data section) of a safetensors file."""
    import json
    import struct

    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    metadata, data = header.pop("__metadata__"), raw[8 + size :]
    tensors = {
        name: (info["dtype"], info["shape"], data[info["data_offsets"][0] : info["data_offsets"][1]])
        for name, info in header.items()
    }
    return metadata, tensors, data


@pytest.mark.parametrize("method", METHODS)
def test_saving_from_sharded_model_writes_one_process_file(run, worker, method, tmp_path):
    """The file saved from the sharded model holds what this process writes for the same vectors:
    equal metadata (config JSON included), equal tensor names, dtypes, shapes and bytes, and an
    equal data section. (Not the whole file's bytes: safetensors writes its header map in a
    per-process hash order, so two runs of one process differ there too.) Saving gathered
    nothing but the adapter's bank rows: a one-row bank sharded over 2 ranks gathers its 64
    numbers padded to 2 x 64, where a base weight alone has 2048."""
    import vera_torch as vt

    out = run[1]
    r = scenario(run, method, "train")
    model = worker.make_model(method)
    params = worker.trainable(model)
    with torch.no_grad():
        for name, value in r["vectors"].items():
            params[name].copy_(value)
    vt.save_adapter(model, tmp_path / "one.safetensors")
    sharded, one = _file_parts(out / f"{method}-sharded.safetensors"), _file_parts(tmp_path / "one.safetensors")
    assert sharded[0] == one[0]
    assert sharded[1] == one[1]
    assert sharded[2] == one[2]
    assert len(one[1]) == len(r["vectors"])
    gathers = [(name, size) for name, size in r["collectives_saving"] if "gather" in name]
    assert gathers, "saving a sharded adapter must gather its vectors"
    assert max(size for _, size in gathers) <= 2 * 64, gathers


@pytest.mark.parametrize("method", METHODS)
def test_loading_into_sharded_model(run, worker, method):
    """``restore_adapter`` writes a file into the sharded model's own adapter (each rank keeps its
    part): outputs equal this process with the file loaded, and training from there matches too.
    ``load_adapter`` adds the file as a new adapter to a sharded base: the same outputs, and its
    vectors serve but never train (FSDP2 would not reduce gradients of parameters made after it)."""
    import vera_torch as vt

    out = run[1]
    r = scenario(run, method, "loading")
    ids = worker.data()
    reference = worker.make_base()
    vt.load_adapter(reference, out / f"{method}-to-load.safetensors")
    with torch.no_grad():
        logits = reference(input_ids=ids).logits
    torch.testing.assert_close(r["restored_logits"], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r["loaded_logits"], logits, rtol=1e-5, atol=1e-5)
    worker.train(reference, ids, steps=2)
    _assert_vectors_close(r["restored_vectors"], worker.vectors(reference), rtol=1e-5, atol=1e-6)
    assert not r["loaded_vectors_sharded"]  # a new adapter after fully_shard: plain, replicated vectors
    assert r["loaded_trainable"] == []  # ... that never train


def test_docs_training_script_runs_under_torchrun(tmp_path):
    """docs/fsdp2.md's script, as written, under ``torchrun`` with 2 CPU processes: the loss falls
    and the adapter file it saves loads onto the unsharded model."""
    import os
    import re
    import subprocess
    from pathlib import Path

    import vera_torch as vt

    page = (Path(__file__).resolve().parents[2] / "docs" / "fsdp2.md").read_text()
    (script,) = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    (tmp_path / "train_fsdp2.py").write_text(script)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [*command, "train_fsdp2.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", done.stdout).groups())
    assert last < first - 0.1
    assert "saved adapter.safetensors: 14 layers, rank 32" in done.stdout
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    loaded = vt.load_adapter(transformers.LlamaForCausalLM(config), tmp_path / "adapter.safetensors")
    assert len(loaded.layers) == 14 and loaded.r == 32
