"""The start and end of a process that runs megatron-core: two costs bigpt does not need to pay.

On a 2-core machine each is seconds per process, and a test suite starts hundreds of them.
"""

import atexit
import gc
import os
import subprocess
import sys

_silence_teardown = False


@atexit.register  # registered first, on import, so it runs after every other exit handler
def _drop_teardown_output() -> None:
    """After a frozen exit, the interpreter's teardown finds objects it never collected and some
    extension modules (triton's nanobind bindings, which megatron-core imports) print a report of
    every one of them: hundreds of lines of nothing a user can act on. Every exit handler has run
    by now, with stderr intact."""
    if _silence_teardown:
        sys.stdout.flush()
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)


def skip_torch_compile_without_gpu() -> None:
    """Call before megatron-core is imported. It wraps its fused kernels in torch.compile as it is
    imported, which loads the inductor compiler (1-3 s). bigpt calls those kernels on GPUs only
    (``model.transformer_config``: fusions need CUDA), so without one torch.compile is made a no-op."""
    from bigpt.runtime.device import on_gpu  # imports torch, not megatron-core

    if not on_gpu():
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def exit_without_final_gc(code: int):
    """``sys.exit(code)`` without the interpreter's last garbage collection, which walks every
    object torch and megatron-core created (2-3 s). Nothing bigpt leaves open depends on it:
    checkpoints, logs and TensorBoard files are closed by then, and objects still referenced are
    released as usual."""
    global _silence_teardown
    gc.freeze()
    _silence_teardown = True
    sys.exit(code)


def run_child(command: list[str], **popen) -> int:
    """``command``'s exit code, run to its end; when this process is interrupted meanwhile (Ctrl-C,
    or SIGTERM raised as ``Terminated``), the child gets SIGTERM and is waited for before the
    interrupt goes on, so that it stops writing before the caller removes what it wrote (torchrun
    passes SIGTERM to its ranks; subprocess.run would SIGKILL it and orphan them)."""
    child = subprocess.Popen(command, **popen)
    try:
        return child.wait()
    except BaseException:
        child.terminate()
        child.wait()
        raise
