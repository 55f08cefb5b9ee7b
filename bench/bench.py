#!/usr/bin/env python3
"""Benchmark harness for dirsync (Python 3.11, standard library only).

Compares `dirsync sync` with rsync, rclone, `cp -a` and a stat-only `find` walk on
deterministic synthetic trees. See bench/README.md for the workloads and targets.

Usage:
  python3 bench/bench.py --scale small|full [--root /dev/shm/dirsync-bench] [--runs 3]
      [--tools dirsync,rsync,rclone,cp,find] [--workloads W1,W2,...] [--dirsync PATH]
      [--out FILE] [--json FILE] [--keep] [--rss-method auto|ptrace|cgroup|rusage]

Markdown goes to stdout (and to --out); progress goes to stderr.
Exit status: 0 when every run that was attempted left a correct replica, 1 when any run
FAILED (wrong replica, non-zero exit, timeout) or dirsync could not be built, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import hashlib
import json
import os
import pickle
import platform
import random
import shlex
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SEED = 42
KiB = 1 << 10
MiB = 1 << 20
MAX_SMALL_FILE = 16 * KiB
ALL_TOOLS = ["dirsync", "dirsync-base", "rsync", "rclone", "cp", "find"]
ALL_WORKLOADS = ["W1", "W2", "W3", "W4", "W5", "W6", "W7"]
ROOT_MARKER = ".dirsync-bench-root"
# Base mtimes of generated entries lie in [T_BASE_LO, T_BASE_HI); mutations use later,
# still fixed, times so that every tool sees byte- and metadata-identical sources.
T_BASE_LO = 1_600_000_000 * 10**9
T_BASE_HI = 1_700_000_000 * 10**9
T_MUTATE = 1_710_000_000 * 10**9

SCALES = {
    "full": dict(
        tree_files=100_000, tree_dirs=5_000, tree_links=100,
        churn=100,
        big_count=8, big_size=256 * MiB,
        rename_big=256 * MiB, rename_files=10_000,
        copy_big=256 * MiB,
        w7=[10_000, 100_000, 300_000],
    ),
    "small": dict(
        tree_files=10_000, tree_dirs=500, tree_links=10,
        churn=10,
        big_count=8, big_size=25 * MiB,
        rename_big=25 * MiB, rename_files=1_000,
        copy_big=25 * MiB,
        w7=[1_000, 10_000, 30_000],
    ),
}

WORKLOAD_TOOLS = {
    "W1": ["dirsync", "dirsync-base", "rsync", "rclone", "cp"],
    "W2": ["dirsync", "dirsync-base", "rsync", "rclone", "find"],
    "W3": ["dirsync", "dirsync-base", "rsync", "rclone", "find"],
    "W4": ["dirsync", "dirsync-base", "rsync", "rclone", "cp"],
    "W5": ["dirsync", "dirsync-base", "rsync", "rclone", "find"],
    "W6": ["dirsync", "dirsync-base", "rsync", "rclone", "find"],
    "W7": ["dirsync", "dirsync-base", "rsync", "rclone", "find"],
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Process runner with per-process peak RSS
# --------------------------------------------------------------------------------------

_PTRACE_TRACEME = 0
_PTRACE_CONT = 7
_PTRACE_SETOPTIONS = 0x4200
_PTRACE_O_TRACEFORK = 0x02
_PTRACE_O_TRACEVFORK = 0x04
_PTRACE_O_TRACECLONE = 0x08
_PTRACE_O_TRACEEXEC = 0x10
_PTRACE_O_TRACEEXIT = 0x40
_PTRACE_O_EXITKILL = 0x100000
_PTRACE_EVENT_EXIT = 6
_WALL = 0x40000000

_libc = None


def _get_libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        _libc.ptrace.restype = ctypes.c_long
    return _libc


@dataclass
class ProcResult:
    wall: float
    rc: int | None           # exit code; negative = killed by signal; None = not started
    rss_kib: int             # summed peak RSS (method dependent)
    cpu: float               # user+sys seconds of the whole tree
    timed_out: bool = False
    nproc: int = 0           # processes seen (ptrace only)


def _read_hwm(pid: int) -> tuple[int, int] | None:
    """(tgid, VmHWM KiB) of a task, read at its exit stop while its memory still exists."""
    try:
        tgid = hwm = None
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Tgid:"):
                    tgid = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
        if tgid is None:
            return None
        return tgid, hwm or 0
    except (OSError, ValueError):
        return None


class Runner:
    """Runs a command, returns wall time and peak RSS of the whole process tree.

    methods:
      ptrace : the command runs traced (fork/vfork/clone/exec/exit events only, no syscall
               tracing); at each task's exit stop its VmHWM is read from /proc; the per-process
               peaks are summed. Exact per-process peaks, summed over the tree.
      cgroup : cgroup v2 child group per run, memory.peak. NOTE: memory.peak also counts page
               cache and tmpfs pages the command writes, so on /dev/shm it includes the data
               copied; it is an upper bound, not RSS.
      rusage : ru_maxrss of the direct child from wait4 (helper processes such as rsync's
               receiver and generator are NOT included).
    """

    def __init__(self, method: str):
        self.method = method
        self._cg_base: Path | None = None
        self._cg_n = 0

    # -- detection --
    @classmethod
    def detect(cls, wanted: str) -> "Runner":
        order = ["ptrace", "cgroup", "rusage"] if wanted == "auto" else [wanted]
        errors = []
        for m in order:
            r = cls(m)
            ok, why = r._probe()
            if ok:
                r.probe_notes = errors
                return r
            errors.append(f"{m}: {why}")
        sys.exit("no usable RSS method: " + "; ".join(errors))

    def _probe(self) -> tuple[bool, str]:
        if self.method == "rusage":
            return True, ""
        if self.method == "cgroup":
            try:
                own = None
                for line in Path("/proc/self/cgroup").read_text().splitlines():
                    if line.startswith("0::"):
                        own = line[3:]
                if own is None:
                    return False, "no cgroup v2 entry in /proc/self/cgroup"
                base = Path("/sys/fs/cgroup") / own.lstrip("/")
                if not (base / "cgroup.controllers").exists():
                    return False, f"{base} is not a cgroup v2 directory"
                probe = base / f"dirsync-bench-probe-{os.getpid()}"
                probe.mkdir()
                try:
                    if not (probe / "memory.peak").exists():
                        return False, "memory controller (memory.peak) not enabled for child groups"
                finally:
                    probe.rmdir()
                self._cg_base = base
            except OSError as e:
                return False, str(e)
        try:
            res = self.run(["true"], timeout=30)
        except Exception as e:  # noqa: BLE001
            return False, repr(e)
        if res.rc != 0:
            return False, f"probe `true` exited {res.rc}"
        return True, ""

    def describe(self) -> str:
        return {
            "ptrace": "ptrace: sum over every process of its own peak RSS (VmHWM read at exit)",
            "cgroup": "cgroup v2 memory.peak (includes page cache / tmpfs pages written)",
            "rusage": "wait4 ru_maxrss of the direct child only (helper processes not counted)",
        }[self.method]

    # -- running --
    def run(self, argv: list[str], stdout: str | None = None, stderr: str | None = None,
            timeout: float = 3600.0, env: dict | None = None) -> ProcResult:
        out_fd = os.open(stdout or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err_fd = os.open(stderr or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        cg = None
        if self.method == "cgroup":
            self._cg_n += 1
            cg = self._cg_base / f"dirsync-bench-{os.getpid()}-{self._cg_n}"
            cg.mkdir()
        env = dict(os.environ if env is None else env)
        ru0 = _children_cpu()
        try:
            pid = os.fork()
            t0 = time.perf_counter()   # after fork: the cost of forking this Python process is not the tool's
            if pid == 0:  # child
                try:
                    os.setpgid(0, 0)
                    os.dup2(out_fd, 1)
                    os.dup2(err_fd, 2)
                    devnull = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(devnull, 0)
                    if cg is not None:
                        with open(cg / "cgroup.procs", "w") as f:
                            f.write("0")
                    if self.method == "ptrace":
                        if _get_libc().ptrace(_PTRACE_TRACEME, 0, None, None) != 0:
                            os._exit(126)
                    os.execvpe(argv[0], argv, env)
                except BaseException:  # noqa: BLE001
                    pass
                os._exit(127)
            timer_fired = threading.Event()

            def _kill():
                timer_fired.set()
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass

            timer = threading.Timer(timeout, _kill)
            timer.daemon = True
            timer.start()
            try:
                if self.method == "ptrace":
                    rc, rss, nproc = self._wait_ptrace(pid)
                else:
                    _, status, ru = os.wait4(pid, 0)
                    rc = os.waitstatus_to_exitcode(status)
                    rss, nproc = ru.ru_maxrss, 1
                t1 = time.perf_counter()
            finally:
                timer.cancel()
            if cg is not None:
                try:
                    rss = int((cg / "memory.peak").read_text()) // KiB
                except (OSError, ValueError):
                    rss = 0
            cpu = _children_cpu() - ru0
            return ProcResult(wall=t1 - t0, rc=rc, rss_kib=rss, cpu=cpu,
                              timed_out=timer_fired.is_set(), nproc=nproc)
        finally:
            os.close(out_fd)
            os.close(err_fd)
            if cg is not None:
                for _ in range(50):
                    try:
                        cg.rmdir()
                        break
                    except OSError:
                        time.sleep(0.02)

    @staticmethod
    def _wait_ptrace(pid: int) -> tuple[int | None, int, int]:
        libc = _get_libc()
        _, status = os.waitpid(pid, _WALL)
        if not os.WIFSTOPPED(status):  # exec failed before the first stop
            return os.waitstatus_to_exitcode(status), 0, 1
        opts = (_PTRACE_O_TRACEFORK | _PTRACE_O_TRACEVFORK
                | _PTRACE_O_TRACEEXEC | _PTRACE_O_TRACEEXIT | _PTRACE_O_EXITKILL)
        if libc.ptrace(_PTRACE_SETOPTIONS, pid, None, ctypes.c_void_p(opts)) != 0:
            raise OSError(ctypes.get_errno(), "PTRACE_SETOPTIONS failed")
        libc.ptrace(_PTRACE_CONT, pid, None, None)
        live = {pid}
        seen = {pid}
        peaks: dict[int, int] = {}
        rc = None
        while live:
            try:
                p, status, _ru = os.wait4(-1, _WALL)
            except ChildProcessError:
                break
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                live.discard(p)
                if p == pid:
                    rc = os.waitstatus_to_exitcode(status)
                continue
            if not os.WIFSTOPPED(status):
                continue
            new = p not in seen
            seen.add(p)
            live.add(p)
            sig = os.WSTOPSIG(status)
            event = status >> 16
            if sig == signal.SIGTRAP and event:
                if event == _PTRACE_EVENT_EXIT:
                    got = _read_hwm(p)
                    if got:
                        tgid, hwm = got
                        peaks[tgid] = max(peaks.get(tgid, 0), hwm)
                libc.ptrace(_PTRACE_CONT, p, None, None)
            elif sig == signal.SIGSTOP and new:
                libc.ptrace(_PTRACE_CONT, p, None, None)  # initial stop of an auto-attached task
            else:
                libc.ptrace(_PTRACE_CONT, p, None, ctypes.c_void_p(sig))  # pass the signal on
        return rc, sum(peaks.values()), len(peaks)


class Launcher:
    """Runs the measured commands from a small process forked before datasets and manifests are
    loaded, with the `Runner` it was given.

    Forking the harness itself late in a run would make every measured command pay for
    copying and then tearing down the page tables of a heap that holds full-scale manifests:
    about 10 ms per command, more than the whole fixed cost of a dirsync no-op, and more for a
    multi-threaded tool than for `find`. The launcher stays as small as it was at its fork.
    """

    def __init__(self, runner: Runner):
        self.runner = runner
        self.method = runner.method
        self.probe_notes = getattr(runner, "probe_notes", [])
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(req_w)
            os.close(res_r)
            code = 0
            try:
                _serve(runner, os.fdopen(req_r, "rb"), os.fdopen(res_w, "wb"))
            except BaseException:  # noqa: BLE001
                code = 1
            os._exit(code)
        os.close(req_r)
        os.close(res_w)
        self._pid = pid
        self._req = os.fdopen(req_w, "wb")
        self._res = os.fdopen(res_r, "rb")

    def run(self, argv: list[str], **kw) -> ProcResult:
        pickle.dump((argv, kw), self._req)
        self._req.flush()
        ok, value = pickle.load(self._res)
        if not ok:
            raise value
        return value

    def describe(self) -> str:
        return self.runner.describe() + "; commands started from a launcher forked at start-up"

    def close(self):
        self._req.close()
        self._res.close()
        os.waitpid(self._pid, 0)


def _serve(runner: Runner, requests, results):
    while True:
        try:
            argv, kw = pickle.load(requests)
        except EOFError:
            return
        try:
            out = (True, runner.run(argv, **kw))
        except Exception as e:  # noqa: BLE001
            out = (False, e)
        pickle.dump(out, results)
        results.flush()


def _children_cpu() -> float:
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------------------
# Deterministic data generation
# --------------------------------------------------------------------------------------

def _write_random(path: str, size: int, rng: random.Random, chunk: int = MiB) -> None:
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(chunk, left)
            f.write(rng.randbytes(n))
            left -= n


def _rand_mtime(rng: random.Random) -> int:
    return rng.randrange(T_BASE_LO, T_BASE_HI)


def gen_tree(root: Path, nfiles: int, ndirs: int, nlinks: int, rng: random.Random,
             dir_prefix: str = "d", file_prefix: str = "f", max_depth: int = 3) -> None:
    """nfiles files of 0..16 KiB random bytes in ndirs directories nested up to max_depth,
    plus nlinks symlinks (most to files, some to directories, some dangling).
    Modes vary (0644/0600/0755 files, 0755/0700 dirs); mtimes are random with ns parts."""
    root.mkdir(parents=True, exist_ok=True)
    dirs = [""]                          # relative paths, "" = root
    depth = {"": 0}
    eligible = [""]                      # dirs that may receive a subdirectory
    for j in range(ndirs):
        parent = rng.choice(eligible)
        rel = f"{parent}/{dir_prefix}{j:05d}" if parent else f"{dir_prefix}{j:05d}"
        os.mkdir(root / rel)
        dirs.append(rel)
        depth[rel] = depth[parent] + 1
        if depth[rel] < max_depth:
            eligible.append(rel)
    files = []
    for i in range(nfiles):
        d = rng.choice(dirs)
        rel = f"{d}/{file_prefix}{i:06d}.dat" if d else f"{file_prefix}{i:06d}.dat"
        size = rng.randint(0, MAX_SMALL_FILE)
        p = str(root / rel)
        with open(p, "wb") as f:
            f.write(rng.randbytes(size))
        r = rng.random()
        mode = 0o644 if r < 0.8 else (0o600 if r < 0.9 else 0o755)
        os.chmod(p, mode)
        m = _rand_mtime(rng)
        os.utime(p, ns=(m, m))
        files.append(rel)
    for k in range(nlinks):
        d = rng.choice(dirs)
        rel = f"{d}/l{k:05d}.lnk" if d else f"l{k:05d}.lnk"
        r = rng.random()
        if r < 0.9 and files:
            target = os.path.relpath(rng.choice(files), d or ".")
        elif r < 0.95:
            target = os.path.relpath(rng.choice(dirs) or ".", d or ".")
        else:
            target = f"missing-{k}/nowhere.dat"   # dangling
        os.symlink(target, root / rel)
    # directory modes and mtimes last, deepest first
    for rel in sorted(dirs, key=lambda x: -depth[x]):
        p = root / rel if rel else root
        os.chmod(p, 0o700 if (rel and rng.random() < 0.1) else 0o755)
        m = _rand_mtime(rng)
        os.utime(p, ns=(m, m))


def _fix_dir_mtime(p: Path, rng: random.Random) -> None:
    m = _rand_mtime(rng)
    os.utime(p, ns=(m, m))


def list_tree(root: Path) -> tuple[list[str], list[str]]:
    """Sorted relative paths of regular files and directories (excluding root)."""
    files, dirs = [], []
    for dp, dns, fns in os.walk(root):
        rel = os.path.relpath(dp, root)
        rel = "" if rel == "." else rel
        for d in dns:
            dirs.append(f"{rel}/{d}" if rel else d)
        for fn in fns:
            r = f"{rel}/{fn}" if rel else fn
            if stat.S_ISREG(os.lstat(os.path.join(dp, fn)).st_mode):
                files.append(r)
    files.sort()
    dirs.sort()
    return files, dirs


# --------------------------------------------------------------------------------------
# Independent mirror checker
# --------------------------------------------------------------------------------------

def _hash_file(path: str) -> str:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(4 * MiB)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def manifest(root: Path, full_meta: bool) -> dict[str, tuple]:
    """relpath -> description. full_meta: permission bits, uid/gid, mtime ns of files and
    dirs (and of the root). Otherwise only kind, size, content hash, symlink target."""
    out: dict[str, tuple] = {}

    def meta(st):
        return (oct(stat.S_IMODE(st.st_mode)), st.st_mtime_ns, st.st_uid, st.st_gid) if full_meta else ()

    st = os.lstat(root)
    out["."] = ("dir",) + meta(st)
    stack = [(str(root), "")]
    while stack:
        dp, rel = stack.pop()
        with os.scandir(dp) as it:
            for e in it:
                r = f"{rel}/{e.name}" if rel else e.name
                st = e.stat(follow_symlinks=False)
                m = st.st_mode
                if stat.S_ISLNK(m):
                    out[r] = ("symlink", os.readlink(e.path))
                elif stat.S_ISDIR(m):
                    out[r] = ("dir",) + meta(st)
                    stack.append((e.path, r))
                elif stat.S_ISREG(m):
                    out[r] = ("file", st.st_size, _hash_file(e.path)) + meta(st)
                else:
                    out[r] = ("other", stat.S_IFMT(m))
    return out


def compare(src: dict, dst: dict, limit: int = 3) -> list[str]:
    """Differences as short strings (first `limit` examples + counts)."""
    missing = sorted(k for k in src if k not in dst)
    extra = sorted(k for k in dst if k not in src)
    differ = sorted(k for k in src if k in dst and src[k] != dst[k])
    out = []
    if missing:
        out.append(f"{len(missing)} missing in DST (e.g. {', '.join(missing[:limit])})")
    if extra:
        out.append(f"{len(extra)} extra in DST (e.g. {', '.join(extra[:limit])})")
    if differ:
        ex = []
        for k in differ[:limit]:
            ex.append(f"{k}: src={_short(src[k])} dst={_short(dst[k])}")
        out.append(f"{len(differ)} differ (e.g. {'; '.join(ex)})")
    return out


def _short(t: tuple) -> str:
    return "(" + ",".join(str(x)[:12] for x in t) + ")"


def tree_stats(m: dict) -> dict:
    files = [v for v in m.values() if v[0] == "file"]
    return dict(files=len(files), dirs=sum(1 for v in m.values() if v[0] == "dir") - 1,
                symlinks=sum(1 for v in m.values() if v[0] == "symlink"),
                bytes=sum(v[1] for v in files))


def warm(root: Path) -> None:
    """Stat every entry once (page-cache / dentry warm-up; nothing is dropped)."""
    stack = [str(root)]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)


def rm_rf(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.exists():
        subprocess.run(["rm", "-rf", "--one-file-system", str(p)], check=True)


def cp_a(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------

@dataclass
class RunRec:
    wall: float
    rss_kib: int
    cpu: float
    ok: bool
    note: str = ""
    index_bytes: int | None = None
    # Wall time of `true` started the same way just before this run: the harness's own cost per
    # command (fork, exec, tracing, wait), which W7's per-file figures are taken net of.
    launch: float | None = None


@dataclass
class Row:
    workload: str
    tool: str
    size: int | None = None           # W7 file count
    runs: list[RunRec] = field(default_factory=list)
    skipped: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.ok for r in self.runs)

    def median(self) -> float | None:
        return statistics.median(r.wall for r in self.runs) if self.ok else None

    def peak_rss_mib(self) -> float | None:
        return max(r.rss_kib for r in self.runs) / 1024 if self.runs else None

    def net_median(self) -> float | None:
        """Median of wall time minus the launch cost measured just before each run."""
        if not self.ok or any(r.launch is None for r in self.runs):
            return None
        return statistics.median(r.wall - r.launch for r in self.runs)


def fmt_s(x: float | None) -> str:
    if x is None:
        return "—"
    if x < 0.1:
        return f"{x:.4f}"
    if x < 10:
        return f"{x:.3f}"
    return f"{x:.2f}"


def md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ").strip()


# --------------------------------------------------------------------------------------
# The bench
# --------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.sc = SCALES[args.scale]
        self.root = Path(args.root).resolve()
        self.repo = Path(__file__).resolve().parent.parent
        self.rows: list[Row] = []
        self.notes: list[str] = []
        self.datasets: dict[str, dict] = {}
        self.src_manifest_cache: dict[str, dict] = {}
        self.tools: dict[str, str] = {}      # tool -> executable
        self.runner: Launcher | None = None
        self.failed = False
        self.rclone_conf = self.root / "rclone.conf"
        self.run_counter = 0
        self.load_start = os.getloadavg()[0]

    # -- setup --
    def prepare_root(self):
        r = self.root
        if r.exists():
            if any(r.iterdir()) and not (r / ROOT_MARKER).exists():
                sys.exit(f"--root {r} exists, is not empty and was not made by this bench "
                         f"(no {ROOT_MARKER}); refusing to touch it")
        r.mkdir(parents=True, exist_ok=True)
        (r / ROOT_MARKER).write_text("scratch space of bench/bench.py; deleted at exit unless --keep\n")
        for sub in ("state", "work", "logs"):
            rm_rf(r / sub)
            (r / sub).mkdir()
        (r / "base").mkdir(exist_ok=True)
        self.rclone_conf.write_text("")

    def resolve_tools(self):
        wanted = [t.strip() for t in self.args.tools.split(",") if t.strip()]
        for t in wanted:
            if t not in ALL_TOOLS:
                sys.exit(f"unknown tool {t!r}; known: {','.join(ALL_TOOLS)}")
        for t in wanted:
            if t == "dirsync":
                exe = self.build_dirsync()
                if exe:
                    self.tools[t] = exe
                continue
            if t == "dirsync-base":
                # Another dirsync binary (an earlier commit), timed side by side with this one.
                if not self.args.baseline or not os.access(self.args.baseline, os.X_OK):
                    sys.exit("tool dirsync-base needs --baseline PATH, an executable dirsync")
                self.tools[t] = str(Path(self.args.baseline).resolve())
                continue
            exe = shutil.which(t)
            if exe is None:
                self.notes.append(f"`{t}` not found on PATH: skipped "
                                  f"(install: apt-get update && apt-get install -y rsync rclone hyperfine)")
                log(f"{t}: not on PATH, skipped")
            else:
                self.tools[t] = exe

    def build_dirsync(self) -> str | None:
        if self.args.dirsync:
            p = Path(self.args.dirsync).resolve()
            if not os.access(p, os.X_OK):
                sys.exit(f"--dirsync {p} is not an executable")
            return str(p)
        log("cargo build --release (dirsync)")
        res = subprocess.run(["cargo", "build", "--release", "--bin", "dirsync"], cwd=self.repo,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        target = Path(os.environ.get("CARGO_TARGET_DIR", self.repo / "target"))
        if not target.is_absolute():
            target = self.repo / target
        exe = target / "release" / "dirsync"
        if res.returncode != 0 or not exe.exists():
            tail = "\n".join(res.stdout.strip().splitlines()[-15:])
            log("dirsync build FAILED:\n" + tail)
            self.notes.append("dirsync: `cargo build --release` FAILED; dirsync skipped. Last lines: "
                              + md_cell(tail[-600:]))
            self.failed = True
            return None
        return str(exe)

    # -- commands --
    def cmd(self, tool: str, src: Path, dst: Path, idx: Path) -> list[str]:
        exe = self.tools[tool]
        if tool in ("dirsync", "dirsync-base"):
            return [exe, "sync", "-q", "--index", str(idx), str(src), str(dst)]
        if tool == "rsync":
            return [exe, "-a", "--delete", f"{src}/", f"{dst}/"]
        if tool == "rclone":
            return [exe, "sync", str(src), str(dst), "--links", "--create-empty-src-dirs",
                    "-q", "--config", str(self.rclone_conf)]
        if tool == "cp":
            return [exe, "-a", str(src), str(dst)]
        if tool == "find":
            return [exe, str(src), "-printf", "%s %T@\\n"]
        raise ValueError(tool)

    def find_argv(self, src: Path) -> list[str]:
        # the shell's `find SRC -printf '%s %T@\n'` passes a literal backslash-n to find
        return self.cmd("find", src, src, src)

    # -- datasets --
    def base(self, name: str) -> Path:
        """Generate (once) a pristine dataset under ROOT/base/NAME."""
        p = self.root / "base" / name
        done = self.root / "base" / f"{name}.done"
        params = json.dumps({"name": name, "scale": self.sc, "seed": SEED, "v": 1}, sort_keys=True)
        if p.exists() and done.exists() and done.read_text() == params:
            return p
        rm_rf(p)
        done.unlink(missing_ok=True)
        t0 = time.time()
        log(f"generating dataset {name} ...")
        if name.startswith("tree-"):
            n = int(name.split("-")[1])
            # W1-style: directories = files/20, symlinks = files/1000
            rng = random.Random(f"{SEED}:{name}")
            gen_tree(p, n, max(1, n // 20), max(1, n // 1000), rng)
        elif name == "big":
            rng = random.Random(f"{SEED}:{name}")
            p.mkdir(parents=True)
            for i in range(self.sc["big_count"]):
                f = p / f"big-{i}.bin"
                _write_random(str(f), self.sc["big_size"], rng)
                m = _rand_mtime(rng)
                os.utime(f, ns=(m, m))
            _fix_dir_mtime(p, rng)
        elif name == "move":
            # W5/W6 tree: the W1 tree plus big/big.bin and bulk/ (rename_files files)
            tree = self.base(f"tree-{self.sc['tree_files']}")
            cp_a(tree, p)
            rng = random.Random(f"{SEED}:{name}")
            (p / "big").mkdir()
            _write_random(str(p / "big" / "big.bin"), self.sc["rename_big"], rng)
            m = _rand_mtime(rng)
            os.utime(p / "big" / "big.bin", ns=(m, m))
            _fix_dir_mtime(p / "big", rng)
            gen_tree(p / "bulk", self.sc["rename_files"], 0, 0, rng, file_prefix="b")
            _fix_dir_mtime(p, rng)
        else:
            raise ValueError(name)
        done.write_text(params)
        log(f"generated {name} in {time.time() - t0:.1f}s")
        return p

    def drop_base(self, name: str):
        if self.args.keep:
            return
        rm_rf(self.root / "base" / name)
        (self.root / "base" / f"{name}.done").unlink(missing_ok=True)
        for k in list(self.src_manifest_cache):
            if k.startswith(str(self.root / "base" / name)):
                del self.src_manifest_cache[k]

    def src_manifest(self, src: Path, full: bool, cacheable: bool) -> dict:
        key = f"{src}|{full}"
        if cacheable and key in self.src_manifest_cache:
            return self.src_manifest_cache[key]
        m = manifest(src, full)
        if cacheable:
            self.src_manifest_cache[key] = m
        return m

    # -- mutations (applied to a fresh copy of the pristine base; deterministic) --
    # Directories whose entries change get a fixed mtime afterwards, so the mutated SRC is
    # identical (bytes and metadata) for every tool. Without this the directory mtimes would be
    # "a few ms ago", and rsync, which compares directory times at one-second granularity
    # and re-touches only differing ones, would leave sub-second-wrong directory mtimes.
    @staticmethod
    def _touch_dirs(src: Path, rels, k0: int = 0):
        for k, rel in enumerate(sorted(set(rels))):
            m = T_MUTATE + 500 * 10**9 + (k0 + k) * 1_000_007
            os.utime(src / rel if rel else src, ns=(m, m))

    def mutate_churn(self, src: Path):
        n = self.sc["churn"]
        rng = random.Random(f"{SEED}:W3")
        files, dirs = list_tree(src)
        picked = rng.sample(files, 2 * n)
        touched = []
        for k, rel in enumerate(picked[:n]):                 # modify
            p = src / rel
            mode = stat.S_IMODE(os.lstat(p).st_mode)
            with open(p, "wb") as f:
                f.write(rng.randbytes(rng.randint(1, MAX_SMALL_FILE)))
            os.chmod(p, mode)
            m = T_MUTATE + k * 1_000_003
            os.utime(p, ns=(m, m))
        for rel in picked[n:]:                               # delete
            os.unlink(src / rel)
            touched.append(os.path.dirname(rel))
        for k in range(n):                                   # add
            d = rng.choice([""] + dirs)
            p = (src / d if d else src) / f"new{k:05d}.dat"
            with open(p, "wb") as f:
                f.write(rng.randbytes(rng.randint(0, MAX_SMALL_FILE)))
            os.chmod(p, 0o644)
            m = T_MUTATE + (n + k) * 1_000_003
            os.utime(p, ns=(m, m))
            touched.append(d)
        self._touch_dirs(src, touched)

    def mutate_rename(self, src: Path):
        os.rename(src / "big" / "big.bin", src / "big" / "big-renamed.bin")
        os.rename(src / "bulk", src / "bulk-renamed")
        self._touch_dirs(src, ["big", ""])

    def mutate_copy(self, src: Path):
        shutil.copyfile(src / "big" / "big.bin", src / "big" / "big-copy.bin")
        os.chmod(src / "big" / "big-copy.bin", 0o644)
        os.utime(src / "big" / "big-copy.bin", ns=(T_MUTATE, T_MUTATE))
        self._touch_dirs(src, ["big"])

    # -- one timed run --
    def timed(self, argv: list[str], tool: str, label: str) -> tuple[ProcResult, str]:
        self.run_counter += 1
        base = self.root / "logs" / f"{self.run_counter:04d}-{label}-{tool}"
        out = os.devnull if tool == "find" else f"{base}.out"
        err = f"{base}.err"
        res = self.runner.run(argv, stdout=out, stderr=err, timeout=self.args.timeout)
        return res, err

    @staticmethod
    def _err_tail(err_path: str) -> str:
        try:
            t = Path(err_path).read_text(errors="replace").strip()
        except OSError:
            return ""
        return t[-300:]

    def _proc_failure(self, res: ProcResult, err: str, what: str) -> str | None:
        if res.timed_out:
            return f"{what}: timed out after {self.args.timeout:.0f}s"
        if res.rc != 0:
            tail = self._err_tail(err)
            return (f"{what}: exit {res.rc}" + (f": {tail}" if tail else "")
                    + (f" (log {err})" if self.args.keep else ""))
        return None

    def _index_bytes(self, state: Path) -> int:
        total = 0
        for e in state.iterdir():
            if e.name != "dst" and e.name.startswith("index") and e.is_file():
                total += e.stat().st_size
        return total

    def run_initial(self, wid: str, tool: str, src: Path, row: Row):
        full = tool != "rclone"
        src_m = self.src_manifest(src, full, cacheable=True)
        for r in range(self.args.runs):
            state = self.root / "state" / f"{wid}-{tool}"
            rm_rf(state)
            state.mkdir()
            dst, idx = state / "dst", state / "index.redb"
            warm(src)
            argv = self.cmd(tool, src, dst, idx)
            res, err = self.timed(argv, tool, wid)
            rec = RunRec(res.wall, res.rss_kib, res.cpu, True)
            fail = self._proc_failure(res, err, "sync")
            if fail is None:
                diff = compare(src_m, manifest(dst, full))
                if diff:
                    fail = "wrong replica: " + "; ".join(diff)
            if fail:
                rec.ok, rec.note = False, fail
            if tool.startswith("dirsync"):
                rec.index_bytes = self._index_bytes(state)
            row.runs.append(rec)
            log(f"  {wid} {tool} run {r + 1}: {res.wall:.3f}s rss {res.rss_kib / 1024:.1f} MiB"
                + (f"  FAILED {fail}" if fail else ""))
            rm_rf(state)

    def run_resync(self, wid: str, tool: str, base: Path, mutate, row: Row):
        full = tool != "rclone"
        for r in range(self.args.runs):
            # --- untimed preparation: SRC, replica made by the tool itself, mutation ---
            if mutate is not None:
                src = self.root / "work" / "src"
                rm_rf(src)
                cp_a(base, src)
            else:
                src = base
            state = self.root / "state" / f"{wid}-{tool}"
            rm_rf(state)
            state.mkdir()
            dst, idx = state / "dst", state / "index.redb"
            fail = None
            if tool != "find":
                argv = self.cmd(tool, src, dst, idx)
                res0, err0 = self.timed(argv, tool, f"{wid}-init")
                fail = self._proc_failure(res0, err0, "initial sync")
                if fail is None:
                    diff = compare(self.src_manifest(src, full, cacheable=mutate is None),
                                   manifest(dst, full))
                    if diff:
                        fail = "initial sync left a wrong replica: " + "; ".join(diff)
                if fail:
                    row.runs.append(RunRec(0.0, 0, 0.0, False, fail))
                    log(f"  {wid} {tool} run {r + 1}: FAILED {fail}")
                    rm_rf(state)
                    continue
            if mutate is not None:
                mutate(src)
            # --- timed re-sync ---
            warm(src)
            argv = self.find_argv(src) if tool == "find" else self.cmd(tool, src, dst, idx)
            launch = self.runner.run(["true"]).wall if wid == "W7" else None
            res, err = self.timed(argv, tool, wid)
            rec = RunRec(res.wall, res.rss_kib, res.cpu, True, launch=launch)
            fail = self._proc_failure(res, err, "re-sync")
            if fail is None and tool != "find":
                src_m = self.src_manifest(src, full, cacheable=mutate is None)
                diff = compare(src_m, manifest(dst, full))
                if diff:
                    fail = "wrong replica: " + "; ".join(diff)
            if fail:
                rec.ok, rec.note = False, fail
            if tool.startswith("dirsync"):
                rec.index_bytes = self._index_bytes(state)
            row.runs.append(rec)
            log(f"  {wid}{'' if row.size is None else f'@{row.size}'} {tool} run {r + 1}: "
                f"{res.wall:.3f}s rss {res.rss_kib / 1024:.1f} MiB"
                + (f"  FAILED {fail}" if fail else ""))
            rm_rf(state)
        if mutate is not None:
            rm_rf(self.root / "work" / "src")

    # -- workloads --
    def workload_plan(self) -> list[str]:
        wanted = [w.strip().upper() for w in self.args.workloads.split(",") if w.strip()]
        for w in wanted:
            if w not in ALL_WORKLOADS:
                sys.exit(f"unknown workload {w!r}; known: {','.join(ALL_WORKLOADS)}")
        return [w for w in ALL_WORKLOADS if w in wanted]

    def bases_for(self, w: str) -> list[str]:
        t = f"tree-{self.sc['tree_files']}"
        return {"W1": [t], "W2": [t], "W3": [t], "W4": ["big"], "W5": ["move"], "W6": ["move"],
                "W7": [f"tree-{n}" for n in self.sc["w7"]]}[w]

    def tools_for(self, w: str) -> list[str]:
        return [t for t in self.tools if t in WORKLOAD_TOOLS[w]]

    def describe_dataset(self, key: str, path: Path):
        if key not in self.datasets:
            self.datasets[key] = tree_stats(self.src_manifest(path, True, cacheable=True))

    def run_all(self):
        plan = self.workload_plan()
        last_use: dict[str, int] = {}
        for i, w in enumerate(plan):
            for b in self.bases_for(w):
                last_use[b] = i
        if "W5" in plan or "W6" in plan:   # "move" is built from the W1 tree
            t = f"tree-{self.sc['tree_files']}"
            last_use[t] = max(last_use.get(t, 0), max(i for i, w in enumerate(plan) if w in ("W5", "W6")))

        for i, w in enumerate(plan):
            log(f"== {w} ==")
            tools = self.tools_for(w)
            if w in ("W1", "W4"):
                src = self.base(self.bases_for(w)[0])
                self.describe_dataset(w, src)
                for t in tools:
                    row = Row(w, t)
                    self.run_initial(w, t, src, row)
                    self.rows.append(row)
            elif w == "W7":
                for n in self.sc["w7"]:
                    name = f"tree-{n}"
                    src = self.base(name)
                    self.describe_dataset(f"W7@{n}", src)
                    for t in tools:
                        row = Row(w, t, size=n)
                        self.run_resync(w, t, src, None, row)
                        self.rows.append(row)
                    if last_use.get(name, -1) <= i:
                        self.drop_base(name)
            else:
                base = self.base(self.bases_for(w)[0])
                self.describe_dataset(w, base)
                mutate = {"W2": None, "W3": self.mutate_churn, "W5": self.mutate_rename,
                          "W6": self.mutate_copy}[w]
                for t in tools:
                    row = Row(w, t)
                    self.run_resync(w, t, base, mutate, row)
                    self.rows.append(row)
            for b in set(self.bases_for(w)) | ({f"tree-{self.sc['tree_files']}"} if w in ("W5", "W6") else set()):
                if last_use.get(b, -1) <= i and (self.root / "base" / b).exists():
                    self.drop_base(b)
        self.failed = self.failed or any(not r.ok for r in self.rows if r.runs)

    # -- report --
    def versions(self) -> dict[str, str]:
        def first_line(argv):
            try:
                r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, timeout=30)
                return (r.stdout.strip().splitlines() or ["?"])[0]
            except Exception as e:  # noqa: BLE001
                return f"? ({e})"
        v = {}
        for t, exe in self.tools.items():
            if t == "dirsync":
                v[t] = first_line([exe, "--version"]) + f" ({exe})"
                try:
                    head = subprocess.run(["git", "-C", str(self.repo), "rev-parse", "--short", "HEAD"],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          text=True).stdout.strip()
                    dirty = subprocess.run(["git", "-C", str(self.repo), "status", "--porcelain", "src"],
                                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                           text=True).stdout.strip()
                    v[t] += f", git {head or '(no commit)'}{' + uncommitted src changes' if dirty else ''}"
                except OSError:
                    pass
            elif t == "rclone":
                v[t] = first_line([exe, "version"])
            else:
                v[t] = first_line([exe, "--version"])
        return v

    def machine(self) -> list[str]:
        def sh(argv):
            try:
                return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True).stdout.strip()
            except OSError:
                return "?"
        cpu = "?"
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        mem = "?"
        try:
            for line in open("/proc/meminfo"):
                if line.startswith("MemTotal"):
                    mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
        except OSError:
            pass
        return [
            f"- nproc: {sh(['nproc'])}; CPU: {cpu}; memory: {mem}",
            f"- kernel: {sh(['uname', '-r'])} ({platform.machine()})",
            f"- filesystem of --root ({self.root}): {sh(['stat', '-f', '-c', '%T', str(self.root)])}",
            f"- python: {platform.python_version()}",
            f"- load average (1 min) at start / end: {self.load_start:.2f} / {os.getloadavg()[0]:.2f} "
            f"(anything well above 0 means other work competed for the {os.cpu_count()} CPUs)",
        ]

    def report(self, cmdline: str, started: str, elapsed: float) -> str:
        L: list[str] = []
        L.append(f"# dirsync benchmark ({self.args.scale} scale)")
        L.append("")
        L.append(f"- command: `{cmdline}`")
        L.append(f"- started: {started}; took {elapsed / 60:.1f} min; runs per cell: {self.args.runs} "
                 f"(median and min–max of wall-clock seconds; preparation untimed)")
        L.extend(self.machine())
        for t, v in self.versions().items():
            L.append(f"- {t}: {v}")
        L.append(f"- peak RSS method: {self.runner.describe()}"
                 + (f" (unavailable: {'; '.join(self.runner.probe_notes)})" if getattr(self.runner, 'probe_notes', None) else ""))
        L.append("- page cache: SRC stat-walked once before each timed run; nothing dropped")
        L.append("- correctness: after every timed run DST is compared with SRC by an independent Python "
                 "walker (paths, kinds, blake2b of file bytes, symlink targets, permission bits, uid/gid, "
                 "mtime ns of files and directories including the root); rclone keeps neither "
                 "directory mtimes nor permission bits, so for rclone only paths, kinds, bytes and "
                 "symlink targets are compared")
        for n in self.notes:
            L.append(f"- note: {n}")
        L.append("")
        L.append("Commands (SRC, DST, IDX per run; IDX lives outside both trees and is reset with the replica):")
        L.append("")
        s, d, i = Path("SRC"), Path("DST"), Path("IDX")
        for t in self.tools:
            if t == "find":
                L.append(f"- find: `find SRC -printf '%s %T@\\n' > /dev/null`")
            else:
                argv = self.cmd(t, s, d, i)
                argv[0] = t
                if t == "rclone":
                    argv[-1] = "EMPTY.conf"
                L.append(f"- {t}: `{shlex.join(argv)}`")
        L.append("")

        titles = {
            "W1": "W1 — initial sync of the file tree",
            "W2": "W2 — no-op re-sync of the file tree",
            "W3": f"W3 — re-sync after modifying {self.sc['churn']}, deleting {self.sc['churn']}, adding {self.sc['churn']} files",
            "W4": f"W4 — initial sync of {self.sc['big_count']} files of {self.sc['big_size'] // MiB} MiB",
            "W5": f"W5 — re-sync after renaming one {self.sc['rename_big'] // MiB} MiB file and one directory of {self.sc['rename_files']:,} files",
            "W6": f"W6 — re-sync after duplicating a {self.sc['copy_big'] // MiB} MiB file under a new name",
            "W7": "W7 — no-op re-sync at increasing tree sizes",
        }
        for w in self.workload_plan():
            rows = [r for r in self.rows if r.workload == w]
            if not rows:
                continue
            L.append(f"## {titles[w]}")
            L.append("")
            if w != "W7":
                ds = self.datasets.get(w)
                if ds:
                    L.append(f"Source: {ds['files']:,} files, {ds['dirs']:,} dirs, {ds['symlinks']:,} symlinks, "
                             f"{ds['bytes'] / MiB:,.1f} MiB" + (" (before the mutation)." if w in ("W3", "W5", "W6") else "."))
                    L.append("")
                L.append("| tool | median s | min–max s | peak RSS MiB | ratio to rsync | notes |")
                L.append("|---|---:|---:|---:|---:|---|")
                rs = next((r for r in rows if r.tool == "rsync"), None)
                for r in rows:
                    L.append(self._row_md(r, rs, w7=False))
            else:
                L.append("| tool | files | median s | min–max s | s per 100k files | net s per 100k | peak RSS MiB | ratio to rsync | notes |")
                L.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
                for n in self.sc["w7"]:
                    sub = [r for r in rows if r.size == n]
                    rs = next((r for r in sub if r.tool == "rsync"), None)
                    for r in sub:
                        L.append(self._row_md(r, rs, w7=True))
            L.append("")
        L.extend(self.targets_md())
        return "\n".join(L) + "\n"

    def _row_md(self, r: Row, rs: Row | None, w7: bool) -> str:
        notes = list(r.notes)
        if r.tool == "rclone":
            notes.append("checked paths/kinds/bytes only")
        if r.ok:
            med = r.median()
            walls = [x.wall for x in r.runs]
            med_s, rng_s = fmt_s(med), f"{fmt_s(min(walls))}–{fmt_s(max(walls))}"
            ratio = "—"
            if rs is not None and rs.ok and rs.median():
                ratio = f"{med / rs.median():.2f}×"
            cpu = statistics.median(x.cpu for x in r.runs)
            notes.insert(0, f"cpu {cpu:.2f} s")
        else:
            med_s, rng_s, ratio = "FAILED", "—", "—"
            bad = [x for x in r.runs if not x.ok]
            notes.insert(0, f"{len(bad)}/{len(r.runs)} runs failed: {bad[0].note[:400]}" if bad else "no runs")
        idx = [x.index_bytes for x in r.runs if x.index_bytes]
        if idx:
            size = max(idx)
            txt = f"index {size / MiB:.2f} MiB"
            files = r.size or (self.datasets.get(r.workload) or {}).get("files")
            if files and files >= 1000:
                txt += f" ({size / MiB / files * 100_000:.2f} MiB per 100k files)"
            notes.append(txt)
        rss = r.peak_rss_mib()
        rss_s = f"{rss:.1f}" if rss is not None and r.runs and any(x.rss_kib for x in r.runs) else "—"
        cells = [r.tool]
        if w7:
            per100k = fmt_s(r.median() / r.size * 100_000) if r.ok else "—"
            net = r.net_median()
            net100k = fmt_s(net / r.size * 100_000) if net is not None else "—"
            cells += [f"{r.size:,}", med_s, rng_s, per100k, net100k, rss_s, ratio]
        else:
            cells += [med_s, rng_s, rss_s, ratio]
        cells.append(md_cell("; ".join(notes)))
        return "| " + " | ".join(cells) + " |"

    def _get(self, w, tool, size=None) -> Row | None:
        for r in self.rows:
            if r.workload == w and r.tool == tool and r.size == size:
                return r
        return None

    def targets_md(self) -> list[str]:
        if "dirsync" not in self.tools:
            return []
        out = ["## Targets (dirsync)", "", "| target | measured | verdict |", "|---|---:|---|"]

        def ratio(w, other_tool, other_w=None, size=None):
            a = self._get(w, "dirsync", size)
            b = self._get(other_w or w, other_tool, size)
            if a is None or b is None:
                return None, "n/a (not run)"
            if not a.ok:
                return None, "MISSED (dirsync FAILED)"
            if not b.ok:
                return None, f"n/a ({other_tool} failed)"
            return a.median() / b.median(), None

        def line(label, w, other, limit, other_w=None, size=None):
            val, why = ratio(w, other, other_w, size)
            if val is None:
                out.append(f"| {label} | — | {why} |")
            else:
                out.append(f"| {label} | {val:.2f}× | {'MET' if val <= limit else 'MISSED'} |")

        line("W1 ≤ 0.9× rsync", "W1", "rsync", 0.9)
        line("W1 ≤ 1.0× cp -a", "W1", "cp", 1.0)
        line("W2 ≤ 0.40× rsync", "W2", "rsync", 0.40)
        line("W2 ≤ 1.5× stat walk (find)", "W2", "find", 1.5)
        line("W3 ≤ 0.40× rsync", "W3", "rsync", 0.40)
        line("W4 ≤ 0.9× rsync", "W4", "rsync", 0.9)
        line("W4 ≤ 1.0× cp -a", "W4", "cp", 1.0)
        line("W5 ≤ 0.35× rsync", "W5", "rsync", 0.35)
        a, b = self._get("W5", "dirsync"), self._get("W2", "dirsync")
        if a and b and a.ok and b.ok:
            v = a.median() / b.median()
            out.append(f"| W5 ≤ 1.3× dirsync's own W2 | {v:.2f}× | {'MET' if v <= 1.3 else 'MISSED'} |")
        else:
            out.append("| W5 ≤ 1.3× dirsync's own W2 | — | "
                       + ("n/a (not run)" if not (a and b) else "MISSED (dirsync FAILED)") + " |")
        line("W6 ≤ 0.5× rsync", "W6", "rsync", 0.5)
        self._w7_flat(out)
        n = max(self.sc["w7"])
        a, b = self._get("W7", "dirsync", n), self._get("W7", "rsync", n)
        label = f"W7 peak RSS at {n:,} files ≤ rsync's total RSS"
        if a and b and a.runs and b.runs and a.ok:
            ra, rb = a.peak_rss_mib(), b.peak_rss_mib()
            out.append(f"| {label} | {ra:.1f} vs {rb:.1f} MiB | {'MET' if ra <= rb else 'MISSED'} |")
        else:
            out.append(f"| {label} | — | " + ("n/a (not run)" if not (a and b) else "MISSED (dirsync FAILED)") + " |")
        out.append("")
        return out

    def _w7_flat(self, out: list[str]):
        """W7: seconds per 100k files at every size within ±20% of the figure at the size of the
        W1-W6 tree, net of the harness's launch cost (the raw deviation is shown beside it)."""
        sizes = self.sc["w7"]
        ref_n = self.sc["tree_files"] if self.sc["tree_files"] in sizes else sizes[len(sizes) // 2]
        label = (f"W7 s per 100k files within ±20% of the {ref_n // 1000}k figure over "
                 + ", ".join(f"{n // 1000}k" for n in sizes))
        rows = [self._get("W7", "dirsync", n) for n in sizes]
        if any(r is None for r in rows):
            out.append(f"| {label} | — | n/a (not run) |")
            return
        if not all(r.ok for r in rows):
            out.append(f"| {label} | — | MISSED (dirsync FAILED) |")
            return

        ref = sizes.index(ref_n)

        def spread(per):
            return max(abs(x - per[ref]) / per[ref] for x in per)

        raw = spread([r.median() / r.size for r in rows])
        nets = [r.net_median() for r in rows]
        if any(x is None for x in nets):
            out.append(f"| {label} | raw ±{raw:.0%} | {'MET' if raw <= 0.2 else 'MISSED'} |")
            return
        net = spread([x / r.size for x, r in zip(nets, rows)])
        out.append(f"| {label} | net ±{net:.0%} (raw ±{raw:.0%}) | {'MET' if net <= 0.2 else 'MISSED'} |")

    def json_dump(self) -> dict:
        return {
            "scale": self.args.scale, "runs": self.args.runs, "rss_method": self.runner.method,
            "datasets": self.datasets, "notes": self.notes,
            "rows": [{"workload": r.workload, "tool": r.tool, "files": r.size, "ok": r.ok,
                      "median_s": r.median(), "runs": [vars(x) for x in r.runs]} for r in self.rows],
        }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), required=True)
    ap.add_argument("--root", default="/dev/shm/dirsync-bench",
                    help="scratch directory for datasets and replicas (default %(default)s)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tools", default=",".join(ALL_TOOLS))
    ap.add_argument("--workloads", default=",".join(ALL_WORKLOADS))
    ap.add_argument("--baseline", help="a second dirsync binary, timed as tool dirsync-base")
    ap.add_argument("--dirsync", help="dirsync binary (default: cargo build --release, target/release/dirsync)")
    ap.add_argument("--out", help="also write the markdown report to this file")
    ap.add_argument("--json", help="write raw per-run results as JSON to this file")
    ap.add_argument("--keep", action="store_true", help="keep --root (datasets are reused next time)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per command, seconds")
    ap.add_argument("--rss-method", choices=["auto", "ptrace", "cgroup", "rusage"], default="auto")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")

    cmdline = "python3 " + shlex.join([sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv)))
    started = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    t0 = time.time()
    b = Bench(args)
    b.workload_plan()
    b.prepare_root()
    try:
        b.runner = Launcher(Runner.detect(args.rss_method))
        log(f"peak RSS method: {b.runner.method}")
        b.resolve_tools()
        if not b.tools:
            sys.exit("no tools to run")
        b.run_all()
        md = b.report(cmdline, started, time.time() - t0)
        sys.stdout.write(md)
        sys.stdout.flush()
        if args.out:
            Path(args.out).write_text(md)
        if args.json:
            Path(args.json).write_text(json.dumps(b.json_dump(), indent=1))
    finally:
        if b.runner is not None:
            b.runner.close()
        if not args.keep:
            log(f"removing {b.root}")
            rm_rf(b.root)
    return 1 if b.failed else 0


if __name__ == "__main__":
    sys.exit(main())
