"""Run a script under Lightning's DDP strategy with 2 CPU processes (gloo) from a test.

Inside pytest, ``strategy="ddp"`` would re-launch the whole pytest command as rank 1, so the
tests run a standalone script in a subprocess instead. Convention: the script takes the output
folder as its first argument and every rank writes ``rank{N}.json`` there.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port the OS has just handed out (not one a previous run may still hold)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def finish_distributed() -> None:
    """End a 2-process test script: barrier, destroy the process group, exit without teardown.

    Lightning's strategies leave the process group alive after ``fit``, and
    ``destroy_process_group`` does not end it either: it only drops the registry's
    references, while FSDP2's modules (their ``FSDPMeshInfo``) and other references, some
    from C++, keep the gloo group, and with it its three threads (two ``pt_gloo_runloop``
    workers and the ``gloo_tcp_loop``), alive until the interpreter's teardown (seen in
    ``/proc/self/task`` after ``destroy_process_group``, ``del`` of the model and the mesh and
    ``gc.collect()``, torch 2.13). A process exiting normally
    then tears the interpreter down under running gloo threads, which aborted now and then
    ("terminate called without an active exception", SIGABRT, about 1 run in 10 of a
    2-process script, after every result had been written; more rarely with the group
    destroyed first), failing the test for no fault of the code under test (torch issue
    #190489). So, once both processes have passed the barrier and the group is gone, the
    process flushes its streams and leaves with ``os._exit(0)``: no teardown runs. Call it
    last, after the results are written, in every 2-process script (``torch.multiprocessing``
    workers included: the parent sees exit code 0).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ddp(script: Path, out_dir: Path, *args: str, timeout: float = 240) -> list[dict]:
    """Run ``script out_dir *args`` and return the parsed ``rank0.json``, ``rank1.json``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    env.setdefault("TMPDIR", str(out_dir))
    env["MASTER_ADDR"] = "127.0.0.1"
    env["MASTER_PORT"] = str(free_port())
    proc = subprocess.run(
        [sys.executable, str(script), str(out_dir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"DDP script failed ({proc.returncode}).\nSTDOUT:\n{proc.stdout[-4000:]}\n"
            f"STDERR:\n{proc.stderr[-6000:]}"
        )
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
