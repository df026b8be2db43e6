"""Schemathesis hooks for the gateway's OpenAPI document (gateway/tests/openapi.rs).

WHIP/WHEP bodies are text (`application/sdp`, `application/trickle-ice-sdpfrag`), which
schemathesis has no serializer for: send them as its built-in `text/plain` serializer does
(the generated string as UTF-8), so those routes are exercised too.
"""

import schemathesis

schemathesis.serializer.alias(["application/sdp", "application/trickle-ice-sdpfrag"], "text/plain")
