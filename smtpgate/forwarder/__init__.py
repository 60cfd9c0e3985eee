"""forwarder - smtpfwdd, which hands spooled messages to the MTA, and smtpq

    start       from smtpfwdd.py's options to the scanning loop: the pid
                file as root (pre_jail_init), the drop (enter_jail),
                the spool lock, the detach
    config      ForwarderConfig: options and constants, built once, frozen
    daemon      the scanning loop and its delivery processes
    delivery    one spool file: the agent's calls, their outcome
    bounce      delivery status notifications (RFC 3464)
    queuetool   smtpq (smtpfwdd -Q): list, show, requeue, delete, flush
"""
