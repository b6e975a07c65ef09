"""A fake SLURM for tests: one script installed as sbatch, squeue, sacct, scancel, scontrol and srun
(runner_helpers.FakeSlurm puts it on PATH). It keeps its jobs in $FAKE_SLURM_DIR/jobs.json, and a test makes it
answer as a real cluster would — or fail (<command>.fail holds the error line) or hang (<command>.hang).

jobs.json: {job id: {"name": str, "tasks": N or null (not an array), "queue": {task: "STATE|reason"},
"accounting": {task: "STATE|exit code"}}}; task "" is the job itself when it is not an array.
"""

import json
import os
import re
import sys
import time
from pathlib import Path

DIR = Path(os.environ["FAKE_SLURM_DIR"])
JOBS = DIR / "jobs.json"


def load() -> dict:
    return json.loads(JOBS.read_text()) if JOBS.exists() else {}


def save(jobs: dict) -> None:
    JOBS.write_text(json.dumps(jobs))


def task_ids(job_id: str, job: dict) -> list[tuple[str, str]]:
    if job["tasks"] is None:
        return [("", job_id)]
    return [(str(i), f"{job_id}_{i}") for i in range(job["tasks"])]


def option(args: list[str], name: str) -> str | None:
    for index, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and index + 1 < len(args):
            return args[index + 1]
    return None


def sbatch(args: list[str]) -> int:
    script = Path(args[-1]).read_text()
    jobs = load()
    job_id = str(max([int(j) for j in jobs] + [1000]) + 1)
    name = re.search(r"^#SBATCH --job-name=(\S+)", script, re.M).group(1).strip("'")
    array = re.search(r"^#SBATCH --array=0-(\d+)", script, re.M)
    tasks = int(array.group(1)) + 1 if array else None
    job = {"name": name, "tasks": tasks, "queue": {}, "accounting": {}}
    for task, _ in task_ids(job_id, job):
        job["queue"][task] = "PENDING|None"
    jobs[job_id] = job
    save(jobs)
    (DIR / f"sbatch-{job_id}.sh").write_text(script)
    print(f"Submitted batch job {job_id}")
    return 0


def squeue(args: list[str]) -> int:
    names = option(args, "--name")
    wanted = set(names.split(",")) if names else None
    for job_id, job in load().items():
        if wanted is not None and job["name"] not in wanted:
            continue
        for task, full in task_ids(job_id, job):
            if task in job["queue"]:
                state, reason = job["queue"][task].split("|")
                print(f"{full}|{state}|{reason}|{job['name']}")
    return 0


def sacct(args: list[str]) -> int:
    ids = option(args, "-j")
    names = option(args, "--name")
    for job_id, job in load().items():
        if ids is not None and job_id not in ids.split(","):
            continue
        if names is not None and job["name"] not in names.split(","):
            continue
        for task, full in task_ids(job_id, job):
            if task in job["accounting"]:
                state, exit_code = job["accounting"][task].split("|")
                print(f"{full}|{state}|{exit_code}|{job['name']}")
            elif task in job["queue"]:
                print(f"{full}|{job['queue'][task].split('|')[0]}|0:0|{job['name']}")
    return 0


def scancel(args: list[str]) -> int:
    jobs = load()
    code = 0
    names = option(args, "--name")
    targets = [a for a in args if not a.startswith("-")]
    if names:
        targets += [f"{j}" for j, job in jobs.items() if job["name"] in names.split(",")]
    for target in targets:
        job_id, _, task = target.partition("_")
        job = jobs.get(job_id)
        tasks = [task] if task else [t for t, _ in task_ids(job_id, job)] if job else []
        if job is None or not all(t in job["queue"] for t in tasks):
            print(f"scancel: error: Kill job error on job id {target}: Invalid job id specified", file=sys.stderr)
            code = 1
            continue
        for t in tasks:
            job["queue"].pop(t, None)
            job["accounting"][t] = "CANCELLED by 0|0:15"
    save(jobs)
    return code


def main() -> int:
    command = os.environ.get("FAKE_SLURM_AS") or Path(sys.argv[0]).name
    args = sys.argv[1:]
    with open(DIR / "calls.log", "a") as log:
        log.write(json.dumps([command, *args]) + "\n")
    if (DIR / f"{command}.hang").exists():
        time.sleep(600)
    failure = DIR / f"{command}.fail"
    if failure.exists():
        print(failure.read_text().strip(), file=sys.stderr)
        return 1
    if command == "scontrol":
        print("MaxArraySize            = 1001")
        return 0
    if command == "srun":
        return 0
    if command in ("sinfo", "sacctmgr"):
        # The fake cluster's partitions (sinfo) and this user's accounts (sacctmgr), one per line, as the test
        # set them (FakeSlurm.names); none set, it lists none.
        names = DIR / f"{command}.names"
        if names.exists():
            print(names.read_text().strip())
        return 0
    return {"sbatch": sbatch, "squeue": squeue, "sacct": sacct, "scancel": scancel}[command](args)


if __name__ == "__main__":
    sys.exit(main())
