#!/usr/bin/env python3
"""Measures ferry, rathole, bore and a direct connection to nginx/iperf3 on loopback.

Every figure of every target is taken in the same run, alternating targets in
each round, and the median of the rounds is reported. Called by bench/run.sh.
FERRY_BIN overrides the ferry binary (default target/release/ferry), RESULTS the
output file (default bench/RESULTS.md). FERRY_BASE names an earlier ferry build to
measure beside this one, in the same rounds (a before/after table is added)."""
import datetime
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FERRY = os.environ.get("FERRY_BIN", os.path.join(ROOT, "target", "release", "ferry"))
RESULTS = os.environ.get("RESULTS", os.path.join(ROOT, "bench", "RESULTS.md"))
DURATION = int(os.environ.get("DURATION", "10"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
IDLE = int(os.environ.get("IDLE", "1000"))
# Idle visitors of the large-scale figure (0: skip it). 9,000, not 10,000: a visitor costs a
# TCP tunnel server two descriptors, and this machine caps a process at 20,000 (see RESULTS.md).
MANY = int(os.environ.get("MANY", "9000"))
NGINX, IPERF, NGINX_TLS = 18080, 15201, 18443
FERRY_TLS = 17443
BORE_CONTROL = 7835  # fixed in bore, no option to change it
HOST = "web.bench.test"
PORTS = {"direct": (NGINX, IPERF), "ferry": (17080, 17201), "rathole": (27080, 27201), "bore": (37080, 37201)}
TARGETS = ["direct", "ferry", "rathole", "bore"]
TUNNELS = TARGETS[1:]
BASE = os.environ.get("FERRY_BASE")
if BASE:
    PORTS["base"] = (47080, 47201)
# Everything measured: the table's targets, and the earlier build when there is one.
MEASURED = TARGETS + (["base"] if BASE else [])
MEASURED_TUNNELS = MEASURED[1:]

work = tempfile.mkdtemp(prefix="ferry-bench-")
os.chmod(work, 0o755)
procs = []


def start(args, **kw):
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    procs.append(proc)
    return proc


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_http(port, what):
    for _ in range(200):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.05)
    sys.exit(f"{what} never answered on port {port}")


def listening(port):
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def wait_listen(port, what):
    # Only looks for the listening socket: a probe connection would reach the service behind.
    for _ in range(200):
        if listening(port):
            return
        time.sleep(0.05)
    sys.exit(f"{what} never listened on port {port}")


def make_cert():
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=" + HOST, "-addext", "subjectAltName=DNS:*.bench.test",
                    "-keyout", f"{work}/key.pem", "-out", f"{work}/cert.pem"],
                   check=True, capture_output=True)


def start_nginx():
    make_cert()
    www = os.path.join(work, "www")
    os.makedirs(www)
    with open(os.path.join(www, "index.html"), "w") as f:
        f.write("<html><body>" + "ferry bench " * 50 + "</body></html>\n")
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes auto;
pid {work}/nginx.pid;
error_log {work}/nginx.err warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 30000; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{NGINX}; root {www}; }}
  server {{ listen 127.0.0.1:{NGINX_TLS} ssl; root {www};
           ssl_certificate {work}/cert.pem; ssl_certificate_key {work}/key.pem; }}
}}
""")
    subprocess.run(["nginx", "-c", conf, "-p", work], check=True)
    wait_http(NGINX, "nginx")


def start_base():
    """The earlier build, with the same TCP tunnels (no TLS or host routing figures)."""
    secret = secrets.token_hex(16)
    server = start([BASE, "server", "--addr", "127.0.0.1:47000", "--id", "bench", "--secret", secret,
                    "--tcp-range", "47001-47999", "--log-level", "warn"])
    time.sleep(0.3)
    client = start([BASE, "client", "--remote", "tcp://127.0.0.1:47000", "--id", "bench", "--secret", secret,
                    "--log-level", "warn",
                    "--local", f"tcp://127.0.0.1:{NGINX}", "--remote-tcp-port", "47080",
                    "--local", f"tcp://127.0.0.1:{IPERF}", "--remote-tcp-port", "47201"])
    wait_http(47080, "ferry (base)")
    return server, client


def start_ferry():
    secret = secrets.token_hex(16)
    server = start([FERRY, "server", "--addr", "127.0.0.1:17000", "--id", "bench", "--secret", secret,
                    "--tcp-range", "17001-17999", "--log-level", "warn",
                    "--tls-addr", f"127.0.0.1:{FERRY_TLS}", "--cert-file", f"{work}/cert.pem",
                    "--key-file", f"{work}/key.pem"])
    time.sleep(0.3)
    client = start([FERRY, "client", "--remote", "tcp://127.0.0.1:17000", "--id", "bench", "--secret", secret,
                    "--log-level", "warn",
                    "--local", f"tcp://127.0.0.1:{NGINX}", "--remote-tcp-port", "17080",
                    "--local", f"tcp://127.0.0.1:{IPERF}", "--remote-tcp-port", "17201",
                    "--local", f"http://127.0.0.1:{NGINX}", "--host-prefix", "web"])
    wait_http(17080, "ferry")
    return server, client


def start_rathole():
    token = secrets.token_hex(16)
    server_conf = os.path.join(work, "rathole-server.toml")
    client_conf = os.path.join(work, "rathole-client.toml")
    with open(server_conf, "w") as f:
        f.write(f"""[server]
bind_addr = "127.0.0.1:27000"
[server.services.web]
token = "{token}"
bind_addr = "127.0.0.1:27080"
[server.services.iperf]
token = "{token}"
bind_addr = "127.0.0.1:27201"
""")
    with open(client_conf, "w") as f:
        f.write(f"""[client]
remote_addr = "127.0.0.1:27000"
[client.services.web]
token = "{token}"
local_addr = "127.0.0.1:{NGINX}"
[client.services.iperf]
token = "{token}"
local_addr = "127.0.0.1:{IPERF}"
""")
    env = dict(os.environ, RUST_LOG="warn")
    server = start(["rathole", "--server", server_conf], env=env)
    time.sleep(0.3)
    client = start(["rathole", "--client", client_conf], env=env)
    wait_http(27080, "rathole")
    return server, client


def start_bore():
    # bore has no config file and one tunnel per `bore local`, so one client per service;
    # the remote ports are fixed with --port inside the server's --min-port/--max-port.
    if listening(BORE_CONTROL):
        sys.exit(f"port {BORE_CONTROL} (bore's fixed control port) is already in use")
    secret = secrets.token_hex(16)
    env = dict(os.environ, RUST_LOG="warn")
    server = start(["bore", "server", "--bind-addr", "127.0.0.1", "--min-port", "37001", "--max-port", "37999",
                    "--secret", secret], env=env)
    wait_listen(BORE_CONTROL, "bore server")
    clients = [start(["bore", "local", "--local-host", "127.0.0.1", "--to", "127.0.0.1", "--port", str(remote),
                      "--secret", secret, str(local)], env=env)
               for local, remote in ((NGINX, PORTS["bore"][0]), (IPERF, PORTS["bore"][1]))]
    wait_http(PORTS["bore"][0], "bore")
    wait_listen(PORTS["bore"][1], "bore")
    return (server, *clients)


def wrk(port, close, host=None, scheme="http"):
    args = ["wrk", "-t2", "-c100", f"-d{DURATION}s", "--latency"]
    if close:
        args += ["-H", "Connection: close"]
    if host:
        args += ["-H", f"Host: {host}"]
    out = subprocess.run(args + [f"{scheme}://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", out).groups()
    p99_ms = float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, p99_ms, (errors.group(1) if errors else "") + (f" non2xx={non2xx.group(1)}" if non2xx else "")


def iperf(port):
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "5", "-J"],
                         capture_output=True, text=True, check=True).stdout
    import json
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def idle_memory(port, pids, count=IDLE, pace=0.001, timeout=60):
    """Peak RSS and private (anonymous) memory at the end, in MiB, of each of `pids`
    with `count` idle visitors."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "idle_visitors.py"), "--port", str(port),
                          "--count", str(count), "--pids", ",".join(str(p) for p in pids), "--pace", str(pace),
                          "--timeout", str(timeout)],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.strip().splitlines()]
    return [(int(hwm) / 1024, int(anon) / 1024) for _, _, hwm, anon in rows]


def version(args):
    try:
        return subprocess.run(args, capture_output=True, text=True).stdout.strip().splitlines()[0]
    except Exception:
        return "?"


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # run the cleanup below
    start_nginx()
    start([ "iperf3", "-s", "-B", "127.0.0.1", "-p", str(IPERF)])
    time.sleep(0.3)
    starters = {"ferry": start_ferry, "rathole": start_rathole, "bore": start_bore, "base": start_base}
    tunnels = {t: starters[t]() for t in MEASURED_TUNNELS}
    figures = {t: {"ka": [], "ka99": [], "close": [], "close99": [], "iperf": []} for t in MEASURED}
    web = {k: [] for k in ("host_ka", "host_close", "tls_ka", "tls_direct_ka")}
    notes = []
    for round_no in range(ROUNDS):
        # Rotate the order each round, so no target always runs right after another.
        shift = round_no % len(MEASURED)
        order = MEASURED[shift:] + MEASURED[:shift]
        for close in (False, True):
            for target in order:
                key = "close" if close else "ka"
                try:
                    rps, p99, err = wrk(PORTS[target][0], close)
                except (subprocess.CalledProcessError, AttributeError) as e:
                    notes.append(f"round {round_no + 1} {target} {key}: wrk gave no figure ({e})")
                    print(notes[-1], flush=True)
                    continue
                figures[target][key].append(rps)
                figures[target][key + "99"].append(p99)
                if err.strip():
                    notes.append(f"round {round_no + 1} {target} {key}: {err.strip()}")
                print(f"round {round_no + 1} {target:8} {'close' if close else 'keep-alive':10} {rps:10.0f} req/s p99 {p99:7.2f} ms {err}", flush=True)
        # Virtual hosts and TLS termination: ferry only (rathole has neither; its TCP tunnel
        # above is the nearest equivalent), against nginx itself over TLS.
        for key, port, close, host, scheme in (
            ("host_ka", 17000, False, HOST, "http"),
            ("host_close", 17000, True, HOST, "http"),
            ("tls_ka", FERRY_TLS, False, HOST, "https"),
            ("tls_direct_ka", NGINX_TLS, False, None, "https"),
        ):
            rps, p99, err = wrk(port, close, host, scheme)
            web[key].append(rps)
            if err.strip():
                notes.append(f"round {round_no + 1} {key}: {err.strip()}")
            print(f"round {round_no + 1} {key:14} {rps:10.0f} req/s p99 {p99:7.2f} ms {err}", flush=True)
        for target in order:
            try:
                gbps = iperf(PORTS[target][1])
            except (subprocess.CalledProcessError, KeyError, ValueError) as e:
                notes.append(f"round {round_no + 1} {target} iperf3: no figure ({e})")
                print(notes[-1], flush=True)
                continue
            figures[target]["iperf"].append(gbps)
            print(f"round {round_no + 1} {target:8} iperf3 {gbps:.2f} Gbit/s", flush=True)
    # Memory: fresh processes, so the peak is that of the idle phase alone.
    # bore runs one client process per service: its client figure is the sum of the two.
    memory = {}
    for target in MEASURED_TUNNELS:
        for proc in tunnels[target]:
            stop(proc)
        tunnels[target] = starters[target]()
        try:
            server, *clients = idle_memory(PORTS[target][0], [p.pid for p in tunnels[target]])
        except subprocess.CalledProcessError as e:
            memory[target] = (None, None, None, None)
            notes.append(f"{target} idle memory: no figure ({e.stderr.strip() or e})")
            print(notes[-1], flush=True)
            continue
        memory[target] = (server[0], sum(c[0] for c in clients), server[1], sum(c[1] for c in clients))
        print(f"{target} with {IDLE} idle visitors: peak RSS server {server[0]:.1f} MiB, client "
              f"{memory[target][1]:.1f} MiB; private server {server[1]:.1f}, client {memory[target][3]:.1f}", flush=True)
    # Many idle visitors: fresh processes again; the server's peak RSS, and whether all got through.
    many = {}
    for target in (MEASURED_TUNNELS if MANY else []):
        for proc in tunnels[target]:
            stop(proc)
        tunnels[target] = starters[target]()
        try:
            (server, _), *_ = idle_memory(PORTS[target][0], [tunnels[target][0].pid], MANY, 0.0005, 120)
            many[target] = (server, MANY)
        except subprocess.CalledProcessError as e:
            got = re.search(r"only (\d+) of", e.stderr or "")
            many[target] = (None, int(got.group(1)) if got else None)
            notes.append(f"{target} {MANY} idle visitors: {(e.stderr or str(e)).strip()}")
        print(f"{target} with {MANY} idle visitors: {many[target]}", flush=True)
    write_results(figures, memory, notes, web, many)


def med(values):
    return statistics.median(values) if values else None


def show(fmt, value):
    return "n/a" if value is None else fmt.format(value)


def ratio(a, b):
    return "n/a" if a is None or b is None else f"{a / b:.2f}×"


def of_direct(value, direct):
    return "" if value is None or direct is None else f" ({value / direct:.0%} of direct)"


# The figures of both tables: (name, key, format, whether higher is better).
FIGURES = [
    ("HTTP keep-alive, requests/s", "ka", "{:,.0f}", True),
    ("HTTP keep-alive, p99 latency (ms)", "ka99", "{:.2f}", False),
    ("HTTP `Connection: close`, requests/s", "close", "{:,.0f}", True),
    ("HTTP `Connection: close`, p99 latency (ms)", "close99", "{:.2f}", False),
    ("iperf3 single stream, Gbit/s", "iperf", "{:.2f}", True),
]


def base_table(f, memory, many):
    """This build against the earlier one (FERRY_BASE), measured in the same rounds."""
    def row(name, key, fmt, higher_better=True):
        b, n = f["base"][key], f["ferry"][key]
        return f"| {name} | {show(fmt, b)} | {show(fmt, n)} | {ratio(n, b) if higher_better else ratio(b, n)} |"
    def memory_row(name, i):
        b, n = memory["base"][i], memory["ferry"][i]
        return f"| {name} | {show('{:.1f}', b)} | {show('{:.1f}', n)} | {ratio(b, n)} |"
    def many_row():
        (b, b_got), (n, n_got) = many.get("base", (None, None)), many.get("ferry", (None, None))
        return (f"| peak RSS, server, {MANY:,} idle visitors (MiB; served) | {show('{:.1f}', b)} ({b_got}) "
                f"| {show('{:.1f}', n)} ({n_got}) | {ratio(b, n)} |")
    return [
        f"Before and after, in the same rounds: {version([BASE, '--version'])} (`{BASE}`) and this build",
        "(last column: above 1 is better for this build; for latency and memory it is before / after).",
        "",
        "| figure | before | after | after vs before |",
        "| --- | --- | --- | --- |",
        *(row(*figure) for figure in FIGURES),
        memory_row(f"peak RSS, server, {IDLE} idle visitors (MiB)", 0),
        memory_row(f"peak RSS, client, {IDLE} idle visitors (MiB)", 1),
        memory_row(f"private memory, server, {IDLE} idle visitors (MiB)", 2),
        memory_row(f"private memory, client, {IDLE} idle visitors (MiB)", 3),
        *([many_row()] if MANY else []),
        "",
    ]


def write_results(figures, memory, notes, web, many):
    f = {t: {k: med(v) for k, v in figures[t].items()} for t in MEASURED}
    def row(name, key, fmt, higher_better=True):
        d, fe = f["direct"][key], f["ferry"][key]
        cells = [show(fmt, f[t][key]) + of_direct(f[t][key], d) for t in TUNNELS]
        vs = [ratio(fe, f[t][key]) if higher_better else ratio(f[t][key], fe) for t in ("rathole", "bore")]
        return f"| {name} | {show(fmt, d)} | {' | '.join(cells)} | {' | '.join(vs)} |"

    def memory_row(name, i):
        fe = memory["ferry"][i]
        cells = [show("{:.1f}", memory[t][i]) for t in TUNNELS]
        vs = [ratio(memory[t][i], fe) for t in ("rathole", "bore")]
        return f"| {name} | – | {' | '.join(cells)} | {' | '.join(vs)} |"

    def many_row(many):
        fe = many.get("ferry", (None, None))[0]
        cells = [f"{show('{:.1f}', many.get(t, (None, None))[0])} ({many.get(t, (None, None))[1]} served)" for t in TUNNELS]
        vs = [ratio(many.get(t, (None, None))[0], fe) for t in ("rathole", "bore")]
        return f"| peak RSS, server, {MANY:,} idle visitors (MiB) | – | {' | '.join(cells)} | {' | '.join(vs)} |"
    lines = [
        "# Benchmark results",
        "",
        f"Run on {datetime.date.today().isoformat()} by `bench/run.sh` on {os.cpu_count()} cores, everything on loopback",
        f"(wrk, nginx, iperf3, the tunnel's server and client share the cores). Median of {ROUNDS} rounds;",
        f"wrk `-t2 -c100 -d{DURATION}s` against an nginx static page; iperf3 5 s single stream.",
        "",
        f"- ferry: {version([FERRY, '--version'])} (TCP transport, release build)",
        f"- rathole: {version(['rathole', '--version']).strip() or 'rathole'} 0.5.0 from crates.io (TCP transport, default config)",
        f"- bore: {version(['bore', '--version'])} from crates.io (`bore server` with a secret, one `bore local` per service)",
        f"- nginx: {subprocess.run(['nginx', '-v'], capture_output=True, text=True).stderr.strip()}",
        f"- wrk: {version(['wrk', '--version']) or 'Debian package'}; iperf3: {version(['iperf3', '--version'])}",
        "",
        "The last two columns are ferry's advantage over rathole and over bore (above 1 is better for ferry;",
        "for latency and memory it is the other tunnel's figure divided by ferry's).",
        "",
        "| figure | direct | ferry | rathole | bore | ferry vs rathole | ferry vs bore |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(row(*figure) for figure in FIGURES),
    ]
    lines += [
        memory_row(f"peak RSS, server, {IDLE} idle visitors (MiB)", 0),
        memory_row(f"peak RSS, client, {IDLE} idle visitors (MiB)", 1),
        memory_row(f"private memory, server, {IDLE} idle visitors (MiB)", 2),
        memory_row(f"private memory, client, {IDLE} idle visitors (MiB)", 3),
        *([many_row(many)] if MANY else []),
        "",
        "Peak RSS counts the pages of the program and its libraries that the process touched",
        "(shared with every other process running them, and given back under pressure); private",
        "memory (`RssAnon`, at the end of the idle phase) is what the visitors and the process's",
        "own state cost. Many idle visitors: fresh processes, the server's peak RSS, and how many",
        "visitors got through (opened at 2,000 per second, one HTTP request each, then held).",
        "",
        "Notes on bore: it has no config file and forwards one port per `bore local` process, so it runs",
        "two clients (nginx, iperf3) and its client RSS is the sum of both peaks. Its control port is fixed",
        f"at {BORE_CONTROL}. For every visitor the bore client opens a new TCP connection to the server's control",
        "port (with a secret, a challenge-response round trip on it) before the data flows; there is no pool",
        "of ready connections and no multiplexing, and the server's accept loop for a tunnel is one task",
        "that also sends the heartbeat frame over the control connection before each accept.",
        "",
        "Virtual hosts and TLS termination (requests/s; rathole has neither, so ferry's routed figure",
        "is set against rathole's plain TCP tunnel to the same nginx, its nearest equivalent):",
        "",
        "| figure | direct | ferry | rathole (TCP tunnel) | ferry vs rathole |",
        "| --- | --- | --- | --- | --- |",
        f"| host routing, keep-alive | {show('{:,.0f}', f['direct']['ka'])} | {med(web['host_ka']):,.0f} | {show('{:,.0f}', f['rathole']['ka'])} | {ratio(med(web['host_ka']), f['rathole']['ka'])} |",
        f"| host routing, `Connection: close` | {show('{:,.0f}', f['direct']['close'])} | {med(web['host_close']):,.0f} | {show('{:,.0f}', f['rathole']['close'])} | {ratio(med(web['host_close']), f['rathole']['close'])} |",
        f"| HTTPS keep-alive (TLS ended by nginx itself / by the ferry server) | {med(web['tls_direct_ka']):,.0f} | {med(web['tls_ka']):,.0f} | – | – |",
        "",
        "Raw rounds (requests/s keep-alive; requests/s close; Gbit/s):",
        "",
    ]
    if BASE:
        at = lines.index("Raw rounds (requests/s keep-alive; requests/s close; Gbit/s):")
        lines[at:at] = base_table(f, memory, many)
    for t in MEASURED:
        lines.append(f"- {t}: {', '.join(f'{v:.0f}' for v in figures[t]['ka'])}; "
                     f"{', '.join(f'{v:.0f}' for v in figures[t]['close'])}; "
                     f"{', '.join(f'{v:.2f}' for v in figures[t]['iperf'])}")
    if notes:
        lines += ["", "Errors reported and figures not taken:", ""] + [f"- {n}" for n in notes]
    lines += soak_section()
    with open(RESULTS, "w") as out:
        out.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def soak_section():
    """The results file's soak section (bench/soak.sh's figures), kept across a rewrite."""
    try:
        with open(RESULTS) as f:
            text = f.read()
    except FileNotFoundError:
        return []
    at = text.find("\n## Soak")
    return [""] + text[at + 1:].rstrip("\n").split("\n") if at >= 0 else []


try:
    main()
finally:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    pid_file = os.path.join(work, "nginx.pid")
    if os.path.exists(pid_file):
        subprocess.run(["nginx", "-c", os.path.join(work, "nginx.conf"), "-p", work, "-s", "stop"])
