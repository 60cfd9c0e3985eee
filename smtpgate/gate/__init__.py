"""gate - smtpd, the gate in front of the MTA

    start       from smtpd.py's options to the first session: inetd or -D,
                or -t's checks
    config      GateConfig: options and constants, built once, frozen
    engine      the Engine (rules, resolver, TLS, caches of the moment) and
                the two phases: pre_jail_init (root), enter_jail (jail)
    master      -D: the front stage and the pool of workers; rules,
                certificate, settings reloads
    screen      -D: the front stage (postscreen's job): one event loop holds
                every connection until it earns a worker
    handoff     -D: a client passed from the front stage to a worker
    worker      -D: one jailed worker: take a client, admit, serve
    rulewatch   -D: the jailed process that reads the rules for the master
    admission   may this client have a session?  concurrency, rate, the
                front stage's allow-list and stress word (shared tables the
                master maps before it forks): in one place
    client      who is the client: the socket, or a trusted proxy's header
    proxy       the PROXY protocol (v1, v2), strictly
    peer        Peer: every fact the gate learns of one client, one record
    connection  one connection, one session: identify the client, serve
    session     the SMTP dialogue: verbs, RCPT, DATA, commit
    chat        what smtpd says: every reply (Reply, encode: one writer),
                the verbs' flags, the EHLO keywords
    channel     the client's I/O: lines, replies, DATA; TLS as a change of
                transport under the same line discipline
    judge       may this recipient pass?  rules, then verification
    tls         the certificate and key, loaded by root before the jail
    verify      recipient verification: callouts to the MTA, their cache
    dnsbl       the client's reputation: DNS lists scored before the greeting,
                their shared cache
    filtering   the session's filter stages: macros, answers, the new draft
    milter      the mail filters' client: filters, their verdicts, kept
                connections (Keeper)
    milterwire  the milter protocol (version 6) on the wire
    rewrite     a message as the filters see it, and their changes to it
    sandbox     the seccomp filter every jailed process enters
    tester      checkrules(8): the rules and the judge, from the command line
"""
