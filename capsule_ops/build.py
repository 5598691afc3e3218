"""Builds the fused kernels (kernels.cc, votes_kernels.cc, fold_kernels.cc) once per source, TensorFlow version,
flags and CPU.

  python -m capsule_ops.build      # build ahead of time (otherwise the first fused routing builds it)

The library is compiled with the system's C++ compiler (`$CXX`, default g++) against the TensorFlow wheel's
headers and link flags (`tf.sysconfig`) into `$CAPSNET_OPS_CACHE` (default ~/.cache/capsnet-em-ops), in a
folder named by a hash of everything that changes the binary: the source, the TensorFlow version, the compiler
and its flags, and -- for `-march=native`, the default, since such a build only runs on a CPU like the one
that built it -- this CPU's feature flags. `$CAPSNET_OPS_MARCH` picks another target (e.g. x86-64-v3 for a
build shared between machines). A file lock keeps two processes from building the same library at once.
"""

import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import sys

import tensorflow as tf

from capsule_ops import BuildError

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_HERE, name) for name in ("kernels.cc", "votes_kernels.cc", "fold_kernels.cc"))
# included by the sources: part of the cache key
HEADERS = tuple(os.path.join(_HERE, name) for name in ("op_common.h", "pose_math.h"))
LIBRARY_NAME = "capsule_ops.so"
CACHE_ENV = "CAPSNET_OPS_CACHE"
DEFAULT_CACHE = os.path.join("~", ".cache", "capsnet-em-ops")
COMPILER_ENV = "CXX"
DEFAULT_COMPILER = "g++"
MARCH_ENV = "CAPSNET_OPS_MARCH"
DEFAULT_MARCH = "native"
# -fopenmp-simd: the `#pragma omp simd` loops over the 16 pose entries, without the OpenMP runtime.
BASE_FLAGS = ("-O3", "-fopenmp-simd", "-shared", "-fPIC", "-Wno-deprecated-declarations")
BUILD_TIMEOUT_S = 600  # a build takes 10-40 s on the 2-core dev machine
# TensorFlow 2.21's Eigen does not compile its AVX512-FP16 half-precision packets with g++ 12 ("expected
# initializer before '<' token" in PacketMathFP16.h), so a target with AVX512-FP16 (an Intel Xeon of the
# Sapphire Rapids generation under -march=native) is built without it; the kernels use no half precision.
NO_FP16_FLAG = "-mno-avx512fp16"
FP16_MACRO = "__AVX512FP16__"  # defined by the compiler when the target has AVX512-FP16
HASH_CHARS = 16
ERROR_CHARS = 300  # of a failed compile's output, when no line names an error


def _cpu_flags():
    """This CPU's feature flags (the `flags` line of /proc/cpuinfo), or '' where there is none."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.lru_cache(maxsize=None)
def _target_has_fp16(compiler, march_flag):
    """Whether `compiler` with `march_flag` enables AVX512-FP16 (its predefined macros name FP16_MACRO).

    Asked once per process and target: `library_path` (every start-up, even when the library is cached) and
    `build` both make the compile command."""
    try:
        result = subprocess.run(
            [compiler, march_flag, "-dM", "-E", "-x", "c++", os.devnull],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False  # the build itself will report the compiler's trouble
    return FP16_MACRO in result.stdout


def compile_command(output):
    """The compiler's argument list that builds `output` from SOURCES. BuildError when there is no compiler."""
    compiler = os.environ.get(COMPILER_ENV) or DEFAULT_COMPILER
    path = shutil.which(compiler)
    if path is None:
        raise BuildError("no C++ compiler %r on PATH (set %s)" % (compiler, COMPILER_ENV))
    target = ["-march=" + (os.environ.get(MARCH_ENV) or DEFAULT_MARCH)]
    if _target_has_fp16(path, target[0]):
        target.append(NO_FP16_FLAG)
    return (
        [path, *target, *BASE_FLAGS, *SOURCES, "-o", output]
        + tf.sysconfig.get_compile_flags()
        + tf.sysconfig.get_link_flags()
    )


def library_path():
    """Where the library for this source, TensorFlow, compiler, flags (and CPU, for -march=native) lives."""
    command = [os.path.basename(arg) if arg in SOURCES else arg for arg in compile_command(LIBRARY_NAME)]
    key = hashlib.sha256()  # the sources by content, not by where this checkout lies
    for name in SOURCES + HEADERS:
        with open(name, "rb") as source:
            key.update(source.read())
    key.update(("\0".join([tf.__version__, sys.version] + command)).encode())
    if "-march=native" in command:
        key.update(_cpu_flags().encode())
    cache = os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    return os.path.join(cache, key.hexdigest()[:HASH_CHARS], LIBRARY_NAME)


def _failure(stderr):
    """One short line for a failed compile: the sources and the compiler's first error, its file by name only."""
    sources = ", ".join(os.path.basename(name) for name in SOURCES)
    errors = [line for line in stderr.splitlines() if "error" in line]
    if not errors:
        return "compiling %s failed: %s" % (sources, stderr[-ERROR_CHARS:].strip())
    path, colon, rest = errors[0].partition(":")
    return "compiling %s failed (%d errors), first: %s" % (sources, len(errors), os.path.basename(path) + colon + rest)


def build():
    """The built library's path: from the cache, or compiled now (under a lock). BuildError on failure."""
    path = library_path()
    if os.path.exists(path):
        return path
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait, then use its result
        if os.path.exists(path):
            return path
        partial = "%s.%d.tmp" % (path, os.getpid())
        try:
            result = subprocess.run(
                compile_command(partial), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise BuildError("the compiler did not run: %s" % error) from None
        if result.returncode != 0:
            raise BuildError(_failure(result.stderr))
        os.replace(partial, path)  # atomic: a reader never sees a half-written library
    return path


def main():
    try:
        print(build())
    except BuildError as error:
        raise SystemExit("error: %s" % error) from None


if __name__ == "__main__":
    main()
