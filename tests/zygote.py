"""Start the processes of a run without paying for their imports: a zygote.

Each process of a run imports torch, megatron-core and bigpt: 4-5 CPU-seconds before its first
line of bigpt, and the suite starts hundreds of them. A zygote is one process per pytest worker,
started on first use, that imports all of it once and then forks every process of a run from
itself, as prepared as a fresh interpreter at the start of the script. ``run`` is the test side:

    run([script, *args], env=env, cwd=cwd, nproc=2, torchrun=True, timeout=300)

returns what ``subprocess.run([python, script, *args], capture_output=True, text=True)`` returns
(``torchrun=False``, one process), or ``torchrun --standalone --nproc_per_node N script args``
(``torchrun=True``):

- each process gets the caller's environment, working directory, ``sys.argv``, ``sys.path[0]``
  (the script's folder) and stdin from /dev/null, and runs the script as ``__main__``; it exits
  as an interpreter does (``SystemExit``'s code, 1 and a traceback for an exception), after
  waiting for its threads and running its exit handlers, but without the interpreter's final
  teardown (as ``bigpt.runtime.process.exit_without_final_gc``);
- as torchrun, each rank gets torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
  MASTER_PORT on a free port, ...); when one rank fails the others get SIGTERM, then SIGKILL 30 s
  later; the job exits 1 after torchrun's report of the failed ranks ("exitcode  : 2") on stderr,
  0 when all succeed; every rank writes to the job's stdout and stderr, or with ``rank_logs``
  to ``rank_logs/<run>/attempt_0/<rank>/{stdout,stderr}.log`` as ``torchrun --log-dir
  rank_logs --redirects 3`` does;
- whatever the zygote's imports print (a dependency's warning) is printed again by every process
  first, so a test that wants a quiet run still sees it;
- a run past ``timeout`` is killed, all its processes (they share a process group), and
  ``subprocess.TimeoutExpired`` raised.

Fork safety: the zygote runs nothing but imports. It never touches torch.distributed, megatron-core's
parallel state, CUDA or a tensor, keeps one intra-op thread (OMP_NUM_THREADS=1, which ``run``
requires: no OpenMP pool to inherit), and forks only while it has a single thread. It starts
with the first run's environment; a run whose variables that modules read as they are imported
(``IMPORT_TIME_PREFIXES``: PYTHON*, TORCH*, CUDA*, ...) differ gets a new zygote. bigpt reads its
own variables (BIGPT_TEST_FAULT) when it runs, and torch TORCH_FORCE_WEIGHTS_ONLY_LOAD at each load.

The protocol, one JSON line at a time over a socket pair: the test sends a request, the zygote
answers {"pid"} of the job (its child that plays torchrun, leader of the run's process group),
then {"returncode"} once the job has exited.
"""

import atexit
import gc
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PRELOAD = (  # launchers/run.py and what a run imports after it, found by diffing sys.modules
    "run",
    "bigpt.train.main",
    "megatron.core.datasets.helpers",
    "megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.models.mimo",
    "torch.distributed.elastic.multiprocessing.errors",  # the job's report of a failed rank
)
# Variables read as a module is imported (CPython's, torch's, CUDA's, ...): a run whose values
# differ from the zygote's gets a new zygote. bigpt reads its own (BIGPT_*) when it runs.
IMPORT_TIME_PREFIXES = ("PYTHON", "TORCH", "PYTORCH", "CUDA", "NCCL", "NVTE", "MEGATRON", "OMP", "MKL", "TRITON", "HF_")
RANK_GRACE_S = 30  # torchrun's: from SIGTERM to the ranks left after a failure to SIGKILL


# ------------------------------------------------------------------------------------ test side
_zygote = None


def stop() -> None:
    """End this worker's zygote, if any, and wait for it (tests/conftest.py, at the session's end:
    pytest-xdist's workers may leave without running exit handlers)."""
    global _zygote
    if _zygote is not None:
        _zygote.close()
        _zygote = None


def run(argv, *, env, cwd, nproc=1, torchrun=False, rank_logs=None, timeout=300):
    """``argv`` = [script, *args] run as described above: a ``subprocess.CompletedProcess``."""
    global _zygote
    if nproc > 1 and not torchrun:
        raise ValueError("several processes are a torchrun job")
    if env.get("OMP_NUM_THREADS") != "1":
        raise ValueError("a zygote's processes have one intra-op thread: set OMP_NUM_THREADS=1")
    if _zygote is not None and (_zygote.process.poll() is not None or _zygote.imported_with != _import_time(env)):
        stop()
    if _zygote is None:
        _zygote = _Zygote(env)
    return _zygote.run([str(a) for a in argv], env, cwd, nproc, torchrun, rank_logs, timeout)


def _import_time(env: dict) -> dict:
    """The variables that a module may read as it is imported: the zygote's must be the run's."""
    return {name: value for name, value in env.items() if name.startswith(IMPORT_TIME_PREFIXES)}


class _Zygote:
    def __init__(self, env: dict):
        self.imported_with = _import_time(env)
        self.log = tempfile.NamedTemporaryFile(prefix="bigpt-zygote-", suffix=".log", delete=False)
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, __file__, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            env=env,
            cwd=REPO,
        )
        theirs.close()
        self.channel = _Channel(ours)

    def close(self) -> None:
        self.channel.sock.close()  # the zygote exits when it reads the end of its channel
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        os.unlink(self.log.name)

    def run(self, argv, env, cwd, nproc, torchrun, rank_logs, timeout):
        command = [sys.executable, *argv]
        if torchrun:
            command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        out = Path(tempfile.mkdtemp(prefix="bigpt-zygote-run-"))
        try:
            request = {"argv": argv, "env": env, "cwd": str(cwd), "nproc": nproc, "torchrun": torchrun}
            self.channel.send({**request, "rank_logs": rank_logs and str(rank_logs), "out": str(out)})
            started = self.channel.receive(timeout)  # (the zygote's own start is not the run's time)
            if started is None:
                self.process.kill()
                raise subprocess.TimeoutExpired(command, timeout, *self._output(out))
            job = started["pid"]
            ended = self.channel.receive(timeout)
            if ended is None:  # past the timeout: the whole job, every rank
                os.killpg(job, signal.SIGKILL)
                self.channel.receive(None)  # the zygote has collected it
                raise subprocess.TimeoutExpired(command, timeout, *self._output(out))
            return subprocess.CompletedProcess(command, ended["returncode"], *self._output(out))
        except EOFError:
            raise RuntimeError(f"the zygote ended (exit {self.process.wait()}):\n{self._log_tail()}") from None
        finally:
            shutil.rmtree(out, ignore_errors=True)

    @staticmethod
    def _output(out: Path) -> tuple[str, str]:
        read = [out / name for name in ("stdout", "stderr")]
        return tuple(path.read_text(errors="replace") if path.exists() else "" for path in read)  # type: ignore

    def _log_tail(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-6000:]


class _Channel:
    """JSON messages, one a line, over a socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def send(self, message: dict) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def receive(self, timeout: float | None) -> dict | None:
        """The next message; None past ``timeout`` seconds (None: wait for it); EOFError once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.sock], [], [], wait)[0]:
                return None
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)


# ------------------------------------------------------------------------------------ zygote side
def serve(channel_fd: int) -> None:
    """Import, then fork a job per request until the test side closes the channel."""
    channel = _Channel(socket.socket(fileno=channel_fd))
    base_path = sys.path[1:]  # a fresh interpreter's sys.path, less the script's folder
    import_output = _preload()
    while True:
        try:
            request = channel.receive(None)
        except EOFError:
            return
        threads = len(os.listdir("/proc/self/task"))
        assert threads == 1, f"the zygote has {threads} threads: a fork would inherit a half-held lock"
        sys.stdout.flush()
        sys.stderr.flush()
        job = os.fork()
        if job == 0:
            os.setpgid(0, 0)
            channel.sock.close()
            sys.path[:] = base_path
            _child(_job, request, import_output)
        os.setpgid(job, job)  # here too, whichever runs first: a timeout may kill the group at once
        channel.send({"pid": job})
        _, status = os.waitpid(job, 0)
        channel.send({"returncode": os.waitstatus_to_exitcode(status)})


def _child(main, *args) -> None:
    """Run ``main(*args) -> exit code`` in a forked process, which never returns from here."""
    code = 1
    try:
        code = main(*args)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _preload() -> tuple[bytes, bytes]:
    """Import what a run imports; what that prints (fd 1 and 2), to be printed again by each run."""
    sys.path.insert(0, str(REPO / "launchers"))  # as tests/fault_injection.py imports it
    captured = [tempfile.TemporaryFile() for _ in (1, 2)]
    saved = [os.dup(1), os.dup(2)]
    for fd, file in zip((1, 2), captured):
        os.dup2(file.fileno(), fd)
    try:
        import torch

        torch.set_num_threads(1)
        for name in PRELOAD:
            __import__(name)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, original in zip((1, 2), saved):
            os.dup2(original, fd)
            os.close(original)
    gc.freeze()  # the children share these pages for longer (a collection writes to every object)
    for file in captured:
        file.seek(0)
    return captured[0].read(), captured[1].read()


def _job(request: dict, import_output: tuple[bytes, bytes]) -> int:
    """torchrun's part (or a shell's, for one plain process): start the ranks, wait for them."""
    out = Path(request["out"])
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    job_stdout, job_stderr = os.open(out / "stdout", flags), os.open(out / "stderr", flags)
    nproc, torchrun, argv = request["nproc"], request["torchrun"], request["argv"]
    env = dict(request["env"])
    run_id = f"zygote_{os.getpid()}"
    if torchrun:
        env.update(
            LOCAL_WORLD_SIZE=str(nproc),
            WORLD_SIZE=str(nproc),
            ROLE_WORLD_SIZE=str(nproc),
            GROUP_RANK="0",
            GROUP_WORLD_SIZE="1",
            ROLE_NAME="default",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
            TORCHELASTIC_RESTART_COUNT="0",
            TORCHELASTIC_MAX_RESTARTS="0",
            TORCHELASTIC_RUN_ID=run_id,
            TORCHELASTIC_USE_AGENT_STORE="False",  # rank 0 hosts the rendezvous store
            TORCH_NCCL_ASYNC_ERROR_HANDLING=env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
            TORCHELASTIC_SIGNALS_TO_HANDLE=env.get("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT"),
        )
    ranks, error_files = {}, {}
    for rank in range(nproc):
        outputs = job_stdout, job_stderr
        if torchrun:
            folder = Path(request["rank_logs"] or out, run_id, "attempt_0", str(rank))
            folder.mkdir(parents=True)
            error_files[rank] = str(folder / "error.json")
            env.update(
                RANK=str(rank), LOCAL_RANK=str(rank), ROLE_RANK=str(rank), TORCHELASTIC_ERROR_FILE=error_files[rank]
            )
            if request["rank_logs"]:
                outputs = tuple(os.open(folder / name, flags) for name in ("stdout.log", "stderr.log"))
        pid = os.fork()
        if pid == 0:
            _child(_rank, argv, env, request["cwd"], outputs, import_output)
        ranks[pid] = rank
    codes = _wait(ranks, torchrun)
    if not torchrun:
        return codes[0]
    if any(codes.values()):
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

        pids = {rank: pid for pid, rank in ranks.items()}
        failures = {
            rank: ProcessFailure(rank, pids[rank], code, error_files[rank]) for rank, code in codes.items() if code
        }
        report = ChildFailedError(argv[0], failures).format_msg()
        traceback_ = "Traceback (most recent call last):\n  (torchrun's, left out)\n"  # torchrun dies of the error
        os.write(job_stderr, f"{traceback_}{ChildFailedError.__module__}.ChildFailedError: \n{report}\n".encode())
        return 1
    return 0


def _rank(argv, env, cwd, outputs, import_output) -> int:
    """One process of the run: as a fresh ``python script args`` with this environment."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    for fd, target in zip((0, 1, 2), (devnull, *outputs)):
        os.dup2(target, fd)
    for fd, output in zip((1, 2), import_output):
        os.write(fd, output)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    script = os.path.abspath(argv[0])
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(script))
    code = _run_as_main(script)
    threading._shutdown()  # as an interpreter (and multiprocessing) does
    atexit._run_exitfuncs()
    if code < 0:  # killed by a signal, as an interpreter dies of a KeyboardInterrupt
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


def _run_as_main(script: str) -> int:
    import runpy

    try:
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # an interpreter says so, then dies of SIGINT
        traceback.print_exc()
        return -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        return 1


def _wait(ranks: dict[int, int], torchrun: bool) -> dict[int, int]:
    """Each rank's exit code (negative: killed by that signal). As torchrun: after the first
    failure, SIGTERM to the others, SIGKILL to those left after ``RANK_GRACE_S``."""
    codes: dict[int, int] = {}
    kill_at = None
    while len(codes) < len(ranks):
        pid, status = os.waitpid(-1, 0 if kill_at is None else os.WNOHANG)
        if pid == 0:
            if time.monotonic() > kill_at:
                _signal_left(ranks, codes, signal.SIGKILL)
                kill_at = float("inf")
            time.sleep(0.05)
            continue
        codes[ranks[pid]] = os.waitstatus_to_exitcode(status)
        if codes[ranks[pid]] != 0 and torchrun and kill_at is None:
            _signal_left(ranks, codes, signal.SIGTERM)
            kill_at = time.monotonic() + RANK_GRACE_S
    return codes


def _signal_left(ranks: dict[int, int], codes: dict[int, int], signum: int) -> None:
    for pid, rank in ranks.items():
        if rank not in codes:
            os.kill(pid, signum)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    serve(int(sys.argv[1]))
