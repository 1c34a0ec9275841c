#!/usr/bin/env python3
"""What a visitor relayed between cluster nodes costs: one etcd, two ferry nodes (on
127.0.0.1 and 127.0.0.2), a client on node 1 exposing nginx on a TCP port; wrk against
that port at node 1 (the owning node) and at node 2 (relayed over the node link), with
keep-alive and with a new connection per request, in alternating rounds. Prints a
Markdown table (bench/RESULTS.md, Cluster). Run by bench/cluster.sh."""

import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRY = os.environ.get("FERRY_BIN", os.path.join(ROOT, "target", "release", "ferry"))
DURATION = int(os.environ.get("DURATION", "10"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
NGINX, PUBLIC, ETCD_CLIENT, ETCD_PEER = 18080, 18180, 18379, 18380
SECRET = "bench-secret-0123456789"

work = tempfile.mkdtemp(prefix="ferry-cluster-bench-")
os.chmod(work, 0o755)
procs = []


def start(args):
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(proc)
    return proc


def cleanup():
    for proc in reversed(procs):
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
    subprocess.run(["nginx", "-c", f"{work}/nginx.conf", "-p", work, "-s", "stop"], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)


def wait_http(url, what):
    for _ in range(400):
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except Exception:
            time.sleep(0.05)
    sys.exit(f"{what} never answered at {url}")


def wrk(ip, close):
    args = ["wrk", "-t2", "-c100", f"-d{DURATION}s", "--latency"]
    if close:
        args += ["-H", "Connection: close"]
    out = subprocess.run(args + [f"http://{ip}:{PUBLIC}/"], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def percentile(p):
        value, unit = re.search(rf"{p}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    return rps, percentile(50), percentile(99)


def main():
    www = os.path.join(work, "www")
    os.makedirs(www)
    with open(os.path.join(www, "index.html"), "w") as f:
        f.write("<html><body>" + "ferry bench " * 50 + "</body></html>\n")
    with open(f"{work}/nginx.conf", "w") as f:
        f.write(f"""worker_processes auto; pid {work}/nginx.pid; error_log {work}/nginx.err warn;
events {{ worker_connections 8192; }}
http {{ access_log off; keepalive_requests 1000000; server {{ listen 127.0.0.1:{NGINX}; root {www}; }} }}
""")
    subprocess.run(["nginx", "-c", f"{work}/nginx.conf", "-p", work], check=True)
    etcd = f"http://127.0.0.1:{ETCD_CLIENT}"
    start(["etcd", f"--data-dir={work}/etcd", f"--listen-client-urls={etcd}", f"--advertise-client-urls={etcd}",
           f"--listen-peer-urls=http://127.0.0.1:{ETCD_PEER}",
           f"--initial-advertise-peer-urls=http://127.0.0.1:{ETCD_PEER}",
           f"--initial-cluster=default=http://127.0.0.1:{ETCD_PEER}"])
    wait_http(f"{etcd}/health", "etcd")
    for n in (1, 2):
        start([FERRY, "server", "--addr", f"127.0.0.{n}:18000", "--tcp-range", f"{PUBLIC}-{PUBLIC}",
               "--id", "bench", "--secret", SECRET, "--cluster-etcd", etcd, "--node-id", f"n{n}",
               "--node-addr", f"127.0.0.{n}:18100", "--log-level", "warn"])
    time.sleep(0.5)  # the nodes bind; the client retries until its node answers anyway
    start([FERRY, "client", "--remote", "127.0.0.1:18000", "--id", "bench", "--secret", SECRET,
           "--local", f"tcp://127.0.0.1:{NGINX}", "--remote-tcp-port", str(PUBLIC), "--log-level", "warn"])
    wait_http(f"http://127.0.0.1:{PUBLIC}/", "the tunnel at node 1")
    wait_http(f"http://127.0.0.2:{PUBLIC}/", "the tunnel relayed by node 2")

    figures = {}
    for round_no in range(ROUNDS):
        for close in (False, True):
            for where, ip in (("owning node", "127.0.0.1"), ("relayed by another node", "127.0.0.2")):
                figures.setdefault((close, where), []).append(wrk(ip, close))
        print(f"round {round_no + 1} of {ROUNDS} done", file=sys.stderr)

    print(f"wrk `-t2 -c100 -d{DURATION}s` against nginx through a TCP tunnel; medians of {ROUNDS} "
          "alternating rounds; two nodes and etcd on this machine.\n")
    print("| visitor at | keep-alive req/s | p50 ms | p99 ms | new connection req/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    med = {key: [statistics.median(v[i] for v in values) for i in range(3)] for key, values in figures.items()}
    for where in ("owning node", "relayed by another node"):
        keep, new = med[(False, where)], med[(True, where)]
        print(f"| {where} | {keep[0]:.0f} | {keep[1]:.2f} | {keep[2]:.2f} | {new[0]:.0f} | {new[1]:.2f} | {new[2]:.2f} |")
    for close, label in ((False, "keep-alive"), (True, "new connection")):
        own, relayed = med[(close, "owning node")], med[(close, "relayed by another node")]
        print(f"\n{label}: relayed/owning = {relayed[0] / own[0]:.2f}x req/s, "
              f"p50 +{relayed[1] - own[1]:.2f} ms, p99 +{relayed[2] - own[2]:.2f} ms", end="")
    print()


if __name__ == "__main__":
    try:
        main()
    finally:
        cleanup()
