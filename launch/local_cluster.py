"""A test cluster on one machine: N network-namespaced hosts on a private switch, DeepSpeed's launcher on each.

    sudo python launch/local_cluster.py --hosts 2 --ranks 1 -- launch/generate.py --config recipe.yaml
    sudo python launch/local_cluster.py --hosts 2 --link 200mbit -- launch/generate.py --config recipe.yaml

Each host is a network namespace `<prefix>-h<i>` with its own address 10.77.0.<i+1> on `eth0`, a veth whose peer
sits on a bridge inside a switch namespace `<prefix>-sw`: nothing is added to the machine's own network stack,
and traffic between hosts never takes loopback. `--link RATE` shapes every host's egress with tc's token bucket
(tbf), so each direction of every host's link carries at most RATE. On host i the script runs exactly what a
real node of a cluster runs:

    deepspeed --hostfile H --no_ssh --node_rank i --num_nodes N --num_gpus R \
              --master_addr <host 0's address> --master_port P <command>

with `GLOO_SOCKET_IFNAME=eth0` and `SEESAW_NODE_KEY=<prefix>-h<i>` (the key of the host's /dev/shm files; the
hosts share this machine's /dev/shm). Logs stream prefixed by host. On exit, Ctrl-C or failure it kills every
process left in its namespaces, deletes them (and their links) and removes the /dev/shm files of its hosts.
Needs root and `ip netns`; otherwise it says so (`error: ...`, exit 2).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

SUBNET = "10.77.0"
RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}
RATE = re.compile(r"^(\d+(?:\.\d+)?)(" + "|".join(RATE_UNITS) + r")$")
PREFIX = re.compile(r"^[a-z][a-z0-9]{2,8}$")


class ClusterError(Exception):
    """The cluster cannot be built here (not root, no namespaces, a name in use...)."""


def rate_bits(rate: str) -> float:
    """'200mbit' -> 2e8 bits/s (tc's units: 'mbps' is megabytes per second)."""
    match = RATE.match(rate.strip().lower())
    if not match:
        raise ValueError(f"--link {rate!r} is not a rate like 200mbit, 25mbps (bytes/s) or 1gbit")
    return float(match.group(1)) * RATE_UNITS[match.group(2)]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


PRIVATE_SHM_SIZE = "2g"


class LocalCluster:
    """N namespaced hosts joined by a switch; `up()` builds them, `down()` removes all it made (idempotent)."""

    def __init__(self, hosts: int, link: str | None = None, prefix: str | None = None, private_shm: bool = False):
        self.hosts, self.link, self.private_shm = hosts, link, private_shm
        self.prefix = prefix or f"ssw{secrets.token_hex(3)}"
        self.switch = f"{self.prefix}-sw"
        self._made: list[str] = []              # namespaces made, in order

    def namespace(self, i: int) -> str:
        return f"{self.prefix}-h{i}"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def node_key(self, i: int) -> str:
        return self.namespace(i)

    def exec_argv(self, i: int, argv: list[str]) -> list[str]:
        """`argv` on host i; with `private_shm`, in a mount namespace whose /dev/shm is a tmpfs of its own,
        shared by the host's ranks and gone with them (hosts then share no /dev/shm, as separate machines)."""
        if self.private_shm:
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                    f'mount -t tmpfs -o size={PRIVATE_SHM_SIZE} {self.namespace(i)}-shm /dev/shm && exec "$@"',
                    "sh", *argv]
        return ["ip", "netns", "exec", self.namespace(i), *argv]

    def up(self) -> None:
        if os.geteuid() != 0:
            raise ClusterError("local_cluster.py needs root (it creates network namespaces); run it with sudo")
        if shutil.which("ip") is None:
            raise ClusterError("`ip` (iproute2) is not installed; network namespaces are unavailable")
        existing = _ip("netns", "list", check=False)
        if existing.returncode != 0:
            raise ClusterError(f"network namespaces are unavailable here: {existing.stderr.strip()}")
        if any(line.split()[0].startswith(self.prefix + "-") for line in existing.stdout.splitlines() if line):
            raise ClusterError(f"namespaces named {self.prefix}-* exist already; choose another --prefix")
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i in range(self.hosts):
            ns, outer, inner = self.namespace(i), f"{self.prefix}a{i}", f"{self.prefix}b{i}"
            self._add_namespace(ns)
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            _ip("link", "set", outer, "netns", self.switch)
            _ip("link", "set", inner, "netns", ns)
            _ip("-n", self.switch, "link", "set", outer, "master", "br0", "up")
            _ip("-n", ns, "link", "set", inner, "name", "eth0")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if self.link:
                self._shape(ns)

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def _shape(self, ns: str) -> None:
        """Token bucket on the host's egress: at most `link` each way, a burst of ~10 ms of traffic."""
        burst = max(4096, int(rate_bits(self.link) / 8 / 100))      # bytes
        proc = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                               "rate", self.link, "burst", str(burst), "latency", "400ms"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterError(f"tc could not limit the link to {self.link}: {proc.stderr.strip()}")

    def pids(self, i: int) -> list[int]:
        """Every process running in host i's namespace."""
        proc = _ip("netns", "pids", self.namespace(i), check=False)
        return [int(p) for p in proc.stdout.split()]

    def kill_host(self, i: int, sig: int = signal.SIGKILL) -> int:
        """Signal every process of host i (a lost host: kill -9); returns how many there were."""
        pids = self.pids(i)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return len(pids)

    def down(self, port: int | None = None) -> list[str]:
        """Kill what runs in the namespaces, delete them (their veths and the bridge go with them) and remove
        the hosts' /dev/shm files (and DeepSpeed's all-reduce buffers of the job on `port`). Returns the names of
        the removed /dev/shm files."""
        for i in range(self.hosts):
            if self.namespace(i) in self._made:
                self.kill_host(i)
        for ns in reversed(self._made):
            deadline = time.monotonic() + 10
            while _ip("netns", "pids", ns, check=False).stdout.split() and time.monotonic() < deadline:
                time.sleep(0.05)
            _ip("netns", "del", ns, check=False)
        for i in range(self.hosts):                  # a veth pair is gone with either end's namespace
            for name in (f"{self.prefix}a{i}", f"{self.prefix}b{i}"):
                if _ip("link", "show", name, check=False).returncode == 0:
                    _ip("link", "del", name, check=False)
        self._made.clear()
        return self.remove_shm_files(port)

    def remove_shm_files(self, port: int | None = None) -> list[str]:
        """This cluster's /dev/shm files: names carrying a host's node key (or the job's master port)."""
        paths = [p for i in range(self.hosts) for p in glob.glob(f"/dev/shm/*-{self.node_key(i)}-*")]
        if port is not None:
            paths += glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
        removed = []
        for path in paths:
            try:
                os.unlink(path)
                removed.append(os.path.basename(path))
            except OSError:
                pass
        return removed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_argv(cluster: LocalCluster, i: int, ranks: int, port: int, hostfile: str, command: list[str]):
    """DeepSpeed's launcher for host i, as a real node of a cluster would run it."""
    exe = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [exe if os.path.exists(exe) else "deepspeed", "--hostfile", hostfile, "--no_ssh", "--node_rank", str(i),
            "--num_nodes", str(cluster.hosts), "--num_gpus", str(ranks), "--master_addr", cluster.address(0),
            "--master_port", str(port), *command]


def _stream(label: str, pipe, out) -> None:
    for line in iter(pipe.readline, ""):
        out.write(f"[{label}] {line}")
        out.flush()
    pipe.close()


def run(cluster: LocalCluster, ranks: int, command: list[str], port: int, grace: float) -> int:
    """Start the launcher on every host, stream their logs, and return the first failing exit code (or 0).
    Once a host fails, the others get `grace` seconds to end on their own before they are killed."""
    workdir = tempfile.mkdtemp(prefix=f"{cluster.prefix}-")
    hostfile = os.path.join(workdir, "hostfile")
    with open(hostfile, "w", encoding="utf-8") as handle:
        handle.writelines(f"h{i} slots={ranks}\n" for i in range(cluster.hosts))
    procs, threads = [], []
    try:
        for i in range(cluster.hosts):
            env = dict(os.environ, GLOO_SOCKET_IFNAME="eth0", SEESAW_NODE_KEY=cluster.node_key(i),
                       PYTHONUNBUFFERED="1")
            argv = cluster.exec_argv(i, launcher_argv(cluster, i, ranks, port, hostfile, command))
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace")
            procs.append(proc)
            thread = threading.Thread(target=_stream, args=(f"h{i}", proc.stdout, sys.stdout), daemon=True)
            thread.start()
            threads.append(thread)
        failed_at, code = None, 0
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                if p.poll() not in (None, 0) and code == 0:
                    code, failed_at = p.returncode, time.monotonic()
                    print(f"local_cluster: host h{i} exited with {p.returncode}; the others get {grace:g} s",
                          flush=True)
            if failed_at is not None and time.monotonic() - failed_at > grace:
                print("local_cluster: killing the hosts still running", flush=True)
                break
            time.sleep(0.1)
        code = code or next((p.returncode for p in procs if p.returncode not in (None, 0)), 0)
        return code
    finally:
        for i in range(cluster.hosts):
            cluster.kill_host(i)
        for p in procs:
            p.wait()
        for t in threads:
            t.join(timeout=5)
        shutil.rmtree(workdir, ignore_errors=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run a DeepSpeed command on N network-namespaced hosts of this machine (needs root).",
        epilog="Everything after `--` is the command DeepSpeed's launcher runs on each host, e.g. "
               "`-- launch/generate.py --config recipe.yaml`.")
    parser.add_argument("--hosts", type=int, default=2, help="number of hosts (default 2)")
    parser.add_argument("--ranks", type=int, default=1, help="ranks per host (--num_gpus of each launcher)")
    parser.add_argument("--link", default=None, help="rate of each host's link, tc units: 200mbit, 25mbps "
                                                     "(bytes/s), 1gbit (default: unlimited)")
    parser.add_argument("--master_port", type=int, default=None, help="rendezvous port (default: a free one)")
    parser.add_argument("--prefix", default=None, help="name prefix of the namespaces (3-9 lowercase letters "
                                                       "and digits; default: random 'ssw' + hex)")
    parser.add_argument("--private-shm", action="store_true",
                        help="give each host a /dev/shm of its own (as separate machines; default: they share "
                             "this machine's)")
    parser.add_argument("--grace", type=float, default=60.0,
                        help="seconds the other hosts get to exit once one host failed (default 60)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- script.py [args]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.exit(2, "error: no command: give it after `--`, e.g. -- launch/generate.py --config r.yaml\n")
    if args.hosts < 1 or args.ranks < 1:
        parser.exit(2, f"error: --hosts and --ranks must be >= 1 (got {args.hosts} and {args.ranks})\n")
    if args.hosts > 250:
        parser.exit(2, f"error: --hosts {args.hosts}: at most 250 hosts fit the switch's /24\n")
    if args.prefix is not None and not PREFIX.match(args.prefix):
        parser.exit(2, f"error: --prefix {args.prefix!r}: 3-9 lowercase letters and digits, a letter first\n")
    if args.link is not None:
        try:
            rate_bits(args.link)
        except ValueError as err:
            parser.exit(2, f"error: {err}\n")
    args.command = command
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cluster = LocalCluster(args.hosts, args.link, args.prefix, args.private_shm)
    port = args.master_port or free_port()

    def stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    try:
        try:
            cluster.up()
        except ClusterError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        link = f"link {args.link}" if args.link else "unlimited link"
        print(f"local_cluster: {args.hosts} hosts x {args.ranks} ranks ({link}): " + ", ".join(
            f"h{i}={cluster.namespace(i)}@{cluster.address(i)}" for i in range(args.hosts))
              + f"; master {cluster.address(0)}:{port}", flush=True)
        return run(cluster, args.ranks, args.command, port, args.grace)
    except KeyboardInterrupt:
        print("local_cluster: interrupted; tearing down", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)      # a second Ctrl-C must not stop the teardown
        removed = cluster.down(port)
        if removed:
            print(f"local_cluster: removed {len(removed)} /dev/shm file(s) of its hosts", flush=True)


if __name__ == "__main__":
    sys.exit(main())
