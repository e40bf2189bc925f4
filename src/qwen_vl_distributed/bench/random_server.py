"""A server over random weights of a preset's dimensions, in a process of its own, for ``qwen-vl bench-serve``.

``start(opts)`` runs ``python -m qwen_vl_distributed.bench.random_server`` with the run options (their one
serialized form) and waits until the server answers /health; the benchmark's client stays in this process, so
the two never share an interpreter lock. The server's model directory holds only processor files (the synthetic
tokenizer, chat template and image processor configs): the weights are random (``RunOptions.random_preset``)
and have no stop token, so every request generates its max_tokens.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

from ..engine.build import RunOptions

READY_TIMEOUT_S = 1800.0  # loading random weights, compiling and capturing graphs of a 235B-sized stage


class RandomServer:
    def __init__(self, opts: RunOptions, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "qwen_vl_distributed.bench.random_server",
                                      "--options", opts.to_json(), "--port", str(port)], start_new_session=True)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the benchmark server exited with status {self.proc.returncode} while starting")
            try:
                if httpx.get(self.url + "/health", timeout=5.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"the benchmark server did not answer /health within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM (uvicorn shuts down, the engine closes), then SIGKILL to the process group if it lingers."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def serve(opts: RunOptions, port: int) -> None:
    """Build the engine over random weights and serve it on 127.0.0.1:port until SIGTERM."""
    import uvicorn

    from ..checkpoint.synth_processor import write_processor_files
    from ..engine.build import open_source, start_engine
    from ..engine.media import MediaOptions
    from ..engine.processor import Processor
    from ..server.app import ServerSettings, create_app

    with tempfile.TemporaryDirectory(prefix="qwen-vl-bench-") as model_dir:
        write_processor_files(model_dir)
        opts.model = model_dir
        processor = Processor.from_pretrained(model_dir, open_source(opts).cfg, MediaOptions(max_images=16))
        handle = start_engine(opts)
        try:
            app = create_app(handle.engine, processor, ServerSettings(model_name="random", max_queue=100_000))
            uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5)
        finally:
            handle.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen_vl_distributed.bench.random_server")
    p.add_argument("--options", required=True, help="RunOptions as JSON (random_preset set)")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    serve(RunOptions.from_json(args.options), args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
