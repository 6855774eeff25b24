#!/usr/bin/env python3
"""Holds N Server-Sent-Events clients on query-api's /v1/live from one process (asyncio, one
TCP connection each, standard library only) for a given time, counting events; prints one
JSON line: connected, refused (non-200 answers), failed (connection errors) and events.

    scripts/live-clients.py 127.0.0.1:8080 1000 30
"""
import asyncio
import json
import sys


async def client(host, port, stats, stop):
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        stats["failed"] += 1
        return
    try:
        writer.write(f"GET /v1/live HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            stats["refused"] += 1
            return
        stats["connected"] += 1
        while not stop.is_set():
            try:
                line = await asyncio.wait_for(reader.readline(), timeout=1.0)
            except asyncio.TimeoutError:
                continue
            if not line:
                stats["closed"] += 1
                return
            if line.startswith(b"event: sensor"):
                stats["events"] += 1
    except OSError:
        stats["failed"] += 1
    finally:
        writer.close()


async def main():
    addr, n, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    host, port = addr.rsplit(":", 1)
    stats = {"connected": 0, "refused": 0, "failed": 0, "closed": 0, "events": 0}
    stop = asyncio.Event()
    tasks = []
    for _ in range(n):
        tasks.append(asyncio.create_task(client(host, int(port), stats, stop)))
        await asyncio.sleep(0)
    await asyncio.sleep(secs)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(stats), flush=True)


asyncio.run(main())
