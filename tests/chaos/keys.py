"""What the chaos run's job writes to the recorder (a Redis of its own, `CHAOS_RECORD_URL`, never the
broker, which the run restarts empty), shared by the job (tasks.py) and the harness (run.py):

- `chaos:starts:<task id>`: one `"<pid> <time>"` per start of the body;
- `chaos:ends:<task id>` and the set `chaos:done`: the body reached its end;
- `chaos:running`: pid -> task id of the body each pool process runs now (the harness picks the
  pool processes to kill among these).
"""

RECORD_URL = "CHAOS_RECORD_URL"
TASK = "chaos.record"
DONE_KEY = "chaos:done"
RUNNING_KEY = "chaos:running"


def starts_key(task_id: str) -> str:
    return f"chaos:starts:{task_id}"


def ends_key(task_id: str) -> str:
    return f"chaos:ends:{task_id}"
