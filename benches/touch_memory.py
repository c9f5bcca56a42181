#!/usr/bin/env python3
"""Touch N GiB of fresh memory, then free it: `touch_memory.py [GIB]` (default 4).

Why: on a VM whose balloon reports freed memory to the host (Firecracker
here: `page_reporting.page_reporting_order=11`), the first write to a guest
page the host has taken back is a host page fault. Writing a 2.5 GB file
into the page cache then costs anything from 1 to 10 s of system time,
depending on how much of the free memory the host still backs. Touching the
memory just before a timed command (the host backs it again, and the
kernel reports freed memory to the host only after a delay, not measured
here) made the next 2.5 GB write cost 1.1-1.3 s instead of 4.8-5.3 s.
The benchmarks run it before every contender's timed command alike.
"""
import mmap
import sys

size = int(float(sys.argv[1]) * 2**30) if len(sys.argv) > 1 else 4 << 30
page = mmap.PAGESIZE
buf = mmap.mmap(-1, size)
for offset in range(0, size, page):
    buf[offset] = 1
buf.close()
