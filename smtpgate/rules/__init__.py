"""rules - smtpd_check_rules: the engine smtpd runs at each RCPT, its tester

    engine      parse the file, evaluate a recipient (the Verdict)
    tokens      the tokens of a rule: patterns, lists, EXCEPT
    dnslookup   every DNS question (dnspython), bounded by the deadline
    ident       RFC 1413, asked once, when a rule needs it
    tester      checkrules(8): the same engine, from the command line
"""
