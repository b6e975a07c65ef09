"""A second process that draws some of a report's figures while build_report
draws the others (matplotlib is single-threaded; the machine's other core is otherwise idle until Chromium prints).

It imports matplotlib and loads its fonts as soon as it starts (while the report is being analysed), then reads
one pickled (Analysis, kinds) from stdin and writes the pickled {kind: [Figure]} to stdout. A plain subprocess
(`python -c "…plotworker import main; main()"`), not multiprocessing: the caller's __main__ is never re-imported.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import gridlab
from gridlab.report import plots


class PlotWorker:
    """The worker process, started at once; `draw` hands it the analysis and `result` collects its figures."""

    def __init__(self):
        package_root = str(Path(gridlab.__file__).resolve().parents[1])  # the same gridlab as this process
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        command = [sys.executable, "-c", "from gridlab.report.plotworker import main; main()"]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._writer: threading.Thread | None = None

    def draw(self, analysis, kinds) -> None:
        payload = pickle.dumps((analysis, tuple(kinds)), protocol=pickle.HIGHEST_PROTOCOL)

        def send():
            try:
                self.process.stdin.write(payload)
                self.process.stdin.close()
            except OSError:  # the worker died; result() reports it
                pass

        # A thread: the worker reads only once its imports are done, and this process has figures to draw meanwhile.
        self._writer = threading.Thread(target=send, daemon=True)
        self._writer.start()

    def result(self) -> dict:
        data = self.process.stdout.read()
        self._writer.join()
        if self.process.wait() != 0:
            raise RuntimeError(f"the plotting process exited with status {self.process.returncode}")
        return pickle.loads(data)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream and not stream.closed:
                stream.close()


def main() -> None:
    plots.warm_up()
    analysis, kinds = pickle.load(sys.stdin.buffer)
    figures = plots.draw(analysis, kinds)
    pickle.dump(figures, sys.stdout.buffer, protocol=pickle.HIGHEST_PROTOCOL)
    sys.stdout.buffer.flush()
