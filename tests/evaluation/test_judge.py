"""hhdpo judge against a real HTTP fake of the OpenAI API, through the real `openai` client.

The fake server (tests/fake_responses_server.py) prefers the longer response, so every
verdict is known in advance; it counts requests per pair idx to prove no duplicates.
"""

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hhdpo.core.io import DataError
from hhdpo.evaluation import judge
from hhdpo.evaluation.judge_api import backoff_delay, retry_after_seconds, run_all
from hhdpo.evaluation.summarize import summarize
from hhdpo.evaluation.verdict import VerdictError, parse_verdict
from hhdpo.evaluation.winner import map_winner, reconcile
from tests.fake_responses_server import FakeOpenAIServer
from tests.judge_helpers import make_pairs, read, run

REPO = Path(__file__).resolve().parents[2]
SECRET = "sk-test-SECRET123"
OPENAI_SECRET = "sk-openai-SECRET456"


@pytest.fixture(autouse=True)
def _no_real_key(monkeypatch):
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "HHDPO_JUDGE_API_KEY"):
        monkeypatch.delenv(var, raising=False)


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("text, template, winner", [
    ('{"winner": "a", "explanation": "A is kinder."}', "strict", "a"),
    ('{"winner": "TIE", "explanation": "same"}', "strict", "tie"),
    ('Sure! Here is my verdict: {"winner": "b", "explanation": "B answers"} Hope it helps.', "strict", "b"),
    ('```json\n{"winner": "a", "explanation": "x"}\n```', "strict", "a"),
    ('{"winner": "b", "explanation": "B is more compl', "strict", "b"),  # cut off by max tokens
    ('{\n  "winner": "a",\n  "explanation": "A says \\"hi\\" and A says \\"hi', "strict", "a"),
    ("Both are fine but B is safer.\nWinner: B", "strict", "b"),
    ("**Winner:** Response A", "strict", "a"),
    ("Comparison: A gives steps, B refuses.\nMore helpful: A", "dpo", "a"),
    ('Comparison: B is clearer.\n"B"', "dpo", "b"),
    ('{"comparison": "A is vague.", "more_helpful": "B"}', "dpo", "b"),
])
def test_parse_verdict_tolerant(text, template, winner):
    assert parse_verdict(text, template)[0] == winner


@pytest.mark.parametrize("text, template", [
    ("", "strict"),
    ("Both responses have their merits; it is hard to say.", "strict"),
    ('{"winner": a, "explanation": "unquoted"', "strict"),
    ('{"winner": "c", "explanation": "neither"}', "strict"),
    ("Winner: a tie, honestly", "strict"),  # not read as "a"
    ('{"winner": "tie", "explanation": "x"}', "dpo"),  # the DPO template has no tie
])
def test_parse_verdict_rejects(text, template):
    with pytest.raises(VerdictError):
        parse_verdict(text, template)


def test_mapping_reconcile_and_retry_delays():
    assert map_winner("a", "policy_model", "hh_chosen", False) == ("model", "policy_model", "hh_chosen")
    assert map_winner("a", "hh_chosen", "policy_model", True) == ("chosen", "policy_model", "hh_chosen")
    assert map_winner("b", "hh_chosen", "policy_model", True)[0] == "model"
    assert map_winner("tie", "x", "hh_chosen", False)[0] == "tie"
    assert map_winner(None, "x", "hh_chosen", False)[0] is None
    assert reconcile("a", "a") == "a" and reconcile("a", "b") == "tie" and reconcile("a", "tie") == "tie"
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < retry_after_seconds({"retry-after": date}) <= 31
    rng = random.Random(0)
    assert all(2.0 <= backoff_delay(0, 1.0, 60, 2.0, rng) <= 2.2 for _ in range(50))
    delays = [backoff_delay(a, 1.0, 8.0, None, rng) for a in range(6)]
    assert 0.5 <= delays[0] <= 1.0 and 4.0 <= delays[5] <= 8.0


def test_run_all_cancels_the_rest_on_the_first_failure_like_a_task_group():
    """judge's workers run under run_all (asyncio.TaskGroup is 3.11+; the package supports 3.10)."""
    ended = []

    async def sleeper(name):
        try:
            await asyncio.sleep(30)
        finally:
            ended.append(name)

    async def fail(exc, after):
        await asyncio.sleep(after)
        raise exc

    async def main():
        t0 = time.monotonic()
        errors = await run_all([sleeper("s1"), fail(ValueError("first"), 0.01), sleeper("s2")])
        return errors, time.monotonic() - t0

    errors, took = asyncio.run(main())
    assert [str(e) for e in errors] == ["first"] and sorted(ended) == ["s1", "s2"] and took < 5
    assert asyncio.run(run_all([asyncio.sleep(0), asyncio.sleep(0.01)])) == []

    async def cancelled_from_outside():
        task = asyncio.ensure_future(run_all([sleeper("s3")]))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled_from_outside())
    assert ended[-1] == "s3"  # awaited, not left running


# --------------------------------------------------------------------------- over HTTP


def test_storm_of_429_500_timeouts_every_verdict_exactly_once(tmp_path):
    pw, pairs, expect = make_pairs(tmp_path, 24)
    rng = random.Random(7)
    faults = {p["idx"]: rng.choice([[], ["429"], ["500", "503"], ["429", "500", "drop"], ["503"]]) for p in pairs}
    faults[pairs[0]["idx"]] = ["429 retry-after-ms=400"]  # the server's wait must be honoured
    faults[pairs[1]["idx"]] = ["slow"]  # client times out, retries
    out = tmp_path / "judged.jsonl"
    with FakeOpenAIServer(faults=faults, slow_seconds=2.0) as srv:
        srv.set_index(pairs)
        scripted = {k: len(v) for k, v in faults.items()}
        stats = run(pw, out, srv, max_retries=4, timeout=0.6)
        counts = srv.counts()
        times = [r["t"] for r in srv.requests if r["idx"] == pairs[0]["idx"]]
        assert all(r["structured"] and r["schema_strict"] for r in srv.requests)
    recs = read(out)
    assert sorted(r["idx"] for r in recs) == sorted(p["idx"] for p in pairs)  # each exactly once
    assert not any("judge_error" in r for r in recs)
    for r in recs:
        assert r["winner_model_vs_chosen"] == expect[r["idx"]] and r["judge_model"] == "fake-judge"
        assert r["input_tokens"] > 0 and r["output_tokens"] > 0
        assert counts[r["idx"]] == scripted[r["idx"]] + 1  # one success after the scripted failures
    assert times[1] - times[0] >= 0.4
    assert stats.files[0].judged == 24 and stats.files[0].errors == 0


def test_failed_and_unparseable_verdicts_are_recorded_and_excluded(tmp_path):
    pw, pairs, expect = make_pairs(tmp_path, 16)
    ids = [p["idx"] for p in pairs]
    faults = {ids[0]: ["500", "500", "500"], ids[1]: ["nonjson"], ids[2]: ["malformed"], ids[3]: ["badwinner"],
              ids[4]: ["400"], ids[5]: ["prose_json"], ids[6]: ["fence"], ids[7]: ["winner_line"],
              ids[8]: ["truncated"]}
    out = tmp_path / "judged.jsonl"
    with FakeOpenAIServer(faults=faults) as srv:
        srv.set_index(pairs)
        stats = run(pw, out, srv, max_retries=2)
        assert srv.counts()[ids[0]] == 3 and srv.counts()[ids[4]] == 1  # 400 is not retried
    recs = {r["idx"]: r for r in read(out)}
    assert len(recs) == 16
    errored = {i for i, r in recs.items() if "judge_error" in r}
    assert errored == set(ids[:5])
    assert "HTTP 500" in recs[ids[0]]["judge_error"] and "3 attempts" in recs[ids[0]]["judge_error"]
    assert "unparseable" in recs[ids[1]]["judge_error"] and recs[ids[1]]["judge_raw"].startswith("Both")
    for i in errored:
        assert recs[i]["winner"] is None and recs[i]["winner_model_vs_chosen"] is None  # never a tie
    for i in set(ids) - errored:
        assert recs[i]["winner_model_vs_chosen"] == expect[i]
    # cut off by the token cap after the verdict: kept, flagged, partial explanation saved
    assert recs[ids[8]]["judge_truncated"] is True and recs[ids[8]]["explanation"] == "Response"
    assert not any(recs[i].get("judge_truncated") for i in ids[:8])
    assert stats.files[0].errors == 5

    s = summarize([out])["files"][0]
    good = [recs[i] for i in ids if i not in errored]
    wins = sum(expect[r["idx"]] == "model" for r in good)
    losses = sum(expect[r["idx"]] == "chosen" for r in good)
    assert (s["errors"], s["wins"], s["losses"], s["ties"]) == (5, wins, losses, len(good) - wins - losses)
    assert s["win_rate"] == pytest.approx(wins / (wins + losses))

    # the run is incomplete: 2 requests failed for good (HTTP 500, HTTP 400); the 3 answers that could
    # not be read are verdicts (invalid: asking again at temperature 0 gives the same text), reported
    # but not unfinished. --keep-errors leaves the failures alone (still incomplete), a plain rerun
    # re-judges exactly them (faults now used up) and completes it
    failed = {i for i in errored if "judge_raw" not in recs[i]}
    assert failed == {ids[0], ids[4]}
    assert stats.files[0].coverage == {"pairs": 16, "judged": 11, "errors": 2, "invalid": 3, "missing": 0,
                                       "complete": False}
    assert not stats.complete and "11 of 16 pairs judged, 0 missing, 2 with errors, 3 invalid" in stats.incomplete_reason()
    with FakeOpenAIServer() as srv:
        srv.set_index(pairs)
        st = run(pw, out, srv, retry_errors=False)
        assert st.files[0].skipped == 16 and not srv.requests and not st.complete
        st = run(pw, out, srv)
        assert sorted(srv.counts()) == sorted(failed) and set(srv.counts().values()) == {1}
    recs2 = {r["idx"]: r for r in read(out)}
    assert sorted(recs2) == sorted(ids) and {i for i, r in recs2.items() if "judge_error" in r} == errored - failed
    assert st.files[0].judged == 2 and st.files[0].skipped == 14 and st.files[0].rejudged == {"with judge_error": 2}
    assert st.complete and st.incomplete_reason() is None


def _judge_cmd(pw, out, url, *extra):
    return [sys.executable, "-m", "hhdpo.evaluation.judge", "--in_file", str(pw), "--out_file", str(out), "--base-url", url,
            "--model", "fake-judge", "--concurrency", "4", "--backoff-base", "0.01", *extra]


def test_sigkill_mid_run_then_resume_loses_and_duplicates_nothing(tmp_path):
    pw, pairs, expect = make_pairs(tmp_path, 60)
    out = tmp_path / "judged.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    with FakeOpenAIServer(latency=0.04) as srv:
        srv.set_index(pairs)
        snapshots = []  # (idx saved so far, requests sent so far) right after each kill
        for kill_after in (8, 30):  # kill twice, at different points
            proc = subprocess.Popen(_judge_cmd(pw, out, srv.base_url, "--no-progress"), cwd=REPO, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if out.exists() and out.read_bytes().count(b"\n") >= kill_after:
                    break
                time.sleep(0.005)
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stderr.close()
            saved = [json.loads(line) for line in out.read_bytes().split(b"\n")[:-1]]  # complete lines only
            snapshots.append(({r["idx"] for r in saved}, len(srv.requests)))
        assert 30 <= len(saved) < 60
        with out.open("ab") as f:  # and a torn line, as from a power loss mid-write
            f.write(b'{"idx": 999, "prompt": "\\n\\nHuman: half a rec')
        done = subprocess.run(_judge_cmd(pw, out, srv.base_url), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    recs = read(out)
    assert sorted(r["idx"] for r in recs) == sorted(p["idx"] for p in pairs)  # 0 lost, 0 duplicated
    assert all(r["winner_model_vs_chosen"] == expect[r["idx"]] for r in recs)
    for saved_idx, n_requests in snapshots:  # a verdict saved before a kill is never requested again
        assert not saved_idx & {r["idx"] for r in srv.requests[n_requests:]}
    assert f"skipped (already done) {len(saved)}" in done.stdout
    assert f"judged {60 - len(saved)}, errors 0" in done.stdout


def test_both_orders_reconciles_and_reports_agreement(tmp_path):
    pw, pairs, expect = make_pairs(tmp_path, 10)
    out = tmp_path / "consistent.jsonl"
    with FakeOpenAIServer() as srv:  # length-based: position-independent, both orders agree
        srv.set_index(pairs)
        stats = run(pw, out, srv, both_orders=True)
        assert set(srv.counts().values()) == {2}
    recs = read(out)
    assert all(r["orders_agree"] and r["winner_model_vs_chosen"] == expect[r["idx"]] for r in recs)
    for r in recs:
        ab, ba = r["verdicts"]
        assert (ab["order"], ba["order"]) == ("ab", "ba") and ab["winner"] == ba["winner"]
        assert ba["raw_winner"] == {"a": "b", "b": "a", "tie": "tie"}[ba["winner"]]
    assert stats.files[0].agree == stats.files[0].both_orders == 10

    out2 = tmp_path / "biased.jsonl"
    with FakeOpenAIServer(mode="always_a") as srv:  # a judge that always picks slot A
        srv.set_index(pairs)
        stats = run(pw, out2, srv, both_orders=True)
    recs = read(out2)
    assert all(r["winner"] == "tie" and r["winner_model_vs_chosen"] == "tie" and not r["orders_agree"] for r in recs)
    assert [v["raw_winner"] for v in recs[0]["verdicts"]] == ["a", "a"]
    assert stats.files[0].agree == 0
    assert summarize([out2])["files"][0]["agreement_rate"] == 0.0
    assert summarize([out])["files"][0]["agreement_rate"] == 1.0


def test_budget_caps_stop_cleanly_and_resume(tmp_path, capsys):
    pw, pairs, expect = make_pairs(tmp_path, 12)
    out = tmp_path / "judged.jsonl"
    base = ["--in_file", str(pw), "--out_file", str(out), "--model", "fake-judge", "--no-progress"]
    with FakeOpenAIServer(fixed_usage=(100, 20)) as srv:
        srv.set_index(pairs)
        rc = judge.cli(base + ["--base-url", srv.base_url, "--concurrency", "3", "--max-requests", "5"])
        captured = capsys.readouterr().out
        assert rc == 75 and "budget hit: max_requests=5" in captured and "7 pair(s) left" in captured
        assert len(srv.requests) == 5 and len(read(out)) == 5

        rc = judge.cli(base + ["--base-url", srv.base_url, "--concurrency", "1", "--max-tokens", "300"])
        captured = capsys.readouterr().out
        # 120 tokens per request: the third crosses 300, its verdict is kept, then it stops
        assert rc == 75 and "budget hit: max_tokens=300" in captured
        assert len(srv.requests) == 8 and len(read(out)) == 8

        assert judge.cli(base + ["--base-url", srv.base_url]) == 0
        assert len(srv.requests) == 12 and set(srv.counts().values()) == {1}
    assert sorted(r["idx"] for r in read(out)) == sorted(p["idx"] for p in pairs)


def test_api_key_is_used_but_never_written_or_logged(tmp_path):
    pw, pairs, expect = make_pairs(tmp_path, 6)
    out = tmp_path / "judged.jsonl"
    env = {**os.environ, "HHDPO_JUDGE_API_KEY": SECRET, "OPENAI_API_KEY": OPENAI_SECRET}
    with FakeOpenAIServer(faults={pairs[0]["idx"]: ["echo_auth"]}) as srv:
        srv.set_index(pairs)
        res = subprocess.run(_judge_cmd(pw, out, srv.base_url), cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 75, res.stderr  # the echo_auth 400 leaves one verdict with judge_error
        assert {r["auth"] for r in srv.requests} == {f"Bearer {SECRET}"}  # the judge's key, from the env
        # a fatal 401 (bad key: bad config) stops the run with exit 2 and a clean message
        out401 = tmp_path / "judged401.jsonl"
        srv.faults = {p["idx"]: ["401"] for p in pairs}
        res401 = subprocess.run(_judge_cmd(pw, out401, srv.base_url), cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=120)
    assert res401.returncode == 2 and "HTTP 401" in res401.stderr and "Traceback" not in res401.stderr
    echoed = [r for r in read(out) if "judge_error" in r]
    assert len(echoed) == 1 and "Bearer ***" in echoed[0]["judge_error"]  # the echoed key was redacted
    for text in (res.stdout, res.stderr, res401.stdout, res401.stderr,
                 *(p.read_text() for p in tmp_path.rglob("*") if p.is_file())):
        assert SECRET not in text and OPENAI_SECRET not in text


def test_chat_api_dpo_template_and_schema_refusal_fallback(tmp_path):
    pw, pairs, expect = make_pairs(tmp_path, 6)
    out = tmp_path / "chat.jsonl"
    with FakeOpenAIServer() as srv:
        srv.set_index(pairs)
        run(pw, out, srv, api="chat", template="dpo")
        assert {r["path"] for r in srv.requests} == {"/v1/chat/completions"}
        assert all(r["structured"] for r in srv.requests)
    recs = read(out)
    # the DPO template has no tie; the fake picks the longer, so every verdict maps exactly
    assert all(r["winner_model_vs_chosen"] == expect[r["idx"]] and r["judge_template"] == "dpo" for r in recs)

    out2 = tmp_path / "noschema.jsonl"
    messages = []
    with FakeOpenAIServer(schema_support=False) as srv:
        srv.set_index(pairs)
        run(pw, out2, srv, template="dpo", concurrency=1, log=messages.append)
        assert [r["status"] for r in srv.requests[:1]] == [400] and not any(r["structured"] for r in srv.requests[1:])
    assert any("refused JSON-schema" in m for m in messages)
    assert all(r["winner_model_vs_chosen"] == expect[r["idx"]] for r in read(out2))


def test_bad_input_and_mixed_judges_are_refused(tmp_path):
    pw, pairs, expect = make_pairs(tmp_path, 4)
    bad = tmp_path / "bad_pairwise.jsonl"
    bad.write_text(pw.read_text() + '{"idx": 9, "prompt": "p", "a": "x"}\n')
    out = tmp_path / "judged.jsonl"
    with FakeOpenAIServer() as srv:
        srv.set_index(pairs)
        with pytest.raises(DataError, match=r"bad_pairwise\.jsonl:5: 'b' missing"):
            run(bad, out, srv)
        run(pw, out, srv)
        with pytest.raises(DataError, match="judge_model='fake-judge'"):
            run(pw, out, srv, model="another-judge")
        assert judge.default_out_file(pw).name == "policy_judged.jsonl"
        with pytest.raises(ValueError, match="must be distinct"):
            run(pw, pw, srv)


def test_two_judges_on_one_out_file_are_refused(tmp_path):
    """A second writer (e.g. a requeued job while the first still runs) would duplicate verdicts."""
    pw, pairs, expect = make_pairs(tmp_path, 30)
    out = tmp_path / "judged.jsonl"
    with FakeOpenAIServer(latency=0.05) as srv:
        srv.set_index(pairs)
        first = subprocess.Popen(_judge_cmd(pw, out, srv.base_url, "--no-progress", "--concurrency", "1"),
                                 cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not (out.exists() and out.read_bytes()) and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(DataError, match="another hhdpo judge is writing it"):
                run(pw, out, srv)
        finally:
            first.kill()
            first.wait()
        run(pw, out, srv)  # the lock died with the killed process: resume works
    assert sorted(r["idx"] for r in read(out)) == sorted(p["idx"] for p in pairs)


def _no_flock(monkeypatch):
    """A filesystem without flock, as Lustre mounted without -o flock answers it."""
    import errno
    import fcntl

    def flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", flock)


def test_without_flock_a_pid_lock_file_guards_the_out_file(tmp_path, monkeypatch):
    """flock failing with ENOSYS: the judge says so once and locks with an O_EXCL lock file holding
    its pid and host, removed at the end; a live holder's lock is refused naming the file to delete
    if stale, a dead holder's (same host) is taken over, another host's is refused."""
    import socket

    _no_flock(monkeypatch)
    pw, pairs, _ = make_pairs(tmp_path, 6)
    out = tmp_path / "judged.jsonl"
    lock = tmp_path / ".judged.jsonl.pidlock"
    with FakeOpenAIServer() as srv:
        srv.set_index(pairs)
        logs = []
        st = run(pw, out, srv, log=logs.append)
        assert st.complete and not lock.exists()
        assert any("has no flock (ENOSYS" in m and ".judged.jsonl.pidlock" in m for m in logs), logs

        out.unlink()
        host = socket.gethostname()
        lock.write_text(json.dumps({"pid": os.getpid(), "host": host, "since": "2025-01-01T00:00:00"}))
        with pytest.raises(DataError, match=rf"another hhdpo judge is writing it .*pid {os.getpid()} on host "
                                            rf"{re.escape(host)}.*delete {re.escape(str(lock))}"):
            run(pw, out, srv)
        lock.write_text(json.dumps({"pid": 1, "host": "another-node", "since": "2025-01-01T00:00:00"}))
        with pytest.raises(DataError, match="pid 1 on host another-node"):
            run(pw, out, srv)
        assert not srv.requests[6:] and lock.exists()

        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()  # a judge killed with SIGKILL on this host leaves its lock behind
        lock.write_text(json.dumps({"pid": dead.pid, "host": host, "since": "2025-01-01T00:00:00"}))
        logs = []
        st = run(pw, out, srv, log=logs.append)
        assert st.complete and not lock.exists()
        assert any(f"stale lock of pid {dead.pid}" in m for m in logs), logs
    assert sorted(r["idx"] for r in read(out)) == sorted(p["idx"] for p in pairs)


def test_without_flock_the_command_line_has_no_traceback(tmp_path):
    """`hhdpo judge` where flock raises ENOSYS: judges (exit 0) with the notice on stderr; with a
    lock file of a judge on another node: exit 2 and the message, no traceback."""
    pw, pairs, _ = make_pairs(tmp_path, 4)
    out = tmp_path / "judged.jsonl"
    wrapper = ("import errno, fcntl, sys\n"
               "def flock(fd, op): raise OSError(errno.ENOSYS, 'Function not implemented')\n"
               "fcntl.flock = flock\n"
               "from hhdpo.evaluation import judge\n"
               "sys.exit(judge.cli(sys.argv[1:]))\n")
    with FakeOpenAIServer() as srv:
        srv.set_index(pairs)
        cmd = [sys.executable, "-c", wrapper, *_judge_cmd(pw, out, srv.base_url, "--no-progress")[3:]]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0, r.stderr
        assert "has no flock (ENOSYS: Function not implemented)" in r.stderr and "Traceback" not in r.stderr
        lock = tmp_path / ".judged.jsonl.pidlock"
        lock.write_text(json.dumps({"pid": 4242, "host": "n9", "since": "2025-01-01T00:00:00"}))
        r = subprocess.run([*cmd, "--retry-errors"], cwd=REPO, capture_output=True, text=True, timeout=120,
                           check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"lock file {lock}: pid 4242 on host n9" in r.stderr and f"delete {lock} and rerun" in r.stderr
    assert len(read(out)) == 4


def test_offline_default_serves_locally_and_stops(tmp_path, monkeypatch, capsys):
    """No key and no base URL: the CLI starts hhdpo.evaluation.serve's server for judge.serve_model, judges
    against it under its served name, sends it no key, and stops it (here a stand-in wrapping
    the fake API)."""
    import hhdpo.evaluation.serve

    pw, pairs, expect = make_pairs(tmp_path, 4)
    events = []

    class StandIn:
        def __init__(self, model, log_file=None):
            self.fake = FakeOpenAIServer()
            self.fake.set_index(pairs)
            self.served_name = model
            events.append(("init", model, log_file))

        def __enter__(self):
            self.fake.start()
            self.base_url = self.fake.base_url
            return self

        def __exit__(self, *exc):
            events.append(("stop", len(self.fake.requests), {(r["model"], r["auth"]) for r in self.fake.requests}))
            self.fake.stop()

    monkeypatch.setattr(hhdpo.evaluation.serve, "VLLMServer", StandIn)
    monkeypatch.setenv("HHDPO_JUDGE_API_KEY", SECRET)  # for a remote judge; our own server gets none
    out = tmp_path / "judged.jsonl"
    assert judge.cli(["--in_file", str(pw), "--out_file", str(out), "--serve-model", "smollm2", "--no-progress"]) == 0
    assert events == [("init", "smollm2", tmp_path / "judge_server.log"), ("stop", 4, {("smollm2", None)})]
    assert "serving 'smollm2' locally" in capsys.readouterr().err
    assert {r["judge_model"] for r in read(out)} == {"smollm2"}

    bad = tmp_path / "bad_pairwise.jsonl"
    bad.write_text('{"idx": 0, "prompt": "p"\n')
    events.clear()
    assert judge.cli(["--in_file", str(bad), "--no-progress"]) == 2
    assert events == [] and f"{bad}:1: malformed JSON" in capsys.readouterr().err  # no server started for bad input


def test_sigterm_while_serving_stops_the_server_too(tmp_path):
    """`hhdpo judge`/`eval` killed by SIGTERM while its local judge server runs (own session, so a
    group kill does not reach it) must not leave the server behind. Stand-in server: the fake API
    as a process, started through VLLMServer itself."""
    script = tmp_path / "serve.py"
    script.write_text(
        "import sys, time\n"
        "import hhdpo.evaluation.serve as s\n"
        f"s.server_command = lambda path, name, port, *a, **k: [sys.executable, {str(Path(__file__).parents[1] / 'fake_responses_server.py')!r}, '--port', str(port)]\n"
        "with s.VLLMServer('smollm2', served_name='fake-judge') as srv:\n"
        "    print(srv.proc.pid, flush=True)\n"
        "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pgid = int(proc.stdout.readline())
    os.killpg(pgid, 0)  # the server runs
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
