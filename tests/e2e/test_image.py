"""The image is the tested environment: the Dockerfile installs exactly constraints.txt, and its install step,
performed here without Docker, gives an environment that trains as the container user.

The static checks read the Dockerfile; the slow one runs the Dockerfile's own commands (its build-stage COPY
lines and `pip wheel`, then the runtime stage's `python ...` commands: `pip install --constraint`, the
constraints check, compileall) with the image's paths mapped to a temporary folder, then `trainer --help`,
`trainer-launch --help` and one training step from the fresh environment as uid 10001 with the image's ENV.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import SYSTEM_TEMP

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import check_constraints  # noqa: E402  (scripts/ is not a package)

DOCKERFILE = (REPO / "Dockerfile").read_text()
CONSTRAINTS = (REPO / "constraints.txt").read_text()
PINS = check_constraints.pins(CONSTRAINTS)
CONTAINER_UID = 10001


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


def stages(text: str) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for instruction, args in instructions(text):
        if instruction == "FROM":
            out.append([])
        if out:
            out[-1].append((instruction, args))
    return out


def base_image(text: str) -> str:
    """The runtime stage's base, with ARG defaults substituted."""
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    image = stages(text)[-1][0][1].split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: defaults[m[1]], image)


def test_the_dockerfile_installs_exactly_the_constraints() -> None:
    runtime = stages(DOCKERFILE)[-1]
    copies = [args for instruction, args in runtime if instruction == "COPY"]
    assert any("constraints.txt" in args.split() for args in copies), "the runtime stage must COPY constraints.txt"
    installs = [part for instruction, args in runtime if instruction == "RUN" for part in args.split("&&")
                if re.search(r"\bpip\b.*\binstall\b", part)]
    assert installs, "no pip install in the runtime stage"
    for command in installs:
        words = shlex.split(command)
        constraint = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--constraint", "-c")]
        assert constraint and constraint[0].endswith("constraints.txt"), f"unconstrained: {command.strip()}"
    assert any("check_constraints.py" in args for instruction, args in runtime if instruction == "RUN")
    # no version of anything pinned in the Dockerfile other than the lock's
    for name, version in re.findall(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\"']+)", DOCKERFILE):
        assert PINS.get(check_constraints.canonical(name)) == version, f"{name}=={version} in the Dockerfile"


def test_the_base_image_matches_the_tested_interpreter_and_torch() -> None:
    image = base_image(DOCKERFILE)
    name, _, tag = image.partition(":")
    if name.endswith("pytorch/pytorch"):  # a base with torch inside: it must be the torch of the lock
        assert tag.split("-")[0] == PINS["torch"], f"{image} carries torch {tag.split('-')[0]}, not {PINS['torch']}"
    else:
        assert name in ("python", "docker.io/library/python"), image
        assert re.match(r"\d+\.\d+\.\d+-", tag), f"{image}: pin the Python version"
        tested = "Python {}.{}".format(*sys.version_info[:2])
        assert tag.startswith(tested.split()[1] + "."), f"{image} is not {tested}, the interpreter of the lock"
        assert tested in CONSTRAINTS.splitlines()[0], "constraints.txt's header names another Python"


def test_check_constraints_finds_every_difference() -> None:
    pinned = {"torch": "2.14.1", "torchvision": "0.29.1", "numpy": "2.4.6"}
    ok = {"torch": "2.14.1", "torchvision": "0.29.1", "numpy": "2.4.6", "detection-trainer": "0.1.0", "pip": "23"}
    assert check_constraints.problems(pinned, ok) == []
    assert check_constraints.problems(pinned, {**ok, "torch": "2.5.1"}) == [
        "torch==2.5.1 is installed but constraints.txt pins 2.14.1"]
    assert check_constraints.problems(pinned, {**ok, "torch": "2.14.1+cpu"})  # another build of the same version
    assert "extra==1.0 is installed but not pinned" in check_constraints.problems(pinned, {**ok, "extra": "1.0"})[0]
    assert check_constraints.problems(pinned, {k: v for k, v in ok.items() if k != "torchvision"}) == [
        "torchvision is not installed"]
    with pytest.raises(ValueError, match="not an exact pin"):
        check_constraints.pins("torch>=2\n")


# ------------------------------------------------------------------------------------ the install step, for real
def run_commands(commands: list[str], mapping: dict[str, str], cwd: Path, python: Path) -> None:
    """Each command with the image's paths mapped (one pass, so a mapped path is not mapped again)."""
    paths = re.compile("|".join(re.escape(path) for path in sorted(mapping, key=len, reverse=True)))
    for command in commands:
        command = paths.sub(lambda m: mapping[m[0]], command)
        command = re.sub(r"(?<![\w/.-])python(?![\w.-])", str(python), command)
        result = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def install_like_the_dockerfile(root: Path) -> Path:
    """The Dockerfile's build and install steps into root/venv (a fresh environment); returns the venv."""
    build, runtime = stages(DOCKERFILE)[0], stages(DOCKERFILE)[-1]
    src, wheels, install, venv = (root / name for name in ("src", "wheels", "install", "venv"))
    for folder in (src, wheels, install):
        folder.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # build stage: its COPY lines into WORKDIR, then its RUN (pip wheel)
    for instruction, args in build:
        if instruction == "COPY":
            *sources, target = args.split()
            for source in sources:
                destination = src / target if target not in ("./", ".") else src / Path(source).name
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, destination, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(REPO / source, destination)
    mapping = {"/wheels": str(wheels), "/install": str(install)}
    run_commands([args for instruction, args in build if instruction == "RUN"], mapping, src, python)
    # runtime stage: the COPY of constraints.txt and the check script, then every `python ...` command of its RUN
    for instruction, args in runtime:
        if instruction == "COPY" and "--from" not in args:
            *sources, _ = args.split()
            for source in sources:
                shutil.copy(REPO / source, install)
    commands = [part.strip() for instruction, args in runtime if instruction == "RUN" for part in args.split("&&")
                if part.strip().removeprefix("{ ").startswith("python ")]  # `{ python ... || true; }` too
    run_commands(commands, mapping, root, python)
    return venv


def as_container_user(home: Path, venv: Path, scratch: Path) -> list[str]:
    """A command prefix that runs as the image's USER when this test runs as root (otherwise as the current,
    non-root user). Folders on the way to the interpreter that uid 10001 may not enter (pyenv under /root) are
    opened for that command only, in its own mount namespace, as the cluster simulation does."""
    if os.geteuid() != 0:
        return []
    from tests.e2e.cluster_sim import _closed_folders_on_the_way_to, _overlay

    shutil.chown(home, CONTAINER_UID, CONTAINER_UID)
    interpreter = Path(os.path.realpath(venv / "bin" / "python"))
    lines = []
    for number, folder in enumerate(dict.fromkeys([*_closed_folders_on_the_way_to(interpreter, CONTAINER_UID),
                                                   *_closed_folders_on_the_way_to(venv, CONTAINER_UID)])):
        lines += [*_overlay(folder, scratch / f"open{number}"), f"chmod o+x {folder}"]
    script = " && ".join([*lines, f'exec setpriv --reuid={CONTAINER_UID} --regid={CONTAINER_UID} --clear-groups "$@"'])
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


def image_env(home: Path, venv: Path) -> dict[str, str]:
    """The Dockerfile's ENV, with the image's home and /tmp mapped into the test's folder."""
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "LANG": "C.UTF-8"}
    for instruction, args in stages(DOCKERFILE)[-1]:
        if instruction == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value.replace("/home/trainer", str(home)).replace("/tmp", str(home / "tmp"))
    (home / "tmp").mkdir(exist_ok=True)
    (home / "tmp").chmod(0o1777)  # writable by the container user, as the chart's /tmp is: else tempfile uses /tmp
    return env


def train_one_step_as_the_container_user(root: Path, venv: Path) -> None:
    home = root / "home"
    home.mkdir()
    user = as_container_user(home, venv, root)
    started = time.time() - 2  # some file systems keep whole seconds
    env = image_env(home, venv)
    for command in (["trainer", "--help"], ["trainer-launch", "--help"]):
        result = subprocess.run([*user, *command], capture_output=True, text=True, env=env, cwd=home, timeout=120)
        assert result.returncode == 0 and "usage:" in result.stdout, result.stdout + result.stderr
    data = home / "shapes"
    result = subprocess.run([*user, "trainer", "synth", "--out", str(data), "--n", "10", "--size", "64"],
                            capture_output=True, text=True, env=env, cwd=home, timeout=120)
    assert result.returncode == 0, result.stderr
    overrides = [f"data.train.coco={data}/train.json", f"data.train.images={data}/images", f"run.dir={home}/runs",
                 "run.name=one-step", "data.batch_size=8", "data.workers=0", "model.min_size=64", "model.max_size=64",
                 "model.name=fasterrcnn_mobilenet_v3_large_320_fpn", "schedule.epochs=1", "schedule.warmup_iters=1",
                 "log.every_steps=1", "eval.every_epochs=0", "train.amp=false"]
    launch = ["trainer-launch", "--standalone", "--nproc-per-node=1", "-m", "trainer.train",
              *[arg for override in overrides for arg in ("--set", override)]]
    result = subprocess.run([*user, *launch], capture_output=True, text=True, timeout=300, cwd=home,
                            env={**env, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert re.search(r"epoch 1/1 step 1/1 loss \d", output), output[-4000:]
    assert (home / "runs" / "one-step" / "model_final.pt").stat().st_size > 1_000_000
    # nothing was written into the installed environment (the image's root filesystem is read-only), nor into this
    # machine's temporary folder (torchrun's and torch's scratch folders go to the image's TMPDIR)
    assert not [p for p in venv.rglob("*") if p.stat().st_uid == CONTAINER_UID]
    assert not [p for p in SYSTEM_TEMP.iterdir() if _made_by_the_container_user(p, started)]


def _made_by_the_container_user(path: Path, since: float) -> bool:
    try:
        info = path.lstat()
    except FileNotFoundError:  # another test's file, removed meanwhile
        return False
    return info.st_uid == CONTAINER_UID and info.st_mtime >= since


@pytest.mark.slow
def test_the_image_install_step_gives_an_environment_that_trains() -> None:
    # not under pytest's base temp (owner-only, and TMPDIR for the session): uid 10001 must be able to enter it
    root = Path(tempfile.mkdtemp(prefix="image-", dir=SYSTEM_TEMP))
    root.chmod(0o755)
    try:
        venv = install_like_the_dockerfile(root)
        frozen = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                                capture_output=True, text=True, check=True).stdout
        versions = {check_constraints.canonical(d["name"]): d["version"] for d in json.loads(frozen)}
        assert (versions["torch"], versions["torchvision"]) == (PINS["torch"], PINS["torchvision"]), versions
        # the extras a cluster config may switch on (log.mlflow, eval.backend) are in the image, at their pins
        for extra in ("mlflow-skinny", "faster-coco-eval"):
            assert versions.get(extra) == PINS[extra], (extra, versions.get(extra))
        train_one_step_as_the_container_user(root, venv)
    finally:
        # several GB of small files: removed in the background rather than making the test wait for the disk
        subprocess.Popen(["rm", "-rf", str(root)], start_new_session=True)
