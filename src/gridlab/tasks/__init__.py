"""gridlab's own offline lm-eval tasks (YAML + local .jsonl), found by `TaskManager(include_path=TASKS_DIR)`."""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
