"""`babydistill bench gpu`: without CUDA one line and exit 2; its whole plan on the CPU at tiny sizes, through the
Triton interpreter, so that the command cannot rot before it meets a GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: the kernel runs in its interpreter

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from babydistill.workflows.benchmarks import bench_gpu, gpu_checks  # noqa: E402
from babydistill.workflows.cli import main  # noqa: E402
from tests.conftest import write_config, write_corpus  # noqa: E402

pytest.importorskip("triton")


def test_without_cuda_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "gpu", "--out", str(tmp_path / "gpu.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("babydistill: error: bench gpu: no CUDA device here")
    assert not (tmp_path / "gpu.json").exists()


def test_a_kernel_check_fails_on_a_wrong_gradient(monkeypatch):
    # the checks can fail: a kernel whose gradient is off by 1% in fp32 is caught
    from babydistill.kernels import autograd

    real = autograd.row_kernel

    def skewed(impl):
        fn = real(impl)

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            (args[2] if len(args) > 2 else kwargs["grad"]).mul_(1.01)  # loss_and_grad(logits, problem, grad)
            return out
        return wrapped

    monkeypatch.setattr(autograd, "row_kernel", skewed)
    row = gpu_checks.check_case("cpu", 4, 48, 4, "topk", "fp32", 1.0, 0.5, "bucket", "token")
    assert not row["ok"] and row["excess"] > 0


def test_the_plan_runs_on_the_cpu(tmp_path, monkeypatch, request):
    from babydistill.kernels import triton_kernel

    # small blocks: the interpreter's cost is per block element (several blocks per row at V = 48 still)
    monkeypatch.setattr(triton_kernel, "BLOCK_V", 32)
    monkeypatch.setattr(triton_kernel, "BLOCK_K", 16)
    monkeypatch.setattr(triton_kernel, "BLOCK_F", 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread avoids OpenMP spin-waits on a busy machine
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    write_corpus(tmp_path / "corpus")
    config = write_config(tmp_path, {"train": {"batch_size": 4}})
    plan = bench_gpu.plan_on_cpu(config)
    out = tmp_path / "gpu.json"
    result = bench_gpu.run_plan(plan, out, "test")
    saved = json.loads(out.read_text())
    assert saved["environment"]["command"] == "test" and saved["machine"]["versions"]["torch"] == torch.__version__
    checks = saved["checks"]
    assert checks["cases"] == gpu_checks.num_checks() == 333 and checks["failed"] == 0, checks["failures"]
    (row,) = saved["loss"]["sizes"]
    assert {"fused", "fused_inplace", "cross_entropy", "clone"} <= set(row) and row["fused"]["ms"] > 0
    assert {"fused_linear", "materialised_ce"} <= set(row["linear"])
    assert set(saved["step"]["modes"]) == {"ce", "offline", "online"}
    assert 0 < saved["capture"]["one_gpu"]["forward_share"] <= 1
    assert saved["capture"]["one_gpu"]["capture"] == {"devices": ["cpu"], "precisions": ["fp32"]}
    assert saved["pipeline"]["report_written"] and saved["pipeline"]["students_evaluated"] == ["s1"]
    assert set(saved["goals"]) == set(bench_gpu.GOALS)
    assert saved["goals"]["capture_scaling_per_gpu"]["measured"] is None  # one device: not measured
    assert result["goals"]["offline_over_ce_time"]["measured"] > 0
