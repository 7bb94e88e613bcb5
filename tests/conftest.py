"""Shared fixtures: tiny random models + SAEs built locally (never downloaded)."""

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(autouse=True)
def no_network(monkeypatch, request):
    """Any connection to a non-loopback address fails the test (tests never download)."""
    if request.node.get_closest_marker("allow_loopback_only") is None and "live_app" in request.fixturenames:
        return
    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1")):
            raise RuntimeError(f"network access attempted in a test: {address!r}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session")
def tiny_llama_preset(tmp_path_factory):
    from steering.synthetic import make_tiny_preset
    return make_tiny_preset(tmp_path_factory.mktemp("tiny_llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_gemma_preset(tmp_path_factory):
    from steering.synthetic import make_tiny_preset
    return make_tiny_preset(tmp_path_factory.mktemp("tiny_gemma"), arch="gemma2")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_llama_preset):
    from steering.bundle import Bundle
    return Bundle.load(str(tiny_llama_preset), device="cpu")


@pytest.fixture(scope="session")
def tiny_gemma_bundle(tiny_gemma_preset):
    from steering.bundle import Bundle
    return Bundle.load(str(tiny_gemma_preset), device="cpu")


@pytest.fixture(scope="session")
def live_app(tmp_path_factory):
    """`python app.py` on a tiny preset with a catalog and one demo example, on a free loopback
    port, shared by the API and browser tests: {"url", "server", "preset", "bundle", "catalog", "word"}."""
    from apprun import AppServer, prepare_tiny

    tmp = tmp_path_factory.mktemp("live_app")
    info = prepare_tiny(tmp)
    # An OpenAI-compatible URL on a closed loopback port: a key typed into the app fails fast, offline.
    server = AppServer(info["preset"], tmp / "app.log", env={"FFP_DEMO_FILE": info["demo_file"],
                                                             "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    yield {**info, "url": server.url, "server": server}
    server.stop()
