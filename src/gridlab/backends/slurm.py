"""The ``slurm`` backend: one submitit job array per stage kind, chained along the DAG, returning at once.

Resource model: each stage kind's merged ``[resources]`` (``ResourcesSpec.for_kind``) become sbatch options
(``sbatch_parameters``): cpus, memory, time, nodes × tasks_per_node, GPUs, array parallelism, and the site's own
options (partition, account, qos, constraint, gres, exclude, nodelist, reservation, mail, comment, ``setup`` lines,
any other ``sbatch`` option). ``preflight`` checks that the SLURM commands are here and that the partitions and
accounts the grid names exist.

A SLURM dependency holds a whole array, so one failed task under `afterok` would cancel every task of the next kind,
including those that do not need it. Arrays therefore wait with `afterany` for their upstream tasks to end, and each
task checks its own upstream results first: a stage whose input is missing fails at once, naming it, while its
siblings run. Jobs are ``submitit.helpers.Checkpointable``: on preemption or timeout they requeue and the stage
resumes from its checkpoint.

Each array gets a fresh job name (gridlab-<grid>-<kind>-<token>), written into its stages' submission records before
sbatch runs; the job ids are written after. A crash in between leaves records that name the job, and the next
`submit` or `status` finds the job by that name in squeue/sacct (``observe``: ``reconciled``) instead of submitting
it again.

State: one squeue call for what SLURM still holds, then one sacct call for the jobs squeue no longer shows. Every
terminal SLURM state means something for its stage (``_TERMINAL``: OUT_OF_MEMORY and TIMEOUT name the resource to
raise); squeue/sacct failing or not answering makes the stages ``unknown`` — never failed, never resubmitted.
"""

from __future__ import annotations

import getpass
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from gridlab.backends import Backend, CancelOutcome, run_command, scheduler_timeout_s
from gridlab.backends.records import record_cancel, record_submission
from gridlab.contracts import STAGE_KINDS, resource_table
from gridlab.errors import UserError
from gridlab.layout import RunPaths
from gridlab.results import clear_outcome

# How many explicit array-task dependencies one job may list before we depend on whole arrays instead.
_MAX_TASK_DEPENDENCIES = 200
SLURM_COMMANDS = ("sbatch", "squeue", "sacct", "scancel")
# The site options of a [resources] table that go to sbatch as they are (when set).
SITE_OPTIONS = ("partition", "account", "qos", "constraint", "gres", "exclude", "nodelist", "mail_type", "mail_user",
                "comment")
_SCANCEL_BENIGN = ("Invalid job id specified", "already completing or completed", "Job/step already")


class SlurmBackend(Backend):
    """Submits one job array per stage kind (chunked below MaxArraySize) with dependencies along the DAG (module
    docstring)."""

    name = "slurm"
    finishes = False

    # ------------------------------------------------------------------------------------------ resource model

    def preflight(self, spec, submitting: bool, source: str = "grid") -> list[str]:
        """Its commands must be on PATH (a UserError when submitting; a warning on a dry run), and the partitions
        and accounts the grid's [resources] name must exist (sinfo, sacctmgr): a name the cluster does not have is a
        UserError naming the key; when the cluster cannot say, a warning says they could not be checked."""
        named: dict[str, dict[str, str]] = {"partition": {}, "account": {}}
        for table in type(spec.resources).model_fields:
            for key in named:
                value = getattr(getattr(spec.resources, table), key)
                if value:
                    named[key].setdefault(value, f"resources.{table}.{key}")
        missing = [command for command in SLURM_COMMANDS if shutil.which(command) is None]
        if missing:
            message = (f"--executor slurm: no SLURM commands here ({', '.join(missing)} not on PATH), so the "
                       f"partitions and accounts of [resources] cannot be checked")
            if submitting:
                raise UserError(f"{message}; submit from a machine of the cluster (a login node)")
            return [message]
        warnings = []
        queries = {"partition": ["sinfo", "-h", "-o", "%R"],
                   "account": ["sacctmgr", "-n", "-P", "show", "associations", f"user={getpass.getuser()}",
                               "format=account"]}
        for key, names in named.items():
            if not names:
                continue
            answer = run_command(queries[key])
            known = {word.strip() for word in answer.stdout.split()} if answer.ok else set()
            if not known:
                warnings.append(f"the {key}s of [resources] ({', '.join(sorted(names))}) cannot be checked: "
                                f"{answer.problem or f'{queries[key][0]} lists none'}")
                continue
            for value, where in names.items():
                if value not in known:
                    raise UserError(f"{source}: {where}: {value!r} is not {'an' if key == 'account' else 'a'} {key} "
                                    f"of this cluster{' for this user' if key == 'account' else ''}; valid: "
                                    f"{', '.join(sorted(known))}")
        return warnings

    # ------------------------------------------------------------------------------------------ run

    def run(self, run_dir: Path, plan, triage, states) -> dict[str, str]:
        job_of = {sid: s.job_id for sid, s in states.items() if s.held and s.job_id}
        done = set(triage.done)
        chunk_size = max(1, max_array_size() - 1)
        folder = RunPaths(run_dir).slurm_dir
        outcome = {}
        # Nothing is submitted below a stage that is failed, cancelled or unknown and not rerun: it would only fail
        # for want of its input (or, unknown, wait on a job that may not exist).
        blocked = {s.stage_id for s in triage.failed + triage.unknown + triage.lingering}
        for kind in STAGE_KINDS:
            of_kind = [s for s in triage.to_run if s.kind == kind]
            stages = []
            for stage in of_kind:
                if set(stage.deps.values()) & blocked:
                    blocked.add(stage.id)
                    outcome[stage.id] = "blocked"
                else:
                    stages.append(stage)
            if len(stages) < len(of_kind):
                self.report(f"not submitted: {len(of_kind) - len(stages)} {kind} stage(s) below a failed, cancelled "
                            f"or unknown stage")
            for start in range(0, len(stages), chunk_size):
                chunk = stages[start:start + chunk_size]
                jobs = self._submit_chunk(run_dir, folder, plan, kind, chunk, job_of, done)
                for stage, job in zip(chunk, jobs, strict=True):
                    job_of[stage.id] = job.job_id
                    outcome[stage.id] = "submitted"
                self.report(f"submitted {len(chunk)} {kind} stage(s) as {'array ' if len(chunk) > 1 else 'job '}"
                            f"{jobs[0].job_id.split('_')[0]}")
        return outcome

    def _submit_chunk(self, run_dir, folder, plan, kind, chunk, job_of, done):
        resources = plan.spec.resources.for_kind(kind)
        name = f"gridlab-{plan.spec.name}-{kind}-{secrets.token_hex(4)}"
        executor = _Submitter(folder=folder / "%j")
        parameters = sbatch_parameters(resources, name)
        dependency = _dependency([dep for stage in chunk for dep in stage.deps.values() if dep not in done], job_of)
        if dependency:
            parameters.setdefault("additional_parameters", {})["dependency"] = dependency
        executor.update_parameters(**parameters)
        asked = {key: resources[key] for key in ("mem_gb", "time_min")}
        for index, stage in enumerate(chunk):
            clear_outcome(RunPaths(run_dir).stage(stage.id))
            record_submission(run_dir, stage.id, self.name, None, job_name=name,
                              array_task=str(index) if len(chunk) > 1 else None, resources=asked)
        ids = [stage.id for stage in chunk]
        try:
            jobs = executor.map_array(StageJob(), [str(run_dir)] * len(ids), ids)
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as error:
            message = (str(error).strip().splitlines() or ["sbatch gave no message"])[-1]
            timed_out = getattr(error.__cause__, "returncode", None) == 124
            if timed_out or isinstance(error, submitit.core.utils.FailedSubmissionError):
                # sbatch hung or answered something unreadable: the job may exist. The records name it, and the
                # next submit or status looks it up by that name.
                what = (f"did not answer within {3 * scheduler_timeout_s():g} s" if timed_out
                        else f"answered something unreadable ({message})")
                raise UserError(f"sbatch {what} while submitting {len(ids)} {kind} stage(s) as {name}; whether "
                                f"SLURM has them is unknown until it answers: run `gridlab status` or `gridlab "
                                f"submit` again later") from None
            for stage in chunk:   # sbatch refused the array: nobody holds these stages
                RunPaths(run_dir).stage(stage.id).submit.unlink(missing_ok=True)
            raise UserError(f"sbatch refused the {kind} stages ({name}): {message}; check "
                            f"[resources.{resource_table(kind)}] (or [resources.default])") from None
        for index, (stage, job) in enumerate(zip(chunk, jobs, strict=True)):
            record_submission(run_dir, stage.id, self.name, job.job_id, job_name=name,
                              array_task=str(index) if len(chunk) > 1 else None, resources=asked,
                              slurm_log=str(job.paths.stdout))
        return jobs

    # ------------------------------------------------------------------------------------------ state

    def observe(self, run_dir: Path, held: list[tuple[Any, dict[str, Any]]], cache) -> None:
        """Ask SLURM (through ``cache``) about the jobs of these records and classify each stage; a failed or
        cancelled stage whose job is still queued or running stays held (``lingering``)."""
        active = [record for state, record in held if state.status not in ("failed", "cancelled")]
        ended = [record for state, record in held if state.status in ("failed", "cancelled")]
        keys = {(r.get("job_id"), r.get("job_name"), False) for r in active}
        keys |= {(r.get("job_id"), r.get("job_name"), True) for r in ended}
        answer = cache.ask(self.name, keys, lambda: query_slurm(active, ended))
        for state, record in held:
            if state.status in ("failed", "cancelled"):
                _lingering(state, record, answer)
            else:
                _classify(state, record, answer)

    # ------------------------------------------------------------------------------------------ cancel

    def cancel(self, run_dir: Path, states: list) -> CancelOutcome:
        """scancel the jobs holding these stages (by job id, or by job name for a submission interrupted before its
        id was recorded). Fail closed: when scancel fails or does not answer, the stages are left as they were."""
        outcome = CancelOutcome()
        jobs: dict[str, list] = {}
        by_name: dict[str, list] = {}
        for state in states:
            if state.job_id:
                jobs.setdefault(state.job_id, []).append(state)
            elif state.job_name:
                by_name.setdefault(state.job_name, []).append(state)
        if jobs:
            answer = run_command(["scancel", *sorted(jobs)])
            if _only_benign_scancel_errors(answer):
                outcome.jobs.extend(sorted(jobs))
                for job_states in jobs.values():
                    for state in job_states:
                        record_cancel(run_dir, state.stage_id, f"scancel {state.job_id}")
                        outcome.cancelled.append(state.stage_id)
            else:
                outcome.problems.append(f"scancel of {len(jobs)} job(s) failed ({answer.problem}); their stages are "
                                        f"left as they were")
        for name, named in by_name.items():
            answer = run_command(["scancel", f"--name={name}"])
            if answer.ok:
                outcome.jobs.append(name)
                for state in named:
                    record_cancel(run_dir, state.stage_id, f"scancel --name={name}")
                    outcome.cancelled.append(state.stage_id)
            else:
                outcome.problems.append(f"scancel --name={name} failed ({answer.problem}); its stages are left as "
                                        f"they were")
        return outcome


def _only_benign_scancel_errors(answer) -> bool:
    """scancel exits non-zero when a listed job has already ended; that is no reason to doubt the others."""
    if answer.ok:
        return True
    errors = [line for line in answer.stderr.splitlines() if line.strip()]
    return bool(errors) and not answer.timed_out and all(any(b in line for b in _SCANCEL_BENIGN) for line in errors)


# ------------------------------------------------------------------------------------------------ submission

class StageJob(submitit.helpers.Checkpointable):
    """The callable a SLURM array task runs, once per task (rank) of a multi-task job: each rank runs the stage,
    training joins the job's process group from submitit's JobEnvironment, and rank 0 writes the result. On
    preemption or timeout submitit requeues it with the same arguments; the stage then resumes from its own
    checkpoint (training resumes from out_dir/checkpoint, at any world size)."""

    def __call__(self, run_dir: str, stage_id: str) -> bool:
        # The worker side (torch) loads in the job, not where the job is submitted or its state is read.
        from gridlab.stages import execute_stage

        threads = os.environ.get("SLURM_CPUS_PER_TASK", "1")
        os.environ["OMP_NUM_THREADS"] = os.environ["GRIDLAB_THREADS"] = threads
        ok = execute_stage(Path(run_dir), stage_id)
        if not ok:
            raise RuntimeError(f"stage {stage_id} failed; see {RunPaths(run_dir).stage(stage_id).log}")
        return ok


def max_array_size() -> int:
    answer = run_command(["scontrol", "show", "config"])
    match = re.search(r"MaxArraySize\s*=\s*(\d+)", answer.stdout) if answer.ok else None
    return int(match.group(1)) if match else 1001


class _Submitter(submitit.SlurmExecutor):
    """submitit's SLURM executor with a time limit on sbatch: a hung sbatch must not hang `gridlab submit`."""

    def _make_submission_command(self, submission_file_path: Path) -> list[str]:
        return ["timeout", f"{3 * scheduler_timeout_s():g}", "sbatch", str(submission_file_path)]


def sbatch_parameters(resources: dict[str, Any], name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for one stage kind's merged resources (gridlab.spec.ResourceSpec)."""
    mem_gb = resources["mem_gb"]
    parameters: dict[str, Any] = {
        "job_name": name, "cpus_per_task": resources["cpus"],
        "mem": f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{round(mem_gb * 1024)}MB",
        "time": resources["time_min"], "array_parallelism": resources["array_parallelism"],
        "nodes": resources["nodes"], "ntasks_per_node": resources["tasks_per_node"],
    }
    if resources["gpus_per_node"]:
        parameters["gpus_per_node"] = resources["gpus_per_node"]
    for key in SITE_OPTIONS:
        if resources.get(key):
            parameters[key] = resources[key]
    if resources.get("reservation"):
        parameters.setdefault("additional_parameters", {})["reservation"] = resources["reservation"]
    if resources.get("setup"):
        parameters["setup"] = list(resources["setup"])
    if resources.get("sbatch"):
        parameters.setdefault("additional_parameters", {}).update(resources["sbatch"])
    return parameters


def _dependency(deps: list[str], job_of: dict[str, str]) -> str | None:
    jobs = sorted({job_of[dep] for dep in deps if dep in job_of})
    if not jobs:
        return None
    if len(jobs) > _MAX_TASK_DEPENDENCIES:
        jobs = sorted({job.split("_")[0] for job in jobs})
    return "afterany:" + ":".join(jobs)


# ------------------------------------------------------------------------------------------------ what SLURM says

_QUEUED = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "RESIZING"}
_RUNNING = {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "SUSPENDED"}

# Terminal states of a job that left no result: (stage state, what it means and what to do). {kind} (the resources
# table of the stage's kind) and the resources the job asked for ({mem_gb}, {time_min}) are filled in.
_TERMINAL: dict[str, tuple[str, str]] = {
    "COMPLETED": ("failed", "the SLURM job completed without writing a result; see the stage log"),
    "FAILED": ("failed", "the SLURM job failed (exit code {exit_code}) before writing a result; see the stage log"),
    "CANCELLED": ("cancelled", "the SLURM job was cancelled{by}"),
    "TIMEOUT": ("failed", "the SLURM job hit its time limit (resources.{kind}.time_min = {time_min}) and was not "
                          "requeued; raise time_min in [resources.{kind}]"),
    "OUT_OF_MEMORY": ("failed", "the SLURM job ran out of memory (resources.{kind}.mem_gb = {mem_gb}); raise mem_gb "
                                "in [resources.{kind}]"),
    "NODE_FAIL": ("failed", "the SLURM job's node failed (NODE_FAIL); the stage itself did not fail: resubmit with "
                            "--retry-failed (exclude the node with resources.{kind}.exclude if it recurs)"),
    "BOOT_FAIL": ("failed", "the SLURM job's node failed to boot (BOOT_FAIL); resubmit with --retry-failed"),
    "DEADLINE": ("failed", "the SLURM job reached its deadline before it could finish (DEADLINE); resubmit with "
                           "--retry-failed, with a later or no --deadline"),
    "PREEMPTED": ("cancelled", "the SLURM job was preempted and not requeued (the partition's PreemptMode cancels "
                               "preempted jobs); resubmit with --retry-failed, or use a partition or QOS that is not "
                               "preempted"),
    "REVOKED": ("cancelled", "the SLURM job was revoked (a federated sibling ran it elsewhere)"),
    "SPECIAL_EXIT": ("failed", "the SLURM job ended in SPECIAL_EXIT; see the stage log"),
}


@dataclass
class SlurmJob:
    status: str                          # one of gridlab.state.STATES
    state: str                           # SLURM's own word
    reason: str = ""
    exit_code: str = ""
    by: str = ""                         # CANCELLED by <uid>

    def explain(self, kind: str, resources: dict[str, Any]) -> str | None:
        if self.reason == "DependencyNeverSatisfied":
            return "an upstream job failed (DependencyNeverSatisfied)"
        if self.state not in _TERMINAL:
            return None if self.status != "unknown" else f"SLURM reports the job as {self.state}"
        template = _TERMINAL[self.state][1]
        return template.format(kind=resource_table(kind), exit_code=self.exit_code or "?",
                               by=f" by {self.by}" if self.by else "", mem_gb=resources.get("mem_gb", "?"),
                               time_min=resources.get("time_min", "?"))


def slurm_job(state: str, reason: str = "", exit_code: str = "") -> SlurmJob:
    """What a SLURM job state means for its stage (a job that left no result)."""
    words = state.split()
    base = words[0] if words else ""
    by = words[2] if len(words) > 2 and words[1] == "by" else ""
    if reason == "DependencyNeverSatisfied":
        return SlurmJob("cancelled", base, reason, exit_code, by)
    if base in _QUEUED:
        return SlurmJob("pending", base, reason, exit_code)
    if base in _RUNNING:
        return SlurmJob("running", base, reason, exit_code)
    if base in _TERMINAL:
        return SlurmJob(_TERMINAL[base][0], base, reason, exit_code, by)
    return SlurmJob("unknown", base or "?", reason, exit_code)


@dataclass
class SlurmAnswer:
    jobs: dict[str, SlurmJob] = field(default_factory=dict)            # job id ("123" or "123_4") → state
    by_name: dict[str, dict[str, str]] = field(default_factory=dict)   # job name → {array task or "": job id}
    problem: str | None = None          # why some jobs may be missing (a query failed or did not answer)
    squeue_problem: str | None = None   # squeue itself failed: nothing is known about queued or running jobs
    complete_for_names: bool = True     # both squeue and sacct answered for every job name asked about


def _lingering(state, record: dict, answer: SlurmAnswer) -> None:
    """A failed or cancelled stage whose job SLURM still holds (a rank that failed while the others hang, a
    cancelled job within KillWait) is still held: resubmitting it would put two jobs on one folder."""
    job = answer.jobs.get(record.get("job_id") or "")
    if job is not None and job.status in ("pending", "running"):
        state.lingering = True
        state.error = (f"{state.error} (its SLURM job {state.job_id} is still {job.status}; it is not resubmitted "
                       f"before it ends: `gridlab cancel` stops it)")
    elif answer.squeue_problem and record.get("job_id"):
        state.lingering = True
        state.error = (f"{state.error} (whether its SLURM job {state.job_id} still runs is unknown: "
                       f"{answer.squeue_problem})")
    else:
        state.submitted = False


def _classify(state, record: dict, answer: SlurmAnswer) -> None:
    job_id = record.get("job_id")
    if job_id is None:
        # Recorded before sbatch, not after: find the job by the name it was submitted under.
        name, task = record.get("job_name"), record.get("array_task")
        found = answer.by_name.get(name, {}) if name else {}
        job_id = found.get(task if task is not None else "")
        if job_id is None:
            if name and answer.complete_for_names:
                state.status, state.submitted = "pending", False   # sbatch never went through: nobody holds it
                return
            state.status = "unknown"
            state.error = ("its submission was interrupted before the job id was recorded, and " +
                           (answer.problem or "the scheduler does not know the job name") +
                           "; if no job runs it, `gridlab cancel` it and resubmit with --retry-failed")
            return
        state.job_id, state.reconciled = job_id, True
    job = answer.jobs.get(job_id)
    if job is not None:
        state.status, state.error = job.status, job.explain(state.kind, record.get("resources") or {})
        return
    state.status = "unknown"
    if answer.problem:
        state.error = f"SLURM job {job_id}: {answer.problem}"
    else:
        state.error = (f"SLURM job {job_id} is known neither to squeue nor to sacct; if it is gone, "
                       f"`gridlab cancel` the stage and resubmit with --retry-failed")


def _sacct_since(records: list[dict]) -> str:
    earliest = min(record.get("submitted_at") or time.time() for record in records) - 3600
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(earliest))


def query_slurm(records: list[dict], queued_only: list[dict] = ()) -> SlurmAnswer:
    """Ask SLURM about the jobs of these submission records: squeue for what it still holds, then sacct for the
    rest. Jobs recorded only by name (an interrupted submission) are looked up by name. For ``queued_only`` (stages
    already known to have failed) only squeue is asked: does their job linger?"""
    answer = SlurmAnswer()
    lingering = {record["job_id"] for record in queued_only if record.get("job_id")}
    records = list(records) + list(queued_only)
    wanted = {record["job_id"] for record in records if record.get("job_id")}
    names = {record["job_name"] for record in records if record.get("job_name")}
    unnamed = any(not record.get("job_name") for record in records)
    searching = {record["job_name"] for record in records if not record.get("job_id") and record.get("job_name")}
    problems = []

    command = ["squeue", "-h", "-r", "-o", "%i|%T|%r|%j"] + ([] if unnamed else [f"--name={','.join(sorted(names))}"])
    squeue = run_command(command)
    if squeue.ok:
        for line in squeue.stdout.splitlines():
            job, state, reason, name = (line.split("|") + ["", "", ""])[:4]
            _found(answer, job.strip(), name, searching)
            if job in wanted or name in searching:
                answer.jobs[job] = slurm_job(state, reason)
    else:
        problems.append(squeue.problem)
        answer.squeue_problem = squeue.problem
    missing = wanted - lingering - answer.jobs.keys()
    lost_names = {name for name in searching if name not in answer.by_name}
    if missing or lost_names:
        fields = ["sacct", "-X", "-n", "-P", "-o", "JobID,State,ExitCode,JobName"]
        queries = []
        if missing:
            queries.append(fields + ["-j", ",".join(sorted({job.split("_")[0] for job in missing}))])
        if lost_names:
            queries.append(fields + [f"--name={','.join(sorted(lost_names))}", "-S",
                                     _sacct_since([r for r in records if r.get("job_name") in lost_names])])
        for query in queries:
            sacct = run_command(query)
            if not sacct.ok:
                problems.append(sacct.problem)
                continue
            for line in sacct.stdout.splitlines():
                job, state, exit_code, name = (line.split("|") + ["", "", ""])[:4]
                for task in _expand_array(job.strip()):
                    _found(answer, task, name, lost_names)
                    if (task in missing or name in lost_names) and task not in answer.jobs:
                        answer.jobs[task] = slurm_job(state, exit_code=exit_code)
    if problems:
        answer.problem = "; ".join(dict.fromkeys(problems))
        answer.complete_for_names = False
    return answer


def _found(answer: SlurmAnswer, job: str, name: str, names: set[str]) -> None:
    if name in names:
        array, _, task = job.partition("_")
        answer.by_name.setdefault(name, {})[task if task.isdigit() else ""] = job if task.isdigit() else array


def _expand_array(job: str) -> list[str]:
    """sacct shows not-yet-started array tasks collapsed, e.g. 12_[3-5,7%2]."""
    match = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", job)
    if not match:
        return [job]
    tasks = []
    for part in match.group(2).split(","):
        low, _, high = part.partition("-")
        tasks.extend(f"{match.group(1)}_{i}" for i in range(int(low), int(high or low) + 1))
    return tasks
