"""A `fastllm serve` subprocess for tests and benchmarks: started on a free loopback port (--port 0, the address
read from its 'listening on' line), waited for until /health answers, stopped with SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

import fastllm


class Server:
    """`python -m fastllm serve --ckpt CKPT --port 0 --threads THREADS ARGS...` in a subprocess."""

    def __init__(self, ckpt: Path, *args: str, threads: int = 1):
        env = dict(os.environ)
        pkg = str(Path(fastllm.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = pkg + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "fastllm", "serve", "--ckpt", str(ckpt), "--port", "0", "--threads", str(threads),
               "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.log: list[str] = []
        deadline = time.time() + 120
        self.url = None
        while self.url is None:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError("fastllm serve did not start:\n" + "".join(self.log))
            self.log.append(line)
            if "listening on " in line:
                self.url = line.split("listening on ")[1].split()[0]
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def wait_idle(self, timeout: float = 10.0) -> dict:
        deadline = time.time() + timeout
        while True:
            h = self.health()
            if h["active"] == 0 and h["waiting"] == 0 or time.time() > deadline:
                return h
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
