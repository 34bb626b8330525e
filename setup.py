"""Builds ring_ext._C against the installed torch (use `pip install --no-build-isolation .`).

Environment (read here and nowhere else at build time):
  RING_EXT_CUDA           auto (default) | 0 | 1. auto builds the CUDA part when the installed torch is a
                          CUDA build and nvcc is found; 1 forces it and fails without nvcc; 0 skips it.
                          Never decided from torch.cuda.is_available(): build boxes often have no GPU.
  TORCH_CUDA_ARCH_LIST    CUDA archs, default "8.0+PTX;9.0a": sm_80 machine code (which sm_86/89 run too),
                          sm_90a machine code (H100/H200), and sm_80 PTX that the driver JIT-compiles on newer
                          GPUs (Blackwell sm_100/120). "X.Y+PTX" embeds PTX for X.Y next to its machine code;
                          a list without +PTX runs on the listed GPUs only (a warning says so).
  RING_EXT_CPU_ISAS       auto (default) | portable. auto: on x86-64 the AVX-512 (with and without BF16)
                          and AVX2 kernels are built next to the portable baseline and picked at run time; on other hosts (aarch64:
                          GH200, GB200) only the baseline. portable: only the baseline, on any host.
  RING_EXT_PTXAS_VERBOSE  1 prints ptxas register/spill reports for every kernel.
  RING_EXT_EMULATE_AVX512 a directory holding SIMDe's simde/ headers: a test build whose AVX-512 kernels
                          run on AVX2 with emulated intrinsics, to test them on a CPU without AVX-512
                          (Note [Emulated AVX-512] in csrc/cpu/emulated_avx512.h; .ci/emulated_avx512.sh).
                          Never for use: its speed means nothing.
  MAX_JOBS                parallel compile jobs (ninja), honoured by torch's BuildExtension.
  CUDA_HOME               the CUDA toolkit, e.g. /usr/local/cuda.
"""

import glob
import os
import platform
import re
import shutil
import sys

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0+PTX;9.0a"
X86_ISA_SOURCES = (  # x86-64 only
    "csrc/cpu/kernels_avx512.cpp",
    "csrc/cpu/kernels_avx512f.cpp",
    "csrc/cpu/kernels_avx2.cpp",
)


def want_cuda() -> bool:
    mode = os.environ.get("RING_EXT_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"RING_EXT_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    nvcc_found = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    torch_has_cuda = torch.version.cuda is not None
    if mode == "1":
        if not nvcc_found:
            sys.exit("RING_EXT_CUDA=1 but nvcc was not found: set CUDA_HOME to the CUDA toolkit")
        if not torch_has_cuda:
            sys.exit(f"RING_EXT_CUDA=1 but the installed torch {torch.__version__} is a CPU build")
        return True
    return nvcc_found and torch_has_cuda


def pip_cuda_includes() -> list:
    """Headers of the pip CUDA wheels (cuBLAS, cuSPARSE, ...) that torch's CUDA headers include."""
    found = []
    for path in sys.path:
        found += glob.glob(os.path.join(path, "nvidia", "cu*", "include"))
        found += glob.glob(os.path.join(path, "nvidia", "*", "include"))
    return sorted({p for p in found if os.path.isdir(p)})


def parse_archs(spec: str) -> list:
    """TORCH_CUDA_ARCH_LIST entries ("8.0", "9.0a", "8.0+PTX"), separated by ';' or spaces."""
    archs = [a for a in spec.replace(" ", ";").split(";") if a]
    bad = [a for a in archs if not re.fullmatch(r"\d+\.\d+[af]?(\+PTX)?", a)]
    if bad or not archs:
        sys.exit(f"TORCH_CUDA_ARCH_LIST: expected entries like 8.0, 9.0a or 8.0+PTX, got {spec!r}")
    if not any(a.endswith("+PTX") for a in archs):
        print(
            f"ring_ext: TORCH_CUDA_ARCH_LIST={spec!r} embeds no PTX: the kernels run only on the GPUs listed"
            " and their minor revisions (add +PTX to the lowest arch, as the default 8.0+PTX does, for newer"
            " GPUs to JIT-compile it)",
            file=sys.stderr,
        )
    return archs


def arch_flags(archs: list) -> list:
    """-gencode pairs: machine code (sm_XY) for every arch, and PTX (compute_XY) where +PTX is given."""
    flags = []
    for arch in archs:
        num = arch.removesuffix("+PTX").replace(".", "")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if arch.endswith("+PTX"):
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags


def cpu_isas() -> list:
    """The CPU kernel builds: x86 ISAs only on x86-64 hosts and unless RING_EXT_CPU_ISAS=portable."""
    mode = os.environ.get("RING_EXT_CPU_ISAS", "auto").lower()
    if mode not in ("auto", "portable"):
        sys.exit(f"RING_EXT_CPU_ISAS must be auto or portable, got {mode!r}")
    x86_64 = platform.machine().lower() in ("x86_64", "amd64")
    return ["avx512", "avx512f", "avx2", "baseline"] if mode == "auto" and x86_64 else ["baseline"]


def emulated_avx512() -> str | None:
    """The SIMDe include directory of a test build with emulated AVX-512 kernels, or None."""
    simde = os.environ.get("RING_EXT_EMULATE_AVX512") or None
    if simde is not None and not os.path.isfile(os.path.join(simde, "simde", "x86", "avx512.h")):
        sys.exit(f"RING_EXT_EMULATE_AVX512={simde!r} holds no simde/x86/avx512.h (SIMDe's headers)")
    return simde


def write_build_info(cuda: bool, archs: list, isas: list, emulated: bool) -> None:
    with open(os.path.join(ROOT, "ring_ext", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"CUDA = {cuda!r}\nCUDA_ARCHS = {archs!r}\nBUILT_WITH_TORCH = {torch.__version__!r}\n")
        f.write(f"CPU_ISAS = {isas!r}\nEMULATED_AVX512 = {emulated!r}\n")


def extension():
    cuda = want_cuda()
    archs = parse_archs(os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)) if cuda else []
    isas = cpu_isas()
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp"))
    if "avx2" not in isas:
        cpu_sources = [s for s in cpu_sources if s not in X86_ISA_SOURCES]
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/common/*.cpp")) + cpu_sources
    sources += sorted(glob.glob("csrc/cp/*.cpp"))
    # C++20: torch >= 2.14 headers need it. -fopenmp: at::parallel_for is a header template compiled
    # here, which runs serially unless _OPENMP is defined (torch's wheel ships the libgomp it uses).
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp"]
    if "avx2" not in isas:
        cxx.append("-DRING_EXT_CPU_PORTABLE_ONLY")  # dispatch.cpp: the baseline kernels only
    simde = emulated_avx512()
    if simde is not None:
        if "avx2" not in isas:
            sys.exit("RING_EXT_EMULATE_AVX512 needs the x86 kernels (not RING_EXT_CPU_ISAS=portable)")
        cxx += ["-DRING_EXT_EMULATE_AVX512", f"-I{simde}"]
    args = {"cxx": cxx}
    kwargs = {}
    if cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        # No --use_fast_math: the float32 SIMT kernels promise float32 accuracy (IEEE expf, logf and
        # division); the tensor-core kernels call ex2.approx explicitly where they want it.
        nvcc = ["-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"]
        nvcc += arch_flags(archs)
        if os.environ.get("RING_EXT_PTXAS_VERBOSE") == "1":
            nvcc.append("-Xptxas=-v")
        args["nvcc"] = nvcc
        args["cxx"] = cxx + ["-DRING_EXT_WITH_CUDA"]
        kwargs["include_dirs"] = pip_cuda_includes()  # our -gencode flags replace torch's own
    write_build_info(cuda, archs, isas, simde is not None)
    make = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    return make(
        "ring_ext._C",
        sources,
        extra_compile_args=args,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
        **kwargs,
    )


if shutil.which("ninja") is None:
    print("ring_ext: ninja not found, falling back to a slower serial build", file=sys.stderr)

setup(
    ext_modules=[extension()],
    cmdclass={
        "build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    },
)
