"""W&B mode: online only with an API key, offline otherwise (a run never waits on the network)."""

import pytest

from lctw.loggers import wandb_mode


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
