"""A real SLURM: `scripts/slurm/run.sbatch` submitted with `sbatch` to a two-node cluster on this machine.

tests/test_multi_host.py checks the commands the script builds against fake `srun`/`scontrol`; this
file runs Debian's SLURM (22.05: slurmctld, two slurmd, munge) so that what SLURM really sets and
does is what the script meets: SLURM_NODEID per task, `scontrol show node`, and a requeue (what a
preemption does) that kills the job mid-run and starts it again on the same output folder.

How two nodes fit on one host, with Debian's build (no --enable-multiple-slurmd is needed): each
node is its own `slurmd -N brnodeK` with its own `Port=`, and the spool folder, pid file and log are
named per node with `%n`. Both nodes have `NodeAddr=127.0.0.1` and names that do not resolve
(`brnode1`, `brnode2`), so the run works only if the main address is taken from SLURM's `NodeAddr`.
munged runs with a key generated for the test, on a socket of its own (`AuthInfo=socket=...`);
everything lives in one temporary folder, on ports picked free, and is stopped at the end.

The daemons must run as root (slurmd starts jobs as their user), as in CI; without root or without
the packages (`apt-get install slurmctld slurmd slurm-client munge`), the tests are skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT, assert_both_ranks_took_part, free_port, photo, write_manifest

pytestmark = pytest.mark.slow

SBATCH = ROOT / "scripts" / "slurm" / "run.sbatch"
NODES = ("brnode1", "brnode2")  # names no resolver knows: only NodeAddr says where they are
TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")


def wait_for(what: str, check: Callable[[], object], timeout: float, every: float = 0.3) -> object:
    """Poll `check` until it returns something true, or fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@dataclass
class Cluster:
    folder: Path
    conf: Path
    daemons: list[subprocess.Popen]

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment pointed at this cluster, without any SLURM job's variables."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env.pop("MAIN_PROCESS_IP", None)
        env.pop("MASTER_PORT", None)
        return env | {"SLURM_CONF": str(self.conf)} | extra

    def tool(self, *command: str, check: bool = True) -> str:
        proc = subprocess.run(command, env=self.env(), capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); sacct needs slurmdbd."""
        text = self.tool("scontrol", "show", "job", "--oneliner", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in (self.folder / "log").glob("*")
        )


def slurm_conf(folder: Path, munge_socket: Path, ctld_port: int, node_ports: list[int]) -> str:
    """A cluster of two one-CPU nodes on 127.0.0.1, no accounting, no cgroups (they need a real host)."""
    nodes = "\n".join(
        f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs=1 State=UNKNOWN"
        for name, port in zip(NODES, node_ports, strict=True)
    )
    return f"""\
ClusterName=brtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/spool/slurmd-%n.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
# the main loop, which starts a requeued job once it may start, runs every 60 s by default
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=5
MinJobAge=3600
SlurmdTimeout=60
{nodes}
PartitionName=br Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


def processes_of(conf: Path) -> list[int]:
    """Processes started for this cluster: those whose environment names its slurm.conf."""
    mine = f"SLURM_CONF={conf}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if mine in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def stop(cluster: Cluster) -> None:
    """Cancel every job, then stop the daemons' process groups, then anything left of the jobs."""
    try:
        cluster.tool("scancel", "--full", "--partition=br", check=False)
        deadline = time.monotonic() + 30
        while cluster.tool("squeue", "-h", check=False).strip() and time.monotonic() < deadline:
            time.sleep(0.5)
    except (OSError, subprocess.SubprocessError):
        pass
    for daemon in reversed(cluster.daemons):
        try:
            os.killpg(daemon.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    for daemon in reversed(cluster.daemons):
        try:
            daemon.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=15)
    for pid in processes_of(cluster.conf):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    missing = [tool for tool in TOOLS if not shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        pytest.skip(
            f"SLURM is not installed (no {', '.join(missing)}): apt-get install slurmctld slurmd slurm-client munge"
        )
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs (CI runs as root)")
    for name in NODES:
        try:
            socket.getaddrinfo(name, None)
            pytest.skip(f"the node name {name} resolves here, so the test could not show that NodeAddr is used")
        except socket.gaierror:
            pass

    folder = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "state", "log", *(f"spool/{name}" for name in NODES)):
        (folder / sub).mkdir(parents=True)
    (folder / "munge").chmod(0o700)
    munge_socket = folder / "munge" / "socket"
    assert len(str(munge_socket)) < 100, f"{munge_socket} is too long for a Unix socket; set a shorter --basetemp"
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, munge_socket, free_port(), [free_port() for _ in NODES]))
    sbin = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"

    cluster = Cluster(folder, conf, [])
    env = cluster.env(PATH=sbin)

    def start(*command: str, log: str) -> None:
        with open(folder / "log" / log, "w") as out:
            cluster.daemons.append(
                subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            )

    try:
        key = folder / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], env=env, check=True, capture_output=True)
        start(
            "munged",
            "--foreground",
            "--force",  # the temporary folder's parents are not root-only, which munged would refuse
            f"--socket={munge_socket}",
            f"--key-file={key}",
            f"--pid-file={folder}/munge/munged.pid",
            f"--log-file={folder}/log/munged.log",
            f"--seed-file={folder}/munge/munged.seed",
            log="munged.out",
        )

        def munge_works() -> bool:
            cred = subprocess.run(["munge", "-n", "-S", str(munge_socket)], capture_output=True, timeout=10)
            return cred.returncode == 0

        wait_for("munged to answer", munge_works, timeout=30)
        start("slurmctld", "-D", "-i", "-f", str(conf), log="slurmctld.out")
        for name in NODES:
            start("slurmd", "-D", "-N", name, "-f", str(conf), log=f"slurmd-{name}.out")

        def both_idle() -> bool:
            for daemon in cluster.daemons:
                assert daemon.poll() is None, f"{daemon.args[0]} exited {daemon.returncode}:\n{cluster.logs()}"
            states = cluster.tool("sinfo", "-h", "-N", "-o", "%N %T", check=False)
            return sorted(tuple(line.split()) for line in states.splitlines()) == [(name, "idle") for name in NODES]

        wait_for("both nodes to be idle in sinfo", both_idle, timeout=90)
        yield cluster
    finally:
        stop(cluster)


def jobs(folder: Path, count: int) -> tuple[Path, list[str]]:
    rows = [
        {"id": f"r{i}", "image": str(photo(folder / "in" / f"{i}.png", seed=i)), "prompt": f"a boat number {i}"}
        for i in range(count)
    ]
    return write_manifest(folder / "jobs.csv", rows), [row["id"] for row in rows]


def submit(cluster: Cluster, folder: Path, *overrides: str) -> str:
    """`sbatch scripts/slurm/run.sbatch ...` as the README says, on both nodes, without GPUs."""
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=2",
            "--gpus-per-node=0",  # the script asks for 8 by default; these nodes have none
            "--open-mode=append",  # a requeued run adds to the job's log instead of replacing it
            str(SBATCH),
            *overrides,
        ],
        cwd=folder,
        env=cluster.env(
            BATCH_RUNNER_DIR=str(ROOT),
            ACCELERATE=f"{sys.executable} -m accelerate.commands.accelerate_cli",
            MASTER_PORT=str(free_port()),  # parallel test sessions never share the job-id port
            OMP_NUM_THREADS="1",  # two "nodes" on one machine share its cores
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def wait_until_over(cluster: Cluster, job_id: str, log: Path, timeout: float = 900) -> dict[str, str]:
    def over() -> dict[str, str] | None:
        job = cluster.job(job_id)
        return job if job["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED") else None

    try:
        return wait_for(f"job {job_id} to end", over, timeout=timeout, every=1)
    except pytest.fail.Exception:
        print(log.read_text(errors="replace")[-6000:] if log.exists() else "no job log", cluster.logs(), sep="\n")
        raise


def parts(out: Path) -> list[dict]:
    return [
        json.loads(line)
        for part in sorted((out / "parts").glob("*.jsonl"))
        for line in part.read_text().splitlines()
        if line.strip()
    ]


def assert_every_row_once(out: Path, ids: list[str]) -> pd.DataFrame:
    made = Counter(row["id"] for row in parts(out))
    assert made == Counter(ids), f"every row made exactly once, over every run: {made}"
    table = pd.read_parquet(out / "results.parquet")
    assert sorted(table["id"]) == sorted(ids) and table["id"].is_unique
    assert (table["status"] == "ok").all(), table[["id", "status", "error"]]
    assert sorted(p.name for p in (out / "videos").glob("*.mp4")) == sorted(f"{i}.mp4" for i in ids)
    return table


def test_sbatch_on_two_real_slurm_nodes_makes_every_row_once_meeting_at_the_first_nodes_node_addr(
    cluster: Cluster, tmp_path: Path
) -> None:
    manifest, ids = jobs(tmp_path, 6)
    job_id = submit(cluster, tmp_path, f"manifest={manifest.name}", "output_dir=out", "model=tiny", "chunk_size=1")
    log = tmp_path / f"slurm-{job_id}.out"

    def launches() -> list[tuple[str, str]] | None:
        text = log.read_text(errors="replace") if log.exists() else ""
        found = sorted(re.findall(r"node (\d) of 2 \(.*--main_process_ip (\S+) ", text))
        if len(found) < 2 and cluster.job(job_id)["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING"):
            pytest.fail(f"job {job_id} ended before both nodes launched:\n{text[-6000:]}")
        return found if len(found) == 2 else None

    # brnode1 resolves nowhere: the main address is its NodeAddr, read from `scontrol show node`.
    # (Checked as soon as both nodes log their command: with the name, they would wait on a lookup.)
    assert wait_for("both nodes to log their launch", launches, timeout=600) == [("0", "127.0.0.1"), ("1", "127.0.0.1")]
    job = wait_until_over(cluster, job_id, log)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text(errors="replace")[-6000:]
    table = assert_every_row_once(tmp_path / "out", ids)
    assert_both_ranks_took_part(tmp_path / "out", set(table["rank"]))  # rank 1 ran on the second node


def test_a_job_requeued_mid_run_as_a_preemption_does_ends_with_every_row_made_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    manifest, ids = jobs(tmp_path, 8)
    out = tmp_path / "out"
    job_id = submit(
        cluster,
        tmp_path,
        f"manifest={manifest.name}",
        "output_dir=out",
        "model=tiny",
        "model.num_inference_steps=20",  # rows of a second or more, so the requeue lands mid-run
        "chunk_size=1",
    )
    log = tmp_path / f"slurm-{job_id}.out"

    def a_row_is_made() -> bool:
        return any(part.stat().st_size for part in (out / "parts").glob("*.jsonl"))

    def over() -> bool:
        return cluster.job(job_id)["JobState"] not in ("PENDING", "CONFIGURING", "RUNNING")

    wait_for("the first row to be made", lambda: a_row_is_made() or over(), timeout=600)
    assert cluster.job(job_id)["JobState"] == "RUNNING" and not (out / "results.parquet").exists(), "mid-run"
    cluster.tool("scontrol", "requeue", job_id)

    job = wait_until_over(cluster, job_id, log)
    text = log.read_text(errors="replace")
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-6000:]
    runs = sorted({part.name.split(".")[0] for part in (out / "parts").glob("*.jsonl")})
    assert len(runs) == 2, f"a run before the requeue and one after: {runs}"
    assert_every_row_once(out, ids)
    # The second run kept every row the first had made before it was killed, and made only the rest.
    first = [row for part in (out / "parts").glob(f"{runs[0]}.*.jsonl") for row in part.read_text().splitlines()]
    done_before = [int(n) for n in re.findall(r"(\d+) already done before this run", text)]
    assert done_before and done_before[-1] == len(first) >= 1, text[-6000:]


WARM_JOB = """#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks=1
# The README's warm start in a job: a server inside the job, on the job's own socket, then the runs.
export BATCH_RUNNER_WARM=1 BATCH_RUNNER_WARM_SOCKET="$PWD/warm-$SLURM_JOB_ID.sock"
cd "$BATCH_RUNNER_DIR"
"$PYTHON" -m batch_runner.run.warm 2> "$OLDPWD/warm.log" &
until [ -S "$BATCH_RUNNER_WARM_SOCKET" ]; do kill -0 $! || exit 3; sleep 0.2; done
srun --ntasks=1 "$PYTHON" run.py "$@"
status=$?
kill %1; wait
exit $status
"""


def test_a_warm_server_started_in_the_job_serves_the_jobs_srun_steps(cluster: Cluster, tmp_path: Path) -> None:
    """Under a real SLURM, srun's task environment (SLURM_*, SLURMD_NODENAME, ...) differs from the
    job script's only in what launchers set, so the step is forked from the server the job started."""
    manifest, ids = jobs(tmp_path, 3)
    script = tmp_path / "warm.sbatch"
    script.write_text(WARM_JOB)
    proc = subprocess.run(
        ["sbatch", "--parsable", str(script), f"manifest={manifest}", f"output_dir={tmp_path / 'out'}", "model=tiny"],
        cwd=tmp_path,
        env=cluster.env(BATCH_RUNNER_DIR=str(ROOT), PYTHON=sys.executable, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-{job_id}.out"
    job = wait_until_over(cluster, job_id, log)
    text = log.read_text(errors="replace")
    server_log = (tmp_path / "warm.log").read_text(errors="replace") if (tmp_path / "warm.log").exists() else ""
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), text[-6000:] + server_log[-3000:]
    assert "not used" not in text, text[-3000:]
    assert re.search(r"warm server: run \d+: .*output_dir=", server_log), server_log[-3000:]
    assert_every_row_once(tmp_path / "out", ids)
