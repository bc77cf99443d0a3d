"""DPO training on Anthropic HH-RLHF with FSDP2.

    # one node: hhdpo becomes torchrun itself (CPU -> gloo, GPU -> nccl, chosen at run time)
    hhdpo train --config configs/smollm2_cpu.yaml
    hhdpo train --config configs/smollm2_cpu.yaml --nproc-per-node 2 dpo_training.max_steps=40
    # under an existing launcher, the process group is joined as is
    torchrun --nproc-per-node 8 -m hhdpo.train --config configs/llama31_8b.yaml
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 -m hhdpo.train --config ...
    srun --ntasks-per-node 8 python -m hhdpo.train --config configs/llama31_8b.yaml   # one task per GPU

Exit status: 0 done, 2 bad config/input, 42 preempted (checkpoint saved; requeue me).
"""

from __future__ import annotations

import json
import os
import sys
from typing import NoReturn

from hhdpo.core.config import config_reference, run_paths
from hhdpo.core.distenv import adopt_slurm_env, in_distributed_env
from hhdpo.core.stage import StageParser, load_stage_config, run_stage
from hhdpo.launch.torchrun import run_under_torchrun, strip_option
from hhdpo.training.checkpoint import completed_run
from hhdpo.training.runtime import preflight
from hhdpo.training.trainer import run


def cli(argv: list[str] | None = None) -> int:
    ap = StageParser("hhdpo train", __doc__, config_help="YAML config file (e.g. configs/smollm2_cpu.yaml)",
                     epilog="config keys (override any as section.key=value, e.g. dpo_training.dpo_beta=0.05):\n"
                     + config_reference())
    ap.flag("nproc_per_node", type=int, default=1, metavar="N",
            help="ranks to start when not already under torchrun/srun (default 1)")
    args = ap.parse(argv)

    def body() -> int:
        cfg = load_stage_config(args)
        distributed = in_distributed_env() or adopt_slurm_env()
        preflight(cfg)  # on every rank: under srun a rank that skipped it would wait for one that failed
        done = completed_run(cfg)
        if done is not None:
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"[train] {run_paths(cfg).save} holds this run, completed at step {done}: nothing to do "
                      "(another dpo_training.save_dir trains again)", flush=True)
            return 0
        if not distributed:
            fwd = strip_option(list(argv if argv is not None else sys.argv[1:]), "nproc_per_node")
            # workers run `python -m hhdpo train`, which holds stop signals before it imports torch
            return run_under_torchrun("hhdpo", ["train", *fwd], args.nproc_per_node, run_paths(cfg).state)
        rc = run(cfg)
        state = run_paths(cfg).state
        completed = state.is_file() and json.loads(state.read_text()).get("status") == "completed"
        if rc == 0 and completed and int(os.environ.get("RANK", 0)) == 0:
            from hhdpo.evaluation.report import write_report_or_warn

            write_report_or_warn(cfg)
        return rc

    return run_stage("hhdpo train", body)


def main(argv: list[str] | None = None) -> NoReturn:
    """The process entry point (``hhdpo train``, ``python -m hhdpo.train``): :func:`cli`, then exit.

    A worker (a rank of a process group) ends without the interpreter's finalization: FSDP's and
    DeviceMesh's references keep the process groups alive until then, and their C++ destructors
    can abort the finished process there ("terminate called without an active exception", SIGABRT;
    seen on 2 gloo ranks), which torchrun reports as a failed run. Its files are written and W&B
    finished by then. In-process callers (submitit's jobs) call :func:`cli` and exit their own way.
    """
    rc = cli(argv)
    if in_distributed_env():
        import logging

        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    main()
