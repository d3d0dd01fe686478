"""The official Python client, `x402` 2.x on httpx (x402 v2): reads PAYMENT-REQUIRED,
signs with PAYMENT-SIGNATURE, retries.

Usage: python x402_httpx.py URL   (key in X402_PRIVATE_KEY)
Prints one JSON line: the final status, its body and the decoded PAYMENT-RESPONSE.
"""

import asyncio
import json
import os
import sys

from eth_account import Account
from x402 import x402Client
from x402.http import decode_payment_response_header
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.exact.register import register_exact_evm_client


async def main(url: str) -> None:
    client = x402Client()
    register_exact_evm_client(client, Account.from_key(os.environ["X402_PRIVATE_KEY"]))
    async with x402HttpxClient(client, timeout=30) as http:
        res = await http.get(url)
        await res.aread()
    header = res.headers.get("payment-response")
    settlement = decode_payment_response_header(header).model_dump(by_alias=True, exclude_none=True) if header else None
    print(json.dumps({"client": "x402==2.25.0", "status": res.status_code, "body": res.text, "settlement": settlement}))


asyncio.run(main(sys.argv[1]))
