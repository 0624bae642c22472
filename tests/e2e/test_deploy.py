"""deploy/: the Colab notebook runs headless, the systemd unit verifies, and the sidecar image's
entrypoint runs torch-free against a real S3-compatible server.

No Docker engine here: the sidecar test builds a venv exactly as deploy/container/Dockerfile
builds the image (copy pyproject.toml, README.md, LICENSE and ckptsync/; ``pip install -c
constraints.txt "ckptsync[s3] @ file:///src"`` into a fresh venv without system site packages)
and runs the image's entrypoint script with that venv first on PATH.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ckptsync.daemon import STOP_GRACE_S
from ckptsync.local import LocalStore
from ckptsync.manifest import Manifest, make_name
from ckptsync.remote import RemoteStore
from tests.support.drive_double import DriveDouble
from tests.support.paths import REPO, package_source
from tests.support.remotes import Remote, clear_fsspec_caches

pytestmark = pytest.mark.core

DEPLOY = REPO / "deploy"
NOTEBOOK = DEPLOY / "colab" / "ckptsync_colab.ipynb"
LAST_CELL = "from ckptsync.remote import RemoteStore"
UNIT = DEPLOY / "systemd" / "ckptsync-watch.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "ckptsync-watch.env.example"
CONTAINER = DEPLOY / "container"
ENTRYPOINT = CONTAINER / "entrypoint.sh"


def _wait(cond: Any, what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- Colab notebook
def _execute_notebook(tmp_path: Path) -> dict[str, str]:
    """Run every code cell in a fresh kernel (this venv's python); return outputs by cell."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name="ckptsync-test", timeout=300,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    return {c.source.splitlines()[0]: "".join(o.get("text", "") for o in c.get("outputs", []))
            for c in nb.cells if c.cell_type == "code" and c.source}


@pytest.mark.allow_thread_leak  # nbclient's kernel manager keeps a zmq I/O thread per process
@pytest.mark.full
def test_colab_notebook_runs_headless_and_a_new_runtime_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drive_server: DriveDouble) -> None:
    """The notebook's default remote, Google Drive through the API with the user's own login
    (the Drive double: an authorized-user login as Colab's ``authenticate_user`` installs it,
    refreshed at Google's token endpoint): a runtime dies at step 130, a new one resumes, and
    each run's last cell waits until the remote holds the newest checkpoint."""
    kernels = tmp_path / "jupyter" / "kernels" / "ckptsync-test"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ckptsync test venv", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    login = tmp_path / "adc.json"  # where the kernel and its watcher find the user's login
    login.write_text(json.dumps(drive_server.user_credentials()))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(login))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    run = f"nb-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("CKPTSYNC_NB_REMOTE_KIND", "gdrive")
    monkeypatch.setenv("CKPTSYNC_NB_RUN", run)
    monkeypatch.setenv("CKPTSYNC_NB_STOP_AT", "130")  # the runtime "dies" at step 130
    remote = f"gdrive://ckptsync/{run}"
    grants = len(drive_server.grants)

    first = _execute_notebook(tmp_path)
    text = "\n".join(first.values())
    assert f"-> {remote}" in text and "fresh start at step 1" in text
    assert "simulated runtime death at step 130" in text
    clear_fsspec_caches()
    store = RemoteStore(remote)  # My Drive/ckptsync/<run>, through the same login
    newest = store.list()[-1]
    assert newest.step == 125  # SAVE_EVERY 25: the last cell waited for it
    last = first[LAST_CELL]
    assert f"is committed to {remote} (newest {newest.name})" in last, last
    assert f"{newest.name}" in last.splitlines()[-1]  # the remote's listing, newest last

    # A new runtime: nothing local survives; Run all again, to the end.
    shutil.rmtree(tmp_path / "checkpoints")
    monkeypatch.delenv("CKPTSYNC_NB_STOP_AT")
    second = _execute_notebook(tmp_path)
    text = "\n".join(second.values())
    assert "resumed from step 125" in text and "stopped at step 300" in text
    clear_fsspec_caches()
    steps = [m.step for m in store.list()]
    assert steps[-1] == 300 and 125 in steps  # keep_last=3, plus the checkpoint resumed from
    assert f"(newest {store.list()[-1].name})" in second[LAST_CELL]
    for m in store.list():
        store.verify(m.name)
    assert set(drive_server.grants[grants:]) == {"refresh_token"}  # the user's login only


def test_colab_only_cells_are_guarded() -> None:
    nb = json.loads(NOTEBOOK.read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert 'IN_COLAB = "google.colab" in sys.modules' in code[0]
    for src in code:
        for colab_only in ("drive.mount", "userdata.get", "auth.authenticate_user", "pip"):
            for line in src.splitlines():
                if colab_only in line:
                    block = src[: src.index(line)]
                    assert "if IN_COLAB:" in block.splitlines()[-1] or "if IN_COLAB:" in \
                        "\n".join(block.splitlines()[-3:]), f"unguarded Colab-only line: {line}"


# --------------------------------------------------------------------------- systemd
def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=True)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(UNIT.read_text())
    return cp


def test_systemd_unit_has_restart_env_file_and_graceful_stop() -> None:
    svc = _unit()["Service"]
    assert svc["Restart"] == "on-failure"
    # Restarted after any crash or remote error; only a start-up configuration error (exit 2)
    # would fail the same way again.
    assert svc["RestartPreventExitStatus"].split() == ["2"]
    assert svc["EnvironmentFile"] == "/etc/ckptsync/watch.env"
    assert svc["KillSignal"] == "SIGTERM"
    assert svc["ExecStart"].split()[:2] == ["/opt/ckptsync/bin/ckptsync", "watch"]
    # The daemon serves its health endpoint, and the start is checked with it.
    start = svc["ExecStart"].split()
    port = start[start.index("--metrics-port") + 1]
    post = svc["ExecStartPost"].split()
    assert post[:4] == ["/opt/ckptsync/bin/python", "-m", "ckptsync.daemon.exporter",
                        "--check"] and post[4] == f"127.0.0.1:{port}"
    env = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
               if line and not line.startswith("#"))
    # The daemon's own stop timeout fits inside systemd's, or systemd SIGKILLs it mid-upload:
    # a SIGTERM takes at most the stop timeout plus STOP_GRACE_S.
    assert float(env["CKPTSYNC_STOP_TIMEOUT"]) + STOP_GRACE_S < float(svc["TimeoutStopSec"])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (the parse check above still runs)")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    # The unit points at /opt/ckptsync (where its comment installs it); verify a copy that
    # points at this venv's console script, which systemd-analyze checks is executable.
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/ckptsync/bin/ckptsync",
                                             str(Path(sys.executable).with_name("ckptsync")))
                    .replace("/opt/ckptsync/bin/python", sys.executable))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr  # unknown keys only warn


def test_systemd_env_example_configures_the_daemon(tmp_path: Path) -> None:
    """The env file's variables are the ones the daemon reads (a typo would be ignored)."""
    from ckptsync.daemon import WatchConfig

    env = dict(line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
               if line and not line.startswith("#"))
    env["CKPTSYNC_LOCAL_DIR"] = str(tmp_path)
    cfg = WatchConfig.resolve({"local_dir": env["CKPTSYNC_LOCAL_DIR"]}, env=env)
    assert cfg.remote == "s3://my-bucket/run-17"
    assert cfg.keep_last == 5
    assert cfg.stop_timeout == 60


# --------------------------------------------------------------------------- container
def test_pod_shares_a_volume_and_stops_the_sidecar_gracefully() -> None:
    pod = yaml.safe_load((CONTAINER / "pod.yaml").read_text())
    spec = pod["spec"]
    (vol,) = spec["volumes"]
    assert "emptyDir" in vol
    inits = {c["name"]: c for c in spec["initContainers"]}
    trainer = spec["containers"][0]
    sidecar = inits["ckptsync"]
    assert sidecar["restartPolicy"] == "Always"  # native sidecar: stopped after the trainer
    assert inits["restore"]["args"] == ["pull"] and sidecar["args"][0] == "watch"
    # The kubelet probes the daemon's health endpoint, on the port it serves.
    args = sidecar["args"]
    port = int(args[args.index("--metrics-port") + 1])
    assert args[args.index("--metrics-addr") + 1] == "0.0.0.0"  # reachable by the kubelet
    (named,) = [p for p in sidecar["ports"] if p["containerPort"] == port]
    probe = sidecar["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and probe["port"] in (port, named["name"])
    # The run's first pod starts fresh on an empty prefix, as declared.
    assert {e["name"]: e["value"] for e in sidecar["env"]}["CKPTSYNC_ALLOW_EMPTY"] == "1"
    mounts = {c["name"]: c["volumeMounts"][0] for c in [trainer, *inits.values()]}
    assert {m["name"] for m in mounts.values()} == {vol["name"]}
    ckpt_dir = {e["name"]: e["value"] for e in sidecar["env"]}["CKPTSYNC_LOCAL_DIR"]
    assert all(m["mountPath"] == ckpt_dir for m in mounts.values())
    assert ckpt_dir in trainer["args"]
    stop = float({e["name"]: e["value"] for e in sidecar["env"]}["CKPTSYNC_STOP_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] > stop + STOP_GRACE_S


def test_dockerfile_copies_what_exists_and_pins_like_dev_requirements() -> None:
    text = (CONTAINER / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies missing {src}"
    assert '"ckptsync[s3,gcs] @ file:///src"' in text
    assert "torch" not in text.split("RUN", 1)[1].split("&&")[1]
    dev = {ln.split("==")[0]: ln for ln in (REPO / "requirements" / "dev.txt").read_text()
           .splitlines() if "==" in ln and not ln.startswith("#")}
    pins = [ln for ln in (CONTAINER / "constraints.txt").read_text().splitlines()
            if ln and not ln.startswith("#")]
    assert pins and all(dev[p.split("==")[0]] == p for p in pins)


def test_sidecar_pull_passes_no_storage_option_as_an_argument(s3_remote: Remote,
                                                              tmp_path: Path) -> None:
    """`ps` shows every process's arguments to every user of the node: the entrypoint leaves
    CKPTSYNC_STORAGE_OPTIONS (credentials) in the environment, where ckptsync reads it.

    ``sh -x`` prints each command the entrypoint runs, with its arguments expanded.
    """
    local = LocalStore(tmp_path / "src")
    st = local.staging(make_name(3))
    st.write_file("w.bin", b"weights")
    ckpt = st.commit(Manifest.new(step=3, files=st.entries, name=st.name))
    RemoteStore(s3_remote.url, s3_remote.storage_options).push(ckpt)
    fresh = tmp_path / "fresh"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "CKPTSYNC_LOCAL_DIR": str(fresh),
           "CKPTSYNC_REMOTE": s3_remote.url,
           "CKPTSYNC_STORAGE_OPTIONS": json.dumps(s3_remote.storage_options)}
    r = subprocess.run(["sh", "-x", str(ENTRYPOINT), "pull"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "+ ckptsync pull" in r.stderr  # the trace shows the commands it ran
    for secret in (s3_remote.storage_options["secret"], s3_remote.storage_options["key"]):
        assert secret not in r.stderr and secret not in r.stdout
    assert [c.name for c in LocalStore(fresh).list()] == [ckpt.name]


def test_sidecar_pull_of_an_empty_remote_is_a_fresh_start_and_a_failed_listing_is_not(
        tmp_path: Path) -> None:
    """The entrypoint's pull: nothing to pull (exit 5) is a fresh start (exit 0) where the run
    exists or CKPTSYNC_ALLOW_EMPTY=1 declares a new one (the pod sets it); a prefix that holds
    nothing at all without it, or a pull that fails, stops the pod's init with its exit code,
    never a silent fresh start that would train from step 0 over a run it could not see."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "CKPTSYNC_LOCAL_DIR": str(tmp_path / "fresh"),
           "CKPTSYNC_REMOTE": f"file://{tmp_path}/empty/run"}
    env.pop("CKPTSYNC_ALLOW_EMPTY", None)
    r = subprocess.run(["sh", str(ENTRYPOINT), "pull"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1 and "holds nothing at all" in r.stderr, (r.stdout, r.stderr)
    assert "a fresh start" not in r.stdout
    r = subprocess.run(["sh", str(ENTRYPOINT), "pull"], capture_output=True, text=True,
                       env={**env, "CKPTSYNC_ALLOW_EMPTY": "1"}, timeout=120)
    assert r.returncode == 0 and "a fresh start" in r.stdout, r.stderr
    r = subprocess.run(["sh", str(ENTRYPOINT), "pull"], capture_output=True, text=True,
                       env={**env, "CKPTSYNC_REMOTE": "nosuchscheme://bucket/run"}, timeout=120)
    assert r.returncode == 2 and "a fresh start" not in r.stdout, (r.stdout, r.stderr)
    assert "nosuchscheme" in r.stderr


@pytest.fixture(scope="module")
def torch_free_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv built the way the Dockerfile builds the image (``[s3]`` only, to stay fast)."""
    root = tmp_path_factory.mktemp("image")
    src = package_source(root)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # The package index is reached directly: the Drive double, once an earlier test started
    # it, has pointed HTTPS_PROXY at itself for this whole process.
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")}
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                        "--disable-pip-version-check", "-c", str(CONTAINER / "constraints.txt"),
                        f"ckptsync[s3] @ {src.as_uri()}"], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return venv


def _sidecar_env(venv: Path, local: Path, remote: Remote, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=f"{venv / 'bin'}:/usr/bin:/bin", CKPTSYNC_LOCAL_DIR=str(local),
               CKPTSYNC_REMOTE=url, CKPTSYNC_INTERVAL="1",
               CKPTSYNC_STORAGE_OPTIONS=json.dumps(remote.storage_options))
    return env


@pytest.fixture
def sidecar_procs() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.full
def test_sidecar_entrypoint_is_torch_free_and_syncs_another_process_checkpoint(
        torch_free_venv: Path, s3_remote: Remote, tmp_path: Path,
        sidecar_procs: list[subprocess.Popen[str]]) -> None:
    py = torch_free_venv / "bin" / "python"
    r = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    local = tmp_path / "ckpt"  # the shared emptyDir
    env = _sidecar_env(torch_free_venv, local, s3_remote, s3_remote.url)
    log = open(tmp_path / "sidecar.log", "w")  # noqa: SIM115
    daemon = subprocess.Popen(["sh", str(ENTRYPOINT), "watch"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, text=True)
    sidecar_procs.append(daemon)
    _wait(lambda: (local / ".ckptsync-watch").exists(), "the daemon to start")

    # The trainer: another process, another venv (this one, with torch).
    trainer = (
        "import torch, sys\n"
        "from ckptsync import Checkpointer\n"
        "torch.manual_seed(0)\n"
        "m = torch.nn.Linear(4, 2)\n"
        "with Checkpointer(sys.argv[1]) as ck:\n"
        "    ck.save(7, model=m, metrics={'loss': 0.5})\n"
        "torch.save(m.state_dict(), sys.argv[2])\n"
    )
    subprocess.run([sys.executable, "-c", trainer, str(local), str(tmp_path / "ref.pt")],
                   check=True, timeout=120)
    store = RemoteStore(s3_remote.url, s3_remote.storage_options)
    (m,) = _wait(store.list, "the sidecar to commit the checkpoint")
    assert m.step == 7 and m.name == LocalStore(local).list()[0].name
    store.verify(m.name)

    daemon.send_signal(signal.SIGTERM)  # what the kubelet sends
    assert daemon.wait(timeout=60) == 0
    log.close()
    assert "event=exit code=0" in (tmp_path / "sidecar.log").read_text()

    # A new pod: the `restore` init container pulls it into an empty volume...
    fresh = tmp_path / "fresh"
    r = subprocess.run(["sh", str(ENTRYPOINT), "pull"], capture_output=True, text=True,
                       env=_sidecar_env(torch_free_venv, fresh, s3_remote, s3_remote.url),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    (pulled,) = LocalStore(fresh).list()
    assert pulled.name == m.name
    import torch

    restored = torch.load(pulled.file("model.pt"), weights_only=True)
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    assert list(restored) == list(ref)
    assert all(torch.equal(restored[k], v) for k, v in ref.items())

    # ...and on a run's very first pod, an empty remote is a fresh start, not a failure.
    r = subprocess.run(["sh", str(ENTRYPOINT), "pull"], capture_output=True, text=True,
                       env={**_sidecar_env(torch_free_venv, tmp_path / "first", s3_remote,
                                           s3_remote.url + "-new"),
                            "CKPTSYNC_ALLOW_EMPTY": "1"}, timeout=120)  # as the pod says
    assert r.returncode == 0 and "a fresh start" in r.stdout, r.stderr
