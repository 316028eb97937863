"""bench/load.py against a real server for ~12 s with a few clients: every request ends, no 5xx, the CPU KV
is freed once idle and the server is still healthy. (RSS is not judged: a short run has no first minute.)"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_load_bench_short_run(tmp_path):
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(ROOT / "bench" / "load.py"), "--clients", "3", "--duration", "12", "--seed", "1",
           "--max-tokens", "4-12", "--long-fraction", "0.2", "--long-tokens", "300-600", "--cancel-after", "0.05-1",
           "--out", str(out), "--records", str(tmp_path / "records.jsonl")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.is_file(), p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert out.with_suffix(".png").is_file()
    assert r["requests"] > 0 and r["outcomes"].get("ok", 0) > 0, r["outcomes"]
    t = r["targets"]
    for k in ("no_unexpected_5xx", "every_request_ended", "cpu_kv_bytes_zero_when_idle", "alive_at_end"):
        assert t[k] is True, (k, r["faults"], r["server"].get("log_faults"))
    assert r["end"]["idle"] and r["end"]["health"] == 200
    assert r["rss_mb"]["samples"] and r["gauges"]["samples"]
    assert p.returncode == (0 if all(v is not False for v in t.values()) else 1)
    recs = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(recs) == r["requests"] and all(x["outcome"] for x in recs)
