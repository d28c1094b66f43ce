"""The wheel carries the Hydra presets: an installed (non-editable) mtp-train composes a run recipe from its
own mtp_pretrain/conf, started outside the repository, exactly as the checkout composes it."""

import shutil
import sys
import zipfile
from pathlib import Path

from omegaconf import OmegaConf

from tests.conftest import compose_config
from tests.launch import ROOT, clean_env, run

PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


def _build_wheel(tmp: Path) -> Path:
    """``pip wheel`` of a copy of the project: a build writes build/ and *.egg-info beside its sources."""
    src = tmp / "src"
    package = ROOT / "mtp_pretrain"  # its conf link included, as a link (the build follows it)
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(package, src / "mtp_pretrain", symlinks=True, ignore=skip)
    shutil.copytree(ROOT / "conf", src / "conf")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # no build isolation and no index: the build uses this venv's setuptools, and nothing is downloaded
    out = run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"), str(src)]
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return next((tmp / "dist").glob("*.whl"))


def test_installed_wheel_composes_the_cpu_demo_from_its_own_conf(tmp_path):
    wheel = _build_wheel(tmp_path)
    presets = {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    names = zipfile.ZipFile(wheel).namelist()
    packaged = {n.removeprefix("mtp_pretrain/conf/") for n in names if n.endswith(".yaml")}
    assert packaged == presets

    site = tmp_path / "site"  # --target and --no-deps: torch & co. come from this venv, pip resolves nothing
    out = run([*PIP, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)])
    assert out.returncode == 0, out.stdout + out.stderr
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = clean_env(PYTHONPATH=str(site))  # the installed package ahead of the checkout's editable one

    def installed(*cmd: str):  # run from outside the repository (launch.run starts in the repo root)
        return run(["env", "-C", str(outside), *cmd], env=env)

    where = installed(sys.executable, "-c", "import mtp_pretrain.cli as c; print(c.__file__, c.CONF_DIR)")
    package = site / "mtp_pretrain"
    assert where.stdout.split() == [str(package / "cli.py"), str(package / "conf")]
    shown = installed(str(site / "bin" / "mtp-train"), "--cfg", "job", "+experiment=cpu_demo")
    assert shown.returncode == 0, shown.stderr
    composed = OmegaConf.to_container(OmegaConf.create(shown.stdout), resolve=True)
    assert composed == OmegaConf.to_container(OmegaConf.structured(compose_config("+experiment=cpu_demo")))
