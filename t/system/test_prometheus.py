"""A private Prometheus (Debian's, its own configuration and data under a
temporary directory, on loopback) scrapes smtpd -D and smtpfwdd while mail
flows through both, a recipient and a pregreet talker are refused and a
delivery fails; its HTTP API must show each counter moved (issue 39)."""

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import pytest

from harness import FWD_CONSTANTS, Agent, Fwd, free_port, send, wait_for

pytestmark = pytest.mark.skipif(not shutil.which("prometheus"),
                                reason="needs Debian's prometheus (.ci/run installs it)")

RULES = "noto:ALL:ALL:carol@my.domain:550 5.7.1 not carol\nallow:ALL:ALL:ALL\n"


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def dashboard_queries():
    with open(os.path.join(ROOT, "etc", "grafana-smtpd.json")) as f:
        dash = json.load(f)
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_the_dashboard_draws_only_metrics_the_gate_exports():
    import re
    from smtpgate import metrics
    names = set()
    for family, (kind, _, _) in metrics.FAMILIES.items():
        names |= {family + "_total"} if kind == "counter" else \
            {family + "_bucket", family + "_sum", family + "_count"} if kind == "histogram" \
            else {family}
    used = {m for e in dashboard_queries() for m in re.findall(r"\b(smtp\w+)", e)}
    assert used and used <= names, used - names


class Prometheus:
    def __init__(self, targets):
        self.dir = tempfile.mkdtemp(prefix="prometheus-", dir="/tmp")
        self.port = free_port()
        config = os.path.join(self.dir, "prometheus.yml")
        with open(config, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                    "scrape_configs:\n")
            for job, port in targets.items():
                f.write("  - job_name: %s\n    static_configs:\n"
                        "      - targets: ['127.0.0.1:%d']\n" % (job, port))
        self.log = open(os.path.join(self.dir, "log"), "wb")
        self.proc = subprocess.Popen(
            ["prometheus", "--config.file=" + config,
             "--storage.tsdb.path=" + os.path.join(self.dir, "data"),
             "--web.listen-address=127.0.0.1:%d" % self.port, "--log.level=warn"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)

    def api(self, path, **query):
        url = "http://127.0.0.1:%d/api/v1/%s?%s" % (self.port, path,
                                                   urllib.parse.urlencode(query))
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.load(r)["data"]

    def value(self, expr):
        """The instant value of a PromQL expression (one series), or None."""
        try:
            result = self.api("query", query=expr)["result"]
        except OSError:
            return None
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def up(self, job):
        return self.value('up{job="%s"}' % job) == 1

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_a_private_prometheus_sees_mail_flow_refusals_and_a_failed_delivery(
        daemon_, tree_factory):
    gate_port, fwd_port = free_port(), free_port()
    d = daemon_(RULES, SMTPD_METRICS_LISTEN="127.0.0.1:%d" % gate_port,
                SMTPD_GREET_PAUSE=200).wait_ready()
    agent = Agent()
    agent.statuses(0, 0, 67, 0)         # the third call fails for good, its notice goes
    fwd = Fwd(tree_factory(**dict(FWD_CONSTANTS,
                                  SMTPFWDD_METRICS_LISTEN="127.0.0.1:%d" % fwd_port)),
              d.jail, agent.path)
    prom = Prometheus({"smtpd": gate_port, "smtpfwdd": fwd_port})
    try:
        assert wait_for(lambda: prom.up("smtpd") and prom.up("smtpfwdd"), 60), \
            open(prom.log.name).read()[-2000:]
        for _ in range(2):
            assert send(d.port) == {}
        try:
            send(d.port, rcpt="carol@my.domain")
        except Exception:
            pass                    # refused: the only recipient
        assert send(d.port, rcpt="dave@my.domain") == {}
        bot = d.connect("127.9.0.2")
        bot.send("EHLO early\r\n")
        assert bot.code() == 554
        assert wait_for(lambda: len(agent.calls()) == 4, 30)     # and the notification

        def seen(expr, want):
            return wait_for(lambda: prom.value(expr) == want, 30)
        assert seen('smtpd_messages_total{result="accepted",reason=""}', 3)
        assert seen('smtpd_recipients_total{result="refused",reason="rules"}', 1)
        assert seen('smtpd_connections_total{result="refused",reason="pregreet"}', 1)
        assert seen('smtpd_message_seconds_count', 3)
        assert seen('smtpfwdd_deliveries_total{result="sent"}', 3)
        assert seen('smtpfwdd_deliveries_total{result="failed"}', 1)
        assert seen('smtpfwdd_bounces_total{action="failed"}', 1)
        assert seen('smtpfwdd_queue_messages{state="failed"}', 1)
        # the rate a dashboard draws: mail flowed within the last minute
        assert wait_for(lambda: (prom.value(
            'sum(increase(smtpd_messages_total{result="accepted"}[1m]))') or 0) > 0, 30)
        # every query of etc/grafana-smtpd.json is one Prometheus takes, and
        # those of the mail that flowed draw something
        for expr in dashboard_queries():
            data = prom.api("query", query=expr)
            assert data["resultType"] == "vector", expr
        for expr in ('sum(rate(smtpd_messages_total{result="accepted"}[5m]))',
                     'smtpfwdd_queue_messages'):
            assert expr in dashboard_queries()
            assert prom.api("query", query=expr)["result"], expr
    finally:
        prom.close()
        fwd.stop()
        shutil.rmtree(agent.dir, ignore_errors=True)
