"""gridlab's own offline lm-eval tasks: `<stem>.yaml` (+ its .jsonl) defines task `gridlab_<stem>`.

lm-eval finds them with `TaskManager(include_path=TASKS_DIR)`; `local_jsonl.load` resolves each task's data file
relative to this folder, so they work wherever gridlab is installed and from any working directory.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
