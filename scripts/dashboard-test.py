#!/usr/bin/env python3
"""Checks query-api's dashboard in a real headless Chromium (Selenium); run by
scripts/dashboard-test.sh, which starts the servers and the services and sets DASH_*.

The oracle is this script's own data: the readings it writes to a CSV file (replayed by the
thermometer, which registers each sensor with the CSV's site) give every sensor's expected
latest value and window delta (latest - oldest; all readings lie inside the 600 s window and
arrive in event-time order, calibration offset 0). The checks:

1. the page loads, and the browser's console has no error (level SEVERE) at any point;
2. the sensors table shows exactly the oracle's sensors, each with its latest value, its delta
   and a sparkline of as many points as readings (from /v1/sensors/{id}/history); the sites
   panel shows the oracle's sites and sensor counts;
3. the pipeline panel shows every service answering, the options temperature-delta and
   view-builder were started with (DASH_*_WORKING / _OBSERVED, not the defaults), one lag
   cell per partition, and the DLQ count going from 0 to at least 1 after this script
   publishes one malformed reading;
4. new readings (a changed sensor and a new one) show on the page within a few seconds,
   without a reload, through the live feed (its counter moves);
5. at a phone's width (390x844) the table is visible and the page has no horizontal overflow.

Screenshots: $DASH_OUT/dashboard.png and dashboard-phone.png.
"""

import datetime
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

API = os.environ["DASH_API"]
NATS_PORT = int(os.environ["DASH_NATS_PORT"])
BIN = os.environ["DASH_BIN"]
WORK = os.environ["DASH_WORK"]
OUT = os.environ["DASH_OUT"]
PARTITIONS = int(os.environ.get("DASH_PARTITIONS", "4"))
DELTA_WORKING = os.environ["DASH_DELTA_WORKING"]
DELTA_OBSERVED = os.environ["DASH_DELTA_OBSERVED"]
VIEWS_OBSERVED = os.environ["DASH_VIEWS_OBSERVED"]
LIVE_BOUND_SECS = float(os.environ.get("DASH_LIVE_BOUND_SECS", "5"))
SERVICES = ["query-api", "sensor-registry", "temperature-delta", "view-builder"]

T0 = time.time()


def log(msg):
    print(f"[dashboard-test {time.time() - T0:6.1f}s] {msg}", flush=True)


class Failed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failed(what)
    log("ok: " + what)


def wait_for(what, fn, timeout=15.0, every=0.1):
    """Polls fn() until it returns a true value (returned) or raises Failed after timeout."""
    end = time.time() + timeout
    last = None
    while True:
        try:
            v = fn()
            if v:
                return v
            last = v
        except Exception as e:  # the page may be re-rendering under us
            last = repr(e)
        if time.time() >= end:
            raise Failed(f"{what}: not within {timeout:.0f} s (last: {last!r})")
        time.sleep(every)


def get_json(path):
    with urllib.request.urlopen(API + path, timeout=5) as r:
        return json.load(r)


# The oracle: readings per sensor, in event-time order.
BASE = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) - datetime.timedelta(minutes=8)


def at(secs):
    return (BASE + datetime.timedelta(seconds=secs)).strftime("%Y-%m-%dT%H:%M:%SZ")


SITES = {"north": 5, "south": 4, "lab": 3}
readings = {}  # sensor id -> [(secs, celsius)]
sites = {}  # sensor id -> site
for si, (site, n) in enumerate(SITES.items()):
    for k in range(n):
        sid = f"dash-{site}-{k + 1:02d}"
        sites[sid] = site
        # Five readings 30 s apart, quarter degrees (exact in binary, so no rounding ties).
        start = 18.0 + si * 2 + k * 0.5
        steps = [0.0, 0.25, -0.5, 0.75 * ((k % 3) + 1), 0.25 * (k + 1) * (1 if k % 2 else -1)]
        readings[sid] = [(30 * i, start + sum(steps[: i + 1])) for i in range(len(steps))]


def fmt(x):
    return f"{x:.2f}"


def signed(x):
    t = fmt(x)
    return fmt(0) if float(t) == 0 else ("+" if float(t) > 0 else "") + t


def expected():
    out = {}
    for sid, rs in readings.items():
        rs = sorted(rs)
        out[sid] = {"site": sites[sid], "latest": fmt(rs[-1][1]), "delta": signed(rs[-1][1] - rs[0][1]), "points": len(rs)}
    return out


def replay(rows, name):
    """Publishes rows (sensor, secs, celsius) with the thermometer's CSV replay (it registers
    each sensor with its site first) and returns when every reading is acknowledged."""
    path = os.path.join(WORK, name + ".csv")
    with open(path, "w") as f:
        f.write("sensor_id,celsius,measured_at,site\n")
        for sid, secs, c in rows:
            f.write(f"{sid},{c},{at(secs)},{sites[sid]}\n")
    port = free_port()
    env = dict(os.environ, HTTP_ADDR=f"127.0.0.1:{port}")
    with open(os.path.join(WORK, name + ".log"), "w") as logf:
        r = subprocess.run([os.path.join(BIN, "thermometer"), "--replay", path, "--rate", "0"],
                           env=env, stdout=logf, stderr=subprocess.STDOUT, timeout=120)
    if r.returncode != 0:
        raise Failed(f"thermometer --replay {name} exited {r.returncode}")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def nats_publish(subject, payload):
    """One core-NATS publish in the text protocol (the READINGS stream stores it)."""
    with socket.create_connection(("127.0.0.1", NATS_PORT), timeout=5) as s:
        f = s.makefile("rb")
        if not f.readline().startswith(b"INFO"):
            raise Failed("nats-server did not greet")
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false,"name":"dashboard-test"}\r\n')
        s.sendall(b"PUB %s %d\r\n%s\r\nPING\r\n" % (subject.encode(), len(payload), payload))
        line = f.readline()
        if not line.startswith(b"PONG"):
            raise Failed(f"publishing to {subject}: {line!r}")


def browser():
    o = webdriver.ChromeOptions()
    o.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,1000", f"--user-data-dir={WORK}/chromium", "--no-first-run"]:
        o.add_argument(a)
    o.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"),
                      log_output=os.path.join(WORK, "chromedriver.log"))
    return webdriver.Chrome(options=o, service=service)


console = []


def console_errors(d):
    for e in d.get_log("browser"):
        console.append(e)
    return [e for e in console if e.get("level") == "SEVERE"]


def table(d):
    """sensor id -> {site, latest, delta, points} as the page shows it."""
    return d.execute_script("""
        const out = {};
        for (const tr of document.querySelectorAll('#sensors tbody tr')) {
          const pl = tr.querySelector('td.spark polyline');
          out[tr.dataset.sensor] = {
            site: tr.querySelector('.c-site').textContent,
            latest: tr.querySelector('.c-latest').textContent,
            delta: tr.querySelector('.c-delta').textContent,
            points: pl ? pl.getAttribute('points').trim().split(/\\s+/).length : 0,
          };
        }
        return out;""")


def sites_panel(d):
    return d.execute_script("""
        const out = {};
        for (const c of document.querySelectorAll('#sites .site-card')) out[c.dataset.site] = c.querySelector('.k').textContent;
        return out;""")


def pipeline_panel(d):
    return d.execute_script("""
        const out = {dlq: document.getElementById('dlq-count').textContent, services: {}};
        for (const el of document.querySelectorAll('#services .svc')) {
          const opts = {};
          for (const c of el.querySelectorAll('[data-option]')) opts[c.dataset.option] = c.textContent;
          out.services[el.dataset.service] = {options: opts, parts: el.querySelectorAll('.part').length,
            ready: el.dataset.ready === 'true'};
        }
        return out;""")


def main():
    # 1. The readings, then the views (the API as a precondition, the CSV as the oracle).
    rows = [(sid, secs, c) for sid, rs in readings.items() for secs, c in rs]
    replay(rows, "first")
    want = expected()
    # Every reading applied (so the page's first read is final, histories included).
    def api_is_oracle():
        page = get_json("/v1/sensors?limit=1000")["sensors"]
        return {v["sensor_id"]: (v["site"], fmt(v["latest_celsius"]), signed(v["delta_celsius"]), v["samples"])
                for v in page} == {k: (w["site"], w["latest"], w["delta"], w["points"]) for k, w in want.items()}
    wait_for("the views hold the oracle's sensors and values", api_is_oracle, timeout=30)
    log(f"{len(want)} sensors at {len(SITES)} sites published and in the views")

    d = browser()
    try:
        d.get(API + "/")
        check(d.title.startswith("Kappa Services"), f"the page loads ({d.title!r})")
        wait_for("the live feed connects", lambda: d.find_element(By.ID, "live").text == "live")

        # 2. The table, the sparklines, the sites.
        def table_is_oracle():
            t = table(d)
            return t == want and t
        try:
            wait_for("the table equals the oracle", table_is_oracle)
        except Failed:
            t = table(d)
            log(f"page shows {json.dumps(t, sort_keys=True)}")
            log(f"oracle is  {json.dumps(want, sort_keys=True)}")
            raise
        check(True, f"the table shows exactly the {len(want)} sensors, each with its latest value, delta and a "
                    f"{want[next(iter(want))]['points']}-point sparkline")
        want_sites = {s: f"{s} · {n} sensors" for s, n in SITES.items()}
        wait_for("the sites panel shows the oracle's sites", lambda: sites_panel(d) == want_sites)
        check(True, f"the sites panel shows {sorted(want_sites)} with their sensor counts")

        # 3. The pipeline panel: services, options, partitions, DLQ.
        def pipeline_ok():
            p = pipeline_panel(d)
            s = p["services"]
            return (all(x in s and s[x]["ready"] for x in SERVICES)
                    and s["temperature-delta"]["options"].get("working") == f"working: {DELTA_WORKING}"
                    and s["temperature-delta"]["options"].get("observed") == f"observed: {DELTA_OBSERVED}"
                    and s["view-builder"]["options"].get("observed") == f"observed: {VIEWS_OBSERVED}"
                    and s["temperature-delta"]["parts"] == PARTITIONS
                    and s["view-builder"]["parts"] == PARTITIONS
                    and p["dlq"] == "0") and p
        try:
            p = wait_for("the pipeline panel shows every service and its options", pipeline_ok)
        except Failed:
            log(f"pipeline panel: {json.dumps(pipeline_panel(d), sort_keys=True)}")
            raise
        check(True, f"pipeline: {sorted(p['services'])} ready; temperature-delta working={DELTA_WORKING} "
                    f"observed={DELTA_OBSERVED}, view-builder observed={VIEWS_OBSERVED}; {PARTITIONS} partitions each; DLQ 0")
        nats_publish("thermo.readings.dash-north-01", b'{"sensor_id": "dash-north-01", "celsius": ')
        t = time.time()
        wait_for("the DLQ count shows the malformed reading",
                 lambda: pipeline_panel(d)["dlq"].isdigit() and int(pipeline_panel(d)["dlq"]) >= 1, timeout=15)
        check(True, f"the DLQ count went to {pipeline_panel(d)['dlq']} {time.time() - t:.1f} s after one malformed reading")
        n = len(rows)
        wait_for("the stream counts", lambda: (d.find_element(By.ID, "readings-count").text,
                                               d.find_element(By.ID, "deltas-count").text) == (str(n + 1), str(n)))
        check(True, f"the pipeline panel counts {n + 1} readings ({n} and the malformed one) and {n} deltas")

        d.save_screenshot(os.path.join(OUT, "dashboard.png"))
        errs = console_errors(d)
        check(not errs, f"no console error so far ({len(console)} console entries)")

        # 4. Live: a changed sensor and a new one, without a reload.
        updates_before = int(d.find_element(By.ID, "updates").text)
        changed, new = "dash-south-02", "dash-lab-09"
        sites[new] = "lab"
        readings[changed].append((300, 42.25))
        readings[new] = [(280, 5.5), (290, 7.75)]
        replay([(changed, 300, 42.25), (new, 280, 5.5), (new, 290, 7.75)], "second")
        t = time.time()
        want = expected()

        def updated():
            tb = table(d)
            return (tb.get(changed, {}).get("latest") == want[changed]["latest"]
                    and tb.get(changed, {}).get("delta") == want[changed]["delta"]
                    and tb.get(new) == want[new])
        wait_for(f"the page shows the new readings within {LIVE_BOUND_SECS:.0f} s", updated, timeout=LIVE_BOUND_SECS)
        took = time.time() - t
        check(True, f"{changed} shows {want[changed]['latest']} (delta {want[changed]['delta']}) and the new sensor {new} "
                    f"appears {took:.2f} s after its readings were acknowledged")
        updates_after = int(d.find_element(By.ID, "updates").text)
        check(updates_after > updates_before, f"through the live feed ({updates_after - updates_before} live updates)")
        wait_for("the whole table equals the updated oracle", table_is_oracle)
        wait_for("the sites panel counts the new sensor",
                 lambda: sites_panel(d).get("lab") == f"lab · {SITES['lab'] + 1} sensors")
        check(True, f"the whole table equals the updated oracle ({len(want)} sensors) and the lab site counts {SITES['lab'] + 1}")
        d.save_screenshot(os.path.join(OUT, "dashboard.png"))

        # 5. A phone's width.
        d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                          {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
        time.sleep(0.5)
        m = d.execute_script("""
            const t = document.getElementById('sensors'), r = t.getBoundingClientRect();
            return {inner: window.innerWidth, doc: document.documentElement.scrollWidth, body: document.body.scrollWidth,
                    left: r.left, right: r.right, height: r.height, wrap: t.parentElement.clientWidth, table: t.scrollWidth,
                    rows: t.querySelectorAll('tbody tr').length};""")
        log(f"phone metrics: {m}")
        check(m["inner"] == 390, "the viewport is 390 px wide")
        check(m["doc"] <= m["inner"] and m["body"] <= m["inner"],
              f"no horizontal overflow of the page at 390 px (document {m['doc']}, body {m['body']})")
        check(d.find_element(By.ID, "sensors").is_displayed() and m["height"] > 0 and m["rows"] == len(want),
              f"the sensors table is visible with its {m['rows']} rows")
        check(m["left"] >= 0 and m["right"] <= m["inner"] and m["table"] <= m["wrap"],
              f"the table fits the phone's width ({m['table']} px in {m['wrap']} px)")
        d.save_screenshot(os.path.join(OUT, "dashboard-phone.png"))

        errs = console_errors(d)
        for e in errs:
            log(f"console: {e}")
        check(not errs, f"no console error at all ({len(console)} console entries)")
        log(f"passed; screenshots in {OUT}")
    except Failed:
        for e in console_errors(d):
            log(f"console: {e}")
        d.save_screenshot(os.path.join(OUT, "dashboard-failed.png"))
        raise
    finally:
        d.quit()


if __name__ == "__main__":
    try:
        main()
    except Failed as e:
        log(f"FAILED: {e}")
        sys.exit(1)
