# Makefile for the Python Obtuse smtpd/smtpfwdd.
#
# Every tunable of the programs lives here, in the table below.  `make`
# writes buildconf.py from it; `make NOTO_DELAY=5` changes a value, and it
# stays changed (config.mk) until `make defaults`.  These are the compiled-in
# defaults: an installed gate is tuned in SETTINGS_FILE
# (/etc/smtpd/smtpd.conf, "NAME = value"), which make install never touches.

# ============================================================ constants ====
# One table: every tunable constant, its bounds and one line of doc, as
#     #: KIND: documentation
#     NAME = default
# KIND: int LOW..HIGH, bool, path (absolute), path? (or empty), name, text or
# nets (CIDRs).  smtpgate/params.py reads it: `make` writes buildconf.py
# from it; smtpd and smtpfwdd check every value at start (78 if one is out
# of bounds); `smtpd -n` prints those that differ from these defaults and
# where each was set, `smtpd -N` all of them.  `make NAME=value` refuses a
# value out of bounds, else writes it in config.mk, which this file
# includes, so it stays until changed; `make defaults` removes config.mk.
# The settings file takes any NAME of the table but PREFIX and
# SETTINGS_FILE.  The man pages (CONFIGURATION) say more of each.

# ---------------------------------------------------------------- paths ----
#: path: the smtpd home, where smtpd chroots (-c default; a real path)
SPOOLDIR = /var/spool/smtpd
#: text: the spool inside the jail (smtpd -d default); smtpfwdd's is SPOOLDIR/SPOOLSUBDIR
SPOOLSUBDIR = .
#: path: the rules file, a path inside the jail
CHECK_FILE = /etc/smtpd_check_rules
#: text: smtpfwdd's mail agent (-s default): a program run per spool file, or smtp:ADDR:PORT, lmtp:ADDR:PORT, lmtp:/path
MAIL_AGENT = /usr/sbin/sendmail
#: path: the directory of smtpd.pid (smtpd -i default: PID_DIR/smtpd.pid)
PID_DIR = /var/run
#: path?: the STARTTLS certificate chain, outside the jail (-C); empty: no STARTTLS
TLS_CERT = /etc/smtpd/cert.pem
#: path?: its private key, outside the jail, read by root (-K); empty: no STARTTLS
TLS_KEY = /etc/smtpd/key.pem
#: path: where make install puts the programs (PREFIX/sbin, PREFIX/lib/smtpd)
PREFIX = /usr/local
#: path?: the operator's settings, NAME = value over these defaults (read at start and SIGHUP)
SETTINGS_FILE = /etc/smtpd/smtpd.conf

# ------------------------------------------------------------- identity ----
#: name: the user both daemons run as (-u default); never root
SMTP_USER = smtpd
#: name: their group (-g default); never root's
SMTP_GROUP = smtpd
#: name: the syslog facility of both daemons (a name of syslog.h without LOG_)
LOG_FACILITY = mail
#: path: the syslog socket, the same path inside the jail (SPOOLDIR/dev/log)
LOG_SOCKET = /dev/log

# -------------------------------------------------------- smtpd timings ----
#: int 0..86400: seconds a noto_delay rule sleeps before its reply
NOTO_DELAY = 60
#: int 0..86400: seconds a deny_delay rule sleeps before its reply
DENY_DELAY = 60
#: int 1..86400: seconds a client has for each command line (and STARTTLS's handshake) before 421
READ_TIMEOUT = 300
#: int 1..86400: seconds a client has for the whole DATA phase, 354 to the final dot
SMTPD_DATA_TIMEOUT = 600
#: int 1..86400: seconds a whole session may last; also the age of a stale draft
SESSION_TIMEOUT = 1800
#: int 0..600: seconds an RFC 1413 ident query may take; 0 = never ask
CHECK_IDENT = 10
#: int 1..65535: the TCP port of the client's ident server
IDENT_PORT = 113
#: int 1..600: seconds a DNS lookup (PTR, A/AAAA, NS, MX, RBL) may take in all
DNS_TIMEOUT = 10
#: bool: 1 = a recipient that no rule matches is denied; 0 = allowed (original)
CHECK_ADDRESS_DENY_ON_FAILURE = 0

# -------------------------------------------------------- smtpd limits ----
#: int 1..100000: most recipients per message; more get 452
MAX_RCPT = 1000
#: int 0..1099511627776: the largest message in bytes (-s default; 0 = no limit; Postfix's)
MESSAGE_SIZE_LIMIT = 10240000
#: int 0..1000: workers smtpd -D starts ahead of demand
SMTPD_PREFORK = 4
#: int 1..10000: most workers, sessions at once, of smtpd -D (-M default)
SMTPD_MAXCHILDREN = 64
#: int 1..10000: most sessions at once from one client network; more get 421
SMTPD_MAX_PER_IP = 10
#: int 1..1000000: sessions a worker serves before it exits and is replaced
SMTPD_MAX_USE = 1000
#: int 1..86400: seconds a spare worker beyond the needed ones stays idle
SMTPD_IDLE_TIME = 10
#: int 0..3600: seconds running sessions (or deliveries) may take to end after SIGTERM
SHUTDOWN_TIMEOUT = 30
#: int 1..1073741824: the largest rules file read, in bytes; larger is an error
RULES_MAX_SIZE = 4194304
#: int 1..1000: errors (refused commands, noto, 451) that end a session with 421
MAX_ERRORS = 10

# ---------------------------------------- smtpd admission (spam engines) ----
#: int 0..32: bits of an IPv4 address that make a client's network
SMTPD_V4_PREFIX = 32
#: int 0..128: bits of an IPv6 address that make a client's network (one host, one /64)
SMTPD_V6_PREFIX = 64
#: int 0..100000: most new sessions per network per SMTPD_RATE_WINDOW; 0 = no limit
SMTPD_MAX_RATE = 0
#: int 1..86400: the rate limit's sliding window, in seconds
SMTPD_RATE_WINDOW = 60
#: int 8..1048576: networks the rate table remembers (96 bytes each, fixed at start)
SMTPD_RATE_TABLE = 4096
#: int 0..600000: milliseconds before the 220; who talks first gets 554 (0 = no pause)
SMTPD_GREET_PAUSE = 0
#: bool: 1 = pipelining where RFC 2920 forbids it gets 554 and is closed; 0 = the original
SMTPD_FORBID_UNAUTH_PIPELINING = 1
#: bool: 1 = EHLO offers ENHANCEDSTATUSCODES (RFC 2034) and replies after EHLO carry them
SMTPD_ENHANCED_STATUS_CODES = 1
#: bool: 1 = EHLO offers CHUNKING (RFC 3030): BDAT chunks, no dot-stuffing
SMTPD_CHUNKING = 1
#: bool: 1 = EHLO offers DSN (RFC 3461): RET, ENVID, NOTIFY and ORCPT are kept and passed on
SMTPD_DSN = 1
#: bool: 1 = EHLO offers SMTPUTF8 (RFC 6531): UTF-8 addresses (IDNA 2008 domains) after MAIL's SMTPUTF8
SMTPD_SMTPUTF8 = 1
#: int 0..1000: errors after which each error reply waits longer
SMTPD_SOFT_ERRORS = 5
#: int 0..3600: seconds more each error reply waits past SMTPD_SOFT_ERRORS
SMTPD_ERROR_SLEEP = 1
#: nets: networks exempt from the rate limit, the greeting pause, error delays and DNS lists
SMTPD_ADMISSION_EXEMPT =

# ------------------------------------ smtpd -D front stage (screen.py) ----
#: int 16..1000000: most connections the front stage holds (two descriptors each); more get 421
SMTPD_SCREEN_MAX = 20000
#: int 1..1000000: most of them from one client network; more get 421
SMTPD_SCREEN_PER_NETWORK = 50
#: int 1..3600: seconds a client that passed may wait for a free worker before 421
SMTPD_SCREEN_WAIT = 30
#: int 0..2592000: seconds a client that passed the greeting pause skips it, and one that had mail accepted goes to a worker at once (0 = never)
SMTPD_SCREEN_ALLOW_TTL = 86400
#: int 8..10000000: most client addresses that allow-list keeps (28 bytes each, fixed at start)
SMTPD_SCREEN_ALLOW_SIZE = 100000
#: int 1..86400: under stress: seconds for a command and for a free worker (the greeting pause: a third)
SMTPD_STRESS_TIMEOUT = 10
#: int 1..86400: under stress: seconds for the DATA phase
SMTPD_STRESS_DATA_TIMEOUT = 120

# ------------------------------------- DNS lists: reputation (dnsbl.py) ----
#: text: DNS lists scoring each client, zone[=filter][*weight] (postscreen_dnsbl_sites); empty = off
SMTPD_DNSBL_SITES =
#: int 1..1000000: a score at or above it refuses the client before the greeting (554 5.7.1)
SMTPD_DNSBL_THRESHOLD = 1
#: int -1000000..0: a score at or below it skips the pause, rate limit and error delays (0 = off)
SMTPD_DNSBL_ALLOWLIST_THRESHOLD = 0
#: int 1..60: seconds the lists may take to answer; the greeting waits at most this
SMTPD_DNSBL_TIMEOUT = 5
#: int 0..86400: seconds a client's score is kept (-D mode; 0 = not kept)
SMTPD_DNSBL_TTL = 3600
#: int 8..10000000: most client addresses the score cache keeps
SMTPD_DNSBL_CACHE = 10000

# ------------------------------------ state shared by several gates (Redis) ----
#: text: redis://[USER@]ADDRESS:PORT/DB shared by several gates (rates, caches); empty = each its own
SMTPD_SHARED_STORE =
#: path?: root-only file: "key SECRET" (signs cache entries), optional "password PW", "user NAME"
SMTPD_SHARED_STORE_SECRETS = /etc/smtpd/shared-store.secret
#: text: prefix of every key, so that two sites can share one server
SMTPD_SHARED_STORE_PREFIX = smtpd:
#: int 1..5000: milliseconds one call may take before the gate uses its own state
SMTPD_SHARED_STORE_TIMEOUT = 50

# ---------------------------------------------- smtpd behind a balancer ----
#: nets: trusted proxies whose connections begin with a PROXY header (-X); empty = off
SMTPD_PROXY_FROM =
#: int 1..3600: seconds the PROXY header may take to arrive
SMTPD_PROXY_TIMEOUT = 5

# ------------------------------------------------ recipient verification ----
#: text: the MTA verify rules ask, [lmtp:]address:port (-V); empty: verify gives 451
SMTPD_VERIFY_BACKEND =
#: int 1..600: seconds each step of a callout may take
SMTPD_VERIFY_TIMEOUT = 10
#: bool: 1 = accept a recipient when the backend cannot be asked; 0 = 451
SMTPD_VERIFY_DEFER_OK = 0
#: int 0..1000000: most callouts in one session; more unverified recipients get 450
SMTPD_VERIFY_MAX = 20
#: path?: the verification cache, an sqlite3 file inside the jail; empty: none
SMTPD_VERIFY_CACHE = /verify.db
#: int 1..10000000: most addresses the verification cache keeps
SMTPD_VERIFY_CACHE_SIZE = 10000
#: int 0..31536000: seconds a user that exists is remembered (31 days; 0 = never)
SMTPD_VERIFY_POSITIVE_TTL = 2678400
#: int 0..31536000: seconds a user that does not exist is remembered (3 days)
SMTPD_VERIFY_NEGATIVE_TTL = 259200

# ------------------------------------------------ milters (mail filters) ----
#: text: filters that judge each message, inet:ADDR:PORT or inet6:[ADDR]:PORT, in order (-f)
SMTPD_MILTERS =
#: name: what a filter that is down, silent or broken gives: tempfail, reject or accept
SMTPD_MILTER_DEFAULT_ACTION = tempfail
#: int 1..600: seconds to connect to a filter (Postfix's milter_connect_timeout)
SMTPD_MILTER_CONNECT_TIMEOUT = 30
#: int 1..3600: seconds a filter may take to answer a command (milter_command_timeout)
SMTPD_MILTER_COMMAND_TIMEOUT = 30
#: int 1..3600: seconds a filter may take per part of a message (milter_content_timeout)
SMTPD_MILTER_CONTENT_TIMEOUT = 300
#: int 0..3600: seconds a worker keeps a filter's connection for its next session; 0 = never
SMTPD_MILTER_KEEP_IDLE = 10

# ----------------------------------------------------- smtpfwdd tunables ----
#: int 1..1000: most delivery processes at once (smtpfwdd -M default)
MAXCHILDREN = 10
#: int 1..1000: seconds between spool scans (smtpfwdd -P default)
POLL_TIME = 10
#: int 6..100000: most argv elements per mail agent call: options, sender, recipients
MAXARGS = 100
#: int 1..86400: seconds a temporarily failed message waits before its next try
RETRY_DELAY_TIME = 600
#: int 1..31536000: seconds a message may stay deferred before failed/ (5 days)
QUEUE_LIFETIME = 432000
#: int 1..86400: seconds one mail agent call may take before it is killed
AGENT_TIMEOUT = 3600
#: int 0..31536000: seconds before a sender hears, once, that a message waits (4 h; 0 = never)
DELAY_WARNING_TIME = 14400
#: int 1..600: smtp:/lmtp: agent: seconds to connect to the MTA
SMTPFWDD_CONNECT_TIMEOUT = 30
#: int 1..3600: smtp:/lmtp: agent: seconds for each reply of the MTA
SMTPFWDD_COMMAND_TIMEOUT = 300
#: int 1..86400: smtp:/lmtp: agent: seconds for a message's data and its final reply
SMTPFWDD_DATA_TIMEOUT = 600
#: int 0..3600: smtp:/lmtp: agent: seconds a delivery process keeps an unused connection (0 = one per message)
SMTPFWDD_KEEP_IDLE = 60
#: path?: smtp:...+tls agent: the CA file the MTA's certificate must verify against (empty: the system's)
SMTPFWDD_TLS_CA =
#: text: smtp:...+tls agent: the name the MTA's certificate must carry (empty: its chain is enough)
SMTPFWDD_TLS_NAME =

# ------------------------------------------------ metrics and log lines ----
#: text: ADDRESS:PORT (numeric) where smtpd -D serves /metrics, e.g. 127.0.0.1:9425; empty = off
SMTPD_METRICS_LISTEN =
#: text: ADDRESS:PORT (numeric) where smtpfwdd serves /metrics, e.g. 127.0.0.1:9426; empty = off
SMTPFWDD_METRICS_LISTEN =
#: name: classic, logfmt or json: the one line per message, per session and per delivery
SMTPD_LOG_FORMAT = classic

-include config.mk

# ------------------------------------------------------------ build rules ----

CONSTANTS := $(shell sed -n '/^\#: /{n;s/ *=.*//p;}' Makefile)
export $(CONSTANTS)
# The constants given on make's command line: config.mk keeps them.
GIVEN = $(foreach v,$(CONSTANTS),$(if $(filter command line,$(origin $(v))),$(v)))

PYTHON = python3
VENV = .venv
VPY = $(VENV)/bin/python
PYTEST_ARGS =

.PHONY: all venv test clean FORCE

all: buildconf.py venv

# Written only when its content changes; the constants given on the command
# line are recorded in config.mk first.
buildconf.py: FORCE
	@$(PYTHON) -m smtpgate.params build Makefile config.mk buildconf.py $(GIVEN)

# The Makefile's defaults again: config.mk goes.
.PHONY: defaults showconf
defaults:
	rm -f config.mk
	@$(PYTHON) -m smtpgate.params build Makefile config.mk buildconf.py

# The constants in effect that differ from the defaults (smtpd -n).
showconf: buildconf.py
	@$(PYTHON) smtpd.py -n

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --disable-pip-version-check \
	    -r requirements.txt -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

test: venv buildconf.py
	$(VPY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) t/

# Also what `make run` made: var/ (its spool and mailboxes) and, when var is a
# link to a copy staged for user nobody under /var/tmp, that copy.
clean:
	rm -rf buildconf.py buildconf.py.tmp __pycache__ t/__pycache__ .pytest_cache .hypothesis
	find smtpgate -name __pycache__ -prune -exec rm -rf {} +
	@if [ -L var ]; then case "$$(readlink var)" in /var/tmp/smtpd-run.*/var) \
	    echo "rm -rf $$(dirname "$$(readlink var)")"; rm -rf "$$(dirname "$$(readlink var)")";; \
	    esac; rm -f var; else rm -rf var; fi

# --------------------------------------------------------- make run ----

# The mail agent of `make run`; e.g. make run MAILPROG=/usr/sbin/sendmail
MAILPROG =

.PHONY: run
run: venv buildconf.py
	MAILPROG="$(MAILPROG)" bin/run-local

# ------------------------------------------------------ make install ----

# Where `make install` puts things (all under DESTDIR when it is set).
LIBDIR = $(PREFIX)/lib/smtpd
SBINDIR = $(PREFIX)/sbin
MANDIR = $(PREFIX)/share/man
DOCDIR = $(PREFIX)/share/doc/smtpd
# The Python the installed programs run with (readable by SMTP_USER).
INSTALL_PYTHON = /usr/bin/python3
# The three programs and the package, module by module: never a wildcard, so
# that a scratch file is never installed (a test checks this list against
# the modules git knows; the tests' trees copy the same list).
PROGRAMS = smtpd smtpfwdd checkrules
PACKAGE = smtpgate
PACKAGE_MODULES = __init__ address counters idn deadline libc log metrics net options params privileges record \
	process shm spool spooldir store text \
	gate/__init__ gate/admission gate/channel gate/chat gate/client gate/config gate/connection gate/dnsbl gate/engine gate/filtering gate/handoff gate/judge gate/master gate/milter gate/milterwire gate/peer gate/proxy gate/rewrite gate/rulewatch gate/sandbox gate/screen gate/session gate/start gate/tester gate/tls gate/verify gate/worker \
	forwarder/__init__ forwarder/bounce forwarder/config forwarder/daemon forwarder/delivery forwarder/queuetool forwarder/relay forwarder/start \
	rules/__init__ rules/dnslookup rules/ident rules/ruleset rules/tokens
EXAMPLES = etc/smtpd_check_rules.example etc/antispam_check_rules.example \
	etc/smtpd.service etc/smtpfwdd.service etc/smtpd.socket etc/smtpd@.service \
	etc/init.d/smtpd etc/init.d/smtpfwdd etc/default/smtpd etc/default/smtpfwdd \
	etc/rc.d/smtpd etc/rc.d/smtpfwdd \
	etc/inetd.conf.smtpd etc/xinetd.d/smtpd etc/rsyslog-smtpd.conf etc/syslog-ng-smtpd.conf \
	etc/haproxy.cfg etc/shared-store.secret.example etc/redis-acl.conf etc/smtpd.conf \
	etc/prometheus-smtpd.yml etc/grafana-smtpd.json etc/postfix-master.cf.smtpfwdd
# Where rsyslog reads snippets; the jail's log socket is added there.
RSYSLOG_DIR = /etc/rsyslog.d

.PHONY: install uninstall
# The directories install makes (with their parents), recorded in
# LIBDIR/installed-dirs for uninstall, which removes those left empty.
INSTALL_DIRS = $(LIBDIR) $(SBINDIR) $(MANDIR)/man5 $(MANDIR)/man8 $(DOCDIR)

install: all venv
	@for d in $(INSTALL_DIRS); do \
	    while [ ! -d "$(DESTDIR)$$d" ]; do echo "$$d"; d=$$(dirname "$$d"); done; \
	done > .installed-dirs.new
	@if [ -r $(DESTDIR)$(LIBDIR)/installed-dirs ]; then \
	    cat $(DESTDIR)$(LIBDIR)/installed-dirs >> .installed-dirs.new; fi
	install -d -m 755 $(addprefix $(DESTDIR),$(INSTALL_DIRS))
	sort -u .installed-dirs.new > .installed-dirs && rm -f .installed-dirs.new
	install -m 644 .installed-dirs $(DESTDIR)$(LIBDIR)/installed-dirs && rm -f .installed-dirs
	install -m 644 $(addsuffix .py,$(PROGRAMS)) buildconf.py $(DESTDIR)$(LIBDIR)/
	rm -rf $(DESTDIR)$(LIBDIR)/$(PACKAGE)
	for m in $(PACKAGE_MODULES); do \
	    install -D -m 644 $(PACKAGE)/$$m.py $(DESTDIR)$(LIBDIR)/$(PACKAGE)/$$m.py || exit 1; \
	done
	@# Byte-compiled now, as Debian's packages are: an inetd session then
	@# starts without compiling a line (and root never writes into LIBDIR).
	PYTHONDONTWRITEBYTECODE= $(INSTALL_PYTHON) -m compileall -q -d $(LIBDIR) \
	    $(DESTDIR)$(LIBDIR)/$(PACKAGE) $(DESTDIR)$(LIBDIR)/buildconf.py >/dev/null
	rm -rf $(DESTDIR)$(LIBDIR)/vendor
	$(VPY) -m pip install -q --disable-pip-version-check --no-compile \
	    --target $(DESTDIR)$(LIBDIR)/vendor -r requirements.txt
	chmod -R a+rX $(DESTDIR)$(LIBDIR)
	for p in $(PROGRAMS); do \
	    printf '#!/bin/sh\n# %s: installed by make install\nPYTHONPATH=%s/vendor exec %s -s %s/%s.py "$$@"\n' \
	        $$p $(LIBDIR) $(INSTALL_PYTHON) $(LIBDIR) $$p > $(DESTDIR)$(SBINDIR)/$$p; \
	    chmod 755 $(DESTDIR)$(SBINDIR)/$$p; \
	done
	printf '#!/bin/sh\n# smtpq: the queue tool (smtpfwdd -Q), installed by make install\nset -- -Q "$$@"\nif [ "$$2" = -d ] && [ $$# -ge 3 ]; then d=$$(readlink -f -- "$$3"); shift 3; set -- -d "$$d" -Q "$$@"; fi\nPYTHONPATH=%s/vendor exec %s -s %s/smtpfwdd.py "$$@"\n' \
	    $(LIBDIR) $(INSTALL_PYTHON) $(LIBDIR) > $(DESTDIR)$(SBINDIR)/smtpq
	chmod 755 $(DESTDIR)$(SBINDIR)/smtpq
	install -m 644 man/smtpd.8 man/smtpfwdd.8 man/smtpq.8 man/checkrules.8 \
	    $(DESTDIR)$(MANDIR)/man8/
	install -m 644 man/smtpd_check_rules.5 $(DESTDIR)$(MANDIR)/man5/
	for f in $(EXAMPLES); do \
	    d=$(DESTDIR)$(DOCDIR)/$${f#etc/}; install -d -m 755 $$(dirname $$d); \
	    sed -e 's|@SBINDIR@|$(SBINDIR)|g' -e 's|@SPOOLDIR@|$(SPOOLDIR)|g' \
	        -e 's|@PYTHON@|$(INSTALL_PYTHON)|g' $$f > $$d; \
	    if [ -x $$f ]; then chmod 755 $$d; else chmod 644 $$d; fi; \
	done
	@# The operator's settings: made once, never overwritten (an upgrade keeps them).
	@if [ -n "$(SETTINGS_FILE)" ]; then \
	    if [ -e $(DESTDIR)$(SETTINGS_FILE) ] || [ -L $(DESTDIR)$(SETTINGS_FILE) ]; then \
	        echo "$(SETTINGS_FILE): kept as it is (smtpd -n shows what it sets)"; \
	    else \
	        install -d -m 755 $$(dirname $(DESTDIR)$(SETTINGS_FILE)); \
	        install -m 644 etc/smtpd.conf $(DESTDIR)$(SETTINGS_FILE); \
	        echo "$(SETTINGS_FILE): installed (all commented: the built-in defaults)"; \
	    fi; \
	fi
	install -d -m 700 $(DESTDIR)$(SPOOLDIR)
	@# The smtpd user owns the spool and may have put links in it: root
	@# makes etc/ and dev/ there only where nothing has that name, and never
	@# changes (chmod follows links) what is there already.
	@for d in etc dev; do p=$(DESTDIR)$(SPOOLDIR)/$$d; \
	    if [ -L $$p ] || { [ -e $$p ] && [ ! -d $$p ]; }; then \
	        echo "$$p is not a directory: left alone" >&2; \
	    elif [ ! -e $$p ]; then mkdir -m 755 $$p; fi; \
	done
	@# rsyslog must be restarted to listen on a new socket: said when it is new.
	@if [ -d $(DESTDIR)$(RSYSLOG_DIR) ]; then \
	    sed -e 's|@SPOOLDIR@|$(SPOOLDIR)|g' etc/rsyslog-smtpd.conf > .rsyslog-smtpd.conf; \
	    if cmp -s .rsyslog-smtpd.conf $(DESTDIR)$(RSYSLOG_DIR)/smtpd.conf; then \
	        rm -f .rsyslog-smtpd.conf; \
	    else \
	        install -m 644 .rsyslog-smtpd.conf $(DESTDIR)$(RSYSLOG_DIR)/smtpd.conf; \
	        rm -f .rsyslog-smtpd.conf; \
	        echo "$(RSYSLOG_DIR)/smtpd.conf: new; restart rsyslog once for the jail's log" \
	            "socket (systemctl restart rsyslog, or: service rsyslog restart)"; \
	    fi; \
	fi
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ]; then \
	    getent group $(SMTP_GROUP) >/dev/null || groupadd --system $(SMTP_GROUP); \
	    getent passwd $(SMTP_USER) >/dev/null || useradd --system --gid $(SMTP_GROUP) \
	        --home-dir $(SPOOLDIR) --no-create-home --shell /usr/sbin/nologin $(SMTP_USER); \
	    chown $(SMTP_USER):$(SMTP_GROUP) $(SPOOLDIR); \
	    echo "spool $(SPOOLDIR) owned by $(SMTP_USER):$(SMTP_GROUP)"; \
	fi

uninstall:
	@cp $(DESTDIR)$(LIBDIR)/installed-dirs .installed-dirs 2>/dev/null || : > .installed-dirs
	rm -rf $(DESTDIR)$(LIBDIR)
	rm -f $(DESTDIR)$(RSYSLOG_DIR)/smtpd.conf
	for p in $(PROGRAMS) smtpq; do rm -f $(DESTDIR)$(SBINDIR)/$$p; done
	rm -f $(DESTDIR)$(MANDIR)/man8/smtpd.8 $(DESTDIR)$(MANDIR)/man8/smtpfwdd.8 \
	    $(DESTDIR)$(MANDIR)/man8/smtpq.8 \
	    $(DESTDIR)$(MANDIR)/man8/checkrules.8 $(DESTDIR)$(MANDIR)/man5/smtpd_check_rules.5
	rm -rf $(DESTDIR)$(DOCDIR)
	@# The verification cache is a cache: it goes, with sqlite's side files.
	@# (rm never follows a link, should the jail have put one there.)
	@if [ -n "$(SMTPD_VERIFY_CACHE)" ]; then c=$(DESTDIR)$(SPOOLDIR)$(SMTPD_VERIFY_CACHE); \
	    rm -f "$$c" "$$c-wal" "$$c-shm" "$$c-journal"; fi
	@# Directories install made, deepest first, if nothing else lives there.
	@sort -r .installed-dirs | while read -r d; do \
	    rmdir "$(DESTDIR)$$d" 2>/dev/null && echo "rmdir $(DESTDIR)$$d"; done; \
	    rm -f .installed-dirs
	@echo "left alone: $(SPOOLDIR) (the spool and rules), $(SETTINGS_FILE) and the" \
	    "$(SMTP_USER) account"

# ------------------------------------------------------------ make bench ----

# run.py: ours vs Postfix vs aiosmtpd (bench/results.md); tls.py: STARTTLS
# vs Postfix; scaleout.py: the HAProxy hop; verify.py: verification per
# RCPT; milter.py: a no-op filter and rspamd, vs Postfix's smtpd_milters;
# dnsbl.py: DNS lists, cached and not, vs postscreen; store.py: rates and
# verification through Redis vs local; maxuse.py: one worker's memory over
# 10000 sessions (each writes bench/results-*.md).  profile_session.py
# profiles a session's path in process.  bench/ab.py compares two trees.
.PHONY: bench
bench: venv buildconf.py
	$(VPY) bench/run.py
	$(VPY) bench/tls.py
	$(VPY) bench/scaleout.py
	$(VPY) bench/verify.py
	$(VPY) bench/milter.py
	$(VPY) bench/dnsbl.py
	$(VPY) bench/store.py
	$(VPY) bench/maxuse.py

# ------------------------------------------------------------- make fuzz ----

# Inputs per atheris harness (fuzz/); not part of make test.  Crashing
# inputs are written to fuzz/artifacts/ (git-ignored).
FUZZ_RUNS = 100000
FUZZ_VENV = fuzz/.venv

.PHONY: fuzz
fuzz: buildconf.py
	test -x $(FUZZ_VENV)/bin/python || $(PYTHON) -m venv $(FUZZ_VENV)
	$(FUZZ_VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt atheris==2.3.0
	mkdir -p fuzz/artifacts
	for h in fuzz/fuzz_*.py; do \
	    echo "== $$h"; mkdir -p fuzz/corpus-$$(basename $$h .py); \
	    $(FUZZ_VENV)/bin/python $$h -runs=$(FUZZ_RUNS) -print_final_stats=1 \
	        -rss_limit_mb=2048 -artifact_prefix=fuzz/artifacts/ \
	        fuzz/corpus-$$(basename $$h .py) || exit 1; \
	done
