// The legacy npm client, `x402-fetch` 1.x (x402 v1): reads the 402's JSON body,
// validates every requirement with its zod schema, signs with X-PAYMENT, retries.
// Usage: node x402-fetch-v1.mjs URL   (key in X402_PRIVATE_KEY)
// Prints one JSON line: the final status, its body and the decoded X-PAYMENT-RESPONSE.
import { createSigner, decodeXPaymentResponse, wrapFetchWithPayment } from "x402-fetch";

const url = process.argv[2];
const signer = await createSigner("base-sepolia", process.env.X402_PRIVATE_KEY);
const pay = wrapFetchWithPayment(fetch, signer);
const res = await pay(url, { method: "GET" });
const header = res.headers.get("x-payment-response");
console.log(
  JSON.stringify({
    client: "x402-fetch@1.2.0",
    status: res.status,
    body: await res.text(),
    settlement: header ? decodeXPaymentResponse(header) : null,
  }),
);
