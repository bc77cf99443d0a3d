"""hhdpo judge as a stage: which key goes to which endpoint (checked on the wire), resuming
without reusing stale verdicts, and the ``--config`` + ``key=value`` command line with its
exit codes. Runs against tests/fake_responses_server.py through the real `openai` client."""

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hhdpo.evaluation.judge_api import JudgeFatal, is_openai_api, make_client
from tests.conftest import run_cli
from tests.fake_responses_server import FakeOpenAIServer
from tests.judge_helpers import make_pairs, read, run

REPO = Path(__file__).resolve().parents[2]

OPENAI_SECRET = "sk-openai-SECRET456"
JUDGE_SECRET = "judge-key-SECRET789"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "HHDPO_JUDGE_API_KEY", "OPENAI_CUSTOM_HEADERS",
                "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
        monkeypatch.delenv(var, raising=False)


# --------------------------------------------------------------------------- key scope


@pytest.mark.parametrize("url, openai", [
    (None, True), ("https://api.openai.com/v1", True), ("https://API.openai.com:443/v1", True),
    ("http://api.openai.com/v1", False), ("https://api.openai.com.evil.example/v1", False),
    ("https://evil.example/api.openai.com/v1", False), ("http://10.0.0.5:8000/v1", False),
])
def test_only_the_openai_api_is_openai(url, openai):
    assert is_openai_api(url) is openai


def test_openai_key_never_leaves_for_another_endpoint(tmp_path, monkeypatch):
    """On the wire: a non-OpenAI base URL gets $HHDPO_JUDGE_API_KEY (or judge.api_key_env's
    variable), or no Authorization header at all; never OPENAI_API_KEY, not even via
    OPENAI_CUSTOM_HEADERS, and no OpenAI account headers."""
    pw, pairs, _ = make_pairs(tmp_path, 2)
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_SECRET)
    monkeypatch.setenv("OPENAI_ORG_ID", "org-SECRETORG")
    with FakeOpenAIServer() as srv:
        srv.set_index(pairs)

        def sent(name, **kw):
            n = len(srv.requests)
            run(pw, tmp_path / f"{name}.jsonl", srv, **kw)
            return {r["auth"] for r in srv.requests[n:]}, {h for r in srv.requests[n:] for h in r["openai_headers"]}

        assert sent("openai_key_only") == ({None}, set())
        monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", f"Authorization: Bearer {OPENAI_SECRET}")
        assert sent("ambient_header") == ({None}, set())
        monkeypatch.setenv("HHDPO_JUDGE_API_KEY", JUDGE_SECRET)
        assert sent("judge_key") == ({f"Bearer {JUDGE_SECRET}"}, set())
        monkeypatch.setenv("MY_JUDGE_KEY", "my-own-judge-key")
        assert sent("custom_var", api_key_env="MY_JUDGE_KEY") == ({"Bearer my-own-judge-key"}, set())
        monkeypatch.delenv("OPENAI_API_KEY")
        monkeypatch.delenv("OPENAI_CUSTOM_HEADERS")
        monkeypatch.delenv("HHDPO_JUDGE_API_KEY")
        assert sent("no_key") == ({None}, set())


def test_openai_base_url_variable_cannot_redirect_the_key(monkeypatch):
    """With no judge.base_url the key goes to api.openai.com; OPENAI_BASE_URL (read by the SDK
    itself) must not send it to another server instead."""
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_SECRET)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    client = make_client(None, 5.0)
    assert str(client.base_url).startswith("https://api.openai.com/v1")
    asyncio.run(client.close())
    with pytest.raises(JudgeFatal, match="OPENAI_API_KEY is not set"):
        monkeypatch.delenv("OPENAI_API_KEY")
        make_client(None, 5.0)


# --------------------------------------------------------------------------- nothing stale reused


def test_changed_pair_is_rejudged_and_only_it(tmp_path):
    pw, pairs, expect = make_pairs(tmp_path, 8)
    out = tmp_path / "policy_judged.jsonl"
    # a pair the model lost; its regenerated response is longer than the chosen one, so it wins now
    target = next(p for p in pairs if expect[p["idx"]] == "chosen")
    slot = "b" if target["is_swapped"] else "a"
    with FakeOpenAIServer() as srv:
        srv.set_index(pairs)
        run(pw, out, srv)
        assert len(srv.requests) == 8
        changed = [dict(p) for p in pairs]
        new_response = target[slot] + " And here is a great deal more helpful detail." * 40
        next(p for p in changed if p["idx"] == target["idx"])[slot] = new_response
        pw.write_text("".join(json.dumps(p) + "\n" for p in changed))
        logs = []
        st = run(pw, out, srv, log=logs.append)
        assert [r["idx"] for r in srv.requests[8:]] == [target["idx"]]  # exactly that pair, once
        assert st.files[0].skipped == 7 and st.files[0].judged == 1
        assert any("dropped 1 saved verdict(s)" in m and "1 prompt or responses changed" in m for m in logs), logs
        run(pw, out, srv)  # now everything is current
        assert len(srv.requests) == 9
    recs = {r["idx"]: r for r in read(out)}
    assert len(read(out)) == 8 and sorted(recs) == sorted(p["idx"] for p in pairs)
    assert recs[target["idx"]][slot] == new_response and recs[target["idx"]]["winner_model_vs_chosen"] == "model"
    assert all(recs[i]["winner_model_vs_chosen"] == expect[i] for i in recs if i != target["idx"])


def test_files_without_judge_key_are_checked_from_their_own_fields(tmp_path):
    """Files judged before judge_key existed: a record that still holds the pair it was judged
    on is kept when that pair is unchanged; one that cannot be checked is re-judged; a verdict
    for a pair no longer in the pairwise file is dropped (it would be counted in summaries)."""
    pw, pairs, _ = make_pairs(tmp_path, 6)
    out = tmp_path / "policy_judged.jsonl"
    with FakeOpenAIServer() as srv:
        srv.set_index(pairs)
        run(pw, out, srv)
        old = [{k: v for k, v in r.items() if k != "judge_key"} for r in read(out)]
        unknown = old[2]["idx"]
        del old[2]["a"]  # e.g. the seed's files, which did not keep the responses
        out.write_text("".join(json.dumps(r) + "\n" for r in old))
        gone = pairs[-1]["idx"]
        pw.write_text("".join(json.dumps(p) + "\n" for p in pairs[:-1]))
        logs = []
        st = run(pw, out, srv, log=logs.append)
        assert [r["idx"] for r in srv.requests[6:]] == [unknown]
    assert st.files[0].rejudged == {"saved without the pair fields to check it": 1, "no longer in the pairwise file": 1}
    assert sorted(r["idx"] for r in read(out)) == sorted(p["idx"] for p in pairs[:-1]) and gone not in {
        r["idx"] for r in read(out)}


# --------------------------------------------------------------------------- the command line


def _config(tmp_path, srv, **judge):
    cfg = tmp_path / "config.yaml"
    lines = [f"run_dir: {tmp_path / 'run'}", "eval:", "  out_dir: eval", "judge:", f"  base_url: {srv.base_url}"]
    lines += [f"  {k}: {v}" for k, v in judge.items()]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def test_config_and_overrides_in_any_order_judge_the_eval_files(tmp_path):
    """`hhdpo judge --config X key=value --flag ...` with no --in_file judges
    <run_dir>/<eval.out_dir>/<name>_pairwise.jsonl for --models (default policy,base)."""
    eval_dir = tmp_path / "run" / "eval"
    pw, pairs, expect = make_pairs(tmp_path, 5, out_dir=eval_dir)
    pw_base, pairs_base, expect_base = make_pairs(tmp_path / "b", 3, name="base", out_dir=eval_dir)
    with FakeOpenAIServer() as srv:
        srv.set_index(pairs + pairs_base)
        srv.faults = {pairs[0]["idx"]: ["500", "500"]}  # judge.max_retries=1: two attempts, then an error
        cfg = _config(tmp_path, srv, model="from-the-config")
        r = run_cli("judge", "--config", cfg, "judge.model=overridden-by-the-flag", "--concurrency", "2",
                    "judge.max_retries=1", "--model", "fake-judge", "--backoff-base", "0.01", "--no-progress")
        # the errored verdict leaves the run incomplete: exit 75, saying so
        assert r.returncode == 75, r.stderr
        assert "INCOMPLETE (exit 75)" in r.stderr and "4 of 5 pairs judged, 0 missing, 1 with errors" in r.stderr
        assert {q["model"] for q in srv.requests} == {"fake-judge"}  # a flag wins over key=value
    policy = {x["idx"]: x for x in read(eval_dir / "policy_judged.jsonl")}
    base = {x["idx"]: x for x in read(eval_dir / "base_judged.jsonl")}
    assert sorted(policy) == sorted(expect) and sorted(base) == sorted(expect_base)
    assert "gave up after 2 attempts" in policy[pairs[0]["idx"]]["judge_error"]
    assert all(policy[i]["winner_model_vs_chosen"] == expect[i] for i in policy if i != pairs[0]["idx"])
    assert all(base[i]["winner_model_vs_chosen"] == expect_base[i] for i in base)

    with FakeOpenAIServer() as srv:  # --models picks the files; others are not touched
        (eval_dir / "policy_judged.jsonl").unlink()
        srv.set_index(pairs)
        r = run_cli("judge", "--models", "policy", "--config", _config(tmp_path, srv, model="fake-judge"),
                    "--no-progress")
        assert r.returncode == 0, r.stderr
        assert len(srv.requests) == 5 and len(read(eval_dir / "policy_judged.jsonl")) == 5


@pytest.mark.parametrize("case", ["malformed_line", "malformed_in_file", "missing_file", "unknown_key", "bad_value", "in_file_and_models"])
def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path, case):
    eval_dir = tmp_path / "run" / "eval"
    pw, pairs, _ = make_pairs(tmp_path, 3, out_dir=eval_dir)
    with FakeOpenAIServer() as srv:
        args, want = [], ""
        if case == "malformed_line":
            pw.write_text(pw.read_text() + '{"idx": 7, "prompt": "p", "a": "x", "b": \n')
            args, want = ["--models", "policy"], f"{pw}:4: malformed JSON"
        elif case == "malformed_in_file":  # the seed's spelling of the command
            pw.write_text(pw.read_text().replace('"b": ', '"B": ', 1))
            args, want = ["--in_file", str(pw)], f"{pw}:1: 'b' missing"
        elif case == "missing_file":
            args, want = ["--models", "nosuchmodel"], f"{eval_dir / 'nosuchmodel_pairwise.jsonl'}: file not found"
        elif case == "unknown_key":
            args, want = ["judge.concurency=2"], "judge.concurency: unknown config key; did you mean judge.concurrency?"
        elif case == "bad_value":
            args, want = ["--max-output-tokens", "0"], "judge.max_output_tokens: got 0"
        else:
            args, want = ["--in_file", str(pw), "--models", "policy"], "give --in_file or --models, not both"
        r = run_cli("judge", "--config", _config(tmp_path, srv, model="fake-judge"), *args, "--no-progress")
        assert not srv.requests
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert want in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- complete, or says it is not
#
# A run's eval directory as `hhdpo eval` leaves it before judging: policy (6 prompts) and base (3)
# generations, the judge the fake server. With judge.concurrency=1 the pairs go in file order, so a
# budget of 4 requests, with a 400 (never retried) on the first pair, leaves policy at 3 judged,
# 1 error, 2 missing and base not started: 9 pairs, 3 judged, 1 error, 5 missing.

PARTIAL = {"complete": False, "pairs": 9, "judged": 3, "errors": 1, "missing": 5}
COMPLETE = {"complete": True, "pairs": 9, "judged": 9, "errors": 0, "missing": 0}


def _eval_run(root, srv, *extra):
    """(config file, eval dir): generations in the eval dir, pairwise files as `hhdpo pairwise` writes them."""
    from hhdpo.core.io import atomic_write_text
    from tests.fake_responses_server import hh_generation_records

    ev = root / "run" / "eval"
    ev.mkdir(parents=True, exist_ok=True)
    pairs = []
    for name, n in (("policy", 6), ("base", 3)):
        gens = hh_generation_records(n, model_id=f"{name}_model")
        atomic_write_text(ev / f"{name}_out.jsonl", "".join(json.dumps(g) + "\n" for g in gens))
        pairs += [{"idx": g["idx"], "prompt": g["prompt"]} for g in gens]
    srv.set_index(pairs)
    cfg = root / "config.yaml"
    cfg.write_text("\n".join([f"run_dir: {root / 'run'}", "HH_test:", "  HH_test_policy_out: eval/policy_out.jsonl",
                              "  HH_test_base_out: eval/base_out.jsonl", "eval:", "  out_dir: eval", "judge:",
                              f"  base_url: {srv.base_url}", "  model: fake-judge", "  concurrency: 1",
                              "  max_retries: 0", *extra]) + "\n")
    return cfg, ev, sorted({p["idx"] for p in pairs})


def _job_done(cfg):
    """`python -m hhdpo.launch.slurm job-done judge`: what judge.sbatch runs for the stage's marker."""
    return subprocess.run([sys.executable, "-m", "hhdpo.launch.slurm", "job-done", "judge", "--config", str(cfg)],
                          capture_output=True, text=True, cwd=REPO, timeout=120, check=False)


def _totals(summary):
    return {k: summary[k] for k in ("complete", "pairs", "judged", "errors", "missing")}


def test_incomplete_judge_exits_75_summary_partial_no_marker_then_rerun_completes(tmp_path):
    """`hhdpo judge` stopped by its budget with a verdict left as an error: exit 75 naming the counts,
    `hhdpo summarize` labels the summary PARTIAL, the judge stage's marker is refused (job-done exits
    75); a rerun without the budget judges only the missing and errored pairs, exits 0, and then the
    summary is complete and the marker written."""
    from hhdpo.core.config import load_config
    from hhdpo.launch import slurm as hs

    with FakeOpenAIServer() as srv:
        cfg, ev, idxs = _eval_run(tmp_path, srv)
        srv.faults = {idxs[0]: ["400"]}
        assert run_cli("pairwise", "--config", cfg).returncode == 0
        r = run_cli("judge", "--config", cfg, "--max-requests", "4", "--no-progress")
        assert r.returncode == 75, r.stderr
        assert "budget hit: max_requests=4" in r.stdout and "1 file(s) not started" in r.stdout
        assert "INCOMPLETE (exit 75)" in r.stderr and "3 of 6 pairs judged, 2 missing, 1 with errors" in r.stderr
        assert "Traceback" not in r.stderr and len(srv.requests) == 4

        done = _job_done(cfg)
        assert done.returncode == 75 and "judge incomplete, no completion marker" in done.stderr, done.stderr
        assert "3 of 6 pairs judged" in done.stderr and "base_judged.jsonl: 0 of 3 pairs judged, 3 missing" in done.stderr
        assert hs.read_marker(load_config(cfg), "judge") is None

        s = run_cli("summarize", "--config", cfg)
        assert s.returncode == 0 and "PARTIAL: 3 of 9 pairs judged, 5 missing, 1 with judge errors" in s.stderr
        summary = json.loads((ev / "summary.json").read_text())
        assert _totals(summary) == PARTIAL
        cov = {f["label"]: f["coverage"] for f in summary["files"]}
        assert cov == {"policy": {"pairs": 6, "judged": 3, "errors": 1, "invalid": 0, "missing": 2, "complete": False},
                       "base": {"pairs": 3, "judged": 0, "errors": 0, "invalid": 0, "missing": 3, "complete": False}}
        assert (ev / "summary.md").read_text().startswith("**PARTIAL: 3 of 9 pairs judged")

        n = len(srv.requests)
        r = run_cli("judge", "--config", cfg, "--no-progress")  # the fault is used up, no budget
        assert r.returncode == 0, r.stderr
        assert "INCOMPLETE" not in r.stdout + r.stderr
        # only the errored and the missing pairs were requested, each once: 1 + 2 of policy, 3 of base
        assert len(srv.requests) - n == 6 and srv.requests[n]["idx"] == idxs[0]
        ok = _job_done(cfg)
        assert ok.returncode == 0, ok.stderr
        assert hs.is_complete(load_config(cfg), "judge")
        assert run_cli("summarize", "--config", cfg).returncode == 0
    summary = json.loads((ev / "summary.json").read_text())
    assert _totals(summary) == COMPLETE and not (ev / "summary.md").read_text().startswith("**PARTIAL")
    assert {f["label"]: f["n"] for f in summary["files"]} == {"policy": 6, "base": 3}


def test_eval_exits_75_with_a_partial_summary_then_a_rerun_completes(tmp_path, monkeypatch, capsys):
    """`hhdpo eval` (generation stubbed: its outputs are in place) with the judge's budget too small:
    summary.json/md/png written and labelled PARTIAL with the counts, exit 75; rerun: complete, exit 0."""
    import hhdpo.evaluation.generate as gen
    from hhdpo.core.config import run_paths
    from hhdpo.evaluation import evaluate
    from hhdpo.evaluation.summarize import describe_test, partial_note

    monkeypatch.setattr(gen, "generate", lambda cfg, models, log=print: {m: run_paths(cfg).gen_out(m) for m in models})
    with FakeOpenAIServer() as srv:
        cfg, ev, idxs = _eval_run(tmp_path, srv)
        srv.faults = {idxs[0]: ["400"]}
        assert evaluate.cli(["--config", str(cfg), "judge.max_requests=4"]) == 75
        err = capsys.readouterr().err
        assert "hhdpo eval: INCOMPLETE (exit 75): PARTIAL: 3 of 9 pairs judged, 5 missing, 1 with judge errors" in err
        summary = json.loads((ev / "summary.json").read_text())
        assert _totals(summary) == PARTIAL
        assert (ev / "summary.md").read_text().startswith("**PARTIAL")
        assert (ev / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert partial_note(summary) and describe_test(summary["comparisons"][0])
        assert len(srv.requests) == 4

        assert evaluate.cli(["--config", str(cfg)]) == 0
        assert len(srv.requests) == 10 and "INCOMPLETE" not in capsys.readouterr().err
    summary = json.loads((ev / "summary.json").read_text())
    assert _totals(summary) == COMPLETE and not (ev / "summary.md").read_text().startswith("**PARTIAL")


def test_submitit_judge_job_fails_when_incomplete_and_completes_on_rerun(tmp_path):
    """The submitit JudgeJob: an incomplete judge makes the job raise (its result is a failure, not
    a summary) after writing the PARTIAL summary, with no marker; run again it returns the complete
    summary and writes the marker."""
    from hhdpo.core.config import load_config
    from hhdpo.launch import slurm as hs
    from hhdpo.launch.jobs import JudgeIncomplete, JudgeJob

    with FakeOpenAIServer() as srv:
        cfg, ev, idxs = _eval_run(tmp_path, srv, "  max_requests: 4")
        srv.faults = {idxs[0]: ["400"]}
        with pytest.raises(JudgeIncomplete, match=r"exit 75.*3 of 6 pairs judged, 2 missing, 1 with errors") as e:
            JudgeJob()(str(cfg), ["policy", "base"])
        assert e.value.exit_code == 75
        assert _totals(json.loads((ev / "summary.json").read_text())) == PARTIAL
        assert hs.read_marker(load_config(cfg), "judge") is None

        cfg.write_text(cfg.read_text().replace("  max_requests: 4\n", ""))
        summary = JudgeJob()(str(cfg), ["policy", "base"])
        assert len(srv.requests) == 10
    assert _totals(summary) == COMPLETE and hs.is_complete(load_config(cfg), "judge", ["policy", "base"])


def test_judge_sbatch_fails_with_75_and_no_marker_then_a_rerun_completes(slurm_cluster, tmp_path):
    """slurm/judge.sbatch on the local cluster: an incomplete judge still summarizes (PARTIAL), the
    job exits 75 (FAILED, so an afterok dependent would not run) with no completion marker; the
    resubmitted job completes it and writes the marker."""
    import tempfile

    from hhdpo.core.config import load_config
    from hhdpo.launch import slurm as hs

    root = Path(tempfile.mkdtemp(prefix="hhdpo-judge-sbatch-", dir="/tmp"))
    root.chmod(0o755)
    env = {k: v for k, v in slurm_cluster.env.items() if not k.startswith(("HHDPO_", "OPENAI_"))}
    env.update(HHDPO_BIN=str(Path(sys.executable).parent), PYTHONUNBUFFERED="1")
    script = REPO / "slurm" / "judge.sbatch"
    with FakeOpenAIServer() as srv:
        cfg, ev, idxs = _eval_run(root, srv, "  max_requests: 4")
        srv.faults = {idxs[0]: ["400"]}
        job = slurm_cluster.run("sbatch", "--parsable", "-o", root / "judge-%j.out", script, "--config", cfg,
                                cwd=root, env=env).stdout.strip().split(";")[0]
        state = slurm_cluster.wait_job(job, timeout=600)
        out = (root / f"judge-{job}.out").read_text(errors="replace")
        assert state == "FAILED", out[-4000:]
        if slurm_cluster.accounting:
            assert slurm_cluster.sacct(job)[0]["ExitCode"] == "75:0"
        assert "judge incomplete (exit 75)" in out and "PARTIAL: 3 of 9 pairs judged" in out
        assert _totals(json.loads((ev / "summary.json").read_text())) == PARTIAL
        assert hs.read_marker(load_config(cfg), "judge") is None

        cfg.write_text(cfg.read_text().replace("  max_requests: 4\n", ""))
        job = slurm_cluster.run("sbatch", "--parsable", "-o", root / "judge-%j.out", script, "--config", cfg,
                                cwd=root, env=env).stdout.strip().split(";")[0]
        state = slurm_cluster.wait_job(job, timeout=600)
        out = (root / f"judge-{job}.out").read_text(errors="replace")
        assert state == "COMPLETED", out[-4000:]
        assert len(srv.requests) == 10
    assert _totals(json.loads((ev / "summary.json").read_text())) == COMPLETE
    assert hs.is_complete(load_config(cfg), "judge")
    shutil.rmtree(root, ignore_errors=True)
