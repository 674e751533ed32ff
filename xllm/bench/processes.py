"""Memory of a process tree (a whole `xllm up`), read from /proc: for soak runs."""

import os
from pathlib import Path


def descendants(root: int) -> dict[int, int]:
    """pid -> parent pid, for `root` and every process under it."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        try:
            children.setdefault(int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(d.name))
        except (OSError, IndexError, ValueError):
            continue  # not a process, or gone
    out, todo = {}, [(root, 0)]
    while todo:
        pid, ppid = todo.pop()
        out[pid] = ppid
        todo.extend((child, pid) for child in children.get(pid, []))
    return out


def rss_mib(root: int) -> dict[int, tuple[str, float]]:
    """pid -> (name from its command line, VmRSS in MiB), for `root` and every process under it."""
    out = {}
    for pid, ppid in descendants(root).items():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        if not argv[0]:
            continue  # a zombie
        name = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else os.path.basename(argv[0])
        if "-c" in argv[:-1]:  # say, `python -c "from multiprocessing.resource_tracker import main; ..."`
            code = argv[argv.index("-c") + 1]
            name = code.split()[1] if code.startswith("from ") else f"-c {' '.join(code.split())[:30]}"
        if "--instance-id" in argv[:-1]:
            name += f" ({argv[argv.index('--instance-id') + 1]})"
        if ppid not in (0, root):
            name += f" (under {ppid})"
        out[pid] = (name, next((int(x.split()[1]) / 1024 for x in status if x.startswith("VmRSS:")), 0.0))
    return out


def memory_line(root: int) -> str:
    """RSS of the system's big processes, split into anonymous memory and shared memory (KV export
    segments), to tell a leak (anon climbing for good) from caches filling up to their bound."""
    parts = []
    for pid, (name, mib) in sorted(rss_mib(root).items()):
        if mib > 100:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            kib = {x.split(":")[0]: int(x.split()[1]) for x in status if x.startswith(("RssAnon:", "RssShmem:"))}
            parts.append(
                f"{name.split()[0].removeprefix('services.')} {mib:.0f} MiB "
                f"(anon {kib.get('RssAnon', 0) / 1024:.0f}, shm {kib.get('RssShmem', 0) / 1024:.0f})"
            )
    return "; ".join(parts)
