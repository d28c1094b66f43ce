"""The Python half of the GPU check (tools/gpu_check.sh) and of `make gpu-wheels` (tools/gpu_wheels.sh).

    python tools/gpu_check.py wheels [--dir .whl] [--json out.json]
        tools/gpu_wheels.txt against pyproject.toml, without downloading: every wheel file name is a wheel of
        its requirement that CPython 3.12 on manylinux x86_64 installs, every declared dependency is carried,
        held by the image or optional, no torch / CUDA package is carried, the declared total fits the
        budget. With --dir: the folder holds exactly the listed files (one version of each, nothing else),
        their real sizes fit, and every wheel's own needs are carried or in the image.
    python tools/gpu_check.py report --work DIR [--json out.json]
        the one summary table of a check's parts (DIR/parts.tsv, wheels.json, tests.log, bench.json).

Standard library + `packaging` only (both the venv and the GPU image have it), no torch import: it runs
before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "tools" / "gpu_wheels.txt"
BUDGET_MIB = 60  # what travels with the working tree is 64 MiB in all: the wheels leave room for the code
HOWS = ("download", "sdist", "sdist-torch", "project")
# Never carried: the image's own CUDA build of torch and its CUDA libraries must stay what is imported.
FORBIDDEN = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*|cupy.*|jax.*)$")
# The GPU image: CPython 3.12 on x86_64 Linux with glibc >= 2.17 (its manylinux tags up to 2_39).
PLATFORMS = ["manylinux2014_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in range(17, 40)] + ["linux_x86_64"]
TARGET_TAGS = {*cpython_tags((3, 12), platforms=PLATFORMS), *compatible_tags((3, 12), platforms=PLATFORMS)}
TARGET_ENV = {
    **default_environment(),
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


def read_list(path: Path = LIST) -> tuple[list[dict[str, Any]], set[str], set[str]]:
    """(wheels: requirement, name, version, how, file, kib), image-held names, optional names."""
    wheels, image, optional = [], set(), set()
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, rest = line.partition(":")
        if key in ("image", "optional") and rest:
            (image if key == "image" else optional).update(canonicalize_name(n) for n in rest.split())
            continue
        fields = line.split()
        if len(fields) != 4 or "==" not in fields[0] or fields[1] not in HOWS or not fields[3].isdigit():
            raise SystemExit(f"{path.name}:{lineno}: expected 'name==version how file KiB', got {line!r}")
        name, version = fields[0].split("==")
        wheels.append(
            dict(
                requirement=fields[0],
                name=canonicalize_name(name),
                version=version,
                how=fields[1],
                file=fields[2],
                kib=int(fields[3]),
            )
        )
    return wheels, image, optional


def list_problems(wheels: list[dict[str, Any]], image: set[str], optional: set[str]) -> list[str]:
    """What is wrong with the list itself and against pyproject.toml (empty: nothing)."""
    problems = []
    names = [w["name"] for w in wheels]
    problems += [f"{n} is listed twice" for n in sorted({n for n in names if names.count(n) > 1})]
    for w in wheels:
        try:
            name, version, _, tags = parse_wheel_filename(w["file"])
        except Exception as e:  # packaging's InvalidWheelFilename
            problems.append(f"{w['file']}: not a wheel file name ({e})")
            continue
        if name != w["name"] or str(version) != w["version"]:
            problems.append(f"{w['file']} is not {w['requirement']}")
        if not set(tags) & TARGET_TAGS:
            problems.append(
                f"{w['file']}: no tag CPython 3.12 on manylinux x86_64 installs ({sorted(map(str, tags))})"
            )
    for n in sorted({*names, *image, *optional}):
        if FORBIDDEN.match(n) and n in names:
            problems.append(f"{n} must never be carried: the image's torch / CUDA build stays")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ours = [w for w in wheels if w["how"] == "project"]
    if [(w["name"], w["version"]) for w in ours] != [
        (canonicalize_name(project["name"]), project["version"])
    ]:
        problems.append(
            f"the project's own wheel must be listed once as {project['name']}=={project['version']}"
        )
    if "3.12" not in _specifier(project.get("requires-python", "")):
        problems.append(
            f"pyproject requires-python {project.get('requires-python')!r} excludes the image's 3.12"
        )
    listed = {w["name"]: w["version"] for w in wheels}
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if req.marker and not req.marker.evaluate(TARGET_ENV):
            continue
        if name in listed:
            if listed[name] not in req.specifier:
                problems.append(f"{name}=={listed[name]} is listed but pyproject declares {spec!r}")
        elif name not in image | optional:
            problems.append(f"declared dependency {spec!r} is neither listed, nor image:, nor optional:")
    return problems


def _specifier(spec: str) -> Any:
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(spec)


def folder_problems(
    wheels: list[dict[str, Any]], image: set[str], optional: set[str], folder: Path
) -> tuple[list[str], dict[str, int]]:
    """What is wrong with a made .whl/ folder, and the real size of each file (bytes)."""
    problems, sizes = [], {}
    present = {p.name for p in folder.glob("*.whl")}
    wanted = {w["file"] for w in wheels}
    problems += [f"{f} is missing from {folder}" for f in sorted(wanted - present)]
    problems += [
        f"{f} in {folder} is not in {LIST.name} (remove it: one version of each)"
        for f in sorted(present - wanted)
    ]
    carried = {w["name"] for w in wheels}
    for w in wheels:
        path = folder / w["file"]
        if not path.exists():
            continue
        sizes[w["file"]] = path.stat().st_size
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            needs = [
                line.split(":", 1)[1].strip()
                for line in z.read(meta).decode().splitlines()
                if line.startswith("Requires-Dist:")
            ]
        for spec in needs:
            req = Requirement(spec)
            if req.marker and not req.marker.evaluate(TARGET_ENV):
                continue  # an extra, or another Python / platform
            name = canonicalize_name(req.name)
            if name not in carried | image | optional:
                problems.append(
                    f"{w['requirement']} needs {spec!r}: carry it (list it) or name it under image:"
                )
    return problems, sizes


def wheels_main(args: argparse.Namespace) -> int:
    wheels, image, optional = read_list()
    problems = list_problems(wheels, image, optional)
    sizes: dict[str, int] = {}
    if args.dir is not None:
        more, sizes = folder_problems(wheels, image, optional, args.dir)
        problems += more
    declared = sum(w["kib"] for w in wheels) / 1024
    actual = sum(sizes.values()) / 2**20 if sizes else None
    print(f"{'requirement':<32} {'how':<12} {'KiB declared':>12} {'KiB made':>9}")
    for w in wheels:
        made = f"{sizes[w['file']] / 1024:.0f}" if w["file"] in sizes else "-"
        print(f"{w['requirement']:<32} {w['how']:<12} {w['kib']:>12} {made:>9}")
    total = f"total {len(wheels)} wheels: {declared:.2f} MiB declared"
    print(total + (f", {actual:.2f} MiB made" if actual is not None else "") + f" (budget {BUDGET_MIB} MiB)")
    for size, what in ((declared, "declared"), (actual, "made")):
        if size is not None and size > BUDGET_MIB:
            problems.append(f"the {what} wheels take {size:.2f} MiB, above the {BUDGET_MIB} MiB budget")
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    if args.json:
        result = dict(
            wheels=wheels, made_bytes=sizes, declared_mib=declared, made_mib=actual, problems=problems
        )
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if problems else 0


def _status(rc: int, seconds: float, limit: float) -> str:
    if rc == 0:
        return "ok"
    if rc in (124, 137) and seconds >= limit - 1:
        return f"TIMEOUT {limit:.0f}s"
    return "SKIPPED" if rc == 200 else f"FAILED rc={rc}"


def _tests_summary(log: Path) -> dict[str, int]:
    """pytest's closing counts ("3 passed, 1 skipped in 9.1s", or "12 tests collected in 1.0s")."""
    text = log.read_text() if log.exists() else ""
    counts = {
        k.replace("tests ", ""): int(n)
        for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|tests? collected|deselected)", text)
    }
    return {("collected" if "collected" in k else k): v for k, v in counts.items()}


def _bench_rows(bench: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for r in bench.get("rows", []) + bench.get("attention_rows", []):
        run = f"n={r['n']}" + (f" attention={r['attention']}" if r.get("attention", "auto") != "auto" else "")
        mem = f"{r['peak_gib']:.2f} GiB" if r.get("peak_gib") is not None else "peak n/a"
        rows.append(
            (
                f"  {run} T={r.get('seq', '?')}",
                f"{r['step_s']:.4f} s/step, {r['tokens_per_s']:,.0f} tokens/s, {100 * r['mfu']:.1f}% MFU, {mem}",
            )
        )
    if "time_ratio" in bench:
        mem = bench.get("memory_ratio")
        sdpa = bench.get("sdpa_over_local")
        rows.append(
            (
                "  n4/n1",
                f"time {bench['time_ratio']:.3f}, FLOPs {bench['flop_ratio']:.3f}, time/FLOP {bench['time_over_flops']:.3f}, memory "
                + (f"{mem:.3f}" if mem is not None else "n/a"),
            )
        )
        rows.append(
            (
                "  sdpa/local",
                f"step time {sdpa:.3f}"
                if sdpa is not None
                else f"not measured: {bench.get('attention_note')}",
            )
        )
    return rows


def report_main(args: argparse.Namespace) -> int:
    work: Path = args.work
    parts = {}
    for line in (work / "parts.tsv").read_text().splitlines():
        name, rc, seconds, limit, what = line.split("\t")
        parts[name] = dict(rc=int(rc), seconds=float(seconds), limit=float(limit), what=what)
    wheels = json.loads((work / "wheels.json").read_text()) if (work / "wheels.json").exists() else {}
    bench = json.loads((work / "bench.json").read_text()) if (work / "bench.json").exists() else {}
    tests = _tests_summary(work / "tests.log")
    detail = {
        "wheels": f"{len(wheels.get('wheels', []))} wheels, {wheels.get('declared_mib', 0):.2f} MiB declared"
        + (f", {wheels['made_mib']:.2f} MiB made" if wheels.get("made_mib") else "")
        + f" (budget {BUDGET_MIB} MiB)",
        "tests": ", ".join(f"{v} {k}" for k, v in tests.items()) or "no pytest summary",
        "bench": ("DRY RUN (tiny model, CPU): " if bench.get("dry_run") else "")
        + bench.get("device", "no result"),
    }
    lines = [f"{'part':<28} {'status':<14} {'seconds':>8}  result"]
    for name, p in parts.items():
        status = _status(p["rc"], p["seconds"], p["limit"])
        lines.append(
            f"{name:<28} {status:<14} {p['seconds']:>8.1f}  {detail.get(name.split()[0], p['what'])}"
        )
        if name.startswith("bench"):
            lines += [f"{label:<28} {'':<14} {'':>8}  {text}" for label, text in _bench_rows(bench)]
    ok = all(p["rc"] in (0, 200) for p in parts.values()) and "failed" not in tests and "errors" not in tests
    if args.expect_gpu and (bench.get("dry_run", True) or not tests.get("passed")):
        lines.append("no CUDA device was used: the tests all skipped or the bench ran its dry mode")
        ok = False
    total = sum(p["seconds"] for p in parts.values())
    lines.append(f"{'GPU check':<28} {'PASS' if ok else 'FAIL':<14} {total:>8.1f}")
    print("\n".join(lines))
    if args.json:
        result = dict(ok=ok, seconds=total, parts=parts, tests=tests, wheels=wheels, bench=bench)
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wheels", help="check tools/gpu_wheels.txt (and a made .whl/ folder)")
    w.add_argument("--dir", type=Path, default=None, help="a made wheel folder to check too (.whl)")
    w.add_argument("--json", type=Path, default=None)
    r = sub.add_parser("report", help="the summary table of a check's parts")
    r.add_argument("--work", type=Path, required=True, help="the check's work folder (parts.tsv, ...)")
    r.add_argument("--json", type=Path, default=None)
    r.add_argument(
        "--expect-gpu", action="store_true", help="fail unless the tests and the bench ran on CUDA"
    )
    args = p.parse_args(argv)
    return wheels_main(args) if args.command == "wheels" else report_main(args)


if __name__ == "__main__":
    sys.exit(main())
