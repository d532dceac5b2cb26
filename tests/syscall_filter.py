"""The systemd units' system call filter without systemd: `python tests/syscall_filter.py CMD...`
runs CMD (and everything it starts) under a seccomp filter that allows what the units allow.

The units say `SystemCallFilter=@system-service`, `SystemCallFilter=~@privileged`,
`SystemCallErrorNumber=EPERM` and `RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
AF_NETLINK`. Here the groups are expanded by `systemd-analyze syscall-filter` (so they are
this systemd's), numbered from the kernel headers, and compiled into a classic BPF
program: a call outside the list fails with EPERM, a socket() of another family with
EAFNOSUPPORT, as under systemd. Only the filter is emulated, not the namespaces or the
read-only file system. x86_64 only; `unavailable()` says why it cannot run elsewhere.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

# the kernel's system call numbers: Debian's multiarch place, then everyone else's
UNISTD = next((p for p in (Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"), Path("/usr/include/asm/unistd_64.h"))
               if p.exists()), Path("/usr/include/asm/unistd_64.h"))  # fmt: skip
FAMILIES = (1, 2, 10, 16)  # AF_UNIX, AF_INET, AF_INET6, AF_NETLINK
EPERM, EAFNOSUPPORT = 1, 97
_LD_ABS, _JEQ, _RET = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
_ALLOW, _KILL, _ERRNO = 0x7FFF0000, 0, 0x00050000
_AUDIT_ARCH_X86_64 = 0xC000003E
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2


def unavailable() -> str | None:
    """Why the filter cannot be built here, or None."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return "the emulated filter is for Linux on x86_64"
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze (which expands the filter's groups) is not installed"
    if not UNISTD.exists():
        return f"{UNISTD} (the system call numbers) is missing: install the kernel headers (linux-libc-dev)"
    return None


def expand(group: str) -> set[str]:
    """The system calls a `@group` names, nested groups included."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        name = line.strip()
        if name and not name.startswith("#"):
            calls |= expand(name) if name.startswith("@") else {name}
    return calls


def program() -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) instructions: the arch, socket()'s family, then the allow list."""
    numbers = {m[1]: int(m[2]) for m in re.finditer(r"#define __NR_(\w+) (\d+)", UNISTD.read_text())}
    allowed = sorted({numbers[c] for c in expand("@system-service") - expand("@privileged") if c in numbers})
    prog = [(_LD_ABS, 0, 0, 4), (_JEQ, 1, 0, _AUDIT_ARCH_X86_64), (_RET, 0, 0, _KILL),  # native ABI only
            (_LD_ABS, 0, 0, 0), (_JEQ, 0, len(FAMILIES) + 3, numbers["socket"]),  # not socket(): the list
            (_LD_ABS, 0, 0, 16)]  # fmt: skip
    prog += [(_JEQ, len(FAMILIES) - i, 0, family) for i, family in enumerate(FAMILIES)]  # to ALLOW below
    prog += [(_RET, 0, 0, _ERRNO | EAFNOSUPPORT), (_RET, 0, 0, _ALLOW)]
    for number in allowed:
        prog += [(_JEQ, 0, 1, number), (_RET, 0, 0, _ALLOW)]
    return prog + [(_RET, 0, 0, _ERRNO | EPERM)]


class _Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Insn))]


def install() -> None:
    """Put this process (and what it starts) under the filter; OSError names the refusal."""
    insns = program()
    table = (_Insn * len(insns))(*(_Insn(*i) for i in insns))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or libc.prctl(
            _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(_Prog(len(insns), table)), 0, 0) != 0:  # fmt: skip
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp filter: {os.strerror(err)}")


if __name__ == "__main__":
    install()
    os.execvp(sys.argv[1], sys.argv[1:])
