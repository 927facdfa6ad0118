"""Exit codes of every mmsep console program (mmsep-run, mmsep-export, mmsep-batch,
mmsep-serve, mmsep-finetune, ``python -m mmsep.export.gpu_check``). Torch-free: the runtime
imports it."""

import errno

EXIT_OK = 0  # done (mmsep-serve: stopped by a signal)
EXIT_INTERNAL = 1  # internal failure (a bug, the backend, the environment); gpu_check: a check
#                   failed or TensorRT / a CUDA GPU is missing
EXIT_USAGE = 2  # bad usage or input, or an output that cannot be written; one line names it
EXIT_SOME_FAILED = 3  # mmsep-batch: some requests failed, the others' outputs are written
EXIT_INTERRUPTED = 130  # Ctrl-C, SIGTERM or SIGHUP (128 + SIGINT); nothing was written
EXIT_BROKEN_PIPE = 141  # the reader of standard output went away (128 + SIGPIPE, as other tools)

# a full disk or quota, or a file size limit: the user's to fix (EXIT_USAGE), not a bug
FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def full_disk_errno(exc: BaseException | None) -> int | None:
    """The errno of a full disk, quota or file size limit behind ``exc`` (also when another
    exception wraps it, as the exporter's errors do), else None."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in FULL_DISK_ERRNOS:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None
