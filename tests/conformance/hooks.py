"""Schemathesis hooks for cardgate: every body that carries an e-card token gets a real one.

Random text never passes the token's signature check, so without these the generated
requests stop at the first step of the flow. `CARDGATE_TOKENS` names a file of tokens, one a
line, minted by `run` for a handful of cards; each is used once (the gateway takes a token
once), and when they run out the generated text is sent as it is. A generated token that
breaks the document's pattern is a negative case (the gateway must refuse it) and is sent as
it is too.
"""

import json
import os
import re
import threading

import schemathesis

# The document's pattern of a token.
with open(os.path.join(os.path.dirname(__file__), "../../docs/openapi.json"), encoding="utf-8") as f:
    _TOKEN = re.compile(json.load(f)["components"]["schemas"]["Bill"]["properties"]["token"]["pattern"])
_lock = threading.Lock()
with open(os.environ["CARDGATE_TOKENS"], encoding="ascii") as f:
    _tokens = iter(f.read().splitlines())


@schemathesis.hook
def map_body(ctx, body):
    token = body.get("token") if isinstance(body, dict) else None
    if isinstance(token, str) and _TOKEN.search(token):
        with _lock:
            token = next(_tokens, None)
        if token:
            body["token"] = token
    return body
