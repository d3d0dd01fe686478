// The current npm client, `@x402/fetch` 2.x with `@x402/evm` (x402 v2): reads
// PAYMENT-REQUIRED, signs with PAYMENT-SIGNATURE, retries, checks PAYMENT-RESPONSE.
// Usage: node x402-fetch-v2.mjs URL   (key in X402_PRIVATE_KEY)
// Prints one JSON line: the final status, its body and the decoded PAYMENT-RESPONSE.
import { decodePaymentResponseHeader, wrapFetchWithPaymentFromConfig } from "@x402/fetch";
import { ExactEvmScheme } from "@x402/evm/exact/client";
import { privateKeyToAccount } from "viem/accounts";

const url = process.argv[2];
const account = privateKeyToAccount(process.env.X402_PRIVATE_KEY);
const pay = wrapFetchWithPaymentFromConfig(fetch, {
  schemes: [{ network: "eip155:84532", client: new ExactEvmScheme(account) }],
});
const res = await pay(url, { method: "GET" });
const header = res.headers.get("payment-response");
console.log(
  JSON.stringify({
    client: "@x402/fetch@2.27.0",
    status: res.status,
    body: await res.text(),
    settlement: header ? decodePaymentResponseHeader(header) : null,
  }),
);
