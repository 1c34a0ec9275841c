#!/usr/bin/env python3
"""Soak test: a real `ferry server` and several real `ferry client` processes under
steady churn, while the server's resident memory, open file descriptors and Tokio task
count are sampled into a CSV.

Churn, for --seconds (or SOAK_SECONDS):
- visitors open at a steady --rate per second to the clients' TCP tunnels, each sends a
  random payload to an echo service and checks the SHA-256 of what comes back; one in
  ten hangs up half way instead (the abrupt-close path), one in ten then stays idle for
  1-5 s (so client replacements cut visitors in flight);
- every --restart-every seconds one client is replaced: in turn killed (SIGKILL),
  stopped (SIGTERM) and restarted, or kicked through the API (it reconnects itself);
- every --reload-every seconds the users file is rewritten (a user added or removed, the
  live users' limits set or lifted) and the server gets SIGHUP.

After the churn the server must come back to its idle state within --settle seconds:
the fd and task counts it had idle at the start (every pool at its configured size:
the surplus pooled connections a burst leaves are closed after a minute idle), and anonymous RSS
within 10% of its idle level after a warm-up of the same churn (a quarter as long). Exits 1 with the reason otherwise, or if any
visitor got corrupted data or failed while its client was not being replaced.
"""
import argparse
import asyncio
import csv
import hashlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RSS_TOLERANCE = 0.10
MAX_IN_FLIGHT = 500
VISITOR_TIMEOUT = 15.0


def parse_args():
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ferry", default=env("FERRY_BIN", os.path.join(ROOT, "target", "release", "ferry")))
    p.add_argument("--seconds", type=float, default=float(env("SOAK_SECONDS", "60")), help="churn duration")
    p.add_argument("--warmup", type=float, default=env("SOAK_WARMUP"),
                   help="churn before the memory baseline [default: a quarter of --seconds, at least 15]")
    p.add_argument("--rate", type=float, default=float(env("SOAK_RATE", "50")), help="visitors per second")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--restart-every", type=float, default=3.0)
    p.add_argument("--reload-every", type=float, default=5.0)
    p.add_argument("--sample-every", type=float, default=2.0)
    p.add_argument("--settle", type=float, default=120.0, help="longest wait for each idle state")
    p.add_argument("--port-base", type=int, default=int(env("SOAK_PORT_BASE", "23000")))
    p.add_argument("--csv", default=env("SOAK_CSV", os.path.join(tempfile.gettempdir(), "ferry-soak.csv")))
    args = p.parse_args()
    # The allocator keeps what the busiest moment needed: the baseline is taken once it
    # has seen a good share of the churn, so a leak, not that high-water mark, is measured.
    args.warmup = float(args.warmup) if args.warmup is not None else max(15.0, args.seconds / 4)
    return args


class Soak:
    """The processes, the counters and the samples of one run."""

    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="ferry-soak-")
        base = args.port_base
        self.server_port, self.api_port, self.echo_port = base, base + 1, base + 2
        self.tunnel_ports = [base + 10 + i for i in range(args.clients)]
        self.secrets = {f"soak{i}": secrets.token_hex(16) for i in range(args.clients)}
        self.users_file = os.path.join(self.work, "users.yaml")
        self.reloads = 0
        self.server = None
        self.clients = [None] * args.clients
        # Bumped whenever a client is disrupted; a visitor cut meanwhile is expected.
        self.generation = [0] * args.clients
        self.up = [False] * args.clients
        self.counts = {"served": 0, "aborted": 0, "cut_by_restart": 0, "errors": 0, "skipped": 0,
                       "restarts": 0, "kicks": 0, "reloads": 0}
        self.in_flight = 0
        self.error_samples = []
        self.phase = "start"
        self.samples = []
        self.started = time.monotonic()

    # --- processes -------------------------------------------------------------------

    def write_users(self):
        """The users file; each reload brings or takes away an extra user and the live
        users' limits (high enough not to slow the visitors)."""
        limits = ", speed: 104857600, connections: 1000" if self.reloads % 2 else ""
        with open(self.users_file, "w") as f:
            for user, secret in self.secrets.items():
                f.write(f"{user}: {{secret: {secret}{limits}}}\n")
            if self.reloads % 2:
                f.write(f"spare: {{secret: {secrets.token_hex(16)}, speed: 1048576}}\n")

    def start_server(self):
        self.write_users()
        with open(os.path.join(self.work, "server.log"), "w") as log:
            self.server = subprocess.Popen(
                [self.args.ferry, "server", "--addr", f"127.0.0.1:{self.server_port}", "--users", self.users_file,
                 "--tcp-range", f"{self.tunnel_ports[0]}-{self.tunnel_ports[-1]}",
                 "--api-addr", f"127.0.0.1:{self.api_port}", "--log-level", "warn",
                 # Surplus pooled connections of a burst close within seconds, not a minute.
                 "--pool-idle-timeout", "5s"],
                stdout=log, stderr=subprocess.STDOUT)

    def start_client(self, i):
        user = f"soak{i}"
        # The secret goes by environment, not on the command line that `ps` shows.
        env = {**os.environ, "FERRY_SECRET": self.secrets[user]}
        with open(os.path.join(self.work, f"client{i}.log"), "a") as log:
            self.clients[i] = subprocess.Popen(
                [self.args.ferry, "client", "--remote", f"tcp://127.0.0.1:{self.server_port}", "--id", user,
                 "--log-level", "warn", "--reconnect-delay", "100ms", "--local", f"tcp://127.0.0.1:{self.echo_port}",
                 "--remote-tcp-port", str(self.tunnel_ports[i])],
                stdout=log, stderr=subprocess.STDOUT, env=env)

    def stop_all(self):
        for proc in self.clients + [self.server]:
            if proc and proc.poll() is None:
                proc.kill()
                proc.wait()

    def api(self, method, path):
        request = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}", method=method)
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.read()

    def services(self):
        """Client ids serving each tunnel port now."""
        return {s["port"]: s["cid"] for s in json.loads(self.api("GET", "/services"))}

    # --- the echo service and visitors --------------------------------------------------

    async def echo(self, reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def visitor(self, i):
        generation = self.generation[i]
        payload = os.urandom(random.randint(1, 256 * 1024))
        roll = random.random()
        abort, linger = roll < 0.1, roll > 0.9
        self.in_flight += 1
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.tunnel_ports[i])
            writer.write(payload)
            await writer.drain()
            wanted = len(payload) // 2 if abort else len(payload)
            echoed = await reader.readexactly(wanted)
            if hashlib.sha256(echoed).digest() != hashlib.sha256(payload[:wanted]).digest():
                self.fail(i, "the echoed data differs from what was sent")
            elif abort:
                self.counts["aborted"] += 1
                writer.transport.abort()
            else:
                if linger:
                    await self.linger(reader)
                self.counts["served"] += 1
        except (OSError, asyncio.IncompleteReadError) as err:
            if self.generation[i] != generation or not self.up[i]:
                self.counts["cut_by_restart"] += 1
            else:
                self.fail(i, f"{type(err).__name__}: {err}")
        finally:
            self.in_flight -= 1
            if writer:
                writer.close()

    async def linger(self, reader):
        """Stays connected and idle for 1-5 s; the tunnel must not close meanwhile."""
        try:
            extra = await asyncio.wait_for(reader.read(1), random.uniform(1, 5))
        except asyncio.TimeoutError:
            return
        raise ConnectionResetError(f"a lingering visitor got {extra!r} from the tunnel")

    def fail(self, i, why):
        self.counts["errors"] += 1
        if len(self.error_samples) < 20:
            self.error_samples.append(f"{self.phase} client {i}: {why}")

    async def visitors(self, until):
        """Opens visitors at the steady rate to tunnels that are up, until `until`."""
        pending = set()
        interval = 1.0 / self.args.rate
        next_at = time.monotonic()
        while next_at < until:
            up = [i for i in range(self.args.clients) if self.up[i]]
            if up and self.in_flight < MAX_IN_FLIGHT:
                task = asyncio.create_task(asyncio.wait_for(self.visitor(random.choice(up)), VISITOR_TIMEOUT))
                pending.add(task)
                task.add_done_callback(pending.discard)
            else:
                self.counts["skipped"] += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        for result in await asyncio.gather(*pending, return_exceptions=True):
            if isinstance(result, asyncio.TimeoutError):
                self.fail(-1, f"a visitor took longer than {VISITOR_TIMEOUT} s")

    # --- churn -------------------------------------------------------------------------

    async def wait_up(self, i, old_cid=None, timeout=20.0):
        """Polls the API until client i serves its port again (with a new cid if given)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                cid = await asyncio.to_thread(lambda: self.services().get(self.tunnel_ports[i]))
            except OSError:  # the API is not listening yet
                cid = None
            if self.server.poll() is not None:
                raise SystemExit(f"the server exited with {self.server.returncode}; see {self.work}")
            if cid is not None and cid != old_cid:
                self.up[i] = True
                return cid
            await asyncio.sleep(0.05)
        raise SystemExit(f"client {i} did not get port {self.tunnel_ports[i]} back within {timeout} s")

    async def replace_client(self, i, how):
        old_cid = await asyncio.to_thread(lambda: self.services().get(self.tunnel_ports[i]))
        self.up[i] = False
        self.generation[i] += 1
        if how == "kick":
            await asyncio.to_thread(self.api, "DELETE", f"/clients/{old_cid}")
            self.counts["kicks"] += 1
        else:
            proc = self.clients[i]
            proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 10)
            self.start_client(i)
            self.counts["restarts"] += 1
        await self.wait_up(i, old_cid)

    async def churn_clients(self, until):
        ways = ["kill", "term", "kick"]
        turn = 0
        while time.monotonic() + self.args.restart_every < until:
            await asyncio.sleep(self.args.restart_every)
            await self.replace_client(turn % self.args.clients, ways[turn % len(ways)])
            turn += 1

    async def reloads_loop(self, until):
        while time.monotonic() + self.args.reload_every < until:
            await asyncio.sleep(self.args.reload_every)
            self.reloads += 1
            self.write_users()
            self.server.send_signal(signal.SIGHUP)
            self.counts["reloads"] += 1

    async def churn(self, seconds, phase):
        self.phase = phase
        until = time.monotonic() + seconds
        await asyncio.gather(self.visitors(until), self.churn_clients(until), self.reloads_loop(until))

    # --- sampling ------------------------------------------------------------------------

    def sample(self):
        pid = self.server.pid
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.split(":", 1) for line in f if ":" in line)
        metrics = self.api("GET", "/metrics").decode()
        tasks = next(int(float(line.split()[1])) for line in metrics.splitlines() if line.startswith("ferry_tasks "))
        row = {"t": round(time.monotonic() - self.started, 1), "phase": self.phase,
               "rss_kib": kib(status["VmRSS"]), "anon_kib": kib(status["RssAnon"]),
               "file_kib": kib(status["RssFile"]), "fds": len(os.listdir(f"/proc/{pid}/fd")),
               "threads": int(status["Threads"]), "tasks": tasks, "in_flight": self.in_flight, **self.counts}
        self.samples.append(row)
        self.write_csv_row(row)
        return row

    async def sampler(self, stop):
        while not stop.is_set():
            if self.server.poll() is not None:
                raise SystemExit(f"the server exited with {self.server.returncode} during the {self.phase}")
            await asyncio.to_thread(self.sample)
            try:
                await asyncio.wait_for(stop.wait(), self.args.sample_every)
            except asyncio.TimeoutError:
                pass

    async def idle(self, timeout, settled):
        """Samples every half second until `settled(previous, latest)` holds, or `timeout`;
        returns the latest sample."""
        deadline = time.monotonic() + timeout
        previous = None
        while True:
            row = await asyncio.to_thread(self.sample)
            if (previous and settled(previous, row)) or time.monotonic() > deadline:
                return row
            previous = row
            await asyncio.sleep(0.5)

    def write_csv_row(self, row):
        """Appends one sample to the CSV as it is taken, so a run cut short keeps them."""
        first = len(self.samples) == 1
        with open(self.args.csv, "w" if first else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if first:
                writer.writeheader()
            writer.writerow(row)


def kib(field):
    """A `/proc/PID/status` size ("1234 kB") in KiB."""
    return int(field.split()[0])


def verdict(baseline, final):
    """Why the final idle sample is not back at the baseline (empty when it is): anonymous
    RSS within 10%, the same fds and tasks.

    Anonymous RSS (heap, stacks) is the memory the server holds; the rest of RSS is pages
    of the executable and libraries, faulted in as code paths run for the first time (a
    reload, a kick, an error path), shared and dropped by the kernel under pressure. They
    grow over a long run as rarer paths come up, so total RSS is reported, not judged."""
    problems = []
    if final["anon_kib"] > baseline["anon_kib"] * (1 + RSS_TOLERANCE):
        problems.append(
            f"anonymous RSS {final['anon_kib']} KiB is more than 10% above the baseline {baseline['anon_kib']} KiB"
        )
    for key in ("fds", "tasks"):
        if final[key] != baseline[key]:
            problems.append(f"{key}: {final[key]} after the churn, {baseline[key]} before")
    return problems


async def run(soak):
    args = soak.args
    echo = await asyncio.start_server(soak.echo, "127.0.0.1", soak.echo_port)
    soak.start_server()
    for i in range(args.clients):
        soak.start_client(i)
    for i in range(args.clients):
        await soak.wait_up(i)
    stop = asyncio.Event()
    sampler = asyncio.create_task(soak.sampler(stop))
    steady = lambda before, row: all(row["in_flight"] == 0 and row[k] == before[k] for k in ("fds", "tasks"))
    soak.phase = "idle"
    idle = await soak.idle(args.settle, steady)
    await soak.churn(args.warmup, "warm-up")
    soak.phase = "baseline"
    baseline = await soak.idle(args.settle, steady)
    # fds and tasks as at the start (every pool at its configured size; surplus pooled
    # connections of a burst are closed after --pool-idle-timeout), memory as after the warm-up.
    reference = {**baseline, "fds": idle["fds"], "tasks": idle["tasks"]}
    await soak.churn(args.seconds, "churn")
    soak.phase = "settle"
    final = await soak.idle(args.settle, lambda _, row: row["in_flight"] == 0 and not verdict(reference, row))
    stop.set()
    await sampler
    echo.close()
    return idle, baseline, reference, final


def report(soak, idle, baseline, final):
    churn = [s for s in soak.samples if s["phase"] == "churn"] or soak.samples
    keys = ("rss_kib", "anon_kib", "file_kib", "fds", "tasks", "threads")
    peak = {key: max(s[key] for s in churn) for key in keys}
    print(f"ferry soak: {soak.args.seconds:.0f} s of churn at {soak.args.rate:g} visitors/s, "
          f"{soak.args.clients} clients (one replaced every {soak.args.restart_every:g} s), "
          f"SIGHUP every {soak.args.reload_every:g} s; settled after {final['t'] - churn[-1]['t']:.0f} s")
    print(f"{'':10}{'start':>10}{'warmed':>10}{'peak':>10}{'final':>10}")
    for key in keys:
        print(f"{key:10}{idle[key]:>10}{baseline[key]:>10}{peak[key]:>10}{final[key]:>10}")
    print("counts: " + ", ".join(f"{k} {v}" for k, v in soak.counts.items()))
    print(f"samples: {soak.args.csv}; logs: {soak.work}")
    for line in soak.error_samples:
        print(f"error: {line}")


def main():
    args = parse_args()
    soak = Soak(args)
    # Stopped from outside: still end the server and clients (in `finally`).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("soak: stopped by SIGTERM"))
    try:
        idle, baseline, reference, final = asyncio.run(run(soak))
    finally:
        soak.stop_all()
    report(soak, idle, baseline, final)
    problems = verdict(reference, final)
    if soak.counts["errors"]:
        problems.append(f"{soak.counts['errors']} visitor(s) failed while their client was up")
    with open(os.path.join(soak.work, "server.log")) as f:
        logged = [line.strip() for line in f if "panicked" in line or " ERROR " in line]
    problems += [f"the server logged: {line}" for line in logged[:5]]
    if soak.counts["served"] == 0:
        problems.append("no visitor was served")
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)
    print("PASS: the server came back to its idle baseline")


if __name__ == "__main__":
    main()
