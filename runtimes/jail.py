"""One job's own namespaces, made inside the node's sandbox just before the job runs.

The agent starts one long-lived sandbox (bubblewrap, ``agent.execution.sandbox``):
a user namespace whose root file system is read-only, where the agent's state,
config and credentials do not exist, and where only two writable trees are
bound in: the folder of every job's package and of every job's work dir. The
fork server lives there and never runs job code. For each job it forks the job's
process straight into a fresh PID namespace (:class:`PidNamespaceForker`), where
it is PID 1, and that process (:func:`confine`), before any job code runs,

1. moves itself into the job's cgroup (through a directory descriptor the agent
   opened, since ``/sys/fs/cgroup`` is read-only in here);
2. unshares a mount, IPC, UTS and cgroup namespace (and a network namespace with
   only loopback, when the job's type has no network);
3. covers every job folder with an empty read-only tmpfs and binds back only this
   job's package folder and work dir, binds its logs folder read-only over itself
   (the agent writes the logs from the job's pipes; the job may not touch them), gets
   a private ``/tmp`` and ``/dev/shm``, and unmounts the GPU device nodes that are
   not the job's;
4. mounts its own ``/proc``, drops every capability (bounding set included), locks
   the root-is-not-special securebits and sets no-new-privileges.

Mounts made here are then out of its reach (it cannot unmount them to see what
they cover). When it exits, the kernel kills every process left in its PID
namespace: setsid or double-fork changes nothing, nothing of the job outlives it.

``python -m runtimes.jail REQUEST.json`` does the same for the spawn launcher (a
fresh interpreter per job inside a fresh bubblewrap) in the keeper model: the
interpreter unshares the namespaces (:func:`enter`), forks the job
(:func:`fork_job`) and waits for it (:func:`keep`), forwarding SIGTERM and SIGINT.

Only Linux. Python has no ``mount``/``unshare``/``capset`` wrappers: ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtimes import host

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000
MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_SET_SECUREBITS = 28
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# NOROOT, NO_SETUID_FIXUP and NO_CAP_AMBIENT_RAISE, each locked; KEEP_CAPS_LOCKED
SECUREBITS_LOCKED_DOWN = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1

STAGE = "/run/miner-jail"  # a tmpfs dir of the sandbox, private to each keeper's mounts
FORWARDED = (signal.SIGTERM, signal.SIGINT)  # what a cancel is made of

_libc: ctypes.CDLL | None = None


class JailError(OSError):
    """A namespace or mount call failed; the message says which."""


@dataclass
class JailRequest:
    """What the keeper needs to know to confine one job (plain JSON on the wire)."""

    package_dir: str
    work_dir: str
    covered: list[str]  # roots of every job's folders: hidden, then ours bound back
    network: bool = True
    gpu_devices: list[str] | None = None  # /dev/nvidiaN the job may use; None: all
    keep: list[str] = field(default_factory=list)  # read-only paths under /tmp to keep
    hostname: str = "job"
    tmp_size: int | None = None  # bytes each of /tmp and /dev/shm (None: half the RAM)
    read_only: list[str] = field(default_factory=list)  # in its folders: bound read-only

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> JailRequest:
        gpus = raw.get("gpu_devices")
        size = raw.get("tmp_size")
        return cls(package_dir=str(raw["package_dir"]), work_dir=str(raw["work_dir"]),
                   covered=[str(p) for p in raw.get("covered", [])],
                   network=bool(raw.get("network", True)),
                   gpu_devices=None if gpus is None else [str(d) for d in gpus],
                   keep=[str(p) for p in raw.get("keep", [])],
                   hostname=str(raw.get("hostname", "job"))[:63] or "job",
                   tmp_size=max(int(size), 1 << 20) if size else None,
                   read_only=[str(p) for p in raw.get("read_only", [])])


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise JailError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(_lib().mount(source and source.encode(), target.encode(),
                        fstype and fstype.encode(), ctypes.c_ulong(flags),
                        data and data.encode()),
           f"mount {source or fstype or ''} on {target}")


def _umount(target: str) -> None:
    _check(_lib().umount2(target.encode(), MNT_DETACH), f"umount {target}")


def unshare(flags: int) -> None:
    _check(_lib().unshare(flags), "unshare")


# -- entering a jail -----------------------------------------------------------------------
def enter(request: JailRequest, cgroup_fd: int | None) -> None:
    """Keeper model (spawn path): confine the calling process's *future children*."""
    _join_and_unshare(request, cgroup_fd, CLONE_NEWPID)
    _mount_views(request)


def confine(request: JailRequest, cgroup_fd: int | None) -> None:
    """Fork-server model: confine this process, already PID 1 of a fresh PID namespace.

    Called in the job's process right after :func:`fork_in_new_pid_namespace`;
    ends with :func:`become_init` (own /proc, no capability, no new privileges).
    """
    _join_and_unshare(request, cgroup_fd, 0)
    _mount_views(request)
    become_init()


def _join_and_unshare(request: JailRequest, cgroup_fd: int | None, extra: int) -> None:
    if cgroup_fd is not None:
        host.join_cgroup(cgroup_fd)
    flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | extra
    if cgroup_fd is not None:
        flags |= CLONE_NEWCGROUP  # the job sees its own cgroup as the root
    if not request.network:
        flags |= CLONE_NEWNET
    unshare(flags)


def _mount_views(request: JailRequest) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do here leaks out, or in
    _lib().sethostname(request.hostname.encode(), len(request.hostname.encode()))
    _private_views(request)
    if request.gpu_devices is not None:
        _hide_gpus(set(request.gpu_devices))
    if not request.network:
        _loopback_up()


class PidNamespaceForker:
    """Forks children straight into a fresh PID namespace each, from a long-lived process.

    ``unshare(CLONE_NEWPID)`` changes only where the caller's *next* child goes; the
    caller stays where it is. So: unshare, fork (the child is PID 1 of a new
    namespace), then point our children back at our own namespace. One fork per
    job, as without a jail, instead of a keeper that forks again (each fork and exit
    of a torch-sized process costs ~4 ms).
    """

    def __init__(self) -> None:
        self._own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)

    def fork(self) -> int:
        """``os.fork()`` with the child as PID 1 of its own PID namespace.

        Cancel signals are blocked in the child until its runtime has a handler
        (``runtimes.host.run_spec`` unblocks them): PID 1 drops a signal it has no
        handler for, while a blocked one waits.
        """
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        try:
            unshare(CLONE_NEWPID)
            pid = os.fork()
        except BaseException:
            self._restore(old_mask)
            raise
        if pid == 0:
            os.close(self._own)  # cancel signals stay blocked until the job's handler
            return 0
        self._restore(old_mask)
        return pid

    def _restore(self, old_mask: Any) -> None:
        """Our next child is ours again (our own namespace), and our signals as before."""
        _check(_lib().setns(self._own, CLONE_NEWPID), "setns to our own PID namespace")
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def close(self) -> None:
        os.close(self._own)


# -- the keeper (spawn path) ---------------------------------------------------------------
def _private_views(request: JailRequest) -> None:
    """Cover all job folders, then bind back this job's two, with ``read_only`` (its
    logs) bound read-only inside them; private /tmp and /dev/shm of ``tmp_size`` bytes
    each.

    What must survive the fresh /tmp (the job's folders, and ``keep``: the code and
    read-only paths that live under /tmp, such as a checkout there) is bound aside
    first and moved back after.
    """
    _mount("tmpfs", STAGE, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700,size=64k")
    keep = {p: _stage(p, f"{STAGE}/keep{i}") for i, p in enumerate(request.keep)}
    mine = {p: _stage(p, f"{STAGE}/{name}") for name, p in
            (("package", request.package_dir), ("work", request.work_dir))}
    # Sized: they live in RAM, which without a memory controller nothing else bounds.
    fresh = "mode=1777" + (f",size={request.tmp_size}" if request.tmp_size else "")
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, fresh)
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, fresh)
    _move_back(keep)
    covered = sorted({os.path.normpath(p) for p in request.covered}, key=len)
    for root in covered:
        os.makedirs(root, exist_ok=True)  # under the fresh /tmp it has to be made again
        _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    _move_back(mine)
    for path in request.read_only:
        _bind_read_only(path)
    for root in covered:  # nothing new can appear beside the job's folders
        _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _own_hosts(request.hostname)
    _umount(STAGE)


def _bind_read_only(path: str) -> None:
    """``path`` bound read-only over itself: the job can read what is there, but not
    write, truncate, remove, rename or replace it (a mount point is busy), nor add to it.

    A job that could swap ``logs/stdout.log`` for a link would have the agent, outside
    the sandbox, read and ship whatever the link names as the job's log.
    """
    _mount(path, path, None, MS_BIND)
    _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _kept_flags(path))


def _kept_flags(mount_point: str) -> int:
    """The flags of ``mount_point`` a remount must repeat: in a user namespace those
    of a mount from outside it are locked, and a remount that drops one fails."""
    flags = os.statvfs(mount_point).f_flag
    return (MS_NOSUID * bool(flags & os.ST_NOSUID) | MS_NODEV * bool(flags & os.ST_NODEV)
            | MS_NOEXEC * bool(flags & os.ST_NOEXEC) | MS_NOATIME * bool(flags & os.ST_NOATIME)
            | MS_NODIRATIME * bool(flags & os.ST_NODIRATIME)
            | MS_RELATIME * bool(flags & os.ST_RELATIME))


def _own_hosts(hostname: str) -> None:
    """An /etc/hosts that resolves the job's hostname to loopback (torchrun needs it).

    Written in the stage tmpfs and bound read-only over /etc/hosts: the bind keeps
    the file when the stage is unmounted. Without it, `torchrun --standalone` waits
    for a hostname that neither the host's /etc/hosts nor (without network) DNS knows.
    """
    if not os.path.isfile("/etc/hosts"):
        return  # nothing to bind over (and / is read-only: nothing to create)
    path = f"{STAGE}/hosts"
    with open(path, "w") as fh:
        fh.write(f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost\n")
    _mount(path, "/etc/hosts", None, MS_BIND)
    _mount(None, "/etc/hosts", None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def _stage(path: str, stage: str) -> str:
    _mount_point(stage, os.path.isdir(path))
    _mount(path, stage, None, MS_BIND | MS_REC)  # a bind keeps the source's read-only flag
    return stage


def _move_back(staged: dict[str, str]) -> None:
    for path, stage in staged.items():
        _mount_point(path, os.path.isdir(stage))
        _mount(stage, path, None, MS_MOVE)


def _mount_point(path: str, directory: bool) -> None:
    """A directory, or an empty file for a file's bind, to mount on."""
    if directory:
        os.makedirs(path, exist_ok=True)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o444))


def _hide_gpus(allowed: set[str]) -> None:
    """Remove the NVIDIA device nodes of other jobs' GPUs (control nodes stay).

    Each is a bind over an empty file bubblewrap made in the sandbox's /dev: unmounted,
    the file would stay, and a CUDA or NVML that opens ``/dev/nvidiaN`` for every GPU
    the driver lists would meet a regular file (an ioctl error) where a missing node is
    simply skipped, as in containers. So the files go too, /dev made writable for that
    moment in this job's own mount namespace.
    """
    hidden = []
    for name in os.listdir("/dev"):
        path = f"/dev/{name}"
        if name.startswith("nvidia") and name[6:].isdigit() and path not in allowed:
            try:
                _umount(path)
            except JailError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: not a mount point, nothing bound
                    raise
            hidden.append(path)
    if hidden:
        _with_writable("/dev", lambda: _unlink_all(hidden))


def _unlink_all(paths: list[str]) -> None:
    for path in paths:
        os.unlink(path)


def _with_writable(mount_point: str, change: Callable[[], object]) -> None:
    """``change()`` with ``mount_point`` read-write, its other flags and mode kept."""
    kept = _kept_flags(mount_point)
    read_only = bool(os.statvfs(mount_point).f_flag & os.ST_RDONLY)
    if read_only:
        _mount(None, mount_point, None, MS_REMOUNT | kept)
    try:
        change()
    finally:
        if read_only:
            _mount(None, mount_point, None, MS_REMOUNT | MS_RDONLY | kept)


def _loopback_up() -> None:
    """A new network namespace has ``lo`` down: bring it up (DDP on one node needs it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, _SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def keep(child: int) -> int:
    """The keeper's life after the fork: forward signals, wait, exit as the job did."""

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    try:
        _, status = os.waitpid(child, 0)
    except ChildProcessError:
        return 1
    if os.WIFSIGNALED(status):  # die of the same signal, so the agent classifies it right
        death = os.WTERMSIG(status)
        signal.signal(death, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {death})
        os.kill(os.getpid(), death)
    return os.waitstatus_to_exitcode(status)


def fork_job(run_job: Callable[[], None]) -> int:
    """Fork the job's process (PID 1 of the new namespace); returns its pid here.

    Signals that mean "cancel" stay blocked in the child until its runtime has a
    handler (``runtimes.host.run_spec`` unblocks them): PID 1 drops a signal it
    has no handler for, so one sent in between would otherwise be lost.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    pid = os.fork()
    if pid == 0:
        try:
            # getppid() is 0 here (the keeper is outside our PID namespace), so no
            # "did the parent die already" check: the job's cgroup kill covers that.
            _lib().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            become_init()
            run_job()
        except BaseException as exc:
            print(f"miner-agent: the job's process could not start: {exc}", file=sys.stderr,
                  flush=True)
        finally:
            os._exit(1)
    return pid


def become_init() -> None:
    """In the job's process: own /proc, no capabilities, no new privileges."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if os.getsid(0) != os.getpid():
        os.setsid()
    drop_privileges()


def drop_privileges() -> None:
    libc = _lib()
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability this kernel knows
    libc.prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_DOWN, 0, 0, 0)  # needs CAP_SETPCAP
    header = struct.pack("Ii", _LINUX_CAPABILITY_VERSION_3, 0)
    data = ctypes.create_string_buffer(24)  # two zeroed {effective, permitted, inheritable}
    _check(libc.capset(ctypes.c_char_p(header), data), "capset")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def unblock_cancel_signals() -> None:
    """Called once the job's cancel handler exists (a no-op outside a jail)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)


# -- the probe's self-test ------------------------------------------------------------------
def self_test() -> None:
    """Jail a throw-away child both ways, in scratch folders; print ``jail ok`` or exit 1.

    Run by the agent's probe (and ``doctor``) inside a throw-away sandbox.
    """
    for folder in ("/tmp/jobs/p/logs", "/tmp/work/w"):
        os.makedirs(folder, exist_ok=True)
    request = JailRequest("/tmp/jobs/p", "/tmp/work/w", ["/tmp/jobs", "/tmp/work"],
                          network=False, read_only=["/tmp/jobs/p/logs"])

    def as_fork_server() -> None:
        confine(request, None)
        os._exit(0 if os.getpid() == 1 else 3)

    def as_keeper() -> None:
        enter(request, None)
        os._exit(keep(fork_job(lambda: os._exit(0 if os.getpid() == 1 else 3))))

    forker = PidNamespaceForker()
    for name, model, fork in (("fork server", as_fork_server, forker.fork),
                              ("keeper", as_keeper, os.fork)):
        pid = fork()
        if pid == 0:
            try:
                model()
            except BaseException as exc:
                print(f"jail failed: {exc}", file=sys.stderr, flush=True)
            os._exit(2)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"the per-job jail ({name} model) failed (status {status})")
    print("jail ok")


# -- spawn mode: python -m runtimes.jail REQUEST --------------------------------------------
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m runtimes.jail REQUEST.json (started by miner-agent)",
              file=sys.stderr)
        raise SystemExit(2)
    raw = json.loads(Path(args[0]).read_text())
    cgroup_fd = raw.get("cgroup_fd")
    try:
        if os.getsid(0) != os.getpid():  # bwrap --new-session made us a leader already
            os.setsid()
        enter(JailRequest.from_dict(raw["jail"]), cgroup_fd)
    except (OSError, KeyError, ValueError) as exc:
        print(f"miner-agent: cannot confine the job: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    spec_path = str(raw["spec"])

    def run() -> None:
        host.run_file(spec_path, check_parent=False)

    child = fork_job(run)
    for fd in (0, 1, 2, int(raw.get("events_fd", 3))):
        try:
            os.close(fd)  # only the job holds the pipes: EOF comes when it is gone
        except OSError:
            pass
    os._exit(keep(child))


if __name__ == "__main__":
    main()
