"""A short schemathesis run (about a thousand positive and negative cases over every operation of the
OpenAPI schema) against a live server: no response is a server error, and the server still serves."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_fuzzing_the_live_server_finds_no_server_error(tmp_path):
    out = tmp_path / "fuzz.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "fuzz.py"), "--max-examples", "5", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    r = json.loads(out.read_text())
    assert r["cases"] >= 300 and set(r["phases"]) >= {"coverage", "fuzzing"}, r["phases"]
    assert r["statuses"].get("200", 0) > 0  # some cases reached generation, not only validation
    assert not [c for c in r["statuses"] if c.isdigit() and int(c) >= 500], r["statuses"]
    assert not [c for c in r["server_logged_statuses"] if int(c) >= 500], r["server_logged_statuses"]
    assert r["failed_checks"] == [] and r["server_tracebacks"] == 0
    assert r["targets"] == {"no_5xx": True, "alive_and_serving": True} and p.returncode == 0, p.stderr[-3000:]
