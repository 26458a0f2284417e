"""Device and precision selection, one GPU per capture worker, bf16 capture, train.compile, on the CPU.

Where a GPU is impossible here, ``torch.cuda.is_available`` / ``device_count`` / ``get_device_capability`` are
monkeypatched; the dask workers' ``CUDA_VISIBLE_DEVICES`` is read from inside the workers.
"""

import os
import shutil

import numpy as np
import pytest
import torch

from babydistill.pipeline import devices
from babydistill.pipeline.capture_chunk import compute_chunk
from babydistill.pipeline.training.optimizer import build_optimizer
from babydistill.pipeline.training.runtime import TrainingError, compile_model, compile_problem
from babydistill.pipeline.training.windows import to_device
from babydistill.stores.tokens import TokenStore
from babydistill.workflows.cli import main
from tests.test_cache import _spec, teachers  # noqa: F401  (the session fixture)


def _fake_gpus(monkeypatch, count: int, capability=(9, 0)):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")


# --- devices and precisions --------------------------------------------------------------------


def test_precision_mapping_on_the_cpu():
    cpu = torch.device("cpu")
    assert devices.resolve_precision("auto", cpu, "cache.precision") is None
    assert devices.resolve_precision("fp32", cpu, "cache.precision") is None
    assert devices.resolve_precision("bf16", cpu, "cache.precision") is torch.bfloat16
    with pytest.raises(ValueError, match=r"^cache.precision=fp16 needs a CUDA device"):
        devices.resolve_precision("fp16", cpu, "cache.precision")


@pytest.mark.parametrize("capability,cache_auto,train_auto", [((9, 0), torch.bfloat16, torch.bfloat16),
                                                                ((7, 0), None, torch.float16)])
def test_precision_mapping_on_cuda(monkeypatch, capability, cache_auto, train_auto):
    _fake_gpus(monkeypatch, 1, capability)
    gpu = torch.device("cuda:0")
    assert devices.resolve_precision("auto", gpu, "cache.precision", without_bf16=None) is cache_auto
    assert devices.resolve_precision("auto", gpu, "train.precision") is train_auto
    assert devices.resolve_precision("fp16", gpu, "cache.precision") is torch.float16
    if capability < (8, 0):
        with pytest.raises(ValueError, match=r"^cache.precision=bf16: Fake GPU has no bf16.*use cache.precision=fp16"):
            devices.resolve_precision("bf16", gpu, "cache.precision")


def test_fp16_refused_on_a_gpu_without_it(monkeypatch):
    _fake_gpus(monkeypatch, 1, (5, 0))
    with pytest.raises(ValueError, match=r"^train.precision=fp16: Fake GPU has no fast fp16"):
        devices.resolve_precision("fp16", torch.device("cuda:0"), "train.precision")


def test_device_selection(monkeypatch):
    _fake_gpus(monkeypatch, 0)
    assert devices.resolve_device("auto", "cache.device") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^cache.device=cuda: CUDA is not available here"):
        devices.resolve_device("cuda", "cache.device")
    with pytest.raises(ValueError, match=r"^cache.device=gpu0: not a device; use auto, cpu, cuda"):
        devices.resolve_device("gpu0", "cache.device")
    with pytest.raises(ValueError, match=r"^cache.device=meta: only cpu and cuda"):
        devices.resolve_device("meta", "cache.device")
    _fake_gpus(monkeypatch, 2)
    assert devices.resolve_device("auto", "cache.device", local_rank=1) == torch.device("cuda:1")
    assert devices.resolve_device("cuda", "cache.device") == torch.device("cuda:0")


def test_one_worker_per_visible_gpu(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.check_gpu_workers(2) == ["0", "1"]
    with pytest.raises(ValueError, match=r"^--workers 3: this host has 2 visible GPU\(s\).*use --workers 2 or fewer"):
        devices.check_gpu_workers(3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")  # a process given GPUs 2 and 5 hands out those
    assert devices.check_gpu_workers(2) == ["2", "5"]


def test_gpu_cluster_workers_each_see_one_device():
    from distributed import Client

    with devices.gpu_cluster(["3", "1"]) as cluster, Client(cluster) as client:
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        threads = client.nthreads()
    assert sorted(seen.values()) == ["1", "3"]
    assert sorted(threads.values()) == [1, 1]


# --- bad input at the command line: one line, exit 2, nothing written ---------------------------


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("argv,expected", [
    (["cache", "--set", "cache.device=cuda"], "cache.device=cuda: CUDA is not available here"),
    (["cache", "--set", "cache.precision=fp16"], "cache.precision=fp16 needs a CUDA device"),
    (["teacher", "--set", "train.device=cuda"], "train.device=cuda: CUDA is not available here"),
    (["distill", "--set", "train.precision=fp16"], "train.precision=fp16 needs a CUDA device"),
    (["run", "--set", "cache.device=cuda:1"], "cache.device=cuda:1: CUDA is not available here"),
])
def test_bad_devices_at_the_command_line(tiny_config_path, capsys, monkeypatch, argv, expected):
    _fake_gpus(monkeypatch, 0)
    line = _cli_error(capsys, [argv[0], str(tiny_config_path), *argv[1:]])
    assert line.startswith("babydistill: error: ") and expected in line and "use " in line
    assert not (tiny_config_path.parent / "run").exists()  # nothing written


def test_workers_above_gpus_and_compile_at_the_command_line(tiny_config_path, capsys, monkeypatch):
    _fake_gpus(monkeypatch, 2)
    line = _cli_error(capsys, ["cache", str(tiny_config_path), "--workers", "3", "--set", "cache.device=cuda"])
    assert "--workers 3: this host has 2 visible GPU(s)" in line and "use --workers 2 or fewer" in line
    _fake_gpus(monkeypatch, 0)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    line = _cli_error(capsys, ["teacher", str(tiny_config_path), "--set", "train.compile=true"])
    assert "train.compile=true: torch.compile on the CPU needs a C++ compiler" in line and "train.compile=false" in line
    assert not (tiny_config_path.parent / "run").exists()


def test_more_workers_than_gpus_is_refused(tiny_run, teachers, capsys, monkeypatch, tmp_path):  # noqa: F811
    from babydistill.pipeline.capture import capture_logits
    from babydistill.pipeline.config import CacheConfig

    _fake_gpus(monkeypatch, 2)
    out = tmp_path / "logits.zarr"
    with pytest.raises(ValueError, match=r"--workers 3: this host has 2 visible GPU"):
        capture_logits(CacheConfig(mode="topk", workers=3), tiny_run.tokens_path, tiny_run.tokenizer_path,
                       teachers, out)
    assert not out.exists()


# --- capture in bf16 -----------------------------------------------------------------------------


def test_bf16_capture_on_the_cpu_is_recorded_and_close(tiny_run, teachers):  # noqa: F811
    windows = TokenStore(tiny_run.tokens_path).windows("train", np.arange(8))
    spec = _spec(teachers, logp_dtype="float32", temperatures=[1.0])
    fp32_stats, bf16_stats = {}, {}
    fp32, _ = compute_chunk({**spec, "device": "auto"}, 0, windows, [], fp32_stats)
    bf16, _ = compute_chunk({**spec, "device": "cpu", "precision": "bf16"}, 0, windows, [], bf16_stats)
    assert fp32_stats["precision"] == "fp32" and bf16_stats["precision"] == "bf16"
    assert fp32_stats["device"] == bf16_stats["device"] == "cpu" and bf16_stats["forward_s"] > 0
    assert not np.array_equal(fp32["logp"], bf16["logp"])  # bf16 really ran
    # the top id agrees almost everywhere and the head's logp moves by bf16 rounding, not more
    assert (fp32["ids"][..., 0] == bf16["ids"][..., 0]).mean() > 0.9
    same = fp32["ids"] == bf16["ids"]
    assert np.abs(fp32["logp"][same] - bf16["logp"][same]).max() < 0.5


def test_capture_records_device_and_precision(tiny_run, teachers, tmp_path):  # noqa: F811
    import zarr

    from babydistill.pipeline.capture import capture_logits
    from babydistill.pipeline.config import CacheConfig

    cfg = CacheConfig(mode="topk", k=4, chunk_windows=64, fidelity_positions=0, precision="bf16", device="cpu")
    summary = capture_logits(cfg, tiny_run.tokens_path, tiny_run.tokenizer_path, teachers, tmp_path / "l.zarr")
    assert summary["capture"] == {"devices": ["cpu"], "precisions": ["bf16"]}
    assert dict(zarr.open_group(str(tmp_path / "l.zarr"), mode="r").attrs)["capture"]["precisions"] == ["bf16"]
    assert 0 < summary["task_forward_s"] <= summary["task_compute_s"]
    # the precision is not the store's identity: an fp32 resume of the same store is accepted
    again = capture_logits(CacheConfig(mode="topk", k=4, chunk_windows=64, fidelity_positions=0, device="cpu"),
                           tiny_run.tokens_path, tiny_run.tokenizer_path, teachers, tmp_path / "l.zarr")
    assert again["chunks_computed"] == 0


# --- training on the device ----------------------------------------------------------------------


def test_adamw_is_fused_only_on_cuda():
    model = torch.nn.Linear(4, 4)
    from babydistill.pipeline.config import TrainConfig

    assert not build_optimizer(model, TrainConfig()).defaults.get("fused")


def test_online_teachers_run_in_bf16_on_a_gpu(monkeypatch, teachers, tiny_run):  # noqa: F811
    from babydistill.pipeline.distill import online_teachers, teacher_dtype

    assert teacher_dtype(torch.device("cpu")) is torch.float32
    loaded = online_teachers(teachers, TokenStore(tiny_run.tokens_path).vocab_size, "auto")
    assert all(p.dtype is torch.float32 and p.device.type == "cpu" for t in loaded for p in t.parameters())
    _fake_gpus(monkeypatch, 1, (8, 0))
    assert teacher_dtype(torch.device("cuda:0")) is torch.bfloat16
    _fake_gpus(monkeypatch, 1, (7, 5))
    assert teacher_dtype(torch.device("cuda:0")) is torch.float32


def test_to_device_on_the_cpu_keeps_values():
    batch = {"input_ids": torch.arange(6).reshape(2, 3)}
    assert torch.equal(to_device(batch, torch.device("cpu"))["input_ids"], batch["input_ids"])


def test_compile_refused_without_a_compiler(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(TrainingError, match=r"^train.compile=true: torch.compile on the CPU needs a C\+\+ compiler"):
        compile_model(torch.nn.Linear(2, 2), True)


@pytest.mark.skipif(compile_problem() is not None, reason="torch.compile cannot run here")
def test_compile_really_compiles():
    # A small MLP rather than a Llama: inductor takes ~6 s here for it, ~25 s for a one-layer Llama.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    x = torch.randn(3, 8)
    expected = model(x)
    compiled = compile_model(model, True)
    assert compiled is not model and compiled._orig_mod is model
    torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)


def test_the_chunk_writer_keeps_order_and_surfaces_a_failed_write():
    import time

    from babydistill.pipeline.capture_chunk import _ChunkWriter

    writer, events = _ChunkWriter(), []

    def slow():
        time.sleep(0.05)
        events.append("first")
        return 0.5

    assert writer.submit(slow) == 0.0  # returns at once: the write runs while the caller computes
    assert events == []
    assert writer.submit(lambda: events.append("second") or 0.25) == 0.5  # waited for the first, got its time
    assert writer.wait() == 0.25 and events == ["first", "second"]
    writer.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a failed write (disk full, ...) fails the next task or the flush
        writer.wait()
    assert writer.wait() == 0.0


def test_a_failed_chunk_lets_the_previous_chunks_write_finish(tiny_run, teachers, tmp_path, monkeypatch):  # noqa: F811
    import time

    from babydistill.pipeline import capture, capture_chunk
    from babydistill.pipeline.config import CacheConfig
    from babydistill.stores.logits import read_marker

    real = capture_chunk.compute_chunk

    def failing(spec, chunk, *args, **kwargs):
        if chunk == 1:
            raise RuntimeError("teacher forward failed")
        return real(spec, chunk, *args, **kwargs)

    def slow_write(*args):
        time.sleep(0.3)  # still writing when chunk 1 fails
        return real_write(*args)

    real_write = capture_chunk._write
    monkeypatch.setattr(capture_chunk, "compute_chunk", failing)
    monkeypatch.setattr(capture_chunk, "_write", slow_write)
    out = tmp_path / "l.zarr"
    with pytest.raises(RuntimeError, match="teacher forward failed"):
        capture.capture_logits(CacheConfig(mode="topk", k=4, chunk_windows=4, fidelity_positions=0, device="cpu"),
                             tiny_run.tokens_path, tiny_run.tokenizer_path, teachers, out)
    assert read_marker(out, 0) is not None  # chunk 0 was handed to the writer before chunk 1 failed: it is done
    assert read_marker(out, 1) is None
