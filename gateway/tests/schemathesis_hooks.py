"""Schemathesis hooks for the gateway's OpenAPI document (gateway/tests/openapi.rs).

WHIP/WHEP bodies are text (`application/sdp`, `application/trickle-ice-sdpfrag`), which
schemathesis has no serializer for: send the generated string as UTF-8 text, so those routes
are exercised too (without a join token and a real SDP they end in a refusal, whose status and
shape are still checked).
"""

import schemathesis


@schemathesis.serializer("application/sdp", "application/trickle-ice-sdpfrag")
def sdp_text(ctx, value):
    if isinstance(value, bytes):
        return {"data": value}
    if not isinstance(value, str):
        value = str(value)
    return {"data": value.encode("utf-8", "surrogatepass")}
