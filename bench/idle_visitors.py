#!/usr/bin/env python3
"""Open N visitors through a tunnel, make one HTTP request on each (so every
visitor reaches the local service), keep them all open and idle, then print the
memory of the given processes: "pid VmRSS VmHWM RssAnon" in KiB, a line each.
Bounded: gives up after --timeout, saying how many got through."""
import argparse
import asyncio
import sys


def memory_kib(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                fields[key] = int(value.split()[0])
    return fields


async def visitor(port, ready, done):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    ready.append(1)
    await done.wait()
    writer.close()


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--pids", default="")
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--pace", type=float, default=0.001, help="seconds between two openings")
    args = parser.parse_args()
    ready, done = [], asyncio.Event()
    tasks = []
    for _ in range(args.count):
        tasks.append(asyncio.create_task(visitor(args.port, ready, done)))
        await asyncio.sleep(args.pace)  # pace the opening a little, as real visitors would arrive
    deadline = asyncio.get_running_loop().time() + args.timeout
    while len(ready) < args.count:
        failed = [t for t in tasks if t.done() and t.exception()]
        if failed or asyncio.get_running_loop().time() > deadline:
            print(f"only {len(ready)} of {args.count} visitors got through", file=sys.stderr)
            sys.exit(1)
        await asyncio.sleep(0.05)
    await asyncio.sleep(1)  # let the tunnel settle with every visitor idle
    for pid in filter(None, args.pids.split(",")):
        mem = memory_kib(pid)
        print(f"{pid} {mem['VmRSS']} {mem['VmHWM']} {mem['RssAnon']}")
    done.set()
    await asyncio.gather(*tasks, return_exceptions=True)


asyncio.run(main())
