"""Instruction census of a compiled kernel's hot loop, from the SASS that triton's bundled ``cuobjdump`` prints.

A decode kernel over packed codes is bound by instruction issue long before it is bound by bytes, so the
count a warp issues per cached token is the number to watch (its floor time is tokens x count /
(4 schedulers x SMs x clock)), and a shared-memory instruction in the loop means a layout conversion
crept back in. Works on a CPU-only machine: kernels compile ahead of time for sm_90a.
"""

from __future__ import annotations

import collections
import re
import subprocess
import tempfile
from pathlib import Path


def disassemble(kernel) -> tuple[str, str]:
    """(resource usage, SASS) of a compiled triton kernel."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        return tuple(subprocess.run([cuobjdump, flag, cubin], capture_output=True, text=True, check=True).stdout
                     for flag in ("--dump-resource-usage", "--dump-sass"))


def hot_loop(sass: str) -> tuple[list[str], int]:
    """Instructions of the loop with the most HMMAs, and how many of them sit in forward-branched blocks."""
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    index = {a: i for i, (a, _) in enumerate(ins)}
    loops = []  # (first, last) of every backward branch
    for i, (_, text) in enumerate(ins):
        target = re.search(r"BRA\s+0x([0-9a-f]+)", text)
        if target and index.get(int(target.group(1), 16), i) < i:
            loops.append((index[int(target.group(1), 16)], i))
    first, last = max(loops, key=lambda span: sum("HMMA" in t for _, t in ins[span[0] : span[1] + 1]))
    skipped = 0  # conditional forward branches inside the loop: blocks most steps skip
    for i in range(first, last):
        forward = re.search(r"^@!?P\d\s+BRA\s+0x([0-9a-f]+)", ins[i][1])
        if forward and i < index.get(int(forward.group(1), 16), -1) <= last:
            skipped += index[int(forward.group(1), 16)] - i - 1
    return [t for _, t in ins[first : last + 1]], skipped


def opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def loop_census(kernel, tokens_per_iteration: int) -> dict:
    """Opcode counts of the hot loop, plus ``registers``, ``stack`` (bytes spilled a thread), ``loop`` (its
    length), ``skipped`` and ``per_token``: instructions a warp issues per token of an iteration."""
    usage, sass = disassemble(kernel)
    loop, skipped = hot_loop(sass)
    regs = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    census = collections.Counter(opcode(t) for t in loop)
    return dict(census, BAR=census.get("BAR", 0), LDS=census.get("LDS", 0), STS=census.get("STS", 0),
                registers=int(regs.group(1)), stack=int(regs.group(2)), loop=len(loop), skipped=skipped,
                per_token=(len(loop) - skipped) / tokens_per_iteration)
