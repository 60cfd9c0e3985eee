# Makefile for the Python Obtuse smtpd/smtpfwdd.
#
# Every tunable of the programs lives here.  `make` writes buildconf.py from
# these values; override any of them on the command line, e.g.
#     make NOTO_DELAY=5
# and the next plain `make` writes the defaults back.

# ---------------------------------------------------------------- paths ----

# The smtpd home: smtpd chroots here (-c default).  Real path.
SPOOLDIR = /var/spool/smtpd

# The spool directory relative to the jail (-d default of smtpd); smtpfwdd's
# default spool is SPOOLDIR/SPOOLSUBDIR.
SPOOLSUBDIR = .

# The rules file, a path inside the jail (so normally SPOOLDIR/etc/...).
CHECK_FILE = /etc/smtpd_check_rules

# The mail agent smtpfwdd runs for each spool file (smtpfwdd -s default).
MAIL_AGENT = /usr/sbin/sendmail

# Directory of smtpd.pid for `smtpd -D` (smtpd -i default: PID_DIR/smtpd.pid).
PID_DIR = /var/run

# STARTTLS: the certificate chain and private key (PEM), outside the jail,
# read by root before the chroot (smtpd -C and -K override them).  Missing
# files here mean plaintext only; empty values turn STARTTLS off.
TLS_CERT = /etc/smtpd/cert.pem
TLS_KEY = /etc/smtpd/key.pem

# Installation prefix for `make install`.
PREFIX = /usr/local

# ------------------------------------------------------------- identity ----

# User and group both daemons run as (-u/-g defaults).  Never root.
SMTP_USER = smtpd
SMTP_GROUP = smtpd

# syslog facility of both daemons (a name from syslog.h, without LOG_).
LOG_FACILITY = mail

# The syslog socket.  Jailed processes reach it by the same path inside the
# jail (SPOOLDIR/dev/log), which `make install` asks rsyslog to provide.
LOG_SOCKET = /dev/log

# ------------------------------------------------------- smtpd timings ----

# Seconds a noto_delay / deny_delay rule sleeps before its reply.
NOTO_DELAY = 60
DENY_DELAY = 60

# Seconds smtpd waits for each read from the client before 421.
READ_TIMEOUT = 300

# Seconds a whole SMTP session may last before 421.  Also the age after
# which smtpfwdd removes an unlocked draft left by a killed smtpd.
SESSION_TIMEOUT = 1800

# Seconds an RFC 1413 ident query may take; 0 = never ask.
CHECK_IDENT = 10

# TCP port of the client's ident server.
IDENT_PORT = 113

# Seconds a DNS lookup (PTR, A/AAAA, NS, MX, RBL) may take in all.
DNS_TIMEOUT = 10

# 1 = a recipient that no rule matches is denied; 0 = allowed (original).
CHECK_ADDRESS_DENY_ON_FAILURE = 0

# -------------------------------------------------------- smtpd limits ----

# Most recipients accepted per message; further RCPTs get 452.
MAX_RCPT = 1000

# The largest message smtpd accepts, in bytes (smtpd -s overrides it; 0 = no
# limit): announced in EHLO SIZE, refused at MAIL SIZE= and after DATA with
# 552.  Postfix's message_size_limit; keep it at or a little below your MTA's
# (whose count includes our Received header and its own), or what it refuses
# comes back to the sender as a bounce instead of a 552.
MESSAGE_SIZE_LIMIT = 10240000

# Workers smtpd -D starts ahead of demand.
SMTPD_PREFORK = 4

# Most worker processes (sessions at once) of smtpd -D (-M default).
SMTPD_MAXCHILDREN = 64

# Most concurrent sessions from one client network (see the prefixes
# below); more get 421.
SMTPD_MAX_PER_IP = 10

# ---------------------------------------- smtpd admission (spam engines) ----

# A client is its network: its address cut to these many bits.  One host
# usually owns a whole IPv6 /64.
SMTPD_V4_PREFIX = 32
SMTPD_V6_PREFIX = 64

# Most new sessions per client network in any SMTPD_RATE_WINDOW seconds,
# refused ones included (the window slides in sixteenths); more get
# "421 4.7.0" (logged once per window).  0 = no limit (the default, as
# Postfix's anvil).  SMTPD_RATE_TABLE networks are remembered, in sets of
# 8, the least recently seen of a full set giving way: 96 bytes each,
# fixed at start.
SMTPD_MAX_RATE = 0
SMTPD_RATE_WINDOW = 60
SMTPD_RATE_TABLE = 4096

# Milliseconds smtpd waits before its 220; a client that talks first gets
# "554 5.5.1" and is closed (sendmail's greet_pause, postscreen's pregreet
# test).  0 = no pause.
SMTPD_GREET_PAUSE = 0

# 1 = a client that does not wait for a reply where RFC 2920 says it must
# (text after DATA before our 354, commands after HELO without PIPELINING,
# a whole session before our greeting) gets "554 5.5.0 Error: SMTP protocol
# synchronization" and is closed (Postfix's smtpd_forbid_unauth_pipelining).
# 0 = the original's way: such input is simply read.
SMTPD_FORBID_UNAUTH_PIPELINING = 1

# Errors (refused commands, noto replies, 451s) that end a session with 421.
MAX_ERRORS = 10

# After this many errors in a session, each further error reply waits
# SMTPD_ERROR_SLEEP seconds more than the one before (1, 2, 3... with the
# default), within the session's time; MAX_ERRORS still ends it.
SMTPD_SOFT_ERRORS = 5
SMTPD_ERROR_SLEEP = 1

# Networks (CIDRs, space-separated) exempt from the rate limit, the greeting
# pause and the error delays -- your own relays and monitoring, e.g.
# "192.0.2.0/24 2001:db8::/48".  The concurrency cap still applies.
SMTPD_ADMISSION_EXEMPT =

# ---------------------------------------------- smtpd behind a balancer ----

# Trusted proxies (CIDRs, space-separated; smtpd -X overrides): a connection
# from them must begin with a PROXY header (v1 or v2), whose client address
# then counts for everything.  Empty = off: every client is its socket.
SMTPD_PROXY_FROM =

# Seconds the PROXY header may take to arrive; the greeting waits for it.
SMTPD_PROXY_TIMEOUT = 5

# ------------------------------------------------ recipient verification ----

# The MTA that "verify" rules ask whether a recipient exists (smtpd -V):
# [lmtp:]address:port with an IP address, e.g. 127.0.0.1:10025 (a second
# Postfix smtpd that only answers) or lmtp:127.0.0.1:24.  Empty: a verify
# rule answers 451 (never lets mail through unverified).
SMTPD_VERIFY_BACKEND =

# Seconds each step of a callout may take (within the session's time).
SMTPD_VERIFY_TIMEOUT = 10

# 1 = accept a recipient when the backend cannot be asked (refused, timeout):
# mail keeps flowing while the backend is down, at the price of bounces for
# unknown users meanwhile.  0 = answer 451 (the sender retries; the default).
SMTPD_VERIFY_DEFER_OK = 0

# Most callouts in one session; further unverified recipients get 450, so
# a flood of random names cannot scan the backend.
SMTPD_VERIFY_MAX = 20

# The cache of answers: an sqlite3 file inside the jail, shared by every
# process of the gate; at most SMTPD_VERIFY_CACHE_SIZE addresses; a user
# that exists is remembered SMTPD_VERIFY_POSITIVE_TTL seconds (31 days), one
# that does not SMTPD_VERIFY_NEGATIVE_TTL (3 days), as Postfix's verify(8).
# An empty SMTPD_VERIFY_CACHE, or a TTL of 0, keeps nothing.
SMTPD_VERIFY_CACHE = /verify.db
SMTPD_VERIFY_CACHE_SIZE = 10000
SMTPD_VERIFY_POSITIVE_TTL = 2678400
SMTPD_VERIFY_NEGATIVE_TTL = 259200

# Sessions a worker serves before it exits and is replaced.
SMTPD_MAX_USE = 100

# Seconds a spare worker beyond the needed ones stays idle before it exits.
SMTPD_IDLE_TIME = 10

# Seconds smtpd -D lets running sessions finish after SIGTERM/SIGINT.
SHUTDOWN_TIMEOUT = 30

# Largest rules file smtpd and checkrules read, in bytes; a larger file is
# an error (the old rules stay in smtpd -D).
RULES_MAX_SIZE = 4194304

# ----------------------------------------------------- smtpfwdd tunables ----

# Most delivery children at once (smtpfwdd -M default).
MAXCHILDREN = 10

# Seconds between spool scans (smtpfwdd -P default).
POLL_TIME = 10

# Most argv elements per mail-agent call: options, sender and recipients.
MAXARGS = 100

# Seconds a temporarily failed message waits before the next attempt.
RETRY_DELAY_TIME = 600

# Seconds a message may stay deferred before it is moved to failed/ (5 days).
QUEUE_LIFETIME = 432000

# Seconds one mail-agent call may take before it is killed (then deferred).
AGENT_TIMEOUT = 3600

# Seconds a message may wait in the queue before its sender is told, once,
# that it is delayed (a delivery status notification, Action: delayed).
# 4 hours, as sendmail: a sender behind a down MTA learns it the same day,
# not after QUEUE_LIFETIME.  0 = never (Postfix's default).
DELAY_WARNING_TIME = 14400

# ------------------------------------------------------------ build rules ----

CONSTANTS = SPOOLDIR SPOOLSUBDIR CHECK_FILE MAIL_AGENT PID_DIR TLS_CERT TLS_KEY PREFIX \
	SMTP_USER SMTP_GROUP LOG_FACILITY LOG_SOCKET NOTO_DELAY DENY_DELAY READ_TIMEOUT \
	SESSION_TIMEOUT CHECK_IDENT IDENT_PORT DNS_TIMEOUT \
	CHECK_ADDRESS_DENY_ON_FAILURE MAX_RCPT MESSAGE_SIZE_LIMIT SMTPD_PREFORK SMTPD_MAXCHILDREN \
	SMTPD_MAX_PER_IP SMTPD_MAX_USE SMTPD_IDLE_TIME SHUTDOWN_TIMEOUT RULES_MAX_SIZE \
	SMTPD_V4_PREFIX SMTPD_V6_PREFIX SMTPD_MAX_RATE SMTPD_RATE_WINDOW SMTPD_RATE_TABLE \
	SMTPD_GREET_PAUSE SMTPD_FORBID_UNAUTH_PIPELINING MAX_ERRORS SMTPD_SOFT_ERRORS SMTPD_ERROR_SLEEP SMTPD_ADMISSION_EXEMPT \
	SMTPD_PROXY_FROM SMTPD_PROXY_TIMEOUT SMTPD_VERIFY_BACKEND SMTPD_VERIFY_TIMEOUT \
	SMTPD_VERIFY_DEFER_OK SMTPD_VERIFY_MAX SMTPD_VERIFY_CACHE SMTPD_VERIFY_CACHE_SIZE \
	SMTPD_VERIFY_POSITIVE_TTL SMTPD_VERIFY_NEGATIVE_TTL \
	MAXCHILDREN POLL_TIME MAXARGS \
	RETRY_DELAY_TIME QUEUE_LIFETIME AGENT_TIMEOUT DELAY_WARNING_TIME
export $(CONSTANTS)
export CONSTANTS

PYTHON = python3
VENV = .venv
VPY = $(VENV)/bin/python
PYTEST_ARGS =

.PHONY: all venv test clean FORCE

all: buildconf.py venv

# Written only when its content changes, so an override is always applied
# and a plain `make` afterwards restores the defaults.
buildconf.py: FORCE
	@$(PYTHON) -c 'import os; \
	  out = ["\"\"\"Generated from Makefile; do not edit.\"\"\"", ""]; \
	  v = lambda s: int(s) if s.lstrip("-").isdigit() else s; \
	  out += ["%s = %r" % (n, v(os.environ[n])) for n in os.environ["CONSTANTS"].split()]; \
	  open("buildconf.py.tmp", "w").write("\n".join(out) + "\n")'
	@if cmp -s buildconf.py.tmp buildconf.py; then rm -f buildconf.py.tmp; \
	 else mv buildconf.py.tmp buildconf.py; echo "wrote buildconf.py"; fi

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
# The three programs and the package, as a package (never a wildcard: a
# scratch file must not be installed).
PROGRAMS = smtpd smtpfwdd checkrules
PACKAGE = smtpgate
EXAMPLES = etc/smtpd_check_rules.example etc/antispam_check_rules.example \
	etc/smtpd.service etc/smtpfwdd.service etc/smtpd.socket etc/smtpd@.service \
	etc/init.d/smtpd etc/init.d/smtpfwdd etc/default/smtpd etc/default/smtpfwdd \
	etc/rc.d/smtpd etc/rc.d/smtpfwdd \
	etc/inetd.conf.smtpd etc/xinetd.d/smtpd etc/rsyslog-smtpd.conf etc/syslog-ng-smtpd.conf \
	etc/haproxy.cfg
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
	cd $(PACKAGE) && git ls-files -- '*.py' 2>/dev/null | grep . > ../.package-files \
	    || find . -name '*.py' | sed 's|^\./||' > ../.package-files
	while read -r f; do install -D -m 644 $(PACKAGE)/$$f $(DESTDIR)$(LIBDIR)/$(PACKAGE)/$$f; \
	    done < .package-files; rm -f .package-files
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
	install -m 644 man/smtpd.8 man/smtpfwdd.8 man/checkrules.8 $(DESTDIR)$(MANDIR)/man8/
	install -m 644 man/smtpd_check_rules.5 $(DESTDIR)$(MANDIR)/man5/
	for f in $(EXAMPLES); do \
	    d=$(DESTDIR)$(DOCDIR)/$${f#etc/}; install -d -m 755 $$(dirname $$d); \
	    sed -e 's|@SBINDIR@|$(SBINDIR)|g' -e 's|@SPOOLDIR@|$(SPOOLDIR)|g' \
	        -e 's|@PYTHON@|$(INSTALL_PYTHON)|g' $$f > $$d; \
	    if [ -x $$f ]; then chmod 755 $$d; else chmod 644 $$d; fi; \
	done
	install -d -m 700 $(DESTDIR)$(SPOOLDIR)
	@# The smtpd user owns the spool and may have put links in it: root
	@# makes etc/ and dev/ there only where nothing has that name, and never
	@# changes (chmod follows links) what is there already.
	@for d in etc dev; do p=$(DESTDIR)$(SPOOLDIR)/$$d; \
	    if [ -L $$p ] || { [ -e $$p ] && [ ! -d $$p ]; }; then \
	        echo "$$p is not a directory: left alone" >&2; \
	    elif [ ! -e $$p ]; then mkdir -m 755 $$p; fi; \
	done
	if [ -d $(DESTDIR)$(RSYSLOG_DIR) ]; then \
	    sed -e 's|@SPOOLDIR@|$(SPOOLDIR)|g' etc/rsyslog-smtpd.conf \
	        > $(DESTDIR)$(RSYSLOG_DIR)/smtpd.conf; \
	    chmod 644 $(DESTDIR)$(RSYSLOG_DIR)/smtpd.conf; \
	    echo "$(RSYSLOG_DIR)/smtpd.conf: restart rsyslog for the jail's log socket"; \
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
	@echo "left alone: $(SPOOLDIR) (the spool and rules) and the $(SMTP_USER) account"

# ------------------------------------------------------------ make bench ----

# run.py: ours vs Postfix vs aiosmtpd (bench/results.md); tls.py: STARTTLS
# vs Postfix; scaleout.py: the HAProxy hop; verify.py: verification per
# RCPT (each writes bench/results-*.md).  bench/ab.py compares two trees.
.PHONY: bench
bench: venv buildconf.py
	$(VPY) bench/run.py
	$(VPY) bench/tls.py
	$(VPY) bench/scaleout.py
	$(VPY) bench/verify.py

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
