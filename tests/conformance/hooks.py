"""Schemathesis hooks for cardgate: every body that carries an e-card token gets a real one.

Random text never passes the token's signature check, so without these the generated
requests stop at the first step of the flow. `CARDGATE_TOKENS` names a file of tokens, one a
line, minted by `run` for a handful of cards; each is used once (the gateway takes a token
once), and when they run out the generated text is sent as it is.
"""

import os
import threading

import schemathesis

_lock = threading.Lock()
with open(os.environ["CARDGATE_TOKENS"], encoding="ascii") as f:
    _tokens = iter(f.read().splitlines())


@schemathesis.hook
def map_body(ctx, body):
    if isinstance(body, dict) and "token" in body:
        with _lock:
            token = next(_tokens, None)
        if token:
            body["token"] = token
    return body
