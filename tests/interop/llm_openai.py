"""The official OpenAI Python SDK, unmodified, through tollgate (tests/it/llm_sdk.rs).

Usage: python llm_openai.py BASE_URL KEY   (BASE_URL is tollgate's, KEY a tollgate key)
Runs a non-streamed chat completion, a stream without stream_options and a stream with
include_usage, each with a user message naming its case ("case: ...") so the fake
upstream knows what to answer. Prints one JSON line with what the SDK saw.
"""

import json
import sys

import openai
from openai import OpenAI


def stream_case(client, case, **extra):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"case: {case}"}],
        max_completion_tokens=200,
        stream=True,
        **extra,
    )
    text, chunks, usage_chunks, empty_choices, finish, usage = "", 0, 0, 0, None, None
    for chunk in raw.parse():
        chunks += 1
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage is not None:
            usage_chunks += 1
            usage = chunk.usage.model_dump()
        if not chunk.choices:
            empty_choices += 1
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return {
        "text": text,
        "chunks": chunks,
        "usage_chunks": usage_chunks,
        "empty_choice_chunks": empty_choices,
        "finish_reason": finish,
        "usage": usage,
        "hold": raw.headers.get("x-tollgate-hold"),
    }


def main(base, key):
    client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=30)
    out = {"client": f"openai=={openai.__version__}"}

    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "case: nonstream"}],
        max_tokens=200,
    )
    completion = raw.parse()
    out["nonstream"] = {
        "object": completion.object,
        "text": completion.choices[0].message.content,
        "finish_reason": completion.choices[0].finish_reason,
        "usage": completion.usage.model_dump(),
        "charged": raw.headers.get("x-tollgate-charged"),
        "balance": raw.headers.get("x-tollgate-balance"),
    }
    out["stream"] = stream_case(client, "stream")
    out["stream_usage"] = stream_case(client, "stream-usage", stream_options={"include_usage": True})

    # A model tollgate has no price for: the SDK raises its own error type for the 400.
    try:
        client.chat.completions.create(model="gpt-unpriced", messages=[{"role": "user", "content": "x"}])
        out["unpriced"] = None
    except openai.BadRequestError as e:
        out["unpriced"] = {"status": e.status_code, "reason": (e.body or {}).get("reason")}
    print(json.dumps(out))


main(sys.argv[1], sys.argv[2])
