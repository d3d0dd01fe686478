//! A verified x402 payment waiting for the upstream's answer, and its settlement
//! (`/settle`) and receipt headers (`PAYMENT-RESPONSE` v2, `X-PAYMENT-RESPONSE` v1).

use super::*;

/// The version's settlement header (`X-PAYMENT-RESPONSE` for v1, `PAYMENT-RESPONSE`
/// for v2): base64 of the compact SettleResponse JSON.
pub(super) fn settlement_header(version: u8, res: &SettleResponse) -> Option<(HeaderName, HeaderValue)> {
    let name = if version == 1 { X_PAYMENT_RESPONSE } else { PAYMENT_RESPONSE };
    let json = serde_json::to_vec(res).ok()?;
    Some((name, HeaderValue::from_str(&STANDARD.encode(json)).ok()?))
}

/// What a verified payment needs to be settled and recorded.
pub(super) struct Pending {
    pub(super) version: u8,
    pub(super) payload: Value,
    pub(super) requirements: Requirements,
    pub(super) payer: String,
    pub(super) amount: u64,
    pub(super) asset: String,
    pub(super) network: String,
    pub(super) route: String,
    pub(super) request_id: String,
}

pub(super) struct X402Grant {
    pub(super) shared: Arc<X402Core>,
    pub(super) pending: Pending,
    /// Settled before the upstream (`settle = "before_upstream"`).
    pub(super) settled: Option<SettleResponse>,
}

impl X402Grant {
    fn receipt(&self, res: &SettleResponse) -> Receipt {
        let p = &self.pending;
        let header = SettleResponse {
            success: true,
            error_reason: None,
            payer: Some(res.payer.clone().unwrap_or_else(|| p.payer.clone())),
            transaction: res.transaction.clone(),
            network: if res.network.is_empty() { p.network.clone() } else { res.network.clone() },
        };
        let mut headers = Vec::with_capacity(2);
        headers.extend(settlement_header(p.version, &header));
        headers.push((
            HeaderName::from_static("x-tollgate-charged"),
            Money { amount: Micros(p.amount), currency: self.shared.symbol.clone() }.header_value(),
        ));
        Receipt { headers, revenue: p.amount }
    }
}

#[async_trait]
impl Grant for X402Grant {
    fn rail(&self) -> &'static str {
        NAME
    }

    fn payer(&self) -> &str {
        &self.pending.payer
    }

    fn paid(&self) -> String {
        Money { amount: Micros(self.pending.amount), currency: self.shared.symbol.clone() }.to_string()
    }

    /// Settles whenever it is called. Whether a response is paid for is one rule for
    /// every rail, applied by the payment layer from the route's `charge_on`
    /// (`"success"`: the upstream answered below 500; `"always"`), so the reference
    /// servers' own rule (settle below 400) does not apply: a 404 or 422 the upstream
    /// answered is paid for, as with credits.
    /// x402 `exact` settles the amount that was signed, whatever `amount` says: the
    /// config keeps x402 off metered routes, so `amount` is the route's price, and a
    /// payment signed for more than the price is settled (and charged) as signed.
    async fn commit(self: Box<Self>, _amount: Micros, _metered: Option<&Metered>) -> Result<Receipt, Denial> {
        if let Some(res) = &self.settled {
            return Ok(self.receipt(res));
        }
        let res = self.shared.settle(&self.pending).await?;
        Ok(self.receipt(&res))
    }

    async fn release(self: Box<Self>) {
        // Nothing to give back: an unsettled authorization simply expires, and its
        // nonce stays reserved until `validBefore` so it can never be used twice.
        if self.settled.is_some() {
            tracing::warn!(
                request_id = %self.pending.request_id,
                payer = %self.pending.payer,
                "x402 payment settled before an upstream that failed; it cannot be refunded automatically"
            );
        }
    }
}
