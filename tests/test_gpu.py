"""The GPU path (make test-gpu; skipped without CUDA): the CPU tests' counterparts where CUDA changes the code that
runs: bf16 with flash attention against transformers, inductor across the phase switch, nccl, FSDP2 with bf16 mixed
precision on one GPU, resume, and the bench's GPU part (tokens/s, MFU)."""

import json

import pytest
import torch
from conftest import hf_neox, metrics, run_py, stop_by_sigterm_while_reading, train_args as args, weights
from safetensors.torch import load_file

import train
from checkpoint import latest_sharded
from model import GPTNeoX

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make test-gpu)")]
GPU = ("--device=cuda",)
SWITCH = ("--max_iters=6", "--eval_interval=3", "--embedding_tuning_frac=0.5")


def torchrun(argv, nproc=1):
    return run_py(["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py", *argv],
                  env={"OMP_NUM_THREADS": "1"})


def test_bf16_logits_as_close_to_fp32_as_transformers_bf16(tmp_path):
    """Ours in bf16 on the GPU (SDPA: flash attention) strays from the fp32 reference no more than transformers'
    own bf16 model does, beyond a bf16 rounding step; its argmax is fp32's wherever fp32's top-1 margin exceeds twice
    transformers' bf16 error (gpu_check.bf16_agreement: a random model's near ties left out)."""
    from gpu_check import bf16_agreement

    ref = hf_neox(hidden_size=128, num_attention_heads=2)
    ref.save_pretrained(tmp_path)
    idx = torch.randint(0, ref.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        exact = ref.cuda()(input_ids=idx).logits.float()
        ref_bf16 = ref.to(torch.bfloat16)(input_ids=idx).logits.float()
        ours = GPTNeoX.from_pretrained(str(tmp_path), dtype="bfloat16", device="cuda").eval()
        ours_bf16 = ours(idx)[0].float()
    f = bf16_agreement(exact, ours_bf16, ref_bf16)
    assert f["max_err"] <= 2 * f["reference_max_err"] + 1e-2, f
    assert f["rel_err"] <= 2 * f["reference_rel_err"] + 1e-3, f
    assert f["decided_positions"] > 0 and f["decided_agreement"] == 1.0, f


def test_inductor_across_the_switch_matches_eager(corpus, tmp_path):
    """compile=True with inductor (CUDA kernels) in bf16: the frozen phase's graph, the recompile at the switch, and
    the losses of the eager run; every weight trained."""
    train.main(args(corpus, tmp_path / "compiled", *SWITCH, *GPU, "--dtype=bfloat16", "--compile=True"))
    train.main(args(corpus, tmp_path / "eager", *SWITCH, *GPU, "--dtype=bfloat16"))
    compiled = [m["loss"] for m in metrics(tmp_path / "compiled") if "lr" in m]
    eager = [m["loss"] for m in metrics(tmp_path / "eager") if "lr" in m]
    assert compiled == pytest.approx(eager, abs=0.03)
    start, end = load_file(corpus / "init" / "model.safetensors"), weights(tmp_path / "compiled")
    assert all(not torch.equal(end[name], start[name]) for name in start)
    summary = json.loads((tmp_path / "compiled" / "summary.json").read_text())
    assert summary["phases"]["full"]["peak_mem_mb"] > 0


def test_one_process_nccl_then_fsdp_on_one_gpu(corpus, tmp_path):
    """torchrun with one process: DDP over nccl, and FSDP2 (bf16 compute, fp32 reduce and master weights) with
    activation checkpointing; the two follow each other's losses, FSDP writes a sharded checkpoint, and its export
    loads."""
    r = torchrun(args(corpus, tmp_path / "ddp", *SWITCH, *GPU, "--backend=nccl", "--dtype=bfloat16"))
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert (ddp["world_size"], ddp["parallelism"], ddp["ddp_ranks_identical"]) == (1, "ddp", True)
    r = torchrun(args(corpus, tmp_path / "fsdp", *SWITCH, *GPU, "--dtype=bfloat16", "--parallelism=fsdp",
                      "--activation_checkpointing=True"))
    assert r.returncode == 0, r.stderr[-3000:]
    fsdp = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert (fsdp["world_size"], fsdp["parallelism"]) == (1, "fsdp")
    losses = {name: [m["loss"] for m in metrics(tmp_path / name) if "lr" in m] for name in ("ddp", "fsdp")}
    assert losses["fsdp"] == pytest.approx(losses["ddp"], abs=0.03)
    assert latest_sharded(str(tmp_path / "fsdp" / "ckpt")).endswith("step-00000006")
    assert all(t.dtype == torch.float32 for t in weights(tmp_path / "fsdp").values())
    GPTNeoX.from_pretrained(str(tmp_path / "fsdp" / "hf"))


def test_stopped_and_resumed_on_the_gpu_ends_as_the_uninterrupted_run(corpus, tmp_path, monkeypatch):
    """SIGTERM in the embedding phase (the batches of the next step already read ahead), resume: the same weights as
    a run that was not stopped (fp32, so the comparison is tight)."""
    run_args = args(corpus, tmp_path / "stopped", *SWITCH, *GPU, "--dtype=float32")
    stop_by_sigterm_while_reading(monkeypatch, 8, lambda: train.main(run_args))  # while step 2 is read
    train.main([*run_args, "--init_from=resume"])
    train.main(args(corpus, tmp_path / "straight", *SWITCH, *GPU, "--dtype=float32"))
    assert [m["step"] for m in metrics(tmp_path / "stopped") if "lr" in m] == list(range(1, 7))
    straight = weights(tmp_path / "straight")
    for name, tensor in weights(tmp_path / "stopped").items():
        torch.testing.assert_close(tensor, straight[name], rtol=0, atol=1e-5)


def test_bench_gpu_part_reports_tokens_per_s_and_mfu(tmp_path):
    """The bench's GPU part at Pythia shapes, compiled, bf16: tokens/s, and MFU in (0, 1) on a card the peak table
    knows (null with the reason on one it does not: tests/test_bench.py); the table prints it."""
    import bench

    gpu = bench.bench_gpu(str(tmp_path), quick=True)
    assert set(gpu) == {"pythia-160m", "pythia-410m"}
    for name, r in gpu.items():
        assert r["tokens_per_s"] > 0, (name, r)
        assert (0 < r["mfu"] < 1) if train.peak_flops(r["device"], "bfloat16") else r["mfu"] is None, (name, r)
    assert "pythia-410m" in bench.table({"machine": bench.machine(), "gpu": gpu})
