"""DistributedDataParallel on CPU (gloo, 2 processes): regenerated projections, same training."""

import sys

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed without gloo")
@pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous and fork-free spawn tested on POSIX only")
def test_ddp_two_processes_match_single_process(tmp_path):
    import torch_ddp_worker as ddp_worker

    import vera_torch as vt

    out = tmp_path / "rank0.pt"
    mp.spawn(ddp_worker.run, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    result = torch.load(out)

    model = ddp_worker.make_model()
    assert result["checksums"] == {
        name: vt.projections.checksum(*model.vera_state.projections.get(key))
        for name, key in model.vera_state.projections.keys_by_name.items()
    }
    ids, target = ddp_worker.data()
    ddp_worker.train(model, ids, target)  # the whole global batch in one process
    single = ddp_worker.vectors(model)
    assert single.keys() == result["vectors"].keys()
    for name, value in single.items():
        torch.testing.assert_close(result["vectors"][name], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(v, ddp_worker.vectors(ddp_worker.make_model())[n]) for n, v in single.items())
