"""the rules: engine, tokens, DNS and ident"""
