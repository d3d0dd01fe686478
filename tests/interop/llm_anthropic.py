"""The official Anthropic Python SDK, unmodified, through tollgate (tests/it/llm_sdk.rs).

Usage: python llm_anthropic.py BASE_URL KEY   (BASE_URL is tollgate's, KEY a tollgate key,
which anthropic 2.x sends as `Authorization: Bearer`). Runs messages.create, the
messages.stream() helper, messages.create(stream=True), and messages.create with the key
sent as `X-Api-Key` instead, each with a user message naming its case ("case: ...") so
the fake upstream knows what to answer. Prints one JSON line with what the SDK saw.
"""

import json
import sys

import anthropic

MODEL = "claude-sonnet-4-5"


def main(base, key):
    client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=30)
    out = {"client": f"anthropic=={anthropic.__version__}"}

    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=200, messages=[{"role": "user", "content": "case: nonstream"}]
    )
    message = raw.parse()
    out["nonstream"] = {
        "type": message.type,
        "text": "".join(b.text for b in message.content if b.type == "text"),
        "stop_reason": message.stop_reason,
        "usage": message.usage.model_dump(exclude_none=True),
        "charged": raw.headers.get("x-tollgate-charged"),
        "balance": raw.headers.get("x-tollgate-balance"),
    }

    with client.messages.stream(
        model=MODEL, max_tokens=200, messages=[{"role": "user", "content": "case: stream-helper"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        hold = stream.response.headers.get("x-tollgate-hold")
    out["stream_helper"] = {
        "text": text,
        "final_text": "".join(b.text for b in final.content if b.type == "text"),
        "stop_reason": final.stop_reason,
        "usage": final.usage.model_dump(exclude_none=True),
        "hold": hold,
    }

    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=200, messages=[{"role": "user", "content": "case: stream-raw"}], stream=True
    )
    events, text, usage = [], "", {}
    for event in raw.parse():
        events.append(event.type)
        if event.type == "message_start":
            usage.update(event.message.usage.model_dump(exclude_none=True))
        elif event.type == "content_block_delta" and event.delta.type == "text_delta":
            text += event.delta.text
        elif event.type == "message_delta":
            usage.update(event.usage.model_dump(exclude_none=True))
    out["stream_raw"] = {"text": text, "events": events, "usage": usage, "hold": raw.headers.get("x-tollgate-hold")}

    # The same key as x-api-key (how older SDKs and Anthropic's curl examples send it).
    legacy = anthropic.Anthropic(base_url=base, api_key=None, default_headers={"X-Api-Key": key}, max_retries=0, timeout=30)
    raw = legacy.messages.with_raw_response.create(
        model=MODEL, max_tokens=200, messages=[{"role": "user", "content": "case: x-api-key"}]
    )
    message = raw.parse()
    out["x_api_key"] = {
        "text": "".join(b.text for b in message.content if b.type == "text"),
        "usage": message.usage.model_dump(exclude_none=True),
        "charged": raw.headers.get("x-tollgate-charged"),
    }
    print(json.dumps(out))


main(sys.argv[1], sys.argv[2])
