"""Distributed correctness: 2 ranks x b sequences, and b sequences x 2 accumulated micro-batches, give the
loss and the gradient of one batch of 2b sequences (lctw/training/module's docstring), and FSDP2 (trainer=fsdp)
shards, checkpoints, resumes and consolidates (lctw/training/distributed).

The sequences have different numbers of valid targets (padding), so a mean of per-micro-batch means would
differ from the batch's mean: the tests would catch it. One plain SGD step at lr 1 without clipping makes
the parameter change the gradient itself.
"""

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys

import lightning as L
import pytest
import torch
from conftest import RUN, compose, tiny_llama
from torch.utils.data import DataLoader

from lctw.config import ConfigError, validate_evaluation
from lctw.method.scorers import SelfScorer
from lctw.method.weighting import Dense
from lctw.models.theta import load_theta
from lctw.runs.checkpoints import is_sharded
from lctw.training.consolidate import consolidate
from lctw.training.distributed import FSDP2Strategy, decoder_layers, gather_theta
from lctw.training.module import TokenWeightingLM
from lctw.training.stages import train

LENGTHS = [12, 5, 9, 3]  # tokens per sequence (BOS included); the rest of the 12 positions is padding


def rows():
    g = torch.Generator().manual_seed(0)
    out = []
    for length in LENGTHS:
        ids = torch.randint(3, 64, (12,), generator=g)
        ids[0] = 1
        out.append({"input_ids": ids, "mask": torch.arange(11) < length - 1})
    return out


class Recording(TokenWeightingLM):
    """Records each micro-batch's Σ w·CE and valid targets (what it backpropagates), and what it logs."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.sums.append((float(out["loss"]), int(batch["mask"].sum())))
        return out

    def log_dict(self, metrics, *args, **kwargs):
        self.logged.update({k: float(v) for k, v in metrics.items()})
        return super().log_dict(metrics, *args, **kwargs)


def one_step(batch_size: int, accumulate: int = 1, devices: int = 1, strategy="auto", meta: bool = False):
    """θ after one SGD step (lr 1) on the 4 sequences, and this rank's (Σ w·CE, targets) per micro-batch.
    ``meta``: θ built without weights, on the meta device (it receives rank 0's when it is sharded)."""
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = tiny_llama(layers=2, vocab=64, seed=0).train()
    module = Recording(model, SelfScorer(n=4, max_len=12), Dense(lam=0.5), n=4,
                       optimizer=functools.partial(torch.optim.SGD, lr=1.0), chunk_size=5)
    module.sums, module.logged = [], {}
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=1,
                        accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        precision="32-true")
    trainer.fit(module, DataLoader(rows(), batch_size=batch_size, shuffle=False))
    if isinstance(strategy, FSDP2Strategy):
        return gather_theta(module.model), module.sums, module.logged
    return {k: v.clone() for k, v in model.state_dict().items()}, module.sums, module.logged


@pytest.mark.integration
def test_accumulated_micro_batches_equal_the_larger_batch():
    big, big_sums, _ = one_step(batch_size=4)
    acc, acc_sums, _ = one_step(batch_size=2, accumulate=2)
    single, single_sums, _ = one_step(batch_size=1, accumulate=4)
    for theta in (acc, single):
        for k in big:
            torch.testing.assert_close(theta[k], big[k], rtol=1e-5, atol=1e-7)
    loss = sum(s for s, _ in big_sums) / sum(c for _, c in big_sums)
    for sums in (acc_sums, single_sums):
        assert sum(s for s, _ in sums) / sum(c for _, c in sums) == pytest.approx(loss, rel=1e-6)
    # the micro-batches' own means differ: averaging them would not be the batch's loss
    mean_of_means = sum(s / c for s, c in acc_sums) / len(acc_sums)
    assert abs(mean_of_means - loss) > 1e-3  # 1000x the tolerance above


@pytest.mark.integration
def test_the_logged_loss_is_the_steps_loss_over_all_micro_batches():
    """train/loss and train/ce are Σ w·CE and Σ CE over every micro-batch of the step divided by its valid
    targets: the loss the gradient is of, not the last micro-batch's mean."""
    _, big_sums, big_logged = one_step(batch_size=4)
    _, sums, logged = one_step(batch_size=1, accumulate=4)
    step_loss = sum(s for s, _ in big_sums) / sum(c for _, c in big_sums)
    assert logged["train/loss"] == pytest.approx(step_loss, rel=1e-6)
    assert big_logged["train/loss"] == pytest.approx(step_loss, rel=1e-6)
    assert logged["train/ce"] == pytest.approx(big_logged["train/ce"], rel=1e-6)
    assert abs(logged["train/loss"] - sums[-1][0] / sums[-1][1]) > 1e-3  # the last micro-batch's own mean


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out: str, strategy: str) -> None:
    """One of 2 gloo ranks, launched by the test (so Lightning does not re-run pytest's command line)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0",
                      LOCAL_RANK=str(rank), RANK=str(rank))
    torch.set_num_threads(1)
    chosen = FSDP2Strategy(param_dtype="float32") if strategy.startswith("fsdp") else strategy
    theta, sums, logged = one_step(batch_size=2, devices=2, strategy=chosen,
                                   meta=strategy == "fsdp-meta" and rank == 1)
    torch.save({"theta": theta, "sums": sums, "logged": logged}, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.slow  # about 50 s each on 2 loaded cores: each spawned rank imports torch, Lightning and transformers
@pytest.mark.parametrize("strategy", ["fsdp", "fsdp-meta", "ddp"])
def test_two_ranks_equal_one_process(tmp_path, strategy):
    """2 ranks x 2 sequences == 1 process x 4 sequences: the same loss, the same update (FSDP2 and DDP).
    fsdp-meta: rank 1 builds θ on the meta device and receives its shards from rank 0, as trainer=fsdp does."""
    torch.multiprocessing.start_processes(_rank, args=(_free_port(), str(tmp_path), strategy), nprocs=2,
                                          start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    big, big_sums, big_logged = one_step(batch_size=4)
    for k in big:
        torch.testing.assert_close(ranks[0]["theta"][k], big[k], rtol=1e-5, atol=1e-7)
    sums = ranks[0]["sums"] + ranks[1]["sums"]
    assert {c for _, c in sums} != {sum(c for _, c in sums) / 2}  # the ranks have different target counts
    assert sum(s for s, _ in sums) / sum(c for _, c in sums) == pytest.approx(
        sum(s for s, _ in big_sums) / sum(c for _, c in big_sums), rel=1e-6)
    assert ranks[0]["logged"]["train/loss"] == pytest.approx(big_logged["train/loss"], rel=1e-6)  # both ranks' sums


def test_decoder_layers_come_from_the_model():
    model = tiny_llama(layers=3)
    assert [type(m).__name__ for m in decoder_layers(model)] == ["LlamaDecoderLayer"] * 3
    model._no_split_modules = ["NoSuchLayer"]
    with pytest.raises(ValueError, match="_no_split_modules"):
        decoder_layers(model)


@pytest.mark.integration
def test_fsdp_run_writes_sharded_checkpoints_that_resume_and_consolidate(hf_model, cache_dir, tmp_path,
                                                                         one_process_group):
    """trainer=fsdp on one gloo rank, in this process (the 2-rank run of train.py: test_train_fsdp_on_two_ranks)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    overrides = [*RUN, "model=hf", f"model.name_or_path={hf_model}", "model.gradient_checkpointing=false",
                 "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_steps=2",
                 "trainer.accumulate_grad_batches=1", "checkpoint_every=1", "trainer.val_check_interval=2",
                 "trainer.limit_val_batches=1", "validate_first=false", "logger=none", "callbacks=default"]
    train(compose(overrides, cache=cache_dir), run_dir=tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert is_sharded(last)
    files = [f for f in last.iterdir() if not f.name.endswith(".sha256")]
    assert all((last / f"{f.name}.sha256").is_file() for f in files)
    saved = dcp.FileSystemReader(str(last)).read_metadata().state_dict_metadata
    assert not [k for k in saved if "scorer." in k] and any(k.startswith("optimizer_0.") for k in saved)
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 2

    out = consolidate(last, tmp_path / "consolidated")  # θ after step 2, as the run exported it to hf/
    exported, consolidated = load_file(tmp_path / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    assert exported.keys() == consolidated.keys()
    assert all(torch.equal(exported[k], consolidated[k]) for k in exported)
    validate_evaluation(compose([f"ckpt={out}"], config_name="evaluate"))  # eval.py accepts it
    validate_evaluation(compose([f"ckpt={last}"], config_name="evaluate"))  # and the checkpoint directory itself

    # resume: the same run directory, two more steps, from the sharded last.ckpt
    train(compose([*overrides, "trainer.max_steps=4"], cache=cache_dir), run_dir=tmp_path)
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 4

    shard = next(f for f in files if f.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-8] + bytes(8))  # a damaged shard is refused by name
    with pytest.raises(ValueError, match=f"{shard.name} is corrupted"):
        load_theta(str(last))
    (tmp_path / "empty.ckpt").mkdir()
    with pytest.raises(ConfigError, match="nor a sharded checkpoint"):
        validate_evaluation(compose([f"ckpt={tmp_path / 'empty.ckpt'}"], config_name="evaluate"))


@pytest.mark.slow  # about 3 minutes on 2 loaded cores: 2 ranks x 3 commands, each importing everything
def test_train_fsdp_on_two_ranks_resumes_and_consolidates(cache_dir, tmp_path):
    """The documented commands: train.py trainer=fsdp on 2 gloo ranks (frozen scorer θ0 sharded too), the
    same command resumed from the sharded last.ckpt, then python -m lctw.training.consolidate."""
    from conftest import ROOT, SMALL
    from safetensors.torch import load_file

    run_dir, out = tmp_path / "run", tmp_path / "consolidated"
    base = [sys.executable, "train.py", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
            *[o for o in SMALL if not o.startswith("logger.")],
            "trainer.accumulate_grad_batches=1", "checkpoint_every=1", "trainer.val_check_interval=2",
            "logger=none", f"paths.cache={cache_dir}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    for steps in (2, 3):  # the second command finds last.ckpt in the run directory and resumes
        proc = subprocess.run([*base, f"trainer.max_steps={steps}"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert torch.load(run_dir / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True)["global_step"] == steps
    assert "Restored all states from the checkpoint" in proc.stderr + proc.stdout
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    cmd = [sys.executable, "-m", "lctw.training.consolidate", str(run_dir / "checkpoints" / "last.ckpt"), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported, consolidated = load_file(run_dir / "hf" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(exported[k], consolidated[k]) for k in exported)


@pytest.mark.parametrize(("env", "devices", "receives"), [
    ({"RANK": "1"}, 1, False),  # a stray RANK in the shell: one process is rank 0
    ({"RANK": "1", "SLURM_PROCID": "1", "LOCAL_RANK": "1"}, 1, False),  # whatever the environment says
    ({"RANK": "1"}, 2, False),  # RANK without torchrun's other variables is not torchrun's
    ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, 2, True),  # the second process Lightning starts
    ({"RANK": "1", "GROUP_RANK": "0", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 2, True),  # torchrun
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_NAME": "train"}, 2, True),  # srun
])
def test_only_a_non_zero_rank_of_several_builds_theta_without_weights(monkeypatch, env, devices, receives):
    from lctw.training.distributed import receives_weights

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID",
                "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = compose(["trainer=fsdp", "trainer.accelerator=cpu", f"trainer.devices={devices}"])
    assert receives_weights(cfg.trainer) is receives


@pytest.mark.integration
def test_a_stray_rank_leaves_a_single_process_fsdp_run_intact(hf_model, cache_dir, tmp_path, one_process_group,
                                                              monkeypatch):
    """``RANK=1`` exported in the shell of a one-process trainer=fsdp run: θ must still be built with its
    weights (it used to be built on the meta device, with no rank to send it any: a diverged validation)."""
    import math

    monkeypatch.setenv("RANK", "1")
    overrides = [*RUN, "model=hf", f"model.name_or_path={hf_model}", "model.gradient_checkpointing=false",
                 "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.max_steps=1",
                 "trainer.accumulate_grad_batches=1", "checkpoint_every=1", "trainer.val_check_interval=1",
                 "trainer.limit_val_batches=1", "logger=none", "callbacks=none"]
    metrics = train(compose(overrides, cache=cache_dir), run_dir=tmp_path)
    assert math.isfinite(metrics["val/ce_before"]) and math.isfinite(metrics["val/ce"])


TWO_RANKS = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.accumulate_grad_batches=1",
             "trainer.max_steps=6", "checkpoint_every=2", "trainer.val_check_interval=3", "logger=csv",
             "trainer.log_every_n_steps=1", "+callbacks.record._target_=toy_parts.RecordBatches"]


def _train_two_ranks(cache_dir, run_dir, *extra):
    """train.py on 2 gloo ranks (Lightning starts the second by re-running the command), in a session of its
    own: a SIGKILL injected on one rank takes down both, and not pytest."""
    from conftest import ROOT, SMALL

    cmd = [sys.executable, "train.py", *[o for o in SMALL if not o.startswith("logger.")], *TWO_RANKS,
           f"paths.cache={cache_dir}", f"hydra.run.dir={run_dir}", *extra]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, start_new_session=True)


def _batches(run_dir):
    """Per rank: step -> the rows trained on at that step (the last time it was trained: after a resume)."""
    out = []
    for rank in range(2):
        with open(run_dir / f"batches-rank{rank}.jsonl") as f:
            out.append({r["step"]: r["rows"] for r in map(json.loads, f)})
    return out


def _same_weights(a, b):
    from safetensors.torch import load_file

    a, b = load_file(a / "hf" / "model.safetensors"), load_file(b / "hf" / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def whole_two_ranks(cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("whole-two-ranks")
    proc = _train_two_ranks(cache_dir, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow  # 67 s on 2 loaded cores (2 commands of 2 ranks), plus 46 s for the shared uninterrupted run
def test_two_ranks_killed_mid_epoch_resume_on_the_rows_they_had_not_seen(whole_two_ranks, cache_dir, tmp_path):
    """A 2-rank trainer=fsdp run SIGKILLed at step 3 (after the step-2 checkpoint, well inside the first
    epoch) and resumed: each rank trains steps 3-6 on exactly the rows the uninterrupted run trains them on
    (every rank used to replay the epoch from its start), and the final weights are equal."""
    crash = ["+callbacks.crash._target_=toy_parts.Crash", "+callbacks.crash.step=3"]
    killed = _train_two_ranks(cache_dir, tmp_path, *crash)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert torch.load(tmp_path / "checkpoints/last.ckpt/meta.pt", weights_only=True)["global_step"] == 2
    again = _train_two_ranks(cache_dir, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    whole, resumed = _batches(whole_two_ranks), _batches(tmp_path)
    assert all(sorted(w) == list(range(1, 7)) for w in whole)
    assert resumed == whole  # steps 3-6 as retrained after the resume, steps 1-2 from before the kill
    assert whole[0][1] != whole[1][1]  # the ranks share the step out
    assert _same_weights(tmp_path, whole_two_ranks)


@pytest.mark.slow  # 67 s on 2 loaded cores (2 commands of 2 ranks), plus the shared uninterrupted run
def test_two_ranks_save_together_at_the_step_after_the_warning_signal(whole_two_ranks, cache_dir, tmp_path):
    """USR2 reaches rank 0 only, in the middle of step 5 (one step after the step-4 checkpoint): both ranks
    agree at the end of step 5, save the sharded last.ckpt together, and end as the signal says; the
    restarted run loses no step and ends with the uninterrupted run's weights, batches and history."""
    import csv

    usr2 = ["+callbacks.usr2._target_=toy_parts.Signal", "+callbacks.usr2.batch=4", "+callbacks.usr2.rank=0"]
    signalled = _train_two_ranks(cache_dir, tmp_path, *usr2)
    assert signalled.returncode == 128 + signal.SIGUSR2, signalled.stderr[-3000:]  # ended as the signal says
    assert torch.load(tmp_path / "checkpoints/last.ckpt/meta.pt", weights_only=True)["global_step"] == 5
    again = _train_two_ranks(cache_dir, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _batches(tmp_path) == _batches(whole_two_ranks)
    assert _same_weights(tmp_path, whole_two_ranks)

    def history(run_dir):
        with open(run_dir / "csv" / "metrics.csv", newline="") as f:
            return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in csv.DictReader(f)]

    assert history(tmp_path) == history(whole_two_ranks)
