"""W&B: the mode, every call lctw makes (read back from the real offline run file), and that logging
never blocks or stops training (no network at the start, W&B's service dying mid-run)."""

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT

from lctw.eval.report import log_results, save_plot
from lctw.runs import loggers
from lctw.runs.loggers import wandb_mode


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_auto_is_offline_without_a_key(clean_env):
    assert wandb_mode("auto") == "offline"


def test_auto_is_online_with_a_key_in_the_environment_or_netrc(clean_env, monkeypatch):
    (clean_env / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (clean_env / ".netrc").chmod(0o600)
    assert wandb_mode("auto") == "online"
    (clean_env / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "abc")
    assert wandb_mode("auto") == "online"


def test_explicit_modes_win(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "abc")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode("auto") == "offline"
    assert wandb_mode("disabled") == "disabled"
    with pytest.raises(ValueError, match=r"logger\.mode='cloud' is not allowed"):
        wandb_mode("cloud")


@pytest.mark.parametrize("key, value", [("init_timeout", 0), ("init_timeout", "soon"), ("finish_timeout", -1)])
def test_bad_timeouts_are_refused(tmp_path, key, value):
    with pytest.raises(ValueError, match=rf"logger\.{key}={value!r} is out of range"):
        loggers.wandb(str(tmp_path), "t", None, {}, mode="offline", **{key: value})


def test_flat_config_has_dotted_keys_and_the_chosen_options():
    config = {"n": 32, "weighting": {"_target_": "lctw.method.weighting.Dense", "lam": 0.75}, "model": {"base": {}},
              "eval": None, "optimizer": {"betas": [0.9, 0.95]}}
    assert loggers.flat_config(config, {"weighting": "dense", "model": "tiny"}) == {
        "n": 32, "weighting._target_": "lctw.method.weighting.Dense", "weighting.lam": 0.75, "model.base": {},
        "eval": None, "optimizer.betas": [0.9, 0.95], "weighting": "dense", "model": "tiny"}
    assert loggers.option_names() == {}  # outside a Hydra app (train.py's runs: tests/test_train.py)


def read_run(run_dir: Path) -> dict:
    """The records of an offline W&B run file (``run-<id>.wandb``): its config and every history row.

    The file is W&B's transaction log: a 7-byte header, then 32 KiB blocks of records (crc32, length,
    type: 1 full, 2 first, 3 middle, 4 last), each record a ``wandb_internal_pb2.Record``. W&B's service
    writes it on its own after ``wandb.finish()`` returns, so this waits for the run's exit record.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + 60
    while True:
        data = path.read_bytes()
        pos, block, buf, records = 7, 32768, b"", []
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # a block's tail too short for a record header is padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if (length, kind) == (0, 0) or pos + 7 + length > len(data):  # padding, or not written yet
                break
            buf += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                records.append(wandb_internal_pb2.Record.FromString(buf))
                buf = b""
        if any(r.HasField("exit") for r in records):
            break
        assert time.monotonic() < deadline, f"{path} has no exit record after 60 s"
        time.sleep(0.2)
    assert data[:4] == b":W&B"
    config = {i.key: json.loads(i.value_json) for r in records if r.HasField("config") for i in r.config.update}
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.HasField("history")]
    return {"config": config, "history": history}


def ruler_shaped_table() -> pd.DataFrame:
    """Like ``lctw.eval.ruler.results_table``: tasks as rows, int lengths as columns, NaN where missing."""
    rows = {"niah_single_1": [100.0, 80.0], "vt": [40.0, float("nan")], "average": [70.0, 80.0]}
    return pd.DataFrame.from_dict(rows, orient="index", columns=[1024, 2048])


def test_every_wandb_call_lctw_makes_lands_in_the_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = loggers.wandb(str(tmp_path), "calls", None, {"n": 32, "scorer": {"mode": "chunked"}}, mode="auto")
    try:
        logger.log_metrics({"train/loss": 1.5}, step=3)
        ruler = ruler_shaped_table()
        plot = save_plot(ruler.T, tmp_path / "ruler.png", "length (tokens)", "score", "RULER")
        log_results(logger, {"eval/ruler/average/1024": 70.0}, ruler, "eval/ruler", plot)
        positions = pd.DataFrame({"ce": [5.1, 5.0]}, index=pd.Index(["0-32", "32-64"], name="positions"))
        log_results(logger, {"eval/ce/0-32": 5.1}, positions, "eval/position_ce")
        run_dir = Path(logger.experiment.dir).parent
    finally:
        loggers.finish()
    assert logger.failures == 0  # no call was skipped: each one below is W&B's own record of it
    assert run_dir.parent == tmp_path / "wandb" and run_dir.name.startswith("offline-run-")
    run = read_run(run_dir)
    assert run["config"]["n"] == 32 and run["config"]["scorer.mode"] == "chunked"  # flat keys (loggers.flat_config)
    logged = {k: v for row in run["history"] for k, v in row.items()}
    assert logged["train/loss"] == 1.5 and logged["trainer/global_step"] == 3
    assert logged["eval/ruler/average/1024"] == 70.0 and logged["eval/ce/0-32"] == 5.1
    assert logged["eval/ruler_plot/_type"] == "images/separated" and logged["eval/ruler_plot/format"] == "png"
    (image,) = logged["eval/ruler_plot/filenames"]
    assert (run_dir / "files" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((run_dir / "files" / logged["eval/ruler/path"]).read_text())
    assert table["columns"] == ["index", "1024", "2048"]
    assert [row[0] for row in table["data"]] == ["niah_single_1", "vt", "average"] and table["data"][0][1:] == [100, 80]
    table = json.loads((run_dir / "files" / logged["eval/position_ce/path"]).read_text())
    assert table == {"columns": ["positions", "ce"], "data": [["0-32", 5.1], ["32-64", 5.0]]}


def run_python(code: str, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter: W&B reads its environment once per process."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**base, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture
def silent_server():
    """A W&B host that accepts connections and never answers (a black hole, the slowest failure)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


# the silent host costs W&B's analytics thread ~20 s at process exit: run on request (pytest -m slow)
@pytest.mark.parametrize("host", ["refused", pytest.param("silent", marks=pytest.mark.slow)])
def test_online_start_without_network_falls_back_to_offline_within_seconds(tmp_path, host, request):
    url = "http://127.0.0.1:9" if host == "refused" else request.getfixturevalue("silent_server")
    save_dir = tmp_path / "run"
    proc = run_python(f"""
        import json, time
        from lctw.runs import loggers

        start = time.monotonic()
        logger = loggers.wandb({str(save_dir)!r}, "no-network", None, {{"n": 32}})
        seconds = time.monotonic() - start
        logger.log_metrics({{"train/loss": 2.5}}, step=1)
        print(json.dumps({{"seconds": seconds, "mode": logger.experiment.settings.mode,
                          "dir": logger.experiment.dir, "failures": logger.failures}}))
        loggers.finish()
    """, env={"WANDB_BASE_URL": url, "WANDB_API_KEY": "0123456789abcdef" * 2 + "01234567",
              "HOME": str(tmp_path), "WANDB_SILENT": "true"})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"W&B fallback to offline ({host}): {result['seconds']:.1f} s")
    assert result["seconds"] < 15 and result["mode"] == "offline" and result["failures"] == 0
    assert "W&B online start failed after" in proc.stderr and "wandb sync" in proc.stderr
    run_dir = Path(result["dir"]).parent
    assert run_dir.parent == save_dir / "wandb" and run_dir.name.startswith("offline-run-")
    run = read_run(run_dir)
    assert run["config"]["n"] == 32 and any(row.get("train/loss") == 2.5 for row in run["history"])


@pytest.mark.process
def test_a_dead_wandb_service_does_not_stop_training(tmp_path):
    """W&B's service process is killed during fit: training finishes, finish() does not raise, and the
    next job of the process (a multirun's) logs to W&B again."""
    proc = run_python(f"""
        import lightning as L
        import psutil
        import torch
        from lctw.runs import loggers

        class Tiny(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.layer = torch.nn.Linear(4, 1)

            def training_step(self, batch, batch_idx):
                if batch_idx == 2:  # W&B's service dies mid-run
                    for child in psutil.Process().children(recursive=True):
                        if "wandb-core" in child.name():
                            child.kill()
                            child.wait(10)
                loss = self.layer(batch[0]).pow(2).mean()
                self.log("train/loss", loss)
                return loss

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(24, 4)), batch_size=4)
        logger = loggers.wandb({str(tmp_path / "first")!r}, "first", None, {{"job": 1}}, mode="offline")
        trainer = L.Trainer(max_steps=6, logger=logger, log_every_n_steps=1, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        try:
            trainer.fit(Tiny(), data)
        finally:
            loggers.finish()
        print("trained", trainer.global_step, "steps; failed W&B calls:", logger.failures)
        second = loggers.wandb({str(tmp_path / "second")!r}, "second", None, {{"job": 2}}, mode="offline")
        second.log_metrics({{"x": 1.0}})
        print("second run:", second.experiment.dir, "failed W&B calls:", second.failures)
        loggers.finish()
    """, env={"HOME": str(tmp_path), "WANDB_SILENT": "true"})
    lines = proc.stdout.strip().splitlines()
    trained = next(line for line in lines if line.startswith("trained"))
    assert trained.startswith("trained 6 steps") and not trained.endswith(" 0")  # W&B failed, training did not
    assert proc.stderr.count("W&B failed in") == 1  # one warning, not one per step
    second = next(line for line in lines if line.startswith("second run:"))
    assert second.endswith("failed W&B calls: 0")
    run = read_run(Path(second.split()[2]).parent)
    assert run["config"]["job"] == 2 and any(row.get("x") == 1.0 for row in run["history"])
