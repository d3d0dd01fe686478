//! What `tollgate doctor` asks a facilitator: does its `/supported` list each
//! configured (scheme, network), for x402 v1 and v2?

use super::*;

/// Whether a facilitator lists one configured (scheme, network).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindSupport {
    pub scheme: &'static str,
    /// CAIP-2.
    pub network: String,
    pub v1_network: Option<&'static str>,
    /// Listed for x402 v1 (under either network spelling).
    pub v1: bool,
    /// Listed for x402 v2.
    pub v2: bool,
}

impl KindSupport {
    pub fn supported(&self) -> bool {
        self.v1 || self.v2
    }
}

/// Asks the facilitator's `GET /supported` whether it serves every configured offer
/// (for `tollgate doctor`).
pub async fn check_supported(cfg: &X402Config) -> Result<Vec<KindSupport>, FacilitatorError> {
    let client = FacilitatorClient::new(cfg).map_err(FacilitatorError::Unreachable)?;
    let supported = client.supported().await?;
    let mut networks: Vec<(&str, u64)> = Vec::new();
    for o in cfg.all_offers() {
        if !networks.iter().any(|(n, _)| *n == o.network) {
            networks.push((&o.network, o.chain_id));
        }
    }
    Ok(networks
        .into_iter()
        .map(|(network, chain_id)| {
            let v1_name = v1_network(chain_id);
            let listed = |version: u8| {
                supported.kinds.iter().any(|k| {
                    k.x402_version == version
                        && k.scheme == SCHEME
                        && (k.network == network || Some(k.network.as_str()) == v1_name)
                })
            };
            KindSupport {
                scheme: SCHEME,
                network: network.to_owned(),
                v1_network: v1_name,
                v1: listed(1),
                v2: listed(2),
            }
        })
        .collect())
}
