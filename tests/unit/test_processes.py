"""Child processes start a torch.distributed world of their own."""

from mtp_pretrain import processes


def test_child_env_drops_the_launcher_variables_and_adds_extra(monkeypatch):
    for var in processes.DIST_VARS:
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("KEEP_ME", "yes")
    env = processes.child_env(EXTRA="x")
    assert not set(processes.DIST_VARS) & set(env)
    assert env["KEEP_ME"] == "yes" and env["EXTRA"] == "x"
