"""The wheel carries the Hydra presets: an installed (non-editable) mtp-train composes a run recipe from its
own mtp_pretrain/conf, started outside the repository, exactly as the checkout composes it."""

import os
import shutil
import sys
import zipfile
from pathlib import Path

import torch
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


def test_system_torch_bootstrap_keeps_the_images_torch(tmp_path):
    """``MTP_SYSTEM_TORCH=1 make venv`` on an image whose interpreter already has (CUDA) torch: the venv
    imports that torch and pip never installs one. The "image" is a venv whose .pth file points at this
    venv's site-packages (torch there, not installed into it); pip has no index and no find-links, so any
    attempt to download or replace torch fails the bootstrap."""
    image = tmp_path / "image"
    run([sys.executable, "-m", "venv", "--without-pip", str(image)]).check_returncode()
    image_python = str(image / "bin" / "python")
    env = clean_env(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, MTP_SYSTEM_TORCH="1", PYTHON=image_python)
    for name in ("PYTHONPATH", "PIP_FIND_LINKS", "PIP_CONSTRAINT"):  # only what the bootstrap installs counts
        env.pop(name, None)
    venv = tmp_path / "venv"
    bootstrap = ["bash", "tools/bootstrap.sh"]

    refused = run(bootstrap, env={**env, "VENV": str(venv)})  # the image has no torch yet
    assert refused.returncode == 1 and "cannot import torch" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1 and not venv.exists()

    image_site = Path(
        run([image_python, "-c", "import site; print(site.getsitepackages()[0])"]).stdout.strip()
    )
    (image_site / "image_torch.pth").write_text(str(Path(torch.__file__).parents[1]) + "\n")
    done = run(bootstrap, env={**env, "VENV": str(venv)}, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    probe = "import sys, torch, mtp_pretrain; print(torch.__version__, torch.__file__, mtp_pretrain.__file__)"
    version, torch_file, package_file = run(
        [str(venv / "bin" / "python"), "-c", probe], env=env
    ).stdout.split()
    assert (version, torch_file) == (torch.__version__, torch.__file__)  # the image's torch, untouched
    assert package_file == str(ROOT / "mtp_pretrain" / "__init__.py")  # the editable install of the checkout
    assert not list(venv.glob("lib/python*/site-packages/torch*"))  # pip installed no torch of its own
