"""What faiss-gpu accepts, checked before an index is cloned to a GPU: the nprobe limit and the compiled GPU code.

Two ways the clone of a CPU index to faiss-gpu goes wrong, and what this module does about each:

* **nprobe above 2048.** ``GpuIndexIVF::copyFrom`` and every GPU IVF search call ``faiss::gpu::validateNProbe``
  (``faiss/gpu/impl/IndexUtils.cu``), which throws unless ``0 < nprobe <= getMaxKSelection()``, i.e.
  ``GPU_MAX_SELECTION_K`` = 2048 (``faiss/gpu/utils/DeviceDefs.cuh``; 16384 only in cuVS builds). Auto-sized IVF
  indexes pass that from about 16.8M vectors on (wiki-18's 21M passages: nlist 18337, nprobe 2292), and the thrown
  error used to send the whole index back to CPU. :func:`clamp_nprobe` caps the value at :data:`GPU_MAX_NPROBE`
  (and at ``nlist``: the GPU IVF scan ``FAISS_ASSERT``\\ s ``nprobe <= numLists_``, an abort, where the CPU index
  just clamps) and logs the value it replaced.
* **No code for the GPU.** A faiss build without kernels for the GPU's compute capability does not raise: the first
  kernel launch fails with CUDA error 209 and ``FAISS_ASSERT`` aborts the process (faiss-gpu-cu12 1.14.1.post1 has
  SASS for sm_70/sm_80 only and no PTX, so it aborts on H100/H200, sm_90). faiss exposes no list of the
  architectures it was compiled for (``faiss.get_compile_options()`` says only ``"GPU"``), so
  :func:`faiss_cuda_archs` reads them from the ``.nv_fatbin`` ELF section of the faiss shared libraries, and
  :func:`check_faiss_gpu_code` refuses with :class:`~searchrl.errors.FailedPrecondition` (naming the GPU, its
  compute capability and the compiled architectures) before any kernel runs. faiss-gpu 1.15.1 carries SASS for
  sm_70/75/80/86/89/90 plus compute_90 PTX (measured with this reader on the PyPI wheel: 182 fat binaries).

Compatibility rule (CUDA C Programming Guide, "Binary Compatibility" and "PTX Compatibility"): SASS for ``sm_XY``
runs on compute capability ``X.Z`` with ``Z >= Y`` (same major only); PTX for ``compute_XY`` is JIT-compiled by the
driver for any compute capability ``>= X.Y``.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("searchrl.retriever.gpu")

#: Largest IVF ``nprobe`` faiss-gpu accepts: ``GPU_MAX_SELECTION_K`` (``faiss/gpu/utils/DeviceDefs.cuh``), enforced by
#: ``faiss::gpu::validateNProbe`` in ``GpuIndexIVF::copyFrom`` and ``GpuIndexIVF::getCurrentNProbe_`` (faiss 1.15.1).
GPU_MAX_NPROBE = 2048

_FATBIN_MAGIC = 0xBA55ED50
_KIND_PTX = 1
_KIND_SASS = 2


def clamp_nprobe(nprobe: int, nlist: int = 0, where: str = "") -> int:
    """``nprobe`` capped at :data:`GPU_MAX_NPROBE` and at ``nlist`` (when > 0), logging a warning when it changes.

    Args:
        nprobe: requested IVF cells per query.
        nlist: the index's IVF cell count (0: unknown, not applied).
        where: what the value belongs to, for the log line (e.g. the index name).

    Returns:
        The value a faiss-gpu IVF index accepts (unchanged when already within the limits).
    """
    limit = GPU_MAX_NPROBE if nlist <= 0 else min(GPU_MAX_NPROBE, nlist)
    if nprobe <= limit:
        return nprobe
    reason = (
        f"faiss-gpu's GPU_MAX_SELECTION_K={GPU_MAX_NPROBE}" if limit == GPU_MAX_NPROBE else f"the index's nlist={nlist}"
    )
    log.warning(
        "%snprobe=%d exceeds %s on GPU; clamped to nprobe=%d", f"{where}: " if where else "", nprobe, reason, limit
    )
    return limit


@dataclass(frozen=True)
class CudaArchs:
    """GPU code compiled into a library: SASS (``sass``) and PTX (``ptx``) architectures as ``10 * major + minor``.

    Attributes:
        sass: e.g. ``{70, 75, 80, 86, 89, 90}``.
        ptx: e.g. ``{90}``.
        files: the shared libraries they were read from.
    """

    sass: frozenset[int]
    ptx: frozenset[int]
    files: tuple[str, ...] = ()

    def runs_on(self, major: int, minor: int) -> bool:
        """True when a device of compute capability ``major.minor`` can run this code (module docstring's rule)."""
        cc = 10 * major + minor
        if any(a // 10 == major and a % 10 <= minor for a in self.sass):
            return True
        return any(a <= cc for a in self.ptx)

    def describe(self) -> str:
        """``"sm_70, sm_80, compute_90"``-style list."""
        parts = [f"sm_{a}" for a in sorted(self.sass)] + [f"compute_{a}" for a in sorted(self.ptx)]
        return ", ".join(parts) or "none"


def _elf_section(buf: mmap.mmap | bytes, name: bytes) -> tuple[int, int] | None:
    """``(offset, size)`` of section ``name`` in a little-endian ELF64 file, or ``None``."""
    if len(buf) < 64 or buf[:4] != b"\x7fELF" or buf[4] != 2 or buf[5] != 1:
        return None
    (shoff,) = struct.unpack_from("<Q", buf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", buf, 0x3A)
    if shoff == 0 or shnum == 0 or shstrndx >= shnum or shoff + shnum * shentsize > len(buf):
        return None
    str_off = struct.unpack_from("<Q", buf, shoff + shstrndx * shentsize + 0x18)[0]
    for i in range(shnum):
        base = shoff + i * shentsize
        (name_off,) = struct.unpack_from("<I", buf, base)
        start = str_off + name_off
        if buf[start : start + len(name) + 1] == name + b"\0":
            off, size = struct.unpack_from("<QQ", buf, base + 0x18)
            return (off, size) if off + size <= len(buf) else None
    return None


def fatbin_archs(path: str | Path) -> tuple[set[int], set[int]] | None:
    """SASS and PTX architectures in the ``.nv_fatbin`` section of the ELF shared library ``path``.

    The section is a sequence of fat binaries, each a 16-byte header (magic ``0xBA55ED50``, version, header size,
    payload size) followed by entries whose header holds the kind (1 = PTX, 2 = ELF/SASS) at byte 0, the entry's
    header and payload sizes at bytes 4 and 8, and the architecture (``10 * major + minor``) at byte 28: the layout
    ``cuobjdump`` lists.

    Returns:
        ``(sass, ptx)``, or ``None`` when the file is not an ELF64 library or has no ``.nv_fatbin`` section.
    """
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            sec = _elf_section(buf, b".nv_fatbin")
            if sec is None:
                return None
            sass: set[int] = set()
            ptx: set[int] = set()
            pos, end = sec[0], sec[0] + sec[1]
            while pos + 16 <= end:
                magic, _version, header, size = struct.unpack_from("<IHHQ", buf, pos)
                if magic != _FATBIN_MAGIC:
                    pos += 8  # fat binaries are 8-byte aligned; skip padding
                    continue
                entry, stop = pos + header, min(end, pos + header + size)
                while entry + 32 <= stop:
                    kind, _, entry_header, payload = struct.unpack_from("<HHIQ", buf, entry)
                    (arch,) = struct.unpack_from("<I", buf, entry + 28)
                    if kind == _KIND_SASS:
                        sass.add(arch)
                    elif kind == _KIND_PTX:
                        ptx.add(arch)
                    if entry_header == 0:
                        break
                    entry += entry_header + payload
                pos = max(stop, pos + 16)
            return sass, ptx
    except (OSError, ValueError, struct.error):
        return None


def faiss_library_files(faiss_module: object | None = None) -> list[Path]:
    """Shared libraries of the imported faiss package: ``faiss/*.so*`` and the wheel's ``faiss*.libs/*.so*``."""
    if faiss_module is None:
        import faiss as faiss_module  # type: ignore[no-redef]
    pkg = Path(getattr(faiss_module, "__file__", "") or ".").resolve().parent
    files = sorted(p for p in pkg.glob("*.so*") if p.is_file())
    for libs in sorted(pkg.parent.glob("faiss*.libs")):
        files += sorted(p for p in libs.glob("*.so*") if p.is_file() and "faiss" in p.name)
    return files


def faiss_cuda_archs(files: Iterable[str | Path] | None = None) -> CudaArchs | None:
    """The GPU code compiled into faiss (:func:`fatbin_archs` over :func:`faiss_library_files`).

    Returns:
        The union over the libraries, or ``None`` when none holds a ``.nv_fatbin`` section (faiss-cpu, or a build that
        keeps its CUDA code elsewhere, e.g. a conda install whose ``libfaiss.so`` is outside the package).
    """
    paths = [Path(p) for p in (faiss_library_files() if files is None else files)]
    sass: set[int] = set()
    ptx: set[int] = set()
    used: list[str] = []
    for p in paths:
        got = fatbin_archs(p)
        if got is not None and (got[0] or got[1]):
            sass |= got[0]
            ptx |= got[1]
            used.append(str(p))
    if not used:
        return None
    return CudaArchs(frozenset(sass), frozenset(ptx), tuple(used))


@dataclass(frozen=True)
class CudaDevice:
    """One visible CUDA device (``CUDA_VISIBLE_DEVICES`` order, as faiss numbers them)."""

    index: int
    name: str
    major: int
    minor: int

    @property
    def compute_capability(self) -> str:
        return f"{self.major}.{self.minor}"


def cuda_devices() -> list[CudaDevice] | None:
    """The visible CUDA devices with their compute capability, from the CUDA driver API (``libcuda.so.1``).

    Returns:
        The devices, or ``None`` when the driver library cannot be loaded or initialised.
    """
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    if cuda.cuInit(0) != 0:
        return None
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return None
    out: list[CudaDevice] = []
    for i in range(count.value):
        dev = ctypes.c_int(0)
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        name = ctypes.create_string_buffer(256)
        if cuda.cuDeviceGet(ctypes.byref(dev), i) != 0:
            return None
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76 (cuda.h)
        if cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) or cuda.cuDeviceGetAttribute(
            ctypes.byref(minor), 76, dev
        ):
            return None
        cuda.cuDeviceGetName(name, 256, dev)
        out.append(CudaDevice(i, name.value.decode(errors="replace"), major.value, minor.value))
    return out


def check_faiss_gpu_code(archs: CudaArchs | None, devices: list[CudaDevice] | None) -> None:
    """Refuses GPUs that the installed faiss has no code for, instead of letting the first kernel abort the process.

    Args:
        archs: :func:`faiss_cuda_archs` (``None``: unknown, nothing is checked and an info line is logged).
        devices: :func:`cuda_devices` (``None``: unknown, nothing is checked).

    Raises:
        FailedPrecondition: a visible GPU's compute capability is not covered by ``archs``; the message names the
            GPU, its compute capability, the compiled architectures and the fixes (faiss-gpu 1.15.1 or
            ``--use-gpu=false``).
    """
    if archs is None or devices is None:
        log.info(
            "could not read the CUDA architectures compiled into faiss (archs=%s, devices=%s); not checked",
            None if archs is None else archs.describe(),
            devices,
        )
        return
    bad = [d for d in devices if not archs.runs_on(d.major, d.minor)]
    if bad:
        from searchrl.errors import FailedPrecondition

        which = ", ".join(f"GPU {d.index} {d.name} (compute capability {d.compute_capability})" for d in bad)
        raise FailedPrecondition(
            f"the installed faiss has no GPU code for {which}: it was compiled for {archs.describe()} "
            f"({', '.join(archs.files)}); install faiss-gpu==1.15.1 (sm_70-sm_90 + compute_90 PTX), or serve the "
            "index from CPU with --use-gpu=false"
        )
