"""Orchestration overhead of slurm/pipeline.sh vs `make demo`, and USR2 -> first resumed step.

In one run, on this machine and the local SLURM cluster (slurm/cluster/start.sh; joined when it is
already up, stopped at the end only when this run started it and nobody else holds its lock):

1. local: the recipe lines of ``make demo`` (``make -n demo`` with DEMO_DIR and ARGS), one by one
2. slurm: the recipe of ``make submit`` with the same overrides (run_dir, dataset.subset and
   HH_test.split as the demo's), i.e. slurm/pipeline.sh: train -> generate -> judge jobs chained
   with afterok; every job gets ``--cpus-per-task=N`` (HHDPO_*_SBATCH; the local demo's threads)
3. usr2: one small train.sbatch job (same config and data, every step logged, no periodic
   checkpoint) sent ``scancel --signal=USR2`` once step 2 is logged; it saves, exits 42, requeues
   itself and resumes. Times from the signal to the first step logged by the requeued attempt.

Wall times are this process's clock; job Submit/Eligible/Start/End come from sacct (1 s resolution).
Queue waits (Start - Eligible: a job could run but its CPUs were busy, e.g. with colleagues' jobs)
are shown apart and subtracted in the "ratio without queue waits". The judge is the same on both
sides (a local vLLM server for judge.serve_model unless OPENAI_API_KEY is set). Exits non-zero only
when a run fails, never for missing the target (slurm / local <= 1.10).

    .venv/bin/python bench/pipeline_overhead.py [--steps N] [--prompts N] [--skip-local] [--json OUT] [--keep]
    .venv/bin/python bench/pipeline_overhead.py --steps 4 --prompts 8   # smaller; vLLM starts dominate either way

Needs root (the cluster). The demo settings take about an hour on 2 quiet cores (each side: training
with its final validation, three vLLM CPU engine starts, 64 judged pairs), several times that on a loaded machine.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/smollm2_cpu.yaml"
# the HH file beside the checkout, as the Makefile and the tests find it (HH_DATA wins)
HH_DATA = os.environ.get("HH_DATA") or str(ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz")
CLUSTER_DIR = os.environ.get("HHDPO_SLURM_DIR", "/tmp/hhdpo-slurm")
TARGET = 1.10
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE"}


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, env=None, check=True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=120, **kw)
    if check and p.returncode:
        raise BenchError(f"{cmd if isinstance(cmd, str) else shlex.join(map(str, cmd))} exited {p.returncode}:\n"
                         f"{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return p


def recipe(target: str, **make_vars: str) -> list[str]:
    """The shell commands ``make TARGET`` runs (``make -n``), continuation lines joined."""
    out = run(["make", "-n", "-s", "-C", str(ROOT), target, *(f"{k}={v}" for k, v in make_vars.items())]).stdout
    return [c.strip() for c in re.sub(r"\\\n\s*", " ", out).splitlines() if c.strip()]


def ts(text: str) -> float | None:
    """sacct's local timestamp (2026-11-25T16:11:47) as epoch seconds; None for Unknown/None."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- the cluster


def join_cluster() -> tuple[dict, bool, object]:
    """Start (or join) the local cluster; returns (env with SLURM_CONF, started here, shared lock)."""
    Path(CLUSTER_DIR).mkdir(parents=True, exist_ok=True)
    lock = open(Path(CLUSTER_DIR) / "users.lock", "a")  # noqa: SIM115 - held until the end, as the tests do
    fcntl.flock(lock, fcntl.LOCK_SH)
    env = dict(os.environ, HHDPO_SLURM_STARTED_BY="bench")
    p = subprocess.run(["bash", str(ROOT / "slurm/cluster/start.sh"), CLUSTER_DIR], env=env, capture_output=True,
                       text=True, timeout=300, check=False)
    if p.returncode:
        raise BenchError(f"slurm/cluster/start.sh exited {p.returncode}:\n{p.stdout}{p.stderr}")
    exports = dict(line[7:].split("=", 1) for line in p.stdout.splitlines() if line.startswith("export ") and "=" in line)
    env = dict(os.environ, **exports)
    return env, "already up" not in p.stderr, lock


def leave_cluster(started: bool, lock, keep: bool) -> None:
    try:
        if started and not keep:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else (a test session) uses it
            except BlockingIOError:
                return
            subprocess.run(["bash", str(ROOT / "slurm/cluster/stop.sh"), CLUSTER_DIR], capture_output=True,
                           timeout=300, check=False)
            log("stopped the cluster this run started")
    finally:
        lock.close()


class Sampler(threading.Thread):
    """Every second: squeue (to count other people's jobs running beside ours)."""

    def __init__(self, env):
        super().__init__(daemon=True)
        self.env, self.ours, self.phase, self.stop = env, set(), "", threading.Event()
        self.foreign: dict[str, set] = {}  # phase -> foreign job ids seen running
        self.samples: dict[str, list] = {}  # phase -> 1-min load averages

    def run(self):
        while not self.stop.wait(1.0):
            phase = self.phase
            if not phase:
                continue
            self.samples.setdefault(phase, []).append(os.getloadavg()[0])
            p = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i"], env=self.env, capture_output=True, text=True,
                               check=False)
            self.foreign.setdefault(phase, set()).update(set(p.stdout.split()) - self.ours)

    def mean(self, phase: str) -> float:
        s = self.samples.get(phase) or [0.0]
        return sum(s) / len(s)

    def summary(self, phase: str) -> str:
        s = self.samples.get(phase) or [0.0]
        return (f"load avg (1 min) mean {sum(s) / len(s):.2f} max {max(s):.2f}; "
                f"{len(self.foreign.get(phase, set()) - self.ours)} other job(s) seen running on the cluster")


def sacct(env, ids, fields=("JobID", "State", "Submit", "Eligible", "Start", "End", "ExitCode"),
          duplicates=False) -> list[dict]:
    cmd = ["sacct", "-X", "-n", "-P", "-j", ",".join(ids), "-o", ",".join(fields)] + (["--duplicates"] if duplicates else [])
    return [dict(zip(fields, ln.split("|"))) for ln in run(cmd, env=env).stdout.splitlines() if ln.strip()]


def wait_jobs(env, ids, timeout: float) -> dict[str, dict]:
    """Wait until every job is final in sacct (after requeues); returns its rows by id."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        rows = {r["JobID"]: r for r in sacct(env, ids)}
        if all(i in rows and rows[i]["State"].split()[0] in FINAL for i in ids):
            return rows
        time.sleep(2)
    raise BenchError(f"jobs {ids} not finished after {timeout:.0f} s")


# --------------------------------------------------------------------------- phases


def local_demo(args, run_dir: Path, sampler) -> dict:
    cmds = recipe("demo", DEMO_DIR=str(run_dir), HH_DATA=args.data, ARGS=" ".join(args.overrides))
    sampler.phase, stages, t0 = "local", [], time.time()
    for cmd in cmds:
        log(f"local: {cmd}")
        t = time.time()
        with open(run_dir.parent / "local.log", "a") as out:
            rc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
        stages.append({"cmd": cmd, "seconds": time.time() - t})
        if rc:
            raise BenchError(f"local demo: exited {rc}: {cmd}\n" + (run_dir.parent / "local.log").read_text()[-3000:])
    wall = time.time() - t0
    sampler.phase = ""
    return {"wall": wall, "train": stages[0]["seconds"], "eval": sum(s["seconds"] for s in stages[1:]),
            "commands": [s["cmd"] for s in stages], "load": sampler.summary("local"),
            "load_mean": sampler.mean("local")}


def slurm_pipeline(args, env, run_dir: Path, sampler) -> dict:
    extra = ["dataset.subset='train[:90%]'", f"run_dir={run_dir}", *args.overrides, "HH_test.split='test[90%:]'"]
    (cmd,) = recipe("submit", HH_DATA=args.data, ARGS=" ".join(extra))
    env = dict(env)
    for stage in ("TRAIN", "GENERATE", "JUDGE"):
        env.setdefault(f"HHDPO_{stage}_SBATCH", f"--cpus-per-task={args.cpus}" if args.cpus else "")
    log(f"slurm: {cmd}  (HHDPO_*_SBATCH={env['HHDPO_TRAIN_SBATCH']!r})")
    sampler.phase, t0 = "slurm", time.time()
    p = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    t_submitted = time.time()
    ids = dict(re.findall(r"^(train|generate|judge): job (\d+)$", p.stdout, re.MULTILINE))
    if p.returncode or list(ids) != ["train", "generate", "judge"]:
        raise BenchError(f"pipeline.sh exited {p.returncode}:\n{p.stdout}{p.stderr}")
    sampler.ours.update(ids.values())
    log(f"slurm: jobs {ids}")
    rows = wait_jobs(env, list(ids.values()), args.timeout)
    sampler.phase = ""
    logs = run_dir / "slurm" / "logs"
    for stage, job in ids.items():
        if rows[job]["State"] != "COMPLETED":
            tail = (logs / f"hhdpo-{stage}-{job}.out").read_text(errors="replace")[-3000:] if logs.is_dir() else ""
            raise BenchError(f"slurm {stage} job {job}: {rows[job]['State']} ({rows[job]['ExitCode']})\n{tail}")
    jobs = {}
    for stage, job in ids.items():
        r = rows[job]
        submit, elig, start, end = (ts(r[k]) for k in ("Submit", "Eligible", "Start", "End"))
        elig = elig or submit
        jobs[stage] = {"job": job, "submit": submit, "eligible": elig, "start": start, "end": end,
                       "run": end - start, "queue": max(0.0, start - max(elig, submit))}
    hops = []
    for a, b in (("train", "generate"), ("generate", "judge")):
        ja, jb = jobs[a], jobs[b]
        hops.append({"hop": f"{a}->{b}", "seconds": jb["start"] - ja["end"],
                     "release": max(0.0, jb["eligible"] - ja["end"]), "queue": jb["queue"]})
    wall = jobs["judge"]["end"] - t0
    return {"wall": wall, "submit_s": t_submitted - t0, "first_start": jobs["train"]["start"] - t0, "jobs": jobs,
            "hops": hops, "queue": sum(j["queue"] for j in jobs.values()), "command": cmd, "ids": ids,
            "load": sampler.summary("slurm"), "load_mean": sampler.mean("slurm")}


class Watch(threading.Thread):
    """Polls files every 0.1 s; records when each pattern (or metrics step) is first seen."""

    def __init__(self):
        super().__init__(daemon=True)
        self.seen, self.files, self.stop = {}, {}, threading.Event()  # name -> (path, regex)
        self.metrics: Path | None = None
        self.steps: dict[int, float] = {}  # step -> first seen (latest attempt's rows overwrite)

    def run(self):
        while not self.stop.wait(0.1):
            now = time.time()
            for name, (path, rx) in list(self.files.items()):
                if name not in self.seen and path.is_file():
                    m = re.search(rx, path.read_text(errors="replace"))
                    if m:
                        self.seen[name] = (now, m)
            if self.metrics and self.metrics.is_file():
                for line in self.metrics.read_text().splitlines():
                    try:
                        step = json.loads(line).get("step")
                    except ValueError:
                        continue
                    if step is not None and step not in self.steps:
                        self.steps[step] = now


def usr2_requeue(args, env, run_dir: Path, sampler) -> dict:
    run_dir.mkdir()
    overrides = [f"dataset.dataset_name={args.data}", "dataset.subset=train[:90%]", f"run_dir={run_dir}",
                 f"dpo_training.max_steps={args.usr2_steps}", "dpo_training.log_steps=1", "checkpoint.save_steps=0"]
    cmd = ["sbatch", "--parsable", "-o", str(run_dir / "train-%j.out"), *([f"--cpus-per-task={args.cpus}"] if args.cpus else []),
           str(ROOT / "slurm/train.sbatch"), "--config", str(ROOT / CONFIG), *overrides]
    log(f"usr2: {shlex.join(cmd)}")
    sampler.phase = "usr2"
    job = run(cmd, env=dict(env, HHDPO_BIN=str(ROOT / ".venv/bin")), cwd=ROOT).stdout.strip().split(";")[0]
    sampler.ours.add(job)
    w = Watch()
    w.metrics = run_dir / "model" / "metrics.jsonl"
    logs = run_dir / "slurm" / "logs"
    w.files = {"saved0": (logs / f"train-{job}-attempt0.log", r"\[ckpt\] saved"),
               "preempted0": (logs / f"train-{job}-attempt0.log", r"\[train\] preempted at step (\d+)"),
               "log1": (logs / f"train-{job}-attempt1.log", r"attempt 1 on"),
               "resumed1": (logs / f"train-{job}-attempt1.log", r"\[ckpt\] resumed from .* at step (\d+)")}
    w.start()
    end = time.monotonic() + args.timeout
    while 2 not in w.steps:
        rows = sacct(env, [job], ("JobID", "State"))  # none until slurmdbd has the job
        if time.monotonic() > end or (rows and rows[0]["State"].split()[0] in FINAL):
            raise BenchError(f"usr2 job {job}: never reached step 2\n" + (run_dir / f"train-{job}.out").read_text()[-3000:])
        time.sleep(0.2)
    at_signal = max(w.steps)
    t_sig = time.time()
    run(["scancel", "--signal=USR2", job], env=env)
    log(f"usr2: job {job} sent USR2 after step {at_signal} was logged")
    wait_jobs(env, [job], args.timeout)
    time.sleep(1.0)  # the watcher's last poll
    w.stop.set()
    sampler.phase = ""
    rows = sacct(env, [job], ("JobID", "State", "Eligible", "Start", "End"), duplicates=True)
    states = [r["State"].split()[0] for r in rows]
    if states != ["REQUEUED", "COMPLETED"] or not {"preempted0", "resumed1"} <= w.seen.keys():
        raise BenchError(f"usr2 job {job}: states {states}, seen {sorted(w.seen)}\n"
                         + (run_dir / f"train-{job}.out").read_text(errors="replace")[-3000:])
    stop_step = int(w.seen["preempted0"][1].group(1))
    end0, start1 = ts(rows[0]["End"]), ts(rows[1]["Start"])
    elig1 = min(max(ts(rows[1]["Eligible"]) or end0, end0), start1)
    t_stop_row = w.steps.get(stop_step, t_sig)
    t_saved, t_resumed = w.seen["saved0"][0], w.seen["resumed1"][0]
    t_log1 = max(start1, w.seen.get("log1", (start1,))[0])
    first = min((s for s in w.steps if s > stop_step), default=None)
    if first is None:
        raise BenchError(f"usr2 job {job}: no step after {stop_step} logged")
    t_first = w.steps[first]
    parts = [("finish the step in flight", max(0.0, t_stop_row - t_sig)),
             ("save checkpoint (DCP)", t_saved - max(t_sig, t_stop_row)),
             ("exit 42 + scontrol requeue", end0 - t_saved),
             ("requeued -> eligible again", elig1 - end0),
             ("eligible -> start (scheduler/queue)", start1 - elig1),
             ("batch script start (job-start)", t_log1 - start1),
             ("srun, imports, model load, resume", t_resumed - t_log1),
             ("first resumed step", t_first - t_resumed)]
    return {"job": job, "signal_after_step": at_signal, "stopped_at_step": stop_step, "first_resumed_step": first,
            "total": t_first - t_sig, "parts": parts, "load": sampler.summary("usr2")}


# --------------------------------------------------------------------------- main


def report(args, local, slurm, usr2) -> dict:
    judge = "OpenAI API (OPENAI_API_KEY set)" if os.environ.get("OPENAI_API_KEY") else "local vLLM server (judge.serve_model)"
    print(f"\npipeline overhead: {CONFIG}, {args.steps_eff} steps, {args.prompts_eff} prompts, data {args.data}; "
          f"judge: {judge}; {os.cpu_count()} cores, --cpus-per-task={args.cpus or 'default'} per job")
    print(f"{'':34}{'wall s':>9}{'train s':>9}{'eval s':>9}  notes")
    if local:
        print(f"{'local (make demo)':34}{local['wall']:9.1f}{local['train']:9.1f}{local['eval']:9.1f}  {local['load']}")
    j = slurm["jobs"]
    print(f"{'slurm (pipeline.sh, submit->end)':34}{slurm['wall']:9.1f}{j['train']['run']:9.1f}"
          f"{j['generate']['run'] + j['judge']['run']:9.1f}  {slurm['load']}")
    print(f"  submit (pipeline.sh returns) {slurm['submit_s']:.1f} s; submit -> train start {slurm['first_start']:.1f} s; "
          f"queue waits (eligible, CPUs busy) {slurm['queue']:.0f} s")
    for s, jj in j.items():
        print(f"  {s:<9} job {jj['job']:<6} run {jj['run']:6.0f} s  queue {jj['queue']:4.0f} s")
    for h in slurm["hops"]:
        print(f"  hop {h['hop']:<18} {h['seconds']:4.0f} s (end -> start; dependency release {h['release']:.0f} s, "
              f"queue {h['queue']:.0f} s)")
    res = {"config": CONFIG, "steps": args.steps_eff, "prompts": args.prompts_eff, "judge": judge, "local": local,
           "slurm": slurm, "usr2": usr2, "target": TARGET}
    if local:
        ratio = slurm["wall"] / local["wall"]
        clean = (slurm["wall"] - slurm["queue"]) / local["wall"]
        res.update(ratio=ratio, ratio_without_queue=clean)
        print(f"RESULT overhead slurm / local = {ratio:.3f} (target <= {TARGET}); without queue waits {clean:.3f}; "
              f"{'meets' if clean <= TARGET else 'misses'} the target")
        busy = max(local["load_mean"], slurm["load_mean"])
        if busy > (os.cpu_count() or 1):
            print(f"WARNING: mean load {local['load_mean']:.1f} (local) vs {slurm['load_mean']:.1f} (slurm) on "
                  f"{os.cpu_count()} cores: other work shared the CPUs, so the ratio measures that load as much as "
                  "the orchestration; rerun on a quiet machine")
    hops = [h["seconds"] for h in slurm["hops"]]
    print(f"RESULT dependency hop (job end -> next job start) = {sum(hops) / len(hops):.1f} s mean "
          f"({', '.join(f'{x:.0f}' for x in hops)}; sacct, 1 s resolution)")
    if usr2:
        print(f"RESULT USR2 -> first resumed step = {usr2['total']:.1f} s (job {usr2['job']}: signal after step "
              f"{usr2['signal_after_step']}, checkpoint at step {usr2['stopped_at_step']}, resumed step "
              f"{usr2['first_resumed_step']}; {usr2['load']})")
        for name, s in usr2["parts"]:
            print(f"  {name:<30} {s:6.1f} s")
    print(f"machine: {load()}; other people's jobs seen running share the same {os.cpu_count()} cores")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, help="dpo_training.max_steps (default: the config's)")
    p.add_argument("--prompts", type=int, help="HH_test.num_sample (default: the config's)")
    p.add_argument("--skip-local", action="store_true", help="only the SLURM side (no ratio)")
    p.add_argument("--skip-usr2", action="store_true", help="no preemption measurement")
    p.add_argument("--usr2-steps", type=int, default=6, help="steps of the preempted job (default: 6)")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="--cpus-per-task per job (0: sbatch default; "
                   "default: this machine's cores, the threads the local demo uses)")
    p.add_argument("--data", default=HH_DATA, help=f"HH file (default: {HH_DATA})")
    p.add_argument("--timeout", type=float, default=3600, help="per phase, s (default: 3600)")
    p.add_argument("--json", metavar="OUT", help="write the figures as JSON")
    p.add_argument("--keep", action="store_true", help="keep the run directories (and a cluster this run started)")
    args = p.parse_args(argv)
    if not Path(args.data).is_file():
        p.error(f"{args.data}: no such file")
    args.overrides = ([f"dpo_training.max_steps={args.steps}"] if args.steps else []) + \
                     ([f"HH_test.num_sample={args.prompts}"] if args.prompts else [])
    sys.path.insert(0, str(ROOT))
    from hhdpo.core.config import load_config

    cfg = load_config(ROOT / CONFIG, args.overrides)
    args.steps_eff, args.prompts_eff = cfg.dpo_training.max_steps, cfg.HH_test.num_sample
    work = Path(tempfile.mkdtemp(prefix="hhdpo-bench-", dir="/tmp"))
    work.chmod(0o755)  # both "nodes" read it
    log(f"run directories in {work}; {load()}")
    env, started, lock = join_cluster()
    sampler = Sampler(env)
    sampler.start()
    local = slurm = usr2 = None
    try:
        if not args.skip_local:
            local = local_demo(args, work / "local", sampler)
            log(f"local: {local['wall']:.1f} s; {load()}")
        slurm = slurm_pipeline(args, env, work / "slurm", sampler)
        log(f"slurm: {slurm['wall']:.1f} s; {load()}")
        failed = None
        if not args.skip_usr2:
            try:
                usr2 = usr2_requeue(args, env, work / "usr2", sampler)
                log(f"usr2: {usr2['total']:.1f} s; {load()}")
            except BenchError as e:  # still report the pipeline's figures
                failed = e
        res = report(args, local, slurm, usr2)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
        if failed:
            raise failed
        return 0
    except BenchError as e:
        print(f"pipeline_overhead: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        sampler.stop.set()
        if sampler.ours:  # anything of ours still queued or running (an error, ^C)
            subprocess.run(["scancel", *sampler.ours], env=env, capture_output=True, check=False)
        leave_cluster(started, lock, args.keep)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
