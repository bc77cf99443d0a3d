"""The local vLLM judge (hhdpo.evaluation.serve).

The slow test takes the session's real server on SmolLM2-135M (conftest's ``vllm_judge``,
CPU, ~30 s to start on an idle machine, ~4.6 GB RAM; tests/evaluation/test_eval_e2e.py judges with the
same one, and runs just before), judges 4 real HH pairs through `hhdpo judge` over the
Responses API with the strict template's JSON schema, checks that every verdict parses,
then stops the server and checks that its whole process group is gone. The fast tests
cover start-up failures with stand-in commands.
"""

import json
import socket
import sys
import time

import pytest

from hhdpo.evaluation import judge, serve
from hhdpo.evaluation.pairwise import make_pairwise
from tests.fake_responses_server import hh_generation_records


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "tiny_model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def test_server_env_and_command(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET123")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    env = serve.server_env(cpu=True, kvcache_gb=3)
    assert "OPENAI_API_KEY" not in env  # the server needs no secret
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    # on CPU the engine core runs in the server's process (faster start); on a GPU vLLM's default stands
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in serve.server_env(cpu=False)
    cmd = serve.server_command("/m", "judge", 8123)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and "--enforce-eager" in cmd
    assert cmd[cmd.index("--port") + 1] == "8123" and cmd[cmd.index("--max-model-len") + 1] == "4096"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--served-model-name") + 1] == "judge"


def test_start_failure_quotes_the_log_tail(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "server_command", lambda *a, **k: [
        sys.executable, "-c", "import sys; print('ValueError: no CPU backend for this model'); sys.exit(3)"])
    srv = serve.VLLMServer(str(model_dir), log_file=tmp_path / "srv.log", startup_timeout=30)
    with pytest.raises(serve.ServeError, match=r"(?s)exited with code 3.*no CPU backend for this model"):
        srv.start()


def test_start_timeout_stops_the_whole_process_group(model_dir, tmp_path, monkeypatch):
    # a "server" that never listens and has a child of its own (like vLLM's engine process)
    script = ("import subprocess, sys, time; print('loading weights...', flush=True); "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")
    monkeypatch.setattr(serve, "server_command", lambda *a, **k: [sys.executable, "-c", script])
    srv = serve.VLLMServer(str(model_dir), log_file=tmp_path / "srv.log", startup_timeout=2)
    t0 = time.monotonic()
    with pytest.raises(serve.ServeError, match=r"(?s)not ready after 2 s.*loading weights"):
        srv.start()
    assert time.monotonic() - t0 < 40
    assert not srv.running() and not serve._group_alive(srv.proc.pid)


@pytest.mark.slow
@pytest.mark.vllm
def test_local_vllm_judge_parses_every_verdict(tmp_path, monkeypatch, capsys, vllm_judge):
    from hhdpo.evaluation.serve import _group_alive

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    gen = tmp_path / "policy_out.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in hh_generation_records(4)))
    pw, out = tmp_path / "policy_pairwise.jsonl", tmp_path / "policy_judged.jsonl"
    make_pairwise(gen, pw, shuffle_ab=True, seed=0)

    server = vllm_judge.get()
    try:
        pgid, port = server.proc.pid, server.port
        assert server.running()
        rc = judge.cli(["--in_file", str(pw), "--out_file", str(out), "--base-url", server.base_url,
                        "--model", server.served_name, "--api", "responses", "--template", "strict",
                        "--concurrency", "4", "--timeout", "300", "--max-output-tokens", "64", "--no-progress"])
        assert rc == 0, capsys.readouterr().err
    finally:
        vllm_judge.stop()  # the last test that judges with it: stopping is part of what this one checks

    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 4
    for r in recs:
        assert "judge_error" not in r, r.get("judge_error")
        assert r["winner"] in ("a", "b", "tie") and r["winner_model_vs_chosen"] in ("model", "chosen", "tie")
        assert r["judge_model"] == "smollm2" and r["input_tokens"] > 0 and r["output_tokens"] > 0

    assert not server.running() and not _group_alive(pgid)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens any more
