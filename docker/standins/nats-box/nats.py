#!/usr/bin/env python3
"""Stand-in for the `nats` CLI of natsio/nats-box (kappa-services CI only).

The real image ships the Go `nats` CLI; none of the registries reachable from CI
has it, so this small nats-py program implements the subset the project uses and
documents (docs/docker.md), printing in the same shape as the real CLI:

    nats sub SUBJECT [--queue Q] [--count N] [--raw]
    nats pub SUBJECT [BODY] [--count N] [-H Key:Value]
    nats req SUBJECT [BODY] [--timeout S] [-H Key:Value]
    nats stream ls [--names]
    nats stream info STREAM
    nats consumer ls STREAM
    nats consumer report STREAM

Global options: -s/--server URL (default $NATS_URL, else nats://127.0.0.1:4222),
--timeout seconds for connect and requests. Credentials, as the real CLI: $NATS_USER and
$NATS_PASSWORD, or nats://user:password@host in the URL.
"""

import argparse
import asyncio
import datetime as _dt
import json
import os
import signal
import sys

import nats
from nats.errors import NoRespondersError, TimeoutError as NatsTimeout

try:
    from importlib.metadata import version as _pkg_version

    VERSION = "0.0.0-kappa-standin (nats-py %s)" % _pkg_version("nats-py")
except Exception:  # noqa: BLE001
    VERSION = "0.0.0-kappa-standin"


def _now():
    return _dt.datetime.now().strftime("%H:%M:%S")


def _out(line=""):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _body(payload):
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return repr(payload)


def _headers(pairs):
    if not pairs:
        return None
    hdrs = {}
    for pair in pairs:
        if ":" not in pair:
            raise SystemExit("nats: error: invalid header %r, expected Key:Value" % pair)
        key, value = pair.split(":", 1)
        hdrs[key.strip()] = value.strip()
    return hdrs


def _print_msg(n, msg, raw):
    if raw:
        _out(_body(msg.data))
        return
    line = '[#%d] Received on "%s"' % (n, msg.subject)
    if msg.reply:
        line += ' with reply "%s"' % msg.reply
    _out(line)
    if msg.headers:
        for key, value in msg.headers.items():
            _out("%s: %s" % (key, value))
        _out()
    _out(_body(msg.data))
    _out()


async def _connect(args):
    servers = [s.strip() for s in args.server.split(",") if s.strip()]

    async def _quiet(_exc):
        return None

    auth = {}
    if os.environ.get("NATS_USER"):
        auth = {"user": os.environ["NATS_USER"], "password": os.environ.get("NATS_PASSWORD", "")}
    try:
        return await nats.connect(
            servers=servers,
            **auth,
            connect_timeout=args.timeout,
            max_reconnect_attempts=-1 if args.cmd == "sub" else 0,
            allow_reconnect=args.cmd == "sub",
            error_cb=_quiet,
            name="nats-box-standin",
        )
    except Exception as exc:  # noqa: BLE001 - one clear line for the user
        raise SystemExit("nats: error: connecting to %s: %s" % (args.server, exc or type(exc).__name__))


async def cmd_sub(args, nc):
    done = asyncio.Event()
    count = 0

    async def handler(msg):
        nonlocal count
        count += 1
        _print_msg(count, msg, args.raw)
        if args.count and count >= args.count:
            done.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, done.set)
        except NotImplementedError:
            pass
    await nc.subscribe(args.subject, queue=args.queue or "", cb=handler)
    await nc.flush()
    if not args.raw:
        qs = " using queue %s" % args.queue if args.queue else ""
        _out("%s Subscribing on %s%s" % (_now(), args.subject, qs))
    await done.wait()


async def cmd_pub(args, nc):
    body = args.body if args.body is not None else ""
    hdrs = _headers(args.header)
    for i in range(1, args.count + 1):
        data = body.replace("{{Count}}", str(i)).replace("{{ Count }}", str(i)).encode()
        await nc.publish(args.subject, data, headers=hdrs)
        if not args.quiet:
            _out('%s Published %d bytes to "%s"' % (_now(), len(data), args.subject))
    await nc.flush()


async def cmd_req(args, nc):
    body = (args.body or "").encode()
    _out('%s Sending request on "%s"' % (_now(), args.subject))
    start = asyncio.get_running_loop().time()
    try:
        msg = await nc.request(args.subject, body, timeout=args.timeout, headers=_headers(args.header))
    except NoRespondersError:
        raise SystemExit("nats: error: nats: no responders available for request")
    except NatsTimeout:
        raise SystemExit("nats: error: nats: timeout")
    rtt = (asyncio.get_running_loop().time() - start) * 1000
    _out("%s Received with rtt %.3fms" % (_now(), rtt))
    if msg.headers:
        for key, value in msg.headers.items():
            _out("%s: %s" % (key, value))
        _out()
    _out(_body(msg.data))


def _table(title, header, rows):
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(str(cell)))
    sep = "├" + "┼".join("─" * (w + 2) for w in widths) + "┤"
    top = "╭" + "─" * (sum(widths) + 3 * len(widths) - 1) + "╮"
    bottom = "╰" + "┴".join("─" * (w + 2) for w in widths) + "╯"
    _out(top)
    _out("│" + title.center(sum(widths) + 3 * len(widths) - 1) + "│")
    _out(sep)
    _out("│" + "│".join(" %s " % str(h).ljust(widths[i]) for i, h in enumerate(header)) + "│")
    _out(sep)
    for row in rows:
        _out("│" + "│".join(" %s " % str(c).ljust(widths[i]) for i, c in enumerate(row)) + "│")
    _out(bottom)


def _size(n):
    n = n or 0
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
    return str(n)


def _enum(value):
    return getattr(value, "value", value)


async def cmd_stream(args, nc):
    jsm = nc.jsm()
    if args.action == "ls":
        infos = await jsm.streams_info()
        if args.names:
            for info in infos:
                _out(info.config.name)
            return
        if not infos:
            _out("No Streams defined")
            return
        rows = []
        for info in sorted(infos, key=lambda i: i.config.name):
            st = info.state
            rows.append([
                info.config.name,
                info.config.description or "",
                ", ".join(info.config.subjects or []),
                st.messages,
                _size(st.bytes),
                "%s..%s" % (st.first_seq, st.last_seq),
                st.consumer_count,
            ])
        _table("Streams", ["Name", "Description", "Subjects", "Messages", "Size", "Sequences", "Consumers"], rows)
    elif args.action == "info":
        if not args.stream:
            raise SystemExit("nats: error: stream info needs a STREAM")
        info = await jsm.stream_info(args.stream)
        _out("Information for Stream %s\n" % info.config.name)
        _out(json.dumps({"config": info.config.as_dict(), "state": info.state.as_dict()}, indent=2, default=str))


async def cmd_consumer(args, nc):
    jsm = nc.jsm()
    infos = await jsm.consumers_info(args.stream)
    if args.action == "ls":
        for info in sorted(infos, key=lambda i: i.name):
            _out(info.name)
        return
    if not infos:
        _out("No Consumers defined on stream %s" % args.stream)
        return
    rows = []
    for info in sorted(infos, key=lambda i: i.name):
        cfg = info.config
        mode = "Push" if getattr(cfg, "deliver_subject", None) else "Pull"
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        filt = getattr(cfg, "filter_subject", None) or ", ".join(getattr(cfg, "filter_subjects", None) or [])
        rows.append([
            info.name,
            mode,
            _enum(cfg.ack_policy) or "",
            "%ss" % (cfg.ack_wait if cfg.ack_wait is not None else ""),
            filt,
            info.num_ack_pending or 0,
            info.num_redelivered or 0,
            info.num_pending or 0,
            info.num_waiting or 0,
            floor,
        ])
    _table(
        "Consumer report for %s with %d consumers" % (args.stream, len(infos)),
        ["Consumer", "Mode", "Ack Policy", "Ack Wait", "Filter", "Ack Pending", "Redelivered",
         "Unprocessed", "Waiting", "Ack Floor"],
        rows,
    )


def _parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-s", "--server", default=argparse.SUPPRESS,
                        help="NATS server URLs, comma separated (default $NATS_URL)")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS,
                        help="connect and request timeout in seconds (default 5)")

    p = argparse.ArgumentParser(prog="nats", parents=[common],
                                description="nats CLI stand-in (kappa-services CI; subset of natscli)")
    p.add_argument("--version", action="version", version=VERSION)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("sub", parents=[common], help="subscribe and print messages")
    s.add_argument("subject")
    s.add_argument("--queue", default="")
    s.add_argument("--count", type=int, default=0, help="exit after N messages")
    s.add_argument("--raw", "-r", action="store_true", help="print only the payloads")

    s = sub.add_parser("pub", parents=[common], help="publish a message")
    s.add_argument("subject")
    s.add_argument("body", nargs="?")
    s.add_argument("--count", type=int, default=1)
    s.add_argument("-H", "--header", action="append", default=[])
    s.add_argument("--quiet", "-q", action="store_true")

    s = sub.add_parser("req", aliases=["request"], parents=[common], help="send a request, print the reply")
    s.add_argument("subject")
    s.add_argument("body", nargs="?")
    s.add_argument("-H", "--header", action="append", default=[])

    s = sub.add_parser("stream", aliases=["str"], parents=[common], help="JetStream streams")
    s.add_argument("action", choices=["ls", "list", "info"])
    s.add_argument("stream", nargs="?")
    s.add_argument("--names", "-n", action="store_true")

    s = sub.add_parser("consumer", aliases=["con"], parents=[common], help="JetStream consumers")
    s.add_argument("action", choices=["ls", "list", "report"])
    s.add_argument("stream")
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    if not hasattr(args, "server"):
        args.server = os.environ.get("NATS_URL") or "nats://127.0.0.1:4222"
    if not hasattr(args, "timeout"):
        args.timeout = 5.0
    args.cmd = {"request": "req", "str": "stream", "con": "consumer"}.get(args.cmd, args.cmd)
    if getattr(args, "action", None) == "list":
        args.action = "ls"
    run = {"sub": cmd_sub, "pub": cmd_pub, "req": cmd_req, "stream": cmd_stream, "consumer": cmd_consumer}[args.cmd]

    async def _main():
        nc = await _connect(args)
        try:
            await run(args, nc)
        except nats.js.errors.NotFoundError:
            raise SystemExit("nats: error: not found")
        finally:
            try:
                await nc.drain() if args.cmd != "sub" else await nc.close()
            except Exception:  # noqa: BLE001
                pass

    try:
        asyncio.run(_main())
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
