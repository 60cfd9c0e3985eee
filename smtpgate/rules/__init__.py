"""rules - smtpd_check_rules: the engine smtpd runs at each RCPT

    ruleset     parse the file, evaluate a recipient (the Verdict)
    tokens      the tokens of a rule: patterns, lists, EXCEPT
    dnslookup   every DNS question (dnspython), bounded by the deadline
    ident       RFC 1413, asked once, when a rule needs it
Nothing here imports gate/: the gate (gate/judge.py) and its tester
(gate/tester.py, checkrules(8)) use the rules, never the other way.
"""
