"""smtpgate - the package behind smtpd, smtpfwdd and checkrules

The three programs at the top of the tree are their options and one call
into this package.  The map: which process runs what, and with which
privileges.  Nothing read from the network, and nothing the jail wrote, is
read with root's privileges.

    process              privileges              modules
    -------------------  ----------------------  ---------------------------------
    smtpd -D master      root, never reads the   smtpd.py, gate/start, gate/config,
                         network nor the jail    gate/engine (pre_jail_init),
                                                 gate/master, gate/admission (maps
                                                 the tables), gate/dnsbl (maps its
                                                 cache), gate/tls, counters (folds
                                                 the workers' rows), shm,
                                                 gate/rulewatch (its end),
                                                 rules/ruleset (compiles the text)
    smtpd front stage    jailed, as a worker     gate/screen, gate/handoff (sends),
                                                 gate/proxy, gate/admission (rates,
                                                 the allow-list, stress), gate/dnsbl
                                                 (asks), gate/chat
    smtpd worker         jailed: chroot -c,      gate/worker, gate/handoff
                         -u/-g, seccomp          (receives), gate/client, gate/peer,
                         (gate/engine            gate/connection, gate/session,
                         enter_jail)             gate/chat, gate/channel,
                                                 gate/judge, gate/admission
                                                 (claims), gate/verify,
                                                 gate/dnsbl, gate/filtering,
                                                 gate/milter, gate/milterwire,
                                                 gate/rewrite, rules/ruleset,
                                                 rules/tokens, rules/dnslookup,
                                                 rules/ident, spool (drafts),
                                                 counters (its row), deadline
    smtpd rules watcher  jailed, as a worker     gate/rulewatch (watch),
                                                 rules/ruleset (read_text)
    smtpd metrics        jailed, as a worker     metrics (Server: reads the
                                                 counters and the scoreboard)
    smtpd under inetd    root until the jail,    smtpd.py, gate/start, gate/chat
                         then as a worker        (its greeting), then as a worker
    smtpfwdd             -u/-g after             smtpfwdd.py, forwarder/config,
                         forwarder/start's       forwarder/start,
                         enter_jail              forwarder/daemon, spooldir
    smtpfwdd metrics     -u/-g, seccomp          metrics (Server: reads the
                                                 counters)
    delivery process     -u/-g                   forwarder/daemon
                                                 (delivery_process),
                                                 forwarder/delivery,
                                                 forwarder/bounce, spool
    the mail agent       -u/-g, exec'd: not      (sendmail: its own)
                         ours; no worker can
                         reach it (sandbox)
    smtpq (smtpfwdd -Q)  root -> the spool's     smtpfwdd.py, forwarder/queuetool,
                         owner before reading    spool, spooldir
    checkrules           any; root -> the jail's checkrules.py, gate/tester,
                         owner for its rules     gate/judge, rules/*, gate/verify
                                                 (-V), gate/dnsbl (-a)

What every process shares sits at this package's root: spool (the only
code that knows the spool file's format) and spooldir (its directory, hostile
input), address (the one address parser),
log, text (the sanitizers), privileges, process, net, libc, shm (memory
the gate's processes share), counters (named, in it), metrics (their
families and the HTTP server), record (the structured lines), deadline,
options (command lines), params (the Makefile's table of constants),
store (what several gates share through Redis: rates and caches; its
secrets read by gate/engine as root, its client used by the workers).
The gate is gate/, the forwarder forwarder/, the rules rules/.
"""
