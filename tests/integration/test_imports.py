"""Import direction, checked in fresh interpreters (this pytest process has imported everything already)."""

import json
import sys

import pytest

from tests.launch import run

_PROBE = """
import importlib, json, sys
importlib.import_module({module!r})
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("megatron", "deepspeed", "mtp_pretrain"))))
"""


def _imported_with(module: str) -> list[str]:
    proc = run([sys.executable, "-c", _PROBE.format(module=module)], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "module", ["mtp_pretrain.inference.generate", "mtp_pretrain.inference.evaluate", "mtp_pretrain.targets"]
)
def test_inference_and_targets_import_no_megatron(module):
    loaded = _imported_with(module)
    assert not [m for m in loaded if m.startswith(("megatron", "deepspeed"))], loaded


def test_the_model_knows_nothing_of_the_loss():
    loaded = _imported_with("mtp_pretrain.model.mtp_model")
    assert "mtp_pretrain.loss" not in loaded and "mtp_pretrain.build" not in loaded


def test_the_config_imports_only_the_slurm_schema_and_the_errors():
    """config.py is at the bottom of the import graph: every module may import it (errors.py imports only
    the standard library)."""
    assert _imported_with("mtp_pretrain.config") == [
        "mtp_pretrain",
        "mtp_pretrain.config",
        "mtp_pretrain.errors",
        "mtp_pretrain.slurm",
    ]
